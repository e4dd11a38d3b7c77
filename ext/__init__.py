"""Pooling and tensor-packing kernels (Cython, OpenMP) for bertstream.

This layer validates once and allocates; the compiled kernels in ``_kernels`` trust what they get.

Hidden states are C-contiguous ``(batch, seq, hidden)`` arrays, right-padded, of float32, float16,
or bfloat16 bit patterns in a uint16 array (numpy has no bfloat16 dtype; from torch:
``t.view(torch.uint16).numpy()``). ``lengths`` holds each row's count of real tokens
(1 <= length <= seq); padding positions are never read. Everything accumulates and returns float32.

NaN and inf: pooling follows IEEE arithmetic over the real tokens (a NaN token value makes that
row's mean and max NaN; +inf gives +inf; +inf and -inf in one mean give NaN); see ``pack_int8`` and
``pack_binary`` for the packed forms.
"""

from __future__ import annotations

import os

import numpy as np

from . import _kernels

# The kernels' pooling modes (sentence-transformers' names in brackets where they differ):
# masked mean, max, CLS (the first pooled token), mean / sqrt(tokens) [mean_sqrt_len_tokens],
# position-weighted mean (token t weighs t + 1) and the last real token. "mean_max" names the pair
# ("mean", "max").
POOLING_MODES = {"mean": 0, "max": 1, "cls": 2, "mean_sqrt_len": 3, "weightedmean": 4,
                 "lasttoken": 5}
MODE_ALIASES = {"mean_max": ("mean", "max")}
LAYER_COMBINES = ("concat", "mean")

__all__ = [
    "POOLING_MODES", "MODE_ALIASES", "pool_modes", "LAYER_COMBINES", "default_threads", "pool", "masked_mean", "masked_max",
    "cls_pool", "mean_max", "gather_tokens", "l2_normalize", "pack_float16", "pack_bfloat16",
    "pack_int8", "pack_binary", "bfloat16_to_float32", "SPLADE_POOLINGS", "splade",
    "flatten_ids", "gather_rows", "group_rows", "greedy_run",
]


def default_threads(n_threads: int | None = None) -> int:
    """The thread count kernels use: the given one, else the cores this process may run on."""
    if n_threads is not None:
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        return int(n_threads)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_layers(hidden) -> tuple[list[np.ndarray], bool]:
    """Validated layers as the kernels take them, and whether 16-bit ones hold bfloat16."""
    layers = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden]
    if not layers:
        raise ValueError("hidden: need at least one layer, got an empty sequence")
    first = layers[0]
    for i, layer in enumerate(layers):
        if not isinstance(layer, np.ndarray):
            raise ValueError(f"hidden[{i}]: expected a numpy array, got {type(layer).__name__}")
        if layer.ndim != 3:
            raise ValueError(f"hidden[{i}]: expected shape (batch, seq, hidden), got {layer.shape}")
        if layer.dtype not in (np.float32, np.float16, np.uint16):
            raise ValueError(f"hidden[{i}]: dtype must be float32, float16 or uint16 (bfloat16 bits), "
                             f"got {layer.dtype}")
        if not layer.flags.c_contiguous:
            raise ValueError(f"hidden[{i}]: must be C-contiguous")
        if layer.shape != first.shape or layer.dtype != first.dtype:
            raise ValueError(f"hidden[{i}]: every layer must match hidden[0] "
                             f"({first.shape} {first.dtype}), got {layer.shape} {layer.dtype}")
        if 0 in layer.shape:
            raise ValueError(f"hidden[{i}]: empty shape {layer.shape}")
    # Kernels read 16-bit inputs as raw bits; numpy's float16 becomes a uint16 view (no copy).
    bf16 = first.dtype == np.uint16
    return [layer.view(np.uint16) if layer.dtype == np.float16 else layer for layer in layers], bf16


def _as_lengths(lengths, batch: int, seq: int) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {lengths.shape}")
    if lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths: must be integers, got {lengths.dtype}")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > seq))
    if bad.size:
        raise ValueError(f"lengths[{bad[0]}] = {lengths[bad[0]]} is outside 1..{seq} (seq)")
    return lengths


def _check_out(out, shape: tuple, dtype=np.float32) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype:
        got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out: expected a {shape} {np.dtype(dtype)} array, got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out: must be C-contiguous and writeable")
    return out


def _check_combine(layer_combine: str) -> bool:
    if layer_combine not in LAYER_COMBINES:
        raise ValueError(f"layer_combine must be one of {LAYER_COMBINES}, got {layer_combine!r}")
    return layer_combine == "mean"


def _layer_args(layers: list[np.ndarray], n_threads: int):
    """The layers' data addresses and one float32 scratch row per thread (room for a combined
    token and the running sum, weighted sum and max of pooling)."""
    pointers = np.array([layer.ctypes.data for layer in layers], dtype=np.uintp)
    scratch = np.empty((n_threads, 4 * layers[0].shape[2]), dtype=np.float32)
    return pointers, scratch


def _combined_width(layers, combine_mean: bool) -> int:
    return layers[0].shape[2] * (1 if combine_mean else len(layers))


def pool_modes(mode) -> tuple[str, ...]:
    """A mode name, an alias ("mean_max") or a sequence of names -> the tuple of mode names."""
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    modes = tuple(name for m in modes for name in MODE_ALIASES.get(m, (m,)))
    if not modes or any(m not in POOLING_MODES for m in modes):
        raise ValueError(f"mode must be one of {tuple(POOLING_MODES) + tuple(MODE_ALIASES)} or a "
                         f"sequence of them, got {mode!r}")
    return modes


def pool(hidden, lengths, mode="mean", layer_combine: str = "concat", out=None,
         n_threads: int | None = None, starts=None) -> np.ndarray:
    """Pool the real tokens of every row.

    hidden: one (batch, seq, hidden) array or a sequence of such arrays (layers). Several layers
    are combined per token before pooling: "concat" (columns layer by layer) or "mean"
    (element-wise). mode: one of POOLING_MODES, "mean_max", or a sequence of them, written side by
    side in that order. starts: per row, the first token pooled (default 0); tokens before it (a
    prompt) are left out, as sentence-transformers' include_prompt=False does.
    Returns (batch, width) float32, width = hidden x (layers if concat) x modes.
    """
    modes = pool_modes(mode)
    layers, bf16 = _as_layers(hidden)
    combine_mean = _check_combine(layer_combine)
    batch, seq, _ = layers[0].shape
    lengths = _as_lengths(lengths, batch, seq)
    if starts is None:
        starts = np.zeros(batch, dtype=np.int64)
    else:
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        if starts.shape != (batch,):
            raise ValueError(f"starts: expected shape ({batch},), got {starts.shape}")
        bad = np.flatnonzero((starts < 0) | (starts >= lengths))
        if bad.size:
            raise ValueError(f"starts[{bad[0]}] = {starts[bad[0]]} is outside "
                             f"0..{lengths[bad[0]] - 1} (lengths[{bad[0]}] - 1)")
    width = _combined_width(layers, combine_mean) * len(modes)
    out = _check_out(out, (batch, width))
    threads = default_threads(n_threads)
    pointers, scratch = _layer_args(layers, threads)
    codes = np.array([POOLING_MODES[m] for m in modes], dtype=np.intc)
    _kernels.pool(layers[0], pointers, combine_mean, lengths, starts, codes, bf16, out, scratch,
                  threads)
    return out


def masked_mean(hidden, lengths, out=None, n_threads: int | None = None) -> np.ndarray:
    """Mean over each row's first lengths[b] tokens: (batch, hidden) float32."""
    return pool(hidden, lengths, "mean", out=out, n_threads=n_threads)


def masked_max(hidden, lengths, out=None, n_threads: int | None = None) -> np.ndarray:
    """Element-wise max over each row's first lengths[b] tokens: (batch, hidden) float32."""
    return pool(hidden, lengths, "max", out=out, n_threads=n_threads)


def cls_pool(hidden, lengths, out=None, n_threads: int | None = None) -> np.ndarray:
    """Each row's first token (position 0) as float32."""
    return pool(hidden, lengths, "cls", out=out, n_threads=n_threads)


def mean_max(hidden, lengths, out=None, n_threads: int | None = None) -> np.ndarray:
    """Masked mean and masked max concatenated: (batch, 2 * hidden) float32."""
    return pool(hidden, lengths, "mean_max", out=out, n_threads=n_threads)


def gather_tokens(hidden, lengths, layer_combine: str = "concat", out=None,
                  n_threads: int | None = None) -> np.ndarray:
    """Every row's real tokens back to back: (sum(lengths), width) float32, rows in order.

    Layers combine per token as in ``pool``. Split the result with ``np.cumsum(lengths)``.
    """
    layers, bf16 = _as_layers(hidden)
    combine_mean = _check_combine(layer_combine)
    batch, seq, _ = layers[0].shape
    lengths = _as_lengths(lengths, batch, seq)
    row_starts = np.zeros(batch, dtype=np.int64)
    np.cumsum(lengths[:-1], out=row_starts[1:])
    out = _check_out(out, (int(lengths.sum()), _combined_width(layers, combine_mean)))
    threads = default_threads(n_threads)
    pointers, scratch = _layer_args(layers, threads)
    _kernels.gather(layers[0], pointers, combine_mean, lengths, row_starts, bf16, out, scratch,
                    threads)
    return out


def _check_vectors(x, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32:
        got = f"{x.shape} {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{name}: expected a 2-d float32 array, got {got}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    return x


def l2_normalize(x: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """Scale each row of a (rows, dim) float32 array to unit L2 norm, in place; returns x.

    An all-zero row stays zero; a row holding inf or NaN becomes NaN.
    """
    _check_vectors(x)
    if not x.flags.writeable:
        raise ValueError("x: must be writeable (normalised in place)")
    _kernels.l2_normalize(x, default_threads(n_threads))
    return x


def pack_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE float16 (round to nearest even, overflow to inf): numpy's conversion is
    already exact and vectorised, so it is used as is."""
    with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as IEEE says; no warning
        return _check_vectors(x).astype("<f2")


def pack_bfloat16(x: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    x = _check_vectors(x)
    out = np.empty(x.shape, dtype=np.uint16)
    _kernels.to_bfloat16(x, out, default_threads(n_threads))
    return out


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 bit patterns (uint16) to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_int8(x: np.ndarray, n_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row: returns (q int8 (rows, dim), scales float32 (rows,)),
    x ~= q * scales[:, None]. scale = max |finite x| / 127. NaN -> 0, +-inf -> +-127; a row with
    no non-zero finite value gets scale 0."""
    x = _check_vectors(x)
    q = np.empty(x.shape, dtype=np.int8)
    scales = np.empty(x.shape[0], dtype=np.float32)
    _kernels.quantize_int8(x, q, scales, default_threads(n_threads))
    return q, scales


def pack_binary(x: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """Sign bits: bit = (x > 0), eight to a byte, most significant first (numpy.packbits order,
    so ``np.unpackbits(packed, axis=1, count=dim)`` recovers them). NaN and zeros give 0."""
    x = _check_vectors(x)
    out = np.empty((x.shape[0], (x.shape[1] + 7) // 8), dtype=np.uint8)
    _kernels.pack_sign_bits(x, out, default_threads(n_threads))
    return out


SPLADE_POOLINGS = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")  # log(1 + relu(x)), and log1p of that once more


def splade(logits, lengths, pooling: str = "max", activation: str = "relu", out=None,
           n_threads: int | None = None) -> np.ndarray:
    """SPLADE pooling of masked-language-model logits (batch, seq, vocab), as
    sentence-transformers' SpladePooling computes it: log(1 + relu(logit)) for every token and
    vocabulary entry ("log1p_relu": log1p once more), then the max or the sum over each row's
    real tokens. Returns (batch, vocab) float32, zero wherever no real token's logit was
    positive."""
    if pooling not in SPLADE_POOLINGS:
        raise ValueError(f"pooling must be one of {SPLADE_POOLINGS}, got {pooling!r}")
    if activation not in SPLADE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {SPLADE_ACTIVATIONS}, got {activation!r}")
    (layer,), bf16 = _as_layers(logits)
    batch, seq, vocab = layer.shape
    lengths = _as_lengths(lengths, batch, seq)
    out = _check_out(out, (batch, vocab))
    _kernels.splade(layer, lengths, pooling == "sum", activation == "log1p_relu", bf16, out,
                    default_threads(n_threads))
    return out


def flatten_ids(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of token ids (the tokenizer's encodings' .ids) back to back: the int32 ids and the
    int64 offsets where each list starts (len(rows) + 1 of them, the last the total), as
    text-embeddings-inference's cu_seq_lengths. Every id must fit int32."""
    if not isinstance(rows, list) or not all(type(row) is list for row in rows):
        raise ValueError("rows: expected a list of lists of ints")
    flat = np.empty(sum(map(len, rows)), dtype=np.int32)
    offsets = np.empty(len(rows) + 1, dtype=np.int64)
    _kernels.flatten_ids(rows, flat, offsets)
    return flat, offsets


def gather_rows(flats: list[np.ndarray], offsets: list[np.ndarray], job_of: np.ndarray,
                index: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts from several flat buffers (flats[j] holds text i at offsets[j][i]:offsets[j][i +
    1]) back to back: row r is text index[r] of buffer job_of[r]. Returns the int32 ids (total
    of them: the rows' tokens) and the int64 offsets where each row starts (len(job_of) + 1)."""
    flats = [np.ascontiguousarray(flat, dtype=np.int32) for flat in flats]
    offsets = [np.ascontiguousarray(off, dtype=np.int64) for off in offsets]
    out = np.empty(total, dtype=np.int32)
    out_offsets = np.empty(len(job_of) + 1, dtype=np.int64)
    _kernels.gather_rows(flats, offsets, np.ascontiguousarray(job_of, dtype=np.int64),
                         np.ascontiguousarray(index, dtype=np.int64), out, out_offsets)
    if out_offsets[-1] != total:
        raise ValueError(f"total: the rows hold {int(out_offsets[-1])} tokens, not {total}")
    return out, out_offsets


def group_rows(group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                        np.ndarray]:
    """Rows by their group (each 0 <= group[r] < groups), as np.unique(group,
    return_inverse=True) and a stable argsort would, in one C pass each way: (present, the groups
    that occur, ascending; number, row r's place among them; order, the rows grouped, in row
    order within a group; ends, where each present group's rows end in order)."""
    group = np.ascontiguousarray(group, dtype=np.int64)
    rows = len(group)
    number, order, present, ends = (np.empty(rows, dtype=np.int64) for _ in range(4))
    k = _kernels.group_rows(group, np.zeros(groups, dtype=np.int64),
                            np.empty(groups, dtype=np.int64), number, order, present, ends)
    return present[:k], number, order, ends[:k]


def greedy_run(keys: list[int], at: int, budget: int, shift: int) -> tuple[int, int]:
    """The run holding keys[at] (a sorted list of ints, each a text's length above `shift`
    bits), of the runs that cut the list greedily from the first, each the longest whose count
    x last length fits `budget`: (its first index, the index past its last)."""
    if not isinstance(keys, list):
        raise ValueError("keys: expected a list of ints")
    return _kernels.greedy_run(keys, at, budget, shift)
