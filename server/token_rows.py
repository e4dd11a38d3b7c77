"""Texts' token ids as they travel from the tokenizer to the forward pass: one flat buffer.

A request's ids are one int32 array, back to back, with the offsets where each text starts (as
text-embeddings-inference's cu_seq_lengths), not an array per text. It is built in one step from
the tokenizer's output (ext.flatten_ids), or is a view of a request's own token-id bytes; a
batch's texts are slices of it, copied once into the padded batch. What that saved, and why the
served host path hardly moved (the GIL): BENCHMARKS.md, "Flat token buffers, gRPC's floor".
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .. import ext


class TokenRows:
    """Texts' token ids: `flat` (int32) holds text i at offsets[i]:offsets[i + 1]."""

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, rows) -> "TokenRows":
        """Rows as they are (TokenRows), or from a sequence of id sequences (lists, arrays)."""
        if isinstance(rows, TokenRows):
            return rows
        if isinstance(rows, list) and all(type(row) is list for row in rows):
            return cls(*ext.flatten_ids(rows))  # the tokenizer's lists: one C loop
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate([np.asarray(row, dtype=np.int64) for row in rows]) if len(rows) \
            else np.empty(0, dtype=np.int64)
        if flat.size and (flat.min() < -2**31 or flat.max() >= 2**31):
            raise OverflowError("token ids must fit int32")
        return cls.of_lengths(flat.astype(np.int32), lengths)

    @classmethod
    def of_lengths(cls, flat: np.ndarray, lengths) -> "TokenRows":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"text {i} of {len(self)}")
        i %= len(self)
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.flat[start:end] for start, end in zip(self.offsets[:-1].tolist(),
                                                           self.offsets[1:].tolist()))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def total(self) -> int:
        """Tokens in all."""
        return int(self.offsets[-1])
