"""Probe: more encoder families than the test suite's four, each a tiny random-weight model saved as a
sentence-transformers folder (Transformer, Pooling, Normalize), served over gRPC and compared with
SentenceTransformer(folder).encode on corpus paragraphs, a long text and non-Latin text.

    python -m benchmarks.probes.architectures
"""
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import stdlib_paragraphs
from tests.conftest import ServerThread
from tests.tiny_models import MAX_SEQ_LENGTH, _tokenizer

from bertstream.client import Client
from bertstream.server.engine import Engine
from bertstream.server.limits import Limits

# family -> (tokenizer kind from tests/tiny_models.py, pooling)
FAMILIES = {"electra": ("bert", "mean"), "deberta-v2": ("bert", "cls"),
            "xlm-roberta": ("roberta", "mean"), "camembert": ("roberta", "max"),
            "modernbert": ("roberta", "mean"), "albert": ("bert", "mean")}


def build(family: str, tokenizer_kind: str, pooling: str, root: Path, texts) -> Path:
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    raw = root / family / "hf"
    tokenizer = _tokenizer(tokenizer_kind, raw, texts)
    padding = tokenizer.pad_token_id + 1 if tokenizer_kind == "roberta" else 0
    config = transformers.AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48, max_position_embeddings=64 + padding,
        pad_token_id=tokenizer.pad_token_id)
    transformers.AutoModel.from_config(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=MAX_SEQ_LENGTH)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling), Normalize()]
    out = root / family / "st"
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def main():
    from sentence_transformers import SentenceTransformer

    corpus = stdlib_paragraphs()
    texts = list(corpus[:40]) + [max(corpus, key=len), "a", "日本語の文章。", "Привет, мир!"]
    print("| family | attention | max abs difference to sentence-transformers |")
    print("| --- | --- | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for family, (tokenizer_kind, pooling) in FAMILIES.items():
            try:
                folder = build(family, tokenizer_kind, pooling, Path(tmp), corpus)
                engine = Engine(str(folder), device="cpu")
            except Exception as exc:  # report it as the server would at start
                print(f"| {family} | - | does not start: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]} |")
                continue
            server = ServerThread(engine, Limits())
            with Client(server.target) as client:
                got = client.embed(texts)
            expected = SentenceTransformer(str(folder), device="cpu").encode(texts)
            print(f"| {family} | {engine.attention} | {np.abs(got - expected).max():.1e} |")
            server.stop()


if __name__ == "__main__":
    main()
