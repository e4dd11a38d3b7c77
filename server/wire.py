"""The wire dtypes of result tensors and their packing, in one place: the batcher packs with
them, the core sizes answers with them before any compute, the front-ends read them back.

Tensors travel as raw little-endian bytes with a dtype and a shape (like Triton's raw contents):
float32, float16, bfloat16, int8 (symmetric per-vector scale sent beside) and binary (sign
bits, packed 8 to a byte, np.packbits order). The conversions are the ext kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ext  # the kernels: ext/ beside server/ in the checkout

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8", "binary")


@dataclass
class Packed:
    """A result tensor in its wire dtype: little-endian bytes, logical shape, int8 scales."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    scales: np.ndarray | None = None

    def as_float32(self) -> np.ndarray:
        """The values as a float32 array (a view of the bytes); only for float32 tensors."""
        if self.dtype != "float32":
            raise ValueError(f"a {self.dtype} tensor is not float32")
        return np.frombuffer(self.data, "<f4").reshape(self.shape)


def pack(vectors: np.ndarray, dtype: str) -> Packed:
    """float32 vectors -> wire bytes in `dtype`."""
    shape = tuple(vectors.shape)
    if dtype == "float32":
        return Packed(dtype, shape, vectors.astype("<f4", copy=False).tobytes())
    if dtype == "float16":
        return Packed(dtype, shape, ext.pack_float16(vectors).tobytes())
    if dtype == "bfloat16":
        return Packed(dtype, shape, ext.pack_bfloat16(vectors).astype("<u2", copy=False).tobytes())
    if dtype == "int8":
        q, scales = ext.pack_int8(vectors)
        return Packed(dtype, shape, q.tobytes(), scales)
    if dtype == "binary":
        return Packed(dtype, shape, ext.pack_binary(vectors).tobytes())
    raise ValueError(f"unknown wire dtype {dtype!r}")


def response_bytes(rows: int, width: int, dtype: str) -> int:
    """Bytes of a response tensor: rows x width values in the wire dtype (int8 adds a float32
    scale per row; binary packs 8 values a byte)."""
    if dtype == "binary":
        return rows * -(-width // 8)
    if dtype == "int8":
        return rows * (width + 4)
    return rows * width * (4 if dtype == "float32" else 2)
