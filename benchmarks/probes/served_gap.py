"""Probe: where a served stream loses time against the in-process loop (forward time, batches,
padded tokens), from the server's Prometheus metrics and the same counts taken in-process.

    python benchmarks/probes/served_gap.py [--dtype bfloat16] [--texts 1000] [--streams 1]

With several forward workers the server's forward seconds add up the workers' overlapping passes.
"""
import argparse
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_throughput import (BATCH_TOKENS, InProcess, Server,  # noqa: E402
                                         concurrent_streams, stream_all)
from tests.conftest import free_port  # noqa: E402
from tests.corpus import stdlib_paragraphs  # noqa: E402

from bertstream import ext  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--texts", type=int, default=1000)
parser.add_argument("--streams", type=int, default=1, help="the served texts split over this "
                    "many concurrent streams")
args = parser.parse_args()
texts = list(stdlib_paragraphs()[:args.texts])
torch.set_num_threads(ext.default_threads())
budget = BATCH_TOKENS["cpu"]


def scrape(port):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    def value(name):
        return float(re.search(rf"^{name} (\S+)$", body, re.M).group(1))
    return {"forward_s": value("bertstream_forward_seconds_sum"),
            "batches": value("bertstream_forward_seconds_count"),
            "padded": value("bertstream_batch_tokens_sum")}


class Counting(InProcess):
    def embed(self, texts):
        self.stats = {"forward_s": 0.0, "batches": 0, "padded": 0}
        for batch in self.batches(texts):
            start = time.perf_counter()
            padded = self.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**padded)[0]
                mask = padded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                (hidden * mask).sum(1) / mask.sum(1)
            self.stats["forward_s"] += time.perf_counter() - start
            self.stats["batches"] += 1
            self.stats["padded"] += padded["input_ids"].numel()


metrics_port = free_port()
local = Counting(args.dtype, "cpu", budget)
local.embed(texts[:64])
server = Server(args.dtype, "cpu", budget, flags=["--metrics-port", str(metrics_port)])
try:
    stream_all(server.target, texts[:128])
    rows = []
    for _ in range(3):
        start = time.perf_counter()
        local.embed(texts)
        local_wall = time.perf_counter() - start
        before = scrape(metrics_port)
        start = time.perf_counter()
        if args.streams == 1:
            stream_all(server.target, texts)
        else:
            concurrent_streams(server.target, texts, args.streams)
        served_wall = time.perf_counter() - start
        after = scrape(metrics_port)
        served = {k: after[k] - before[k] for k in after}
        rows.append((local_wall, served_wall, local.stats, served))
        print(f"wall {local_wall:.2f} vs {served_wall:.2f} s | forward {local.stats['forward_s']:.2f}"
              f" vs {served['forward_s']:.2f} s | batches {local.stats['batches']} vs "
              f"{served['batches']:.0f} | padded tokens {local.stats['padded']} vs "
              f"{served['padded']:.0f}", flush=True)
finally:
    server.stop()
print("median wall ratio served/local:",
      f"{statistics.median(r[1] / r[0] for r in rows):.3f}")
