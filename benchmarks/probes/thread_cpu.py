"""Probe: CPU time of every server and client thread during one stream (bfloat16 by default):
what runs beside the forward pass and takes cores from it.

    python benchmarks/probes/thread_cpu.py [--dtype bfloat16] [--texts 1000] [--streams 1]

With several streams the client's stream threads end before they can be read: the client's line
is then its whole process (resource.getrusage).
"""
import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_throughput import (BATCH_TOKENS, Server,  # noqa: E402
                                         concurrent_streams, stream_all)
from tests.corpus import stdlib_paragraphs  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid):
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[task.name] = (name, (int(fields[11]) + int(fields[12])) / TICK)
        except FileNotFoundError:
            pass
    return out


parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--texts", type=int, default=1000)
parser.add_argument("--streams", type=int, default=1)
args = parser.parse_args()


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
texts = list(stdlib_paragraphs()[:args.texts])
server = Server(args.dtype, "cpu", BATCH_TOKENS["cpu"])
try:
    stream_all(server.target, texts[:128])
    for _ in range(2):
        before = {"server": threads(server.process.pid), "client": threads(os.getpid())}
        client_before = client_cpu()
        start = time.perf_counter()
        if args.streams == 1:
            stream_all(server.target, texts)
        else:
            concurrent_streams(server.target, texts, args.streams)
        wall = time.perf_counter() - start
        after = {"server": threads(server.process.pid), "client": threads(os.getpid())}
        print(f"\n{args.streams} stream(s) of {len(texts)} texts: {wall:.2f} s wall; the client "
              f"process {client_cpu() - client_before:.2f} s of CPU")
        for side in ("server", "client"):
            used = {f"{name} {tid}": cpu - before[side].get(tid, (name, 0))[1]
                    for tid, (name, cpu) in after[side].items()}
            for name, cpu in sorted(used.items(), key=lambda kv: -kv[1]):
                if cpu > 0:
                    print(f"  {side:6s} thread {name:20s} {cpu:6.2f} s")
finally:
    server.stop()
