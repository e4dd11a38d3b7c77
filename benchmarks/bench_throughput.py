"""Served throughput against in-process baselines, in one run: the five targets of the throughput issue.

    python -m benchmarks.bench_throughput [--texts 1000] [--long-texts 100000] [--rounds 5]
        [--device cpu] [--dtypes float32 ...] [--soak-only]

Every round runs each compared thing once, back to back (both servers stay up, idle when not
measured); the table gives the median of the per-round ratios and their range.
1. one EmbedStream (bundled client) vs the strongest in-process loop: the server's own scheme of
   forward workers (one single-thread worker per core) over the same precision, max length and
   batching (tokenizer + AutoModel forward + masked mean), float32 and bfloat16; (1b) vs one
   loop with torch on every core; (1c) the stream's first answer against the forward time of one
   batch in-process (the median batch of the workers' run);
2. vs sentence-transformers `encode` (float32, its defaults);
3. four concurrent streams vs one;
4. unary latency of one short text vs the in-process forward of that text (p50);
5. a long stream: resident memory growth of server and client after warm-up, and the throughput of
   the last tenth vs the first tenth (skipped with --long-texts 0).
The server runs as a subprocess (`bertstream serve`), as in production; the client in this process.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from benchmarks.harness import free_port, stdlib_paragraphs
from benchmarks.harness import machine as cpu  # noqa: F401  (bench_http, bench_ray use it)

from bertstream import ext
from bertstream.client import Client
from bertstream.server.limits import BATCH_TOKENS_BY_DEVICE as BATCH_TOKENS
from bertstream.server.engine import default_model_path

MAX_LENGTH = 256
ROUNDS = 5


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`bertstream serve` in a subprocess, ready (one text embedded) when the constructor returns.
    flags: more `serve` flags; env: more environment (probes)."""

    def __init__(self, dtype: str, device: str, batch_tokens: int, flags=(), env=None):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bertstream.server.cli", "serve", "--port", str(self.port),
             "--dtype", dtype, "--device", device, "--max-batch-tokens", str(batch_tokens),
             "--log-level", "WARNING", *flags],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        self.target = f"127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with Client(self.target, timeout=5) as client:
                    client.embed(["warm-up"])
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


class InProcess:
    """The baseline: the same model, precision, max length and batching, no server; and the
    server's own scheme of forward workers (one single-thread worker per core on the CPU), so
    the served stream is compared with the strongest loop the engine can run in-process."""

    def __init__(self, dtype: str, device: str, batch_tokens: int):
        from transformers import AutoModel, AutoTokenizer

        path = default_model_path()
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(
            path, local_files_only=True, attn_implementation="sdpa",
            dtype=getattr(torch, dtype)).to(self.device).eval()
        self.batch_tokens = batch_tokens
        self.batch_seconds: list[float] = []  # each batch's time, tokenizer padding included

    def batches(self, texts):
        ids = self.tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batch = []
        for i in order:
            if batch and (len(batch) + 1) * len(ids[i]) > self.batch_tokens:
                yield [ids[j] for j in batch]
                batch = []
            batch.append(i)
        if batch:
            yield [ids[j] for j in batch]

    def padded_batches(self, texts) -> list[dict]:
        """The token-budget batches of `texts`, padded as the model takes them (probes)."""
        return [self.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
                for batch in self.batches(texts)]

    def _embed_batch(self, batch) -> int:
        started = time.perf_counter()
        padded = self.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**{k: v.to(self.device) for k, v in padded.items()})[0]
            mask = padded["attention_mask"].to(self.device).unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy()
        self.batch_seconds.append(time.perf_counter() - started)
        return len(pooled)

    def embed(self, texts) -> int:
        """One loop over the batches, torch on every core."""
        return sum(self._embed_batch(batch) for batch in self.batches(texts))

    def embed_workers(self, texts, workers: int | None = None) -> int:
        """The server's scheme, in-process: `workers` threads (default: the server's, one per
        core on the CPU, two on a GPU), each on one torch thread, taking the length-sorted
        token-budget batches in turn."""
        workers = workers or (ext.default_threads() if self.device.type == "cpu" else 2)
        self.batch_seconds = []
        pending = list(self.batches(texts))  # tokenizing is part of the timed work
        lock, done = threading.Lock(), [0]

        def worker():
            torch.get_num_threads()  # set this thread's count up, then keep it at one
            torch.set_num_threads(1)
            while True:
                with lock:
                    if not pending:
                        return
                    batch = pending.pop(0)
                rows = self._embed_batch(batch)
                with lock:
                    done[0] += rows

        threads = [threading.Thread(target=worker) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return done[0]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stream_all(target: str, texts, batch_size=64, window=64, first=None) -> int:
    """Stream `texts`, the rows received; `first`, a list: the seconds to the first answer is
    appended to it (from the call, channel set-up included)."""
    start = time.perf_counter()
    rows = 0
    with Client(target, timeout=3600) as client:
        for part in client.stream(texts, batch_size=batch_size, window=window):
            if first is not None and not rows:
                first.append(time.perf_counter() - start)
            rows += len(part)
    return rows


def timed_side_by_side(fn, arguments) -> float:
    """Seconds until fn(*args) has returned for every args in `arguments`, each on a thread."""
    threads = [threading.Thread(target=fn, args=args) for args in arguments]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def concurrent_streams(target: str, texts, streams: int) -> float:
    return timed_side_by_side(stream_all, [(target, texts[i::streams]) for i in range(streams)])


def unary_latency(target: str, text: str, repeat: int = 100) -> float:
    with Client(target, timeout=60) as client:
        client.embed([text])
        times = [timed(lambda: client.embed([text])) for _ in range(repeat)]
    return statistics.median(times)


def inprocess_latency(baseline: InProcess, text: str, repeat: int = 100) -> float:
    baseline.embed([text])
    return statistics.median(timed(lambda: baseline.embed([text])) for _ in range(repeat))


def long_stream(server: Server, texts, n_texts: int):
    """Stream n_texts (`texts` cycled; a tenth is whole cycles, so every tenth holds the same
    texts); returns the memory growth of server and client from the end of the first tenth
    (warm-up) to the end, the server's resident memory at the end of every tenth, and the
    seconds each tenth took. The stream goes on for one client window past n_texts, so that the
    last tenth, like the others, is measured while texts still arrive (in the drain at the end,
    the server has no sending and tokenizing beside it and sorts its last batches whole: that
    tenth ran 10% faster than the rest)."""
    tenth = n_texts // 10
    batch_size, window = 64, 32
    texts = itertools.islice(itertools.cycle(texts), n_texts + batch_size * window)
    marks, server_rss, client_rss = [], [], []
    with Client(server.target, timeout=3600) as client:
        done = 0
        start = time.perf_counter()
        for part in client.stream(texts, batch_size=batch_size, window=window):
            done += len(part)
            if done // tenth > len(marks) and len(marks) < 10:
                marks.append(time.perf_counter() - start)
                server_rss.append(rss_mb(server.process.pid))
                client_rss.append(rss_mb(os.getpid()))
    growth = (server_rss[-1] - server_rss[0], client_rss[-1] - client_rss[0])
    return growth, server_rss, np.diff(marks, prepend=0.0)


def soak(server: Server, texts, n_texts: int, dtype: str, row) -> None:
    (grow_s, grow_c), series, tenths = long_stream(server, texts, n_texts)
    row(f"5. {n_texts} texts, {dtype}: memory growth after warm-up",
        f"server {grow_s:+.0f} MB, client {grow_c:+.0f} MB", "<= 100 MB each")
    row("5. server resident MB at the end of each tenth", " ".join(f"{m:.0f}" for m in series),
        "flat after warm-up")
    row("5. seconds per tenth", " ".join(f"{t:.1f}" for t in tenths), "")
    row(f"5. {n_texts} texts, {dtype}: last tenth time / first tenth time",
        f"{tenths[-1] / tenths[0]:.3f} (/ second tenth: {tenths[-1] / tenths[1]:.3f})", "0.9-1.1")


def measure_round(texts, st, sides, short) -> dict:
    """One round: every compared thing once, back to back, so each ratio compares runs made
    under the same machine conditions."""
    times = {"st": timed(lambda: st.encode(texts))}
    for dtype, (baseline, server) in sides.items():
        times[dtype, "local"] = timed(lambda: baseline.embed(texts))
        times[dtype, "workers"] = timed(lambda: baseline.embed_workers(texts))
        times[dtype, "batch"] = statistics.median(baseline.batch_seconds)
        first = []
        times[dtype, "one"] = timed(lambda: stream_all(server.target, texts, first=first))
        times[dtype, "first"] = first[0]
        times[dtype, "four"] = concurrent_streams(server.target, texts, 4)
        times[dtype, "unary"] = unary_latency(server.target, short)
        times[dtype, "local unary"] = inprocess_latency(baseline, short)
    return times


def spread(values, fmt: str, unit: str = "") -> str:
    """Median, and the range over rounds: `fmt` formats one number."""
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid}{unit} ({low} to {high})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000, help="corpus paragraphs (0 = all)")
    parser.add_argument("--long-texts", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--soak-only", action="store_true",
                        help="only the long stream (target 5), float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+",
                        help="precisions (default: float32 and bfloat16 on the CPU, float16 and "
                             "bfloat16 on a GPU)")
    args = parser.parse_args()
    corpus = stdlib_paragraphs()
    texts = list(corpus[:args.texts] if args.texts else corpus)
    if args.long_texts and (args.long_texts // 10) % len(texts):
        parser.error(f"--long-texts / 10 must be a multiple of the {len(texts)} texts, so that "
                     f"every tenth of the long stream holds the same texts")
    device = args.device
    batch_tokens = BATCH_TOKENS[device.split(":")[0]]
    torch.set_num_threads(ext.default_threads())
    print(cpu())
    print(f"{len(texts)} texts, device {device}, max length {MAX_LENGTH}, "
          f"batch budget {batch_tokens} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds; ratios are medians of "
          f"per-round ratios (range over rounds in brackets)\n")

    def row(name, value, target):
        print(f"| {name} | {value} | {target} |", flush=True)

    print("| measure | value | target |\n|---|---|---|")
    if args.soak_only:
        server = Server("float32", device, batch_tokens)
        try:
            stream_all(server.target, texts)  # warm, as the servers of the full run are
            soak(server, texts, args.long_texts, "float32", row)
        finally:
            server.stop()
        return
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_model_path(), device=device)
    st.encode(texts[:64])
    precisions = args.dtypes or (("float32", "bfloat16") if device == "cpu"
                                 else ("float16", "bfloat16"))
    sides = {}
    short = "The quick brown fox jumps over the lazy dog."
    try:
        for dtype in precisions:
            baseline = InProcess(dtype, device, batch_tokens)
            baseline.embed(texts[:64])
            sides[dtype] = (baseline, Server(dtype, device, batch_tokens))
            stream_all(sides[dtype][1].target, texts[:128])
        rounds = [measure_round(texts, st, sides, short) for _ in range(args.rounds)]
        rate = len(texts)
        row("sentence-transformers encode, float32",
            spread([rate / r["st"] for r in rounds], "{:.1f}", " texts/s"), "")
        for dtype in precisions:
            def took(r, what):
                return r[what] if what == "st" else r[dtype, what]

            def speedup(fast, slow):
                return [took(r, slow) / took(r, fast) for r in rounds]

            row(f"in-process loop, {dtype}",
                spread([rate / r[dtype, "local"] for r in rounds], "{:.1f}", " texts/s"), "")
            row(f"in-process forward workers (the server's scheme), {dtype}",
                spread([rate / r[dtype, "workers"] for r in rounds], "{:.1f}", " texts/s"), "")
            row(f"1. served, one stream, {dtype}: x in-process forward workers",
                spread(speedup("one", "workers"), "{:.2f}", "x"),
                ">= 0.95x (600 texts), >= 0.97x (3,000)")
            row(f"1c. first answer of the stream, {dtype}: / one batch's forward in-process",
                spread([r[dtype, "first"] / r[dtype, "batch"] for r in rounds], "{:.1f}", "x")
                + "; first answer "
                + spread([r[dtype, "first"] * 1e3 for r in rounds], "{:.0f}", " ms"), "<= 3x")
            row(f"1b. served, one stream, {dtype}: x in-process single loop",
                spread(speedup("one", "local"), "{:.2f}", "x"), "")
            row(f"2. served {dtype}: x sentence-transformers float32",
                spread(speedup("one", "st"), "{:.2f}", "x"),
                ">= 3x (bfloat16)" if dtype == "bfloat16" else ">= 1.5x")
            row(f"3. four streams, {dtype}: x one stream",
                spread(speedup("four", "one"), "{:.2f}", "x"), ">= 0.97x")
            row(f"4. unary p50, one short text, {dtype}: served - in-process",
                spread([(r[dtype, "unary"] - r[dtype, "local unary"]) * 1e3 for r in rounds],
                       "{:+.2f}", " ms") + "; served "
                + spread([r[dtype, "unary"] * 1e3 for r in rounds], "{:.2f}", " ms"),
                "within 1 ms")
        vectors = {}
        for dtype in precisions if "bfloat16" in precisions[1:] else ():
            with Client(sides[dtype][1].target, timeout=600) as client:
                vectors[dtype] = client.embed(texts)
        if vectors:
            low, full = vectors["bfloat16"], vectors[precisions[0]]
            cos = (low * full).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(full, axis=1)
            row(f"bfloat16 vs {precisions[0]} cosine, min over texts", f"{cos.min():.5f}",
                ">= 0.9995")
        if args.long_texts:
            _, server = sides.pop(precisions[0])
            for _, other in sides.values():
                other.stop()  # the soak runs alone
            sides.clear()
            try:
                soak(server, texts, args.long_texts, precisions[0], row)
            finally:
                server.stop()
    finally:
        for _, server in sides.values():
            server.stop()


if __name__ == "__main__":
    main()
