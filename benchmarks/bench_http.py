"""HTTP throughput, in one run: bertstream's OpenAI-compatible HTTP front-end under 4 concurrent
clients, beside one gRPC stream to the same server, and beside Infinity's HTTP server (the same
model, precision and texts, 4 concurrent clients).

    python -m benchmarks.bench_http [--texts 1000] [--rounds 3] [--infinity PATH_TO_infinity_emb]

Every round runs each compared thing once, back to back; the table gives texts/s as the median over
rounds (range in brackets) and the ratio to bertstream HTTP as the median of per-round ratios. HTTP
clients post `{"input": [64 texts]}` to /v1/embeddings (Infinity: /embeddings) over kept-alive
connections and parse the JSON they get back, as a real client does. Infinity is optional (it
needs its own virtual environment: it pins other versions of transformers than this project).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import threading
import time

from benchmarks.bench_throughput import BATCH_TOKENS, Server, cpu, stream_all, timed
from benchmarks.harness import free_port, stdlib_paragraphs

from bertstream.server.engine import default_model_path

BATCH = 64
CLIENTS = 4


def post_all(port: int, path: str, texts: list[str], model: str) -> int:
    """Post texts in batches over one kept-alive connection; the rows received."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    rows = 0
    for start in range(0, len(texts), BATCH):
        body = json.dumps({"input": texts[start:start + BATCH], "model": model})
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {payload[:200]!r}")
        rows += len(json.loads(payload)["data"])
    connection.close()
    return rows


def concurrent_posts(port: int, path: str, texts: list[str], model: str) -> float:
    """Seconds for CLIENTS clients to post their share of the texts side by side."""
    shares = [texts[i::CLIENTS] for i in range(CLIENTS)]
    counts = [0] * CLIENTS

    def client(i):
        counts[i] = post_all(port, path, shares[i], model)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    assert sum(counts) == len(texts), counts
    return seconds


class Infinity:
    """Infinity's HTTP server (`infinity_emb v2`), torch engine, the same model folder."""

    def __init__(self, executable: str, model: str, dtype: str):
        self.port = free_port()
        self.model = model
        self.process = subprocess.Popen(
            [executable, "v2", "--model-id", model, "--engine", "torch", "--device", "cpu",
             "--dtype", dtype, "--batch-size", str(BATCH), "--port", str(self.port),
             "--no-bettertransformer"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"})
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                post_all(self.port, "/embeddings", ["warm-up"], model)
                return
            except (OSError, RuntimeError, http.client.HTTPException):
                if self.process.poll() is not None:
                    raise RuntimeError("infinity_emb exited at start")
                time.sleep(1)
        raise RuntimeError("infinity_emb did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--infinity", help="the infinity_emb executable (its own venv)")
    args = parser.parse_args()
    texts = list(stdlib_paragraphs()[:args.texts])
    model = default_model_path()
    print(f"{cpu()}; {len(texts)} corpus paragraphs, all-MiniLM-L6-v2, {args.dtype}, "
          f"{args.rounds} rounds, batches of {BATCH}\n")
    http_port = free_port()
    server = Server(args.dtype, "cpu", BATCH_TOKENS["cpu"], flags=("--http-port", str(http_port)))
    infinity = Infinity(args.infinity, model, args.dtype) if args.infinity else None
    runs = {"bertstream HTTP, 4 clients": lambda: concurrent_posts(
                http_port, "/v1/embeddings", texts, "all-MiniLM-L6-v2"),
            "bertstream gRPC, one stream": lambda: stream_all(server.target, texts)}
    if infinity:
        runs["Infinity HTTP, 4 clients"] = lambda: concurrent_posts(
            infinity.port, "/embeddings", texts, model)
    seconds = {name: [] for name in runs}
    try:
        for _ in range(args.rounds):
            for name, run in runs.items():
                seconds[name].append(timed(run))
    finally:
        server.stop()
        if infinity:
            infinity.stop()
    base = seconds["bertstream HTTP, 4 clients"]
    print("| what | texts/s | bertstream HTTP / this |")
    print("| --- | ---: | ---: |")
    for name, values in seconds.items():
        rates = [len(texts) / s for s in values]
        ratios = [s / b for b, s in zip(base, values)]  # time ratio = throughput ratio inverted
        print(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
