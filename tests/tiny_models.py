"""Tiny random-weight encoders saved as sentence-transformers folders, built with sentence-transformers'
own modules: the second, third and fourth architectures every model-fidelity test runs on.

Each tokenizer is trained here, on the reference corpus, in well under a second; nothing is
downloaded. Max length 40 tokens, so the corpus has texts over it.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_SEQ_LENGTH = 40
PROMPTS = {"query": "query: ", "passage": "passage: "}

# architecture -> the sentence-transformers pipeline it is saved with (what the server must follow)
PIPELINES = {
    # The BGE shape: CLS pooling, then Normalize; prompts, none by default.
    "bert": dict(pooling="cls", dense=None, normalize=True, prompts=PROMPTS),
    # Max pooling and a Dense projection with tanh, stored as safetensors; not normalized; a
    # cased tokenizer that sentence_bert_config.json says to lower-case.
    "roberta": dict(pooling="max", dense=dict(out=16, activation="Tanh", safetensors=True),
                    normalize=False, do_lower_case=True),
    # Two modes concatenated, prompt tokens left out of pooling, a default prompt, the old
    # boolean Pooling config format.
    "distilbert": dict(pooling=("mean_sqrt_len_tokens", "weightedmean"), include_prompt=False,
                       dense=None, normalize=True, prompts=PROMPTS, default_prompt="query",
                       legacy_pooling_config=True),
    # The all-mpnet-base-v2 architecture: last-token pooling, a GELU Dense without bias in a torch
    # .bin, then Normalize.
    "mpnet": dict(pooling="lasttoken", dense=dict(out=24, activation="GELU", bias=False,
                                                  safetensors=False),
                  normalize=True),
}

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                      "<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _train_wordpiece(folder: Path, texts) -> Path:
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(texts, vocab_size=1500, special_tokens=WORDPIECE_SPECIALS)
    tokenizer.save_model(str(folder))
    return folder / "vocab.txt"


def _tokenizer(architecture: str, folder: Path, texts):
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if architecture == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=1500,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bpe.save_model(str(folder))
        return transformers.RobertaTokenizerFast(str(folder / "vocab.json"),
                                                 str(folder / "merges.txt"))
    vocab = _train_wordpiece(folder, texts)
    cls = {"bert": transformers.BertTokenizerFast,
           "distilbert": transformers.DistilBertTokenizerFast,
           "mpnet": transformers.MPNetTokenizerFast}[architecture]
    return cls(str(vocab))


def _config(architecture: str, tokenizer):
    import transformers

    size = dict(vocab_size=len(tokenizer), max_position_embeddings=64)
    if architecture == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48,
                                             pad_token_id=tokenizer.pad_token_id, **size)
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
           "mpnet": transformers.MPNetConfig}[architecture]
    if architecture in ("roberta", "mpnet"):  # positions start after the padding index
        size["max_position_embeddings"] += tokenizer.pad_token_id + 1
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
               pad_token_id=tokenizer.pad_token_id, **size)


def build(architecture: str, folder: Path, texts) -> Path:
    """Save a tiny random `architecture` encoder with its PIPELINES entry into `folder`."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    spec = PIPELINES[architecture]
    torch.manual_seed(sorted(PIPELINES).index(architecture))
    raw = folder / "hf"
    tokenizer = _tokenizer(architecture, raw, texts)
    model = transformers.AutoModel.from_config(_config(architecture, tokenizer)).eval()
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)

    transformer = Transformer(str(raw), max_seq_length=MAX_SEQ_LENGTH)
    width = transformer.get_embedding_dimension()
    pooling = Pooling(width, pooling_mode=spec["pooling"],
                      include_prompt=spec.get("include_prompt", True))
    modules = [transformer, pooling]
    if spec["dense"]:
        dense = spec["dense"]
        modules.append(Dense(pooling.get_embedding_dimension(), dense["out"],
                             bias=dense.get("bias", True),
                             activation_function=getattr(torch.nn, dense["activation"])()))
    if spec["normalize"]:
        modules.append(Normalize())
    st_model = SentenceTransformer(modules=modules, device="cpu", prompts=spec.get("prompts"),
                                   default_prompt_name=spec.get("default_prompt"))
    out = folder / architecture
    safetensors = (spec["dense"] or {}).get("safetensors", True)
    st_model.save(str(out), safe_serialization=safetensors)
    if spec.get("legacy_pooling_config"):
        _legacy_pooling_config(out)
    if spec.get("do_lower_case"):
        config = json.loads((out / "sentence_bert_config.json").read_text())
        config["do_lower_case"] = True
        (out / "sentence_bert_config.json").write_text(json.dumps(config, indent=2))
    return out


def _legacy_pooling_config(folder: Path) -> None:
    """Rewrite the Pooling config in the boolean format older sentence-transformers wrote."""
    modules = json.loads((folder / "modules.json").read_text())
    path = next(folder / m["path"] / "config.json" for m in modules if m["type"].endswith("Pooling"))
    config = json.loads(path.read_text())
    modes = config.pop("pooling_mode")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    legacy = {"word_embedding_dimension": config.pop("embedding_dimension")}
    for key, mode in [("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_max_tokens", "max"),
                      ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                      ("pooling_mode_weightedmean_tokens", "weightedmean"),
                      ("pooling_mode_lasttoken", "lasttoken")]:
        legacy[key] = mode in modes
    path.write_text(json.dumps({**legacy, **config}, indent=2))


# Cross-encoders: architecture -> its labels (one: a reranker; several: a classifier).
CROSS_ENCODERS = {
    "bert": ["relevance"],
    "distilbert": ["contradiction", "entailment", "neutral"],
}


def build_cross_encoder(architecture: str, folder: Path, texts) -> Path:
    """Save a tiny random sequence-classification `architecture` as sentence-transformers'
    CrossEncoder saves one, with CROSS_ENCODERS' labels, into folder/ce-<architecture>."""
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    labels = CROSS_ENCODERS[architecture]
    torch.manual_seed(10 + len(labels))
    raw = folder / f"ce-{architecture}-hf"
    tokenizer = _tokenizer(architecture, raw, texts)
    config = _config(architecture, tokenizer)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    out = folder / f"ce-{architecture}"
    CrossEncoder(str(raw), device="cpu", max_length=MAX_SEQ_LENGTH).save(str(out))
    return out


def build_sparse_encoder(pooling: str, folder: Path, texts) -> Path:
    """Save a tiny random BERT masked-language model with SPLADE pooling (`pooling`: max or sum)
    as sentence-transformers' SparseEncoder saves one, into folder/splade-<pooling>."""
    import torch
    import transformers
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    torch.manual_seed(20 + len(pooling))
    raw = folder / f"splade-{pooling}-mlm"
    tokenizer = _tokenizer("bert", raw, texts)
    model = transformers.BertForMaskedLM(_config("bert", tokenizer)).eval()
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=MAX_SEQ_LENGTH,
                              transformer_task="fill-mask")
    splade = SpladePooling(pooling_strategy=pooling, embedding_dimension=len(tokenizer))
    out = folder / f"splade-{pooling}"
    SparseEncoder(modules=[transformer, splade], device="cpu").save(str(out))
    return out
