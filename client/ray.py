"""bertstream as a stage of a Ray Data pipeline: a fleet of servers embeds a dataset's text column.

    import ray.data
    from .ray import embed

    docs = ray.data.read_parquet("s3://bucket/paragraphs/")            # columns: id, text
    embed(docs, ["embed-0:50051", "embed-1:50051"]).write_parquet("s3://bucket/vectors/")

Needs the `bertstream[ray]` extra. The Ray workers only send texts and decode answers (each Ray
actor holds one client for its lifetime, round robin over the replicas); the forward passes run on
the servers, so the fleet and the Ray cluster are sized separately (README, "Beyond one machine").

Exactly once: a batch is computed whole or not at all, and Ray writes each output block once. A
message whose replica dies is sent again to another one by the client (a server computes from
scratch, so a resend can neither lose nor double a row); a batch that fails anyway with a passing
error (every replica unreachable for a while, an overloaded fleet, a deadline) raises
TransientEmbedError, which Ray retries (task_retries times), and so are batches whose actor died.
Errors that no retry can fix (a bad option, a text too long with truncate=False, a wrong token)
stop the job with the server's message.
"""

from __future__ import annotations

from typing import Sequence

import grpc
import numpy as np
import pyarrow as pa
import ray.data

from .core import Int8Embeddings, build_request
from .sync import Client

# gRPC codes that a later try of the same batch can get past.
PASSING = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


class TransientEmbedError(RuntimeError):
    """A batch failed for a passing reason; Ray runs it again."""


def embed(dataset: "ray.data.Dataset", target: str | Sequence[str], column: str = "text",
          output_column: str = "embedding", *, concurrency: int = 2, batch_size: int = 1024,
          message_size: int = 64, window: int = 16, num_cpus: float = 0.25,
          task_retries: int = 10, preserve_order: bool = True, message_timeout: float = 300,
          token: str | None = None, tls: dict | None = None, tokenize_locally: bool = False,
          **embed_options) -> "ray.data.Dataset":
    """`dataset` with a vector column added: every row once, its other columns (an id) kept.

    target: one "host:port", a gRPC target with many addresses ("dns:///embed:50051"), or a list
    of replicas. concurrency: Ray actors, each with one client and one batch at a time.
    batch_size: rows per Ray batch (the unit of retry). message_size, window: texts per gRPC
    message and messages in flight per actor, so a fleet gets up to concurrency x window x
    message_size texts at once (defaults: 2,048, enough to keep a few CPU replicas busy; raise
    concurrency for a larger fleet). num_cpus: Ray CPUs reserved per actor (it only sends and
    decodes). task_retries: batches in a row that one actor may fail for a passing reason
    before the job stops. preserve_order: output rows in input order (Ray's execution option, set on
    the dataset's context); without it, in the order batches finish. tokenize_locally: each actor
    tokenizes with the server's tokenizer and sends token ids (Client's option): the tokenizing
    moves to the Ray cluster's cores.
    embed_options: those of Client.embed (pooling, layers, normalize, dtype, truncate,
    prompt_name, prompt, dimensions; none means the model's own pipeline; priority, "bulk" here
    unless given; model, one of the server's models by name, its default if none).

    The column is a fixed-size list of float32 (uint8 for dtype="binary", int8 plus a
    `<output_column>_scale` float32 column for dtype="int8"); with pooling="none", a list of
    fixed-size lists, one per token.
    """
    embed_options.setdefault("priority", "bulk")  # corpus work: the server's bulk lane
    build_request([""], "check", **embed_options)  # a wrong option fails here, not in a worker
    context = dataset.context
    retried = context.actor_task_retry_on_errors
    if retried is not True:
        context.actor_task_retry_on_errors = [*(retried or []), TransientEmbedError]
    if preserve_order:
        context.execution_options.preserve_order = True
    # Blocks of batch_size rows: a few big input files (Ray read ten shards as one block here)
    # would otherwise keep all but one actor idle.
    blocks = dataset.repartition(target_num_rows_per_block=batch_size)
    return blocks.map_batches(
        _Embedder, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        fn_constructor_kwargs=dict(target=target, column=column, output_column=output_column,
                                   message_size=message_size, window=window, token=token,
                                   tls=tls or {}, message_timeout=message_timeout,
                                   tokenize_locally=tokenize_locally,
                                   give_up_after=task_retries, options=embed_options))


class _Embedder:
    """One Ray actor's client; called with an Arrow table, returns it with the vectors."""

    def __init__(self, target, column, output_column, message_size, window, token, tls,
                 message_timeout, tokenize_locally, give_up_after, options):
        self.client = Client(target, token=token, tokenize_locally=tokenize_locally, **tls)
        # Ray retries a TransientEmbedError without limit (Ray Data's actor default): past this
        # many failed batches in a row, the fleet is taken to be down and the job stops.
        self.give_up_after, self.failed_in_a_row = give_up_after, 0
        self.column, self.output_column = column, output_column
        self.message_size, self.window, self.message_timeout = message_size, window, message_timeout
        self.options = options

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.column not in table.column_names:
            raise ValueError(f"no column {self.column!r} to embed; columns: {table.column_names}")
        texts = table.column(self.column)
        if texts.null_count:
            raise ValueError(f"column {self.column!r} holds {texts.null_count} null texts")
        if not len(texts):  # an empty block still gets the column, with the same type
            # (from one text of one token: "" has none where a tokenizer adds no special tokens)
            return _with_vectors(table, self.output_column, self._embed(["."]), rows=0)
        return _with_vectors(table, self.output_column, self._embed(texts.to_pylist()))

    def _embed(self, texts: list[str]) -> list:
        try:  # spread: each message its own call, over every replica, resent if one goes away
            parts = list(self.client.stream(
                texts, batch_size=self.message_size, window=self.window, spread=True,
                message_timeout=self.message_timeout, **self.options))
        except grpc.RpcError as error:
            self.failed_in_a_row += 1
            reason = f"{error.code().name}: {error.details()}"
            if error.code() not in PASSING:
                raise
            if self.failed_in_a_row > self.give_up_after:
                raise RuntimeError(f"{self.failed_in_a_row} batches in a row failed, the last "
                                   f"with {reason}") from None
            raise TransientEmbedError(reason) from None
        self.failed_in_a_row = 0
        return parts


def _with_vectors(table: pa.Table, name: str, parts: list, rows: int | None = None) -> pa.Table:
    """The table with the answers of its messages (in order) as Arrow columns; rows: keep only
    the first ones (0 for an empty block)."""
    if isinstance(parts[0], Int8Embeddings):
        vectors = np.concatenate([part.q for part in parts])[:rows]
        scales = np.concatenate([part.scales for part in parts])[:rows]
        return table.append_column(name, _fixed_size(vectors)).append_column(
            f"{name}_scale", pa.array(scales))
    if isinstance(parts[0], list):  # pooling="none": one (tokens, width) array per text
        texts = [text for part in parts for text in part][:rows]
        offsets = np.cumsum([0] + [len(text) for text in texts], dtype=np.int32)
        tokens = np.concatenate(texts) if texts else parts[0][0][:0]
        return table.append_column(name, pa.ListArray.from_arrays(
            pa.array(offsets), _fixed_size(tokens)))
    return table.append_column(name, _fixed_size(np.concatenate(parts)[:rows]))


def _fixed_size(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(n, width) as n fixed-size lists, zero-copy: a plain Arrow type that every Parquet reader
    knows, unlike Ray's tensor extension type."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
