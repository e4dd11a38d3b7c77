"""Probe: the largest answers a legal request can ask for, each alone against one warm
`bertstream serve` (default limits, HTTP on): the server's peak RSS growth, and the latency of
another caller's one-text Embed calls meanwhile (one every 20 ms).

    python benchmarks/probes/big_answers.py

Tokenize of 10,000 texts of 256 tokens over gRPC and over HTTP; /v1/embeddings and /embed of
10,000 texts. The peak only grows, so a later row's growth is what it adds to the rows above.
"""
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import free_port, serve_process  # noqa: E402
from tests.test_hostile import peak_rss, while_a_small_caller_calls  # noqa: E402

from bertstream.client import Client  # noqa: E402

http_port = free_port()
process, target = serve_process("--log-level", "WARNING", "--http-port", str(http_port))


def post(path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return f"{response.status}, {len(response.read()) / 1e6:.0f} MB"
    except urllib.error.HTTPError as error:
        return f"{error.code}"


def measure(what, action):
    before, started = peak_rss(process.pid), time.perf_counter()
    outcome, latencies = while_a_small_caller_calls(target, action, pause=0.02)
    took = time.perf_counter() - started
    print(f"{what}: {outcome} in {took:.1f} s; peak RSS +"
          f"{(peak_rss(process.pid) - before) / 2**20:,.0f} MB; the other caller p50 "
          f"{np.median(latencies) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms "
          f"({len(latencies)} calls)", flush=True)


try:
    with Client(target, timeout=600) as client:
        client.embed(["warm up"] * 64)
        long_texts = ["word " * 300] * 10_000
        measure("gRPC Tokenize, 10,000 x 256 tokens",
                lambda: f"{sum(map(len, client.tokenize(long_texts))):,} tokens")
    measure("HTTP /tokenize, 10,000 x 256 tokens", lambda: post("/tokenize", {"inputs": long_texts}))
    short = [f"text {i}" for i in range(10_000)]
    measure("HTTP /v1/embeddings, 10,000 texts", lambda: post("/v1/embeddings", {"input": short}))
    measure("HTTP /embed, 10,000 texts", lambda: post("/embed", {"inputs": short}))
finally:
    process.kill()
