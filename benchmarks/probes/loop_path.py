"""Probe: the event loop's own CPU per text on the token-id path, without gRPC.

    python -m benchmarks.probes.loop_path

3,000 corpus paragraphs, tokenized beforehand into EmbedRequests of 64 (token ids), go through
EmbedderService._embed on one asyncio loop (decode, checks, job, queue, answer, encode), all
messages at once as a stream's read-ahead sends them, against a Batcher whose forward pass is a
stand-in that computes nothing. Prints the loop thread's CPU per text (median of 7 rounds).
"""
import asyncio
import statistics
import time

import torch

from benchmarks.harness import machine, stdlib_paragraphs
from bertstream.client.core import batches, build_request
from bertstream.proto import embedder_pb2 as pb
from bertstream.server.admission import Admission
from bertstream.server.batcher import Batcher
from bertstream.server.budget import MemoryBudget
from bertstream.server.core import Core
from bertstream.server.engine import Engine
from bertstream.server.jobs import LANES
from bertstream.server.limits import Limits
from bertstream.server.metrics import Metrics
from bertstream.server.service import EmbedderService


def main() -> None:
    engine = Engine(device="cpu", dtype="float32")
    flat = torch.randn(32768 * engine.hidden_size)

    def stand_in(input_ids, attention_mask, **_):
        rows, longest = input_ids.shape
        layer = flat[:rows * longest * engine.hidden_size].view(rows, longest,
                                                                engine.hidden_size)
        return (layer,) * (engine.num_layers + 1)

    engine.run_model = stand_in
    texts = list(stdlib_paragraphs()[:3000])
    messages = []
    for number, batch in enumerate(batches(texts, 64)):
        request = build_request(batch, str(number))
        ids = engine.tokenize(list(batch)).ids
        del request.texts[:]
        request.token_ids = ids.flat.astype("<i4").tobytes()
        request.token_lengths.extend(ids.lengths.tolist())
        messages.append(request.SerializeToString())

    async def run() -> list[float]:
        limits = Limits(max_batch_tokens=32768)
        admissions = {lane: Admission(limits.max_queue_texts, asyncio.get_running_loop())
                      for lane in LANES}
        batcher = Batcher([engine], limits.max_batch_tokens, Metrics(),
                          on_leave=lambda lane, n: admissions[lane].release(n))
        service = EmbedderService(Core([engine], batcher, limits, admissions), MemoryBudget(
            limits.max_held_bytes, limits.max_connection_held_bytes, limits.stall_timeout_s))

        async def one_round():
            caller = object()

            async def one(data):
                answer = await service._embed("EmbedStream", pb.EmbedRequest.FromString(data),
                                              caller)
                return answer.SerializeToString()

            await asyncio.gather(*[one(data) for data in messages])

        await one_round()
        seconds = []
        for _ in range(7):
            started = time.thread_time()
            await one_round()
            seconds.append(time.thread_time() - started)
        batcher.close()
        return seconds

    seconds = asyncio.run(run())
    print(machine())
    print(f"event loop, token ids, no gRPC: median {statistics.median(seconds) / 3000 * 1e6:.1f} "
          f"µs a text, least {min(seconds) / 3000 * 1e6:.1f} (7 rounds of 3,000 texts)")


if __name__ == "__main__":
    main()
