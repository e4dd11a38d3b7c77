"""Probe: the host path on two cores as one server process or as two, the stand-in forward.

    python -m benchmarks.probes.processes [--texts 3000] [--rounds 3]

host_path.py finds a served stream of client token ids GIL-bound: on two cores it goes no
faster than on one. Here the same four streams of 3,000 corpus paragraphs (messages of 64, built
beforehand), each on a connection of its own, go to one stand-in server on both cores, then
two each to two stand-in servers, each pinned to a core of its own. (Deployed, two servers can
share one port: gRPC sets SO_REUSEPORT, and the kernel spreads connections over them, unevenly
with few: four went 3 to 1 here.) Printed: texts/s of each, and the two servers' CPU shares.
"""
from __future__ import annotations

import argparse
import os
import statistics

from benchmarks.harness import machine, process_cpu, stdlib_paragraphs
from benchmarks.host_path import StandInServer, streams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args()
    texts = list(stdlib_paragraphs()[:args.texts])
    cores = [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]
    print(f"{machine()}; {len(texts)} paragraphs, {args.streams} streams, medians of "
          f"{args.rounds} rounds, the stand-in forward pass")
    print("| input | one process, two cores | two processes, a core each | ratio | "
          "CPU shares of the two |")
    print("| --- | ---: | ---: | ---: | --- |")
    rates = {}
    one = StandInServer(1024, ",".join(cores))
    try:
        for local in (False, True):
            streams(one.target, texts[:256], 1, local)
            rates["one", local] = statistics.median(
                len(texts) / streams(one.target, texts, args.streams, local, True)
                for _ in range(args.rounds))
    finally:
        one.stop()
    pair = [StandInServer(1024, core) for core in cores]
    targets = [server.target for server in pair]
    shares = {}
    try:
        for local in (False, True):
            streams(targets, texts[:256], 2, local, True)
            before = [process_cpu(server.process.pid) for server in pair]
            rates["two", local] = statistics.median(
                len(texts) / streams(targets, texts, args.streams, local, True)
                for _ in range(args.rounds))
            used = [process_cpu(server.process.pid) - b for server, b in zip(pair, before)]
            shares[local] = " / ".join(f"{u / sum(used):.0%}" for u in used)
    finally:
        for server in pair:
            server.stop()
    for local in (False, True):
        print(f"| {'token ids' if local else 'texts'} | {rates['one', local]:,.0f} | "
              f"{rates['two', local]:,.0f} | {rates['two', local] / rates['one', local]:.2f} | "
              f"{shares[local]} |")


if __name__ == "__main__":
    main()
