"""The models that are not dense embedders, and what to make of their outputs: cross-encoders (a
sequence-classification folder: its labels, activation and problem type; its logits as scores)
and SPLADE sparse encoders (a masked-language model and its SpladePooling: vocabulary-wide
logits pooled by the ext kernels into sparse vectors). The engine loads the model; this says
what it is and what its outputs mean.

sentence-transformers' CrossEncoder is the reference: `predict` applies the model's activation
(the config's `sentence_transformers.activation_fn`, else sigmoid for one label and none for
several), `rank` orders by it. Classify follows text-embeddings-inference's /predict instead:
softmax over several labels, sigmoid for one label or a multi-label model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .pipeline import PipelineError

EMBEDDING, CROSS_ENCODER, SPARSE = "embedding", "cross-encoder", "sparse"
TASKS = {EMBEDDING: ("embed", "tokenize"), CROSS_ENCODER: ("rerank", "classify", "tokenize"),
         SPARSE: ("embed_sparse", "tokenize")}
# Activations a request can get, by name: the model's own ("model"), or none (raw logits).
NAMED = {"none": torch.nn.Identity(), "sigmoid": torch.nn.Sigmoid(),
         "softmax": torch.nn.Softmax(dim=-1)}


@dataclass(frozen=True)
class ScoreOptions:
    """What to make of a batch's logits for one request: its activation, by name (NAMED, or
    "model"), and the row width (the labels). Built by Engine.score_options()."""

    activation: str
    width: int
    token_level = False  # one row per item, as an embedding's options say


@dataclass(frozen=True)
class SparseOptions:
    """A sparse embedding request: keep the top_k largest values of each vector (0: every
    non-zero one); width: the vocabulary (the vectors' dimensions)."""

    top_k: int
    width: int
    token_level = False
    sparse = True


@dataclass(frozen=True)
class Splade:
    """A SparseEncoder folder's SpladePooling: max or sum, relu or log1p_relu; and its saved
    max_active_dims (0: none)."""

    pooling: str = "max"
    activation: str = "relu"
    max_active_dims: int = 0


def model_kind(folder: str | Path) -> str:
    """SPARSE for a SparseEncoder folder (a transformer and SpladePooling), CROSS_ENCODER for a
    sequence-classification model's (a CrossEncoder's, or a plain transformers
    ...ForSequenceClassification), else EMBEDDING."""
    modules = Path(folder, "modules.json")
    if modules.is_file() and any(module.get("type", "").endswith("SpladePooling")
                                 for module in json.loads(modules.read_text())):
        return SPARSE
    config = Path(folder, "config.json")
    if not config.is_file():
        return EMBEDDING
    architectures = json.loads(config.read_text()).get("architectures") or []
    return CROSS_ENCODER if any(a.endswith("ForSequenceClassification") for a in architectures) \
        else EMBEDDING


def check_modules(folder: str | Path) -> None:
    """A cross-encoder's modules.json, where there is one, must be its transformer alone: a head
    module (sentence-transformers' Dense scores, LogitScore) would change the scores."""
    modules_file = Path(folder, "modules.json")
    if not modules_file.is_file():
        return
    modules = json.loads(modules_file.read_text())
    kinds = [module.get("type", "?").rsplit(".", 1)[-1] for module in modules]
    if kinds != ["Transformer"] or modules[0].get("path", "") not in ("", "."):
        raise PipelineError(f"{modules_file}: a cross-encoder of modules {kinds}; bertstream "
                            f"serves a sequence-classification Transformer alone")


def read_splade(folder: str | Path) -> Splade:
    """A SparseEncoder folder's pipeline: exactly its transformer (at the folder's root) then
    SpladePooling; anything else is refused, naming the modules."""
    folder = Path(folder)
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [module.get("type", "?").rsplit(".", 1)[-1] for module in modules]
    if kinds not in (["Transformer", "SpladePooling"], ["MLMTransformer", "SpladePooling"]) \
            or modules[0].get("path", "") not in ("", "."):
        raise PipelineError(f"{folder / 'modules.json'}: a sparse encoder of modules {kinds}; "
                            f"bertstream serves a masked-language Transformer, then SpladePooling")
    pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
    saved = folder / "config_sentence_transformers.json"
    settings = json.loads(saved.read_text()) if saved.is_file() else {}
    splade = Splade(pooling.get("pooling_strategy", "max"),
                    pooling.get("activation_function", "relu"),
                    int(settings.get("max_active_dims") or 0))
    if splade.pooling not in ("max", "sum") or splade.activation not in ("relu", "log1p_relu"):
        raise PipelineError(f"{folder / modules[1]['path']}: SpladePooling {splade.pooling!r} "
                            f"with {splade.activation!r}; bertstream serves max or sum, with "
                            f"relu or log1p_relu")
    return splade


def sparse_rows(dense: np.ndarray, top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's non-zero entries as (indices ascending, int32; values, float32); with top_k,
    only its top_k largest (as SparseEncoder's max_active_dims)."""
    rows = []
    for row in dense:
        indices = np.flatnonzero(row)
        if top_k and len(indices) > top_k:
            keep = np.argpartition(row[indices], len(indices) - top_k)[len(indices) - top_k:]
            indices = np.sort(indices[keep])
        rows.append((indices.astype(np.int32), row[indices].astype(np.float32)))
    return rows


def model_activation(folder: str | Path, config, num_labels: int) -> torch.nn.Module:
    """The activation CrossEncoder.predict applies, where CrossEncoder looks for it:
    config_sentence_transformers.json, then config.json's sentence_transformers entry (or the
    older sbert_ce_default_activation_function), a torch class (what sentence-transformers
    trusts without remote code); else sigmoid for one label, none for several."""
    saved = Path(folder, "config_sentence_transformers.json")
    path = json.loads(saved.read_text()).get("activation_fn") if saved.is_file() else None
    settings = getattr(config, "sentence_transformers", None) or {}
    path = path or settings.get("activation_fn") or \
        getattr(config, "sbert_ce_default_activation_function", None)
    if path and path.startswith("torch."):
        module, _, name = path.rpartition(".")
        import importlib

        return getattr(importlib.import_module(module), name)()
    return torch.nn.Sigmoid() if num_labels == 1 else torch.nn.Identity()


def classify_activation(config, num_labels: int) -> str:
    """Classify's default: softmax over several labels; sigmoid for one, or for a multi-label
    model (problem_type)."""
    multi = getattr(config, "problem_type", None) == "multi_label_classification"
    return "sigmoid" if num_labels == 1 or multi else "softmax"


def scores(logits: torch.Tensor, rows: np.ndarray, activation: torch.nn.Module) -> np.ndarray:
    """The rows' scores, float32 (len(rows), labels): the activation of their logits."""
    if len(rows) != logits.shape[0] or not np.array_equal(rows, np.arange(len(rows))):
        logits = logits[torch.from_numpy(rows).to(logits.device)]
    with torch.inference_mode():
        return np.ascontiguousarray(activation(logits.float()).cpu().numpy(), dtype=np.float32)


@dataclass(frozen=True)
class PairTemplate:
    """How the tokenizer joins a pair, read off one encoded pair: the special tokens before,
    between and after the two texts, with the segment ids of every part ([CLS] a [SEP] b [SEP]
    with 0s then 1s for BERT; <s> a </s></s> b </s>, all 0, for RoBERTa)."""

    prefix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    first_type: int
    middle: tuple[int, ...]
    middle_types: tuple[int, ...]
    second_type: int
    suffix: tuple[int, ...]
    suffix_types: tuple[int, ...]

    @classmethod
    def of(cls, backend) -> "PairTemplate":
        encoding = backend.encode("a", "b")
        sides, ids, types = encoding.sequence_ids, encoding.ids, encoding.type_ids
        first = [i for i, side in enumerate(sides) if side == 0]
        second = [i for i, side in enumerate(sides) if side == 1]
        return cls(tuple(ids[:first[0]]), tuple(types[:first[0]]), types[first[0]],
                   tuple(ids[first[-1] + 1:second[0]]), tuple(types[first[-1] + 1:second[0]]),
                   types[second[0]], tuple(ids[second[-1] + 1:]),
                   tuple(types[second[-1] + 1:]))

    @property
    def added(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def join(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A pair's ids and segment ids."""
        parts = (self.prefix, first, self.middle, second, self.suffix)
        ids = np.concatenate([np.asarray(part, dtype=np.int32) for part in parts])
        types = np.concatenate([np.asarray(self.prefix_types, dtype=np.int32),
                                np.full(len(first), self.first_type, dtype=np.int32),
                                np.asarray(self.middle_types, dtype=np.int32),
                                np.full(len(second), self.second_type, dtype=np.int32),
                                np.asarray(self.suffix_types, dtype=np.int32)])
        return ids, types


def longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each side of a pair of that many, `budget` in all: Hugging Face tokenizers'
    longest_first truncation (what CrossEncoder asks for), in its closed form. Only min(length,
    budget + 1) of each side matters, which is what lets a side be cut before tokenizing."""
    if first + second <= budget:
        return first, second
    short, long_ = sorted((first, second))
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short, long_ = budget // 2, budget // 2 + budget % 2
    kept_short, kept_long = min(short, min(first, second)), min(long_, max(first, second))
    return (kept_short, kept_long) if first <= second else (kept_long, kept_short)
