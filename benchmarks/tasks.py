"""Served rerank and sparse embeddings against sentence-transformers in-process, in one run.

    python -m benchmarks.tasks [--queries 40] [--documents 25] [--texts 1000] [--callers 4]

Two models of all-MiniLM-L6-v2's shape (6 layers, 384 wide, its tokenizer and 30,522-token
vocabulary), random weights (the work is the same as trained ones'), saved with
sentence-transformers' own classes: a CrossEncoder with one label and a SparseEncoder (masked
language model, SpladePooling max). Rerank: --queries queries of --documents corpus paragraphs
each, by `CrossEncoder.predict` (batch 32) in this process, then by one `bertstream serve` of both
models through --callers callers (4). Sparse: --texts corpus paragraphs by `SparseEncoder.encode` (batch
32), then served in messages of 64 through the same callers. Printed: pairs/s and texts/s, and the
ratio served / in-process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import free_port, machine, stdlib_paragraphs



def build(folder: Path) -> tuple[Path, Path]:
    """The cross-encoder and the SPLADE model, MiniLM-sized, random weights."""
    import torch
    import transformers
    from sentence_transformers import CrossEncoder, SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    from bertstream.server.engine import default_model_path

    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=384,
                                     num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, num_labels=1)
    paths = {}
    for kind, model in (("ce", transformers.BertForSequenceClassification(config)),
                        ("mlm", transformers.BertForMaskedLM(config))):
        raw = folder / f"{kind}-hf"
        model.eval().save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        paths[kind] = raw
    cross = folder / "cross-encoder"
    CrossEncoder(str(paths["ce"]), device="cpu", max_length=256).save(str(cross))
    transformer = Transformer(str(paths["mlm"]), max_seq_length=256, transformer_task="fill-mask")
    splade = folder / "splade"
    SparseEncoder(modules=[transformer, SpladePooling("max", embedding_dimension=len(tokenizer))],
                  device="cpu").save(str(splade))
    return cross, splade


def serve(cross: Path, splade: Path) -> tuple[subprocess.Popen, str]:
    from bertstream.client import Client

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bertstream.server.cli", "serve", "--port", str(port),
         "--dtype", "float32", "--device", "cpu", "--log-level", "WARNING",
         "--model", f"rerank={cross}", "--model", f"splade={splade}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    target, deadline = f"127.0.0.1:{port}", time.time() + 300
    while True:
        try:
            with Client(target, timeout=5) as client:
                client.rerank("warm", ["up"], model="rerank")
            return process, target
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def spread(work, items, callers: int) -> float:
    """Seconds for `callers` threads to run work(item) over every item."""
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(work, items))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--documents", type=int, default=25)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=4, help="concurrent callers of the server")
    args = parser.parse_args()
    import torch
    from sentence_transformers import CrossEncoder, SparseEncoder

    from bertstream.client import Client

    torch.set_num_threads(os.cpu_count())
    corpus = stdlib_paragraphs()
    queries = [text[:120] for text in corpus[:args.queries]]
    documents = [corpus[(100 + i * args.documents + j) % len(corpus)]
                 for i in range(args.queries) for j in range(args.documents)]
    lists = [documents[i * args.documents:(i + 1) * args.documents] for i in range(args.queries)]
    texts = [corpus[(5000 + i) % len(corpus)] for i in range(args.texts)]
    with tempfile.TemporaryDirectory() as folder:
        cross, splade = build(Path(folder))
        rows = []
        model = CrossEncoder(str(cross), device="cpu")
        pairs = [(q, d) for q, docs in zip(queries, lists) for d in docs]
        model.predict(pairs[:64], batch_size=32)  # warm
        started = time.perf_counter()
        model.predict(pairs, batch_size=32)
        alone = time.perf_counter() - started
        sparse_model = SparseEncoder(str(splade), device="cpu")
        sparse_model.encode(texts[:64], batch_size=32)
        started = time.perf_counter()
        sparse_model.encode(texts, batch_size=32)
        sparse_alone = time.perf_counter() - started
        del model, sparse_model
        process, target = serve(cross, splade)
        try:
            with Client(target, timeout=600) as client:
                client.embed_sparse(texts[:64], model="splade")  # warm
                served = spread(lambda i: client.rerank(queries[i], lists[i], model="rerank"),
                                range(args.queries), args.callers)
                messages = [texts[i:i + 64] for i in range(0, len(texts), 64)]
                sparse_served = spread(lambda m: client.embed_sparse(m, model="splade"),
                                       messages, args.callers)
        finally:
            process.terminate()
            process.wait(timeout=60)
        rows = [("rerank (pairs/s)", len(pairs) / alone, len(pairs) / served),
                ("sparse (texts/s)", len(texts) / sparse_alone, len(texts) / sparse_served)]
    print(f"{machine()}; MiniLM-sized random models, float32; rerank {args.queries} queries x "
          f"{args.documents} corpus paragraphs, sparse {args.texts:,} paragraphs; "
          f"{args.callers} callers")
    print("\n| task | sentence-transformers in-process | served | x |")
    print("| --- | ---: | ---: | ---: |")
    for task, baseline, ours in rows:
        print(f"| {task} | {baseline:,.0f} | {ours:,.0f} | {ours / baseline:.2f} |")


if __name__ == "__main__":
    main()
