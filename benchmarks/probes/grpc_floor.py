"""Probe: what gRPC itself costs the server per text, the floor under benchmarks/host_path.py.

    python -m benchmarks.probes.grpc_floor

A grpc.aio server whose EmbedStream answers each message at once with a canned answer of the
real size (64 x 384 float32), nothing else: no checks, no queue, no pooling. The same stream of
3,000 corpus paragraphs in messages of 64 as host_path.py sends, as texts and as token ids; the
server process's CPU per text and per message, over 20 passes.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np

from benchmarks.harness import free_port, machine, process_cpu, stdlib_paragraphs

PASSES = 20


def serve(port: int) -> None:
    import grpc

    from bertstream.proto import embedder_pb2 as pb
    from bertstream.proto import embedder_pb2_grpc as pb_grpc

    answer = np.zeros((64, 384), dtype=np.float32).tobytes()

    class Canned(pb_grpc.EmbedderServicer):
        async def EmbedStream(self, requests, context):
            async for request in requests:
                yield pb.EmbedResponse(request_id=request.request_id, embeddings=pb.Tensor(
                    dtype=pb.DTYPE_FLOAT32, shape=[64, 384], data=answer))

    async def main():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1)])
        pb_grpc.add_EmbedderServicer_to_server(Canned(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def token_id_messages(messages: list) -> list:
    """The same messages as the packaged model's token ids (what Client(tokenize_locally) sends)."""
    from bertstream.proto import embedder_pb2 as pb
    from bertstream.server.engine import Engine

    tokenizer = Engine(device="cpu")._truncating
    built = []
    for message in messages:
        rows = [encoding.ids for encoding in tokenizer.encode_batch_fast(list(message.texts))]
        built.append(pb.EmbedRequest(
            request_id=message.request_id, token_lengths=[len(row) for row in rows],
            token_ids=np.concatenate([np.array(row, dtype="<i4") for row in rows]).tobytes()))
    return built


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        return serve(int(sys.argv[2]))
    from benchmarks.host_path import stream
    from bertstream.client.core import batches, build_request

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.probes.grpc_floor", "--serve",
                               str(port)])
    try:
        texts = list(stdlib_paragraphs()[:3000])
        messages = [build_request(batch, str(n)) for n, batch in enumerate(batches(texts, 64))]
        target = f"127.0.0.1:{port}"
        time.sleep(2)
        print(f"{machine()}; {len(texts)} paragraphs in {len(messages)} messages, {PASSES} passes")
        for name, sent in (("texts", messages), ("token ids", token_id_messages(messages))):
            stream(target, sent)  # warm-up
            cpu = process_cpu(server.pid)
            for _ in range(PASSES):
                stream(target, sent)
            used = process_cpu(server.pid) - cpu
            print(f"{name}: {used / len(texts) / PASSES * 1e6:.1f} µs server CPU per text, "
                  f"{used / len(messages) / PASSES * 1e6:.0f} µs per message")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
