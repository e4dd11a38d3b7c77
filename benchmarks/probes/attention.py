"""Probe: attention implementations (SDPA, eager) over the corpus's token-budget batches, five
alternating rounds in one run.

    python benchmarks/probes/attention.py [--dtype bfloat16]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_throughput import BATCH_TOKENS, InProcess  # noqa: E402
from tests.corpus import stdlib_paragraphs  # noqa: E402

from bertstream.server.engine import default_model_path  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
torch.set_num_threads(2)
base = InProcess(args.dtype, "cpu", BATCH_TOKENS["cpu"])
batches = base.padded_batches(stdlib_paragraphs()[:1000])
models = {name: AutoModel.from_pretrained(default_model_path(), attn_implementation=name,
                                          dtype=getattr(torch, args.dtype)).eval()
          for name in ("sdpa", "eager")}


def run(model):
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        return time.perf_counter() - start


for model in models.values():
    run(model)
rounds = [{name: run(model) for name, model in models.items()} for _ in range(5)]
print(f"{args.dtype}: eager / sdpa time per round:",
      " ".join(f"{r['eager'] / r['sdpa']:.3f}" for r in rounds),
      f"(median {statistics.median(r['eager'] / r['sdpa'] for r in rounds):.3f})")
