"""Pooling where the forward pass ran (torch), for a GPU: the kernels' semantics, on the device.

The kernels (ext.pool) pool on the host, so on a GPU every hidden state would cross to the host
first: a pass of 32,768 tokens of all-MiniLM-L6-v2 in float16 is 25 MB (BERT-base: 50 MB) copied
and then read again by the kernels, against 0.1 ms of the device's own time to pool it. Pooled on
the device, only (rows, width) float32 crosses: about 1.4 MB for that pass. Every peer pools on
the device (sentence-transformers, text-embeddings-inference, Infinity). On the CPU the kernels
stay: 4.5x to 52x torch's masked mean (BENCHMARKS.md, "Pooling kernels"). Which device pools is
limits.POOL_ON_DEVICE; `make gpu-check` times both (benchmarks/probes/gpu_pooling.py).

What it computes is ext.pool's, to float32 rounding (tests/test_kernels.py holds them side by
side): tokens start..length-1 of each row, accumulated in float32; the modes side by side in
their order; several layers concatenated (a block of every mode per layer) or averaged per token
first. And a SPLADE model's pooling, ext.splade's: there the logits are (rows, tokens,
vocabulary), 2 GB of float16 for a pass of 32,768 tokens, where the pooled rows are 4 MB a
hundred texts.
"""

from __future__ import annotations

import numpy as np
import torch


def pool(layers: list[torch.Tensor], lengths: np.ndarray, rows: np.ndarray,
         modes: tuple[str, ...], combine_mean: bool, starts: np.ndarray | None) -> np.ndarray:
    """Pool `rows` of the layers (each (batch, seq, hidden), on one device) as ext.pool does:
    lengths and starts are the chosen rows' own (starts None: 0). Returns (len(rows), width)
    float32 on the host."""
    device = layers[0].device
    every_row = len(rows) == layers[0].shape[0] and np.array_equal(rows, np.arange(len(rows)))
    if not every_row:
        index = torch.from_numpy(rows).to(device)
        layers = [layer.index_select(0, index) for layer in layers]
    layers = [layer.float() for layer in layers]  # float32 accumulation, as the kernels'
    if combine_mean and len(layers) > 1:
        layers = [torch.stack(layers).mean(0)]
    seq = layers[0].shape[1]
    ends = torch.from_numpy(np.asarray(lengths, dtype=np.int64)).to(device)
    firsts = torch.zeros_like(ends) if starts is None else \
        torch.from_numpy(np.asarray(starts, dtype=np.int64)).to(device)
    positions = torch.arange(seq, device=device)
    pooled = (positions >= firsts[:, None]) & (positions < ends[:, None])  # (rows, seq)
    counts = (ends - firsts).float()[:, None]
    blocks = []
    for layer in layers:
        for mode in modes:
            blocks.append(_mode(mode, layer, pooled, counts, positions, firsts, ends))
    return torch.cat(blocks, dim=1).cpu().numpy()


def _mode(mode: str, layer: torch.Tensor, pooled: torch.Tensor, counts: torch.Tensor,
          positions: torch.Tensor, firsts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """One mode of one layer: (rows, hidden). Positions not pooled are filled over, never
    multiplied (padding may hold anything, NaN included); sums are sums, not matmuls (a
    matmul may run in TF32 on a GPU: 10 bits)."""
    left_out = ~pooled[:, :, None]
    if mode in ("mean", "mean_sqrt_len"):
        total = layer.masked_fill(left_out, 0).sum(1)
        return total / (counts if mode == "mean" else counts.sqrt())
    if mode == "weightedmean":  # token t weighs t + 1, its position in the row
        weights = pooled * (positions + 1).float()
        total = (layer.masked_fill(left_out, 0) * weights[:, :, None]).sum(1)
        return total / weights.sum(1, keepdim=True)
    if mode == "max":  # NaN wins, as in the kernels (amax propagates it)
        return layer.masked_fill(left_out, -torch.inf).amax(1)
    if mode in ("cls", "lasttoken"):  # the first pooled token, or the last real one
        at = firsts if mode == "cls" else ends - 1
        return layer[torch.arange(layer.shape[0], device=layer.device), at]
    raise ValueError(f"pooling mode {mode!r} has no device version")


# Rows of logits taken at once by splade(): at most this many float32 values of (rows, tokens,
# vocabulary) exist at a time (256 MB), whatever the pass's size.
SPLADE_CHUNK_VALUES = 1 << 26


def splade(logits: torch.Tensor, lengths: np.ndarray, rows: np.ndarray, pooling: str,
           activation: str, chunk_values: int = SPLADE_CHUNK_VALUES) -> np.ndarray:
    """ext.splade of `rows` of a pass's masked-language logits (batch, seq, vocab), on their
    device: log(1 + relu(x)) (log1p once more for "log1p_relu") over each row's real tokens,
    their max ("max": of the logits, then the activation, which never decreases) or sum.
    lengths are the chosen rows'. Returns (len(rows), vocab) float32 on the host; rows go a
    few at a time, at most chunk_values float32 values of them at once."""
    device, (_, seq, vocab) = logits.device, logits.shape
    ends = torch.from_numpy(np.asarray(lengths, dtype=np.int64)).to(device)
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)
    step = max(1, chunk_values // max(1, seq * vocab))
    pooled = []
    for first in range(0, len(rows), step):
        chunk = logits.index_select(0, index[first:first + step]).float()
        left_out = (torch.arange(seq, device=device) >= ends[first:first + step, None])[:, :, None]
        if pooling == "max":  # NaN stays (amax propagates it); no real token above 0: 0
            pooled.append(_splade_activation(chunk.masked_fill(left_out, -torch.inf).amax(1),
                                             activation))
        else:
            pooled.append(_splade_activation(chunk, activation).masked_fill(left_out, 0).sum(1))
        del chunk
    return torch.cat(pooled).cpu().numpy()


def _splade_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    x = torch.log1p(torch.relu(x))
    return torch.log1p(x) if activation == "log1p_relu" else x
