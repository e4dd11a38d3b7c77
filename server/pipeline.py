"""The model's own sentence-transformers pipeline, read from its folder: what a default call does.

A folder with `modules.json` says which modules turn token vectors into the model's embedding:
Transformer (the encoder and its tokenizer settings), Pooling, then Dense and Normalize steps. The
server implements exactly those four. Any other module stops the server at start, by name: serving
vectors that differ from `SentenceTransformer(folder).encode` without saying so is worse than not
serving. A folder without `modules.json` is a plain transformers model: masked mean, nothing after.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bertstream.pipeline")

# sentence-transformers' pooling mode names -> the kernels' (bertstream.ext.POOLING_MODES).
ST_POOLING_MODES = {"cls": "cls", "max": "max", "mean": "mean",
                    "mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean": "weightedmean",
                    "lasttoken": "lasttoken"}
# The old boolean Pooling config, in the order sentence-transformers concatenates the modes.
LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                       "pooling_mode_mean_tokens": "mean",
                       "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                       "pooling_mode_weightedmean_tokens": "weightedmean",
                       "pooling_mode_lasttoken": "lasttoken"}
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
SENTENCE_EMBEDDING = "sentence_embedding"


class PipelineError(ValueError):
    """The folder asks for something the server cannot reproduce exactly."""


@dataclass(eq=False)  # compared and hashed by identity: options holding it group by it
class Dense:
    """sentence-transformers' Dense: activation(x W^T + b)."""

    weight: torch.Tensor            # (out, in) float32
    bias: torch.Tensor | None       # (out,)
    activation_name: str            # as the config names it, e.g. torch.nn.modules.activation.Tanh
    activation: torch.nn.Module

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.nn.functional.linear(torch.from_numpy(vectors), self.weight, self.bias)
            return np.ascontiguousarray(self.activation(x).numpy(), dtype=np.float32)


class Normalize:
    """sentence-transformers' Normalize: L2, applied by the engine with the ext kernel."""

    def __repr__(self) -> str:
        return "Normalize()"


NORMALIZE = Normalize()


@dataclass(frozen=True)
class Pipeline:
    """What the model's authors configured; the engine applies it to a default request."""

    source: str = "default"                   # "sentence-transformers", or "default" (no ST files)
    modules: tuple[str, ...] = ()             # the module types, in order, as modules.json names them
    transformer_path: str = ""                # the encoder's folder, relative to the model folder
    pooling: tuple[str, ...] = ("mean",)      # kernel mode names, concatenated in this order
    include_prompt: bool = True               # False: prompt tokens are left out of pooling
    steps: tuple = ()                         # Dense and NORMALIZE, in the model's order
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def dense(self) -> tuple[Dense, ...]:
        return tuple(step for step in self.steps if isinstance(step, Dense))

    @property
    def normalizes(self) -> bool:
        return bool(self.steps) and self.steps[-1] is NORMALIZE


def read_pipeline(folder: str | Path) -> Pipeline:
    """The pipeline of a model folder; raises PipelineError naming what it cannot serve."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pipeline()
    modules = json.loads(modules_file.read_text())
    kinds = [_module_kind(module) for module in modules]
    if not kinds or kinds[0] != "Transformer" or kinds[1:2] != ["Pooling"] \
            or "Transformer" in kinds[1:] or "Pooling" in kinds[2:]:
        raise PipelineError(
            f"{modules_file}: modules {kinds} are not Transformer, Pooling, then Dense/Normalize "
            f"steps; bertstream serves only that shape")
    transformer = modules[0].get("path", "")
    config = _json(inside(folder, transformer) / "sentence_bert_config.json")
    pooling, include_prompt = _pooling(inside(folder, modules[1]["path"]))
    steps = []
    for module, kind in zip(modules[2:], kinds[2:]):
        steps.append(_dense(inside(folder, module["path"])) if kind == "Dense"
                     else _normalize(inside(folder, module["path"])))
    st_config = _json(folder / "config_sentence_transformers.json")
    prompts = dict(st_config.get("prompts") or {})
    default_prompt = st_config.get("default_prompt_name")
    if default_prompt is not None and default_prompt not in prompts:
        raise PipelineError(f"config_sentence_transformers.json: default_prompt_name "
                            f"{default_prompt!r} is not one of its prompts {sorted(prompts)}")
    return Pipeline(
        source="sentence-transformers", modules=tuple(m["type"] for m in modules),
        transformer_path=transformer, pooling=pooling, include_prompt=include_prompt,
        steps=tuple(steps), max_seq_length=config.get("max_seq_length"),
        do_lower_case=bool(config.get("do_lower_case", False)), prompts=prompts,
        default_prompt_name=default_prompt)


def inside(folder: Path, relative: str) -> Path:
    """folder/relative, which must stay inside the folder (links resolved): a modules.json path
    like '../x' would read files the model's authors never shipped."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise PipelineError(f"{folder / 'modules.json'}: module path {relative!r} leaves the "
                            f"model folder; bertstream reads only what is inside it")
    return path


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _module_kind(module: dict) -> str:
    """Transformer, Pooling, Dense or Normalize, from old (sentence_transformers.models.Pooling)
    and new (sentence_transformers.sentence_transformer.modules.pooling.Pooling) type names."""
    name = module.get("type", "")
    kind = name.rsplit(".", 1)[-1]
    if not name.startswith("sentence_transformers.") or kind not in SUPPORTED_MODULES:
        raise PipelineError(
            f"modules.json: module {module.get('idx', '?')} is {name!r}, which bertstream does not "
            f"implement (it serves {', '.join(SUPPORTED_MODULES)}); refusing to serve different "
            f"vectors than the model's")
    return kind


def _pooling(path: Path) -> tuple[tuple[str, ...], bool]:
    config = _json(path / "config.json")
    modes = config.get("pooling_mode")
    if modes is None:  # the old format: one boolean per mode; none set means mean
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [mode for mode in modes if mode not in ST_POOLING_MODES]
    if unknown or not modes:
        raise PipelineError(f"{path}/config.json: pooling mode(s) {unknown or modes} unknown; "
                            f"known: {sorted(ST_POOLING_MODES)}")
    return tuple(ST_POOLING_MODES[mode] for mode in modes), bool(config.get("include_prompt", True))


def _check_io(path: Path, config: dict) -> None:
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, SENTENCE_EMBEDDING) != SENTENCE_EMBEDDING:
            raise PipelineError(f"{path}/config.json: {key} = {config[key]!r}; bertstream applies "
                                f"modules to the sentence embedding only")


def _dense(path: Path) -> Dense:
    config = _json(path / "config.json")
    _check_io(path, config)
    if config.get("use_residual"):
        raise PipelineError(f"{path}/config.json: use_residual is not implemented")
    name = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    weights = _dense_weights(path)
    weight = weights["linear.weight"].float().contiguous()
    bias = weights.get("linear.bias") if config.get("bias", True) else None
    if tuple(weight.shape) != (config["out_features"], config["in_features"]):
        raise PipelineError(f"{path}: weight shape {tuple(weight.shape)} does not match "
                            f"out_features x in_features in its config")
    return Dense(weight, None if bias is None else bias.float().contiguous(), name,
                 _activation(path, name))


def _dense_weights(path: Path) -> dict:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise PipelineError(f"{path}: no model.safetensors or pytorch_model.bin for the Dense module")


def _activation(path: Path, name: str) -> torch.nn.Module:
    """A torch.nn module class by its dotted name, as sentence-transformers loads it without
    trust_remote_code: torch's own modules only, never code from the folder."""
    import importlib

    module_name, _, class_name = name.rpartition(".")
    if module_name.startswith("torch."):
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            return cls()
    raise PipelineError(f"{path}/config.json: activation_function {name!r} is not a torch.nn "
                        f"module; bertstream runs no code from a model folder")


def _normalize(path: Path) -> Normalize:
    _check_io(path, _json(path / "config.json"))
    return NORMALIZE


def local_model_folder(model: str) -> str:
    """A local folder as is; a hub id resolved to its snapshot in the local cache (no network),
    so its sentence-transformers files are found too. Unresolvable: the name unchanged, for
    transformers to report."""
    if Path(model).is_dir():
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception as exc:  # not cached, or not a hub id
        log.debug("no cached snapshot of %s: %s", model, exc)
        return model
