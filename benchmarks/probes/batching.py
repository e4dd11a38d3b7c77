"""Probe: padding and batch count of batch-formation rules on the corpus, offline (no model).

    python benchmarks/probes/batching.py [--texts 1500] [--budget 1024]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.corpus import stdlib_paragraphs  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bertstream.server.engine import default_model_path  # noqa: E402


def runs(lengths, budget):
    """Greedy runs of sorted lengths that fit rows x longest <= budget (the batcher's rule)."""
    out, batch = [], []
    for length in sorted(lengths):
        if batch and (len(batch) + 1) * length > budget:
            out.append(batch)
            batch = []
        batch.append(length)
    return out + ([batch] if batch else [])


def describe(name, batches):
    padded = sum(len(b) * max(b) for b in batches)
    real = sum(sum(b) for b in batches)
    print(f"| {name} | {len(batches)} | {padded} | {padded / real - 1:.1%} |")


parser = argparse.ArgumentParser()
parser.add_argument("--texts", type=int, default=1500)
parser.add_argument("--budget", type=int, default=1024)
args = parser.parse_args()
tokenizer = AutoTokenizer.from_pretrained(default_model_path())
texts = list(stdlib_paragraphs()[:args.texts])
lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
print("| rule | batches | padded tokens | padding |\n|---|---:|---:|---:|")
describe("one global sort (offline loop; the batcher with a full pool)", runs(lengths, args.budget))
for snapshot in (8192, 16384, 32768):  # the first batcher: sort within snapshots of queued tokens
    batches, current = [], []
    for start in range(0, len(lengths), 64):  # messages of 64 texts, in arrival order
        current += lengths[start:start + 64]
        if sum(current) >= snapshot:
            batches += runs(current, args.budget)
            current = []
    describe(f"sorted per snapshot of {snapshot} tokens", batches + runs(current, args.budget))
