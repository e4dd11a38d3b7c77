"""Cross-encoders: what a sequence-classification folder says (its labels, its activation, its
problem type), and its logits as scores. The engine loads the model; this says what to make of it.

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

EMBEDDING, CROSS_ENCODER = "embedding", "cross-encoder"
TASKS = {EMBEDDING: ("embed", "tokenize"), CROSS_ENCODER: ("rerank", "classify", "tokenize")}
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


def model_kind(folder: str | Path) -> str:
    """CROSS_ENCODER for a sequence-classification model's folder (a CrossEncoder's, or a plain
    transformers ...ForSequenceClassification), else EMBEDDING."""
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


def model_activation(config, num_labels: int) -> torch.nn.Module:
    """The activation CrossEncoder.predict applies: the config's (a torch.nn class, as
    sentence-transformers trusts without remote code), else sigmoid for one label, none for
    several."""
    settings = getattr(config, "sentence_transformers", None) or {}
    path = settings.get("activation_fn") or getattr(config, "sbert_ce_default_activation_function",
                                                    None)
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
