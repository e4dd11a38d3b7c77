"""The server's limits and their defaults, in one place: the command line's flags are built from
these defaults, Info reports them, the front-ends and the core enforce them."""

from __future__ import annotations

from dataclasses import dataclass

# Measured (BENCHMARKS.md): on the CPU, small batches keep activations in cache; 1024 tokens was
# the fastest budget for float32 and bfloat16 alike. A GPU wants big batches.
BATCH_TOKENS_BY_DEVICE = {"cpu": 1024, "cuda": 32768}
# Padding whose compute is free: a pass's fixed cost (its host work, about 0.25 ms a pass here,
# and launching its kernels), counted in the device's operations meanwhile. On the CPU every
# operation costs (0: a caller's first message is cut in groups of similar length); on a GPU,
# 0.5 ms at 50 TFLOPS, an estimate from arithmetic: no GPU has timed one pass against groups yet
# (benchmarks/gpu_flops.py, in `make gpu-check`, does). Engine.free_padding_flops applies it.
FREE_PADDING_FLOPS_BY_DEVICE = {"cpu": 0, "cuda": 25e9}
# Where hidden states are pooled (server/device_pooling.py): on the CPU by the kernels (4.5x to
# 52x torch's masked mean); on a GPU on the device, so that only the pooled rows cross to the
# host, not every hidden state (25-50 MB a pass; a SPLADE model's logits, 2 GB): chosen by that
# arithmetic and by what every peer does; no GPU has timed the two yet
# (benchmarks/probes/gpu_pooling.py in `make gpu-check`).
POOL_ON_DEVICE = {"cpu": False, "cuda": True}
# The forward pass's precisions, and each device's default (the command line offers these).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BY_DEVICE = {"cpu": "float32", "cuda": "float16"}


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int = 10_000
    max_chars_per_text: int = 100_000
    max_batch_tokens: int = BATCH_TOKENS_BY_DEVICE["cpu"]
    max_message_bytes: int = 64 * 2**20
    stream_window: int = 64  # stream messages read ahead of their responses
    max_queue_texts: int = 100_000  # texts admitted and still waiting, all callers, per lane
    max_response_bytes: int = 64 * 2**20  # one response's tensor bytes, known before any compute
    # Held on behalf of clients (budget.py): requests read ahead and answers not yet taken.
    max_held_bytes: int = 2**30  # all clients together
    max_connection_held_bytes: int = 128 * 2**20  # one connection's share (two 60 MB answers)
    stall_timeout_s: float = 30.0  # a connection at its share taking no answer this long is cut
    max_concurrent_streams: int = 100  # gRPC calls open at once on one connection
    http_read_timeout_s: float = 10.0  # an HTTP request's headers and body, from its start
    max_http_connections: int = 0  # open at once; 0: half the file descriptors free at start
    bulk_share: float = 0.2  # forward passes the bulk lane gets at least, while both have work
