"""What the device computes, and what a pass costs it whatever its size, on corpus messages cut as
the server cuts them: for all-MiniLM-L6-v2 and a BERT-base-sized random model (`make gpu-check`).

    python -m benchmarks.gpu_flops [--device cuda] [--dtype float16] [--messages 47]

Each stream message of 64 corpus paragraphs goes into an empty Queue with the device's budget (as
when the forward pass keeps up with one stream) and is cut until gone, once with the device's free
padding (Engine.free_padding_flops) and once with none (groups of similar length). Each pass is
Engine.forward and Engine.pool, synchronized and timed. Per model and cut rule it prints passes a
message, milliseconds a message, and the achieved TFLOPS (Engine.forward_flops, the FLOPs metric's
formula, over the passes' seconds). Then a least-squares fit over every pass of
seconds = fixed + flops / rate: the fixed cost of a pass, the rate, and their product, the padding
a pass hides in its fixed cost. server/limits.py's FREE_PADDING_FLOPS_BY_DEVICE estimates that
product (25 GFLOP on cuda) from arithmetic; this is what measures it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine, stdlib_paragraphs
from bertstream.server.engine import Engine, default_model_path
from bertstream.server.jobs import Job
from bertstream.server.limits import BATCH_TOKENS_BY_DEVICE
from bertstream.server.text_queue import Queue


def base_sized(folder: Path) -> Path:
    """BERT-base's shape (768 wide, 12 layers, 12 heads, 3072 feed-forward), random weights, with
    all-MiniLM-L6-v2's tokenizer; a plain transformers folder (served with mean pooling)."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    source = default_model_path()
    config = AutoConfig.from_pretrained(source)
    config.update(dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072))
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def timed_passes(engine: Engine, messages, budget: int, free: float) -> list[tuple[float, int]]:
    """(seconds, flops) of every pass, the messages one at a time into an empty queue."""
    options, caller, passes = engine.options(), object(), []
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for number, tokens in enumerate(messages):
        queue = Queue(budget, engine.forward_flops, free)
        queue.add(Job(tokens.ids, options, "float32", lambda result: None, caller=caller,
                      sequence=number, engine=engine))
        while queue.waiting:
            rows = [item.job.ids[item.index] for item in queue.cut()]
            sync()
            started = time.perf_counter()
            hidden, lengths = engine.forward(rows)
            engine.pool(hidden, lengths, np.arange(len(rows)), options)  # to the host: synced
            sync()
            passes.append((time.perf_counter() - started,
                           engine.forward_flops(len(rows), int(lengths.max()),
                                                int(lengths.sum()))))
    return passes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: the device's")
    parser.add_argument("--messages", type=int, default=47, help="of 64 corpus paragraphs")
    args = parser.parse_args()
    texts = list(stdlib_paragraphs()[:64 * args.messages])
    with tempfile.TemporaryDirectory() as tmp:
        models = {"all-MiniLM-L6-v2": default_model_path(),
                  "BERT-base-sized, random": str(base_sized(Path(tmp)))}
        engines = {name: Engine(folder, device=args.device, dtype=args.dtype)
                   for name, folder in models.items()}
        first = next(iter(engines.values()))
        Engine.set_forward_threads(first.threads)  # this thread runs the passes
        budget = BATCH_TOKENS_BY_DEVICE.get(first.device.type, BATCH_TOKENS_BY_DEVICE["cpu"])
        print(f"{machine()}; {first.device} {first.dtype}, budget {budget} tokens, "
              f"{len(texts)} corpus paragraphs in messages of 64, each into an empty queue")
        print("\n| model | cut | passes a message | ms a message | achieved TFLOPS | "
              "fit: fixed ms a pass | fit: TFLOPS | fixed x rate, GFLOP |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, engine in engines.items():
            messages = [engine.tokenize(texts[i:i + 64]) for i in range(0, len(texts), 64)]
            rules = {f"free padding {engine.free_padding_flops / 1e9:g} GFLOP":
                     engine.free_padding_flops, "groups (none free)": 0}
            timed_passes(engine, messages[:2], budget, engine.free_padding_flops)  # warm up
            runs = {rule: timed_passes(engine, messages, budget, free)
                    for rule, free in rules.items()}
            every = np.array([run for passes in runs.values() for run in passes], dtype=float)
            slope, fixed = np.polyfit(every[:, 1], every[:, 0], 1)  # seconds = fixed + slope x
            for rule, passes in runs.items():
                seconds, flops = np.array(passes, dtype=float).sum(0)
                fit = (f"{fixed * 1e3:.3f} | {1 / slope / 1e12:.1f} | {fixed / slope / 1e9:.1f}"
                       if slope > 0 else "- | - | -")
                print(f"| {name} | {rule} | {len(passes) / len(messages):.2f} | "
                      f"{seconds / len(messages) * 1e3:.2f} | {flops / seconds / 1e12:.2f} | "
                      f"{fit} |")


if __name__ == "__main__":
    main()
