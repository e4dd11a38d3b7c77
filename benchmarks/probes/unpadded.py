"""Probe: a padding-free BERT forward (token-wise layers on real tokens only, fused QKV, padding
back only around attention) against the HF forward, on the corpus's token-budget batches.

    python benchmarks/probes/unpadded.py [--dtype bfloat16]

Prints the largest difference in the last layer and the time ratio of five alternating rounds.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_throughput import BATCH_TOKENS, InProcess  # noqa: E402
from tests.corpus import stdlib_paragraphs  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
torch.set_num_threads(2)
base = InProcess(args.dtype, "cpu", BATCH_TOKENS["cpu"])
batches = base.padded_batches(stdlib_paragraphs()[:1000])
model = base.model
heads = model.config.num_attention_heads
fused = [(torch.cat([layer.attention.self.query.weight, layer.attention.self.key.weight,
                     layer.attention.self.value.weight]),
          torch.cat([layer.attention.self.query.bias, layer.attention.self.key.bias,
                     layer.attention.self.value.bias])) for layer in model.encoder.layer]


def unpadded(input_ids, attention_mask):
    rows, width = input_ids.shape
    real = torch.nonzero(attention_mask.reshape(-1)).squeeze(1)
    mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
    x = model.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    x = x.reshape(rows * width, -1).index_select(0, real)
    hidden = x.shape[1]
    for layer, (weight, bias) in zip(model.encoder.layer, fused):
        qkv = F.linear(x, weight, bias)
        padded = qkv.new_zeros(rows * width, 3 * hidden).index_copy_(0, real, qkv)
        q, k, v = padded.view(rows, width, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).reshape(rows * width, hidden).index_select(0, real)
        x = layer.attention.output(context, x)
        x = layer.output(layer.intermediate(x), x)
    return x


def run(forward):
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    return time.perf_counter() - start


with torch.inference_mode():
    worst = max((model(**b).last_hidden_state[b["attention_mask"].bool()].float()
                 - unpadded(b["input_ids"], b["attention_mask"]).float()).abs().max().item()
                for b in batches)
    hf = lambda b: model(**b)  # noqa: E731
    mine = lambda b: unpadded(b["input_ids"], b["attention_mask"])  # noqa: E731
    run(hf), run(mine)
    rounds = [(run(hf), run(mine)) for _ in range(5)]
print(f"{args.dtype}: largest difference {worst:.2g}; unpadded / HF time per round:",
      " ".join(f"{b / a:.3f}" for a, b in rounds),
      f"(median {statistics.median(b / a for a, b in rounds):.3f})")
