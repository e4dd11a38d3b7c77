"""The host path alone: the server with a forward pass that costs nothing, in one run.

    python -m benchmarks.host_path [--texts 3000] [--rounds 3] [--batch-tokens N] [--gpu]

On a GPU the forward pass is cheap and what surrounds it sets the pace: decoding, tokenizing,
queueing, padding, pooling, packing, encoding, gRPC. Here the server runs as `bertstream serve`
does, but in a process whose Engine.run_model hands back hidden states of the right shape without
computing them (a stand-in in this file, not a server flag), so everything around the model runs
as it does in production. Printed, for one stream and for four, server-tokenized and with
client-side token ids (Client(tokenize_locally=True)):
- texts/s, and the server process's CPU per text, beside the tokenizer's own CPU per text on the
  same texts (encode_batch_fast in messages of 64, the server's tokenizer);
- the CPU per text of each stage, by the thread that runs it: the event loop (gRPC handlers,
  request and response conversion), the tokenizer threads, the forward workers (padding, the
  stand-in, pooling, packing), gRPC core's threads, the rest;
- served texts/s with the server on one core and on two (taskset), same texts.
With --gpu, batches are cut as on a GPU: its budget (32,768 tokens) and its free padding
(limits.py), so a stream's message is about one pass, not 3.7.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks.harness import free_port, machine, stdlib_paragraphs, thread_cpu
from bertstream.server.limits import BATCH_TOKENS_BY_DEVICE

# Stages by the OS name of the thread that runs them (server/threads.py names the server's own;
# the event loop is the main thread, named after the executable).
STAGES = [("event loop", ("python",)), ("tokenizer threads", ("bertstream-tok",)),
          ("forward workers", ("bertstream-forw", "bertstream-feed"))]


def serve(port: int, batch_tokens: int, gpu: bool) -> None:
    """The stand-in server: `bertstream serve`, with a forward pass that computes nothing; with
    gpu, cutting batches as on a GPU (its free padding; the caller gives its budget)."""
    import torch

    from bertstream.server import cli, engine, limits

    if gpu:
        limits.FREE_PADDING_FLOPS_BY_DEVICE["cpu"] = limits.FREE_PADDING_FLOPS_BY_DEVICE["cuda"]

    buffers: dict = {}

    def stand_in(self, input_ids, attention_mask, **_):
        rows, longest = input_ids.shape
        size = rows * longest * self.hidden_size
        flat = buffers.get("flat")
        if flat is None or flat.numel() < size:  # random once: pooling sees real numbers
            flat = buffers["flat"] = torch.randn(size, dtype=torch.float32)
        layer = flat[:size].view(rows, longest, self.hidden_size)
        return (layer,) * (self.num_layers + 1)

    engine.Engine.run_model = stand_in
    sys.exit(cli.main(["serve", "--port", str(port), "--dtype", "float32", "--device", "cpu",
                       "--max-batch-tokens", str(batch_tokens), "--log-level", "WARNING"]))


class StandInServer:
    def __init__(self, batch_tokens: int, cores: str | None = None, gpu: bool = False):
        self.port = free_port()
        pin = ["taskset", "-c", cores] if cores else []
        self.process = subprocess.Popen(
            [*pin, sys.executable, "-m", "benchmarks.host_path", "--serve", str(self.port),
             "--batch-tokens", str(batch_tokens), *(["--gpu"] if gpu else [])],
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.target = f"127.0.0.1:{self.port}"
        from bertstream.client import Client

        deadline = time.time() + 180
        while True:
            try:
                with Client(self.target, timeout=5) as client:
                    client.embed(["warm-up"])
                return
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def requests(target: str, texts, local: bool) -> list:
    """The stream's messages of 64 texts, built (and with local, tokenized) before the clock
    starts, so that what is timed is the server, not this client."""
    from bertstream.client import Client
    from bertstream.client.core import batches, build_request

    built = [build_request(batch, str(n)) for n, batch in enumerate(batches(texts, 64))]
    if local:
        with Client(target, timeout=60, tokenize_locally=True) as client:
            built = [client._prepared(request) for request in built]
    return built


def stream(target: str, messages: list) -> None:
    """One EmbedStream of the messages; every answer read (and checked for an error)."""
    import grpc

    from bertstream.proto import embedder_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        for response in pb_grpc.EmbedderStub(channel).EmbedStream(iter(messages), timeout=600):
            if response.HasField("error"):
                raise RuntimeError(response.error.message)


def streams(target: str, texts, count: int, local: bool) -> None:
    import threading

    parts = [requests(target, texts[i::count], local) for i in range(count)]
    threads = [threading.Thread(target=stream, args=(target, part)) for part in parts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def stage_of(name: str) -> str:
    for stage, prefixes in STAGES:
        if name.startswith(prefixes):
            return stage
    return "other threads"  # gRPC core's pollers and executors, the tokenizers' own pool


def measure(server: StandInServer, texts, count: int, local: bool) -> dict:
    """One run: wall seconds, server CPU seconds, CPU seconds per stage (the server's threads
    live as long as it does, so their sum is the process's CPU, to the nanosecond)."""
    pid = server.process.pid
    before = thread_cpu(pid)
    wall = streams(server.target, texts, count, local)
    after = thread_cpu(pid)
    stages: dict[str, float] = {}
    for tid, (name, used) in after.items():
        stage = stage_of(name)
        stages[stage] = stages.get(stage, 0.0) + used - before.get(tid, (name, 0.0))[1]
    return {"wall": wall, "cpu": sum(stages.values()), "stages": stages}


def tokenizer_cpu(target: str, texts, rounds: int) -> float:
    """CPU seconds of the server's own tokenizer on the texts, in messages of 64 (best round)."""
    import grpc
    from tokenizers import Tokenizer

    from bertstream.proto import embedder_pb2 as pb
    from bertstream.proto import embedder_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        answer = pb_grpc.EmbedderStub(channel).GetTokenizer(pb.TokenizerRequest())
    tokenizer = Tokenizer.from_str(answer.tokenizer_json)
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for first in range(0, len(texts), 64):
            tokenizer.encode_batch_fast(texts[first:first + 64])
        best = min(best, time.process_time() - started)
    return best


def median_run(server, texts, count, local, rounds) -> dict:
    runs = [measure(server, texts, count, local) for _ in range(rounds)]
    middle = sorted(runs, key=lambda run: run["cpu"])[len(runs) // 2]
    return {**middle, "rate": len(texts) / statistics.median(run["wall"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="default: the device's (1024 for the CPU, 32768 with --gpu)")
    parser.add_argument("--gpu", action="store_true",
                        help="cut batches as on a GPU: its budget and its free padding")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    args.batch_tokens = args.batch_tokens or BATCH_TOKENS_BY_DEVICE[device]
    if args.serve:
        return serve(args.serve, args.batch_tokens, args.gpu)
    texts = list(stdlib_paragraphs()[:args.texts])
    print(f"{machine()}; {len(texts)} corpus paragraphs, messages of 64, batch budget "
          f"{args.batch_tokens} tokens, batches cut as on the {device}, forward pass: a stand-in "
          f"that computes nothing; medians of {args.rounds} rounds")
    server = StandInServer(args.batch_tokens, gpu=args.gpu)
    try:
        streams(server.target, texts[:256], 1, False)
        streams(server.target, texts[:256], 1, True)
        tokenizing = tokenizer_cpu(server.target, texts, args.rounds) / len(texts) * 1e6
        print(f"\nthe tokenizer alone (encode_batch_fast, this process): {tokenizing:.1f} µs "
              f"CPU per text\n")
        print("| input | streams | texts/s | server CPU per text | x the tokenizer | "
              + " | ".join(stage for stage, _ in STAGES) + " | other threads |")
        print("| --- | ---: | ---: | ---: | ---: |" + " ---: |" * (len(STAGES) + 1))
        for local in (False, True):
            for count in (1, 4):
                run = median_run(server, texts, count, local, args.rounds)
                per_text = run["cpu"] / len(texts) * 1e6
                stages = [run["stages"].get(stage, 0.0) / len(texts) * 1e6
                          for stage in [s for s, _ in STAGES] + ["other threads"]]
                print(f"| {'token ids' if local else 'texts'} | {count} | {run['rate']:,.0f} | "
                      f"{per_text:.1f} µs | {per_text / tokenizing:.2f} | "
                      + " | ".join(f"{value:.1f} µs" for value in stages) + " |")
    finally:
        server.stop()
    print("\nserved texts/s, the server pinned to one core and to two (taskset); the client "
          "(messages built beforehand) runs beside it, unpinned")
    print("| input | streams | one core | two cores | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    cores = [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]
    rates = {}
    for pinned in (cores[0], ",".join(cores)):
        server = StandInServer(args.batch_tokens, pinned, args.gpu)
        try:
            streams(server.target, texts[:256], 1, False)
            for local in (False, True):
                for count in (1, 4):
                    rates[pinned, local, count] = median_run(server, texts, count, local,
                                                             args.rounds)["rate"]
        finally:
            server.stop()
    for local in (False, True):
        for count in (1, 4):
            one, two = rates[cores[0], local, count], rates[",".join(cores), local, count]
            print(f"| {'token ids' if local else 'texts'} | {count} | {one:,.0f} | {two:,.0f} | "
                  f"{two / one:.2f} |")


if __name__ == "__main__":
    main()
