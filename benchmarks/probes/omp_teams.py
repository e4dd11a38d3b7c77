"""Probe: a forward pass on a worker thread, with and without torch OpenMP used on the main thread.

    python benchmarks/probes/omp_teams.py          # main thread computes first (the slow case)
    python benchmarks/probes/omp_teams.py --clean  # main thread stays at 1 torch thread

Why the engine loads with torch at 1 thread and the batcher's forward thread claims the cores.
"""
import statistics
import sys
import threading
import time

import torch
from transformers import AutoModel, AutoTokenizer

from bertstream.server.engine import default_model_path

clean = "--clean" in sys.argv
torch.set_num_threads(1 if clean else 2)
path = default_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
inputs = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")


def forward_ms(label):
    torch.set_num_threads(2)
    with torch.inference_mode():
        model(**inputs)
        times = []
        for _ in range(60):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    print(f"{label}: {statistics.median(times) * 1e3:.2f} ms", flush=True)


if not clean:
    forward_ms("main thread")
worker = threading.Thread(target=forward_ms, args=("worker thread",))
worker.start()
worker.join()
