"""The request path every front-end shares, with no transport in it: plain values in, a result or
an EmbedError out.

Validation, the size of the answer, admission to the queue, tokenization off the event loop,
submission to the batcher, cancellation and the per-request metrics live here, once. A front-end
(service.py for gRPC) converts its wire format to an EmbedCall and the result back, and maps
EmbedError kinds to its own status codes; it decides nothing else, so limits and semantics cannot
drift apart between front-ends.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .admission import Admission
from .batcher import Batcher
from .jobs import INTERACTIVE, LANES, Job, JobResult
from .engine import EmbedOptions, Engine, Tokenized
from .errors import EmbedError, ErrorKind
from .limits import Limits
from .threads import name_os_thread
from .wire import WIRE_DTYPES, response_bytes

# Requests up to this many characters are tokenized on the event loop (tens of microseconds);
# bigger ones on a worker thread so the loop keeps serving.
INLINE_TOKENIZE_CHARS = 2000
# Token ids up to this many bytes are checked on the event loop, bigger ones on a worker thread.
INLINE_TOKEN_ID_BYTES = 256 * 1024
# Tokenize answers are built this many texts at a time (Core.tokenize).
TOKENIZE_CHUNK_TEXTS = 256


@dataclass
class SparseCall:
    """EmbedSparse in the core's terms: texts for a SPLADE model; top_k keeps each vector's
    largest values (None: the model's max_active_dims, else every non-zero one)."""

    texts: Sequence[str]
    top_k: int | None = None
    truncate: bool = True
    priority: str = INTERACTIVE
    model: str = ""

    @property
    def items(self) -> int:
        return len(self.texts)


@dataclass
class ScoreCall:
    """Rerank or Classify in the core's terms: items of one text (firsts) or of two (firsts and
    seconds, pairs), scored by a cross-encoder. For Rerank, firsts is the query once per
    document (one string, many references)."""

    task: str  # "rerank" or "classify" (Engine.tasks)
    firsts: Sequence[str]
    seconds: Sequence[str] | None = None
    raw_scores: bool = False  # logits, not the activation
    truncate: bool = True
    priority: str = INTERACTIVE
    model: str = ""
    first_field: str = "texts"  # the names errors give the two sides
    second_field: str = "text_pairs"

    @property
    def items(self) -> int:
        return len(self.firsts)

    @classmethod
    def rerank(cls, query: str, documents: Sequence[str], documents_field: str = "documents",
               **options) -> "ScoreCall":
        """The query paired with each document (errors name the documents by
        documents_field)."""
        return cls("rerank", [query] * len(documents), documents, first_field="query",
                   second_field=documents_field, **options)


@dataclass
class EmbedCall:
    """One embedding request in the core's terms. `texts` (a list, or a request's repeated field)
    is the core's to empty once tokenized (a request may hold up to max_message_bytes of them).
    Or, tokenized by the client, `token_ids` (int32 little-endian, back to back) with
    `token_lengths` per text."""

    texts: Sequence[str]
    pooling: str | None = None  # None: the model's pipeline (Engine.options)
    layers: tuple[int, ...] = ()
    layer_combine: str = "concat"
    normalize: bool | None = None
    prompt_name: str | None = None
    prompt: str | None = None
    dimensions: int = 0
    dtype: str = "float32"  # wire dtype of the result
    truncate: bool = True
    token_ids: bytes = b""
    token_lengths: Sequence[int] = ()
    priority: str = INTERACTIVE  # the lane it waits in (jobs.LANES)
    model: str = ""  # the served model's name (Engine.name); empty: the default
    tokenizing_sha256: str = ""  # with token_ids: the model they were made for (empty: unsaid)

    @property
    def items(self) -> int:
        """Texts in the request, sent as text or as token ids."""
        return len(self.token_lengths) or len(self.texts)


class Core:
    def __init__(self, engines: Sequence[Engine], batcher: Batcher, limits: Limits,
                 admissions: dict[str, Admission]):
        """engines: the served models, by their names; the first is the default."""
        self.engines = {engine.name: engine for engine in engines}
        self.engine = engines[0]  # the default model
        self.batcher = batcher
        self.limits = limits
        self.admissions = admissions  # lane -> its room in the queue
        self.metrics = batcher.metrics
        # Tokenizing a big message takes milliseconds; keep it off the event loop.
        self._tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bertstream-tok",
                                              initializer=name_os_thread)
        # Requests in the order they came: a stream's messages may finish tokenizing out of
        # order, and the batcher serves a caller's oldest first (Queue).
        self._sequence = itertools.count()

    # ------------------------------------------------------------------ checks

    def engine_for(self, model: str | None) -> Engine:
        """The served model of that name; empty or None: the default."""
        if not model:
            return self.engine
        engine = self.engines.get(model)
        if engine is None:
            raise EmbedError.not_found(
                f"model: {model[:200]!r} is not served here; the served models are "
                f"{', '.join(self.engines)} (empty: the default, {self.engine.name})")
        return engine

    def check_texts(self, texts, field: str = "texts") -> None:
        """At least one, at most max_texts_per_request, each within max_chars_per_text (texts;
        for token_lengths, the count only)."""
        if not texts:
            raise EmbedError.invalid(f"{field}: empty; send at least one text")
        if len(texts) > self.limits.max_texts_per_request:
            raise EmbedError.too_large(
                f"{field}: {len(texts)} texts, over the limit of "
                f"{self.limits.max_texts_per_request} per request (max_texts_per_request)")
        if field != "token_lengths":
            self.check_chars(texts, field)

    def check_chars(self, texts, field: str) -> None:
        for i, text in enumerate(texts):
            if len(text) > self.limits.max_chars_per_text:
                raise EmbedError.too_large(
                    f"{field}[{i}]: {len(text)} characters, over the limit of "
                    f"{self.limits.max_chars_per_text} (max_chars_per_text)")

    def options(self, call: EmbedCall) -> EmbedOptions:
        if call.dtype not in WIRE_DTYPES:
            raise EmbedError.invalid(f"dtype: unknown value {call.dtype!r}; use one of "
                                     f"{WIRE_DTYPES}")
        return self.engine_for(call.model).options(
            call.pooling, call.layers, call.layer_combine, call.normalize, call.prompt_name,
            call.prompt, call.dimensions)

    def check_response_size(self, rows: int, options: EmbedOptions, dtype: str) -> None:
        """Refuse a response over max_response_bytes before computing it: rows are texts, or
        for token-level output, tokens."""
        size = response_bytes(rows, options.width, dtype)
        if size > self.limits.max_response_bytes:
            unit = "tokens" if options.token_level else "texts"
            raise EmbedError.too_large(
                f"the response would be {size:,} bytes ({rows:,} {unit} x {options.width} values "
                f"in {dtype}), over the limit of {self.limits.max_response_bytes:,} "
                f"(max_response_bytes); send fewer texts, layers or dimensions")

    def memory_cost(self, call: EmbedCall, request_bytes: int) -> int:
        """What a request may hold in memory while in flight: its own bytes and its response's
        (for token-level output, at most max_response_bytes). A bad request costs its bytes."""
        try:
            options = self.options(call)
        except EmbedError:
            return request_bytes
        rows = call.items * (self.engine_for(call.model).max_length if options.token_level
                             else 1)
        return request_bytes + min(response_bytes(rows, options.width, call.dtype),
                                   self.limits.max_response_bytes)

    def score_cost(self, call: ScoreCall, request_bytes: int) -> int:
        """What a Rerank or Classify request may hold: its bytes, its tokens (ids and segment
        ids, at most the max length a pair) and its scores."""
        try:
            engine = self.engine_for(call.model)
        except EmbedError:
            return request_bytes
        held = call.items * (engine.max_length * 8 + (len(engine.labels) or 1) * 4)
        return request_bytes + min(held, self.limits.max_response_bytes)

    def tokenize_cost(self, request_bytes: int) -> int:
        """What a Tokenize request may hold: its bytes and its answer's (some 16 bytes a token,
        a token some 4 bytes of text; at most max_response_bytes)."""
        return request_bytes + min(4 * request_bytes, self.limits.max_response_bytes)

    def info(self, model: str | None = None) -> dict:
        """What the server runs for that model, as plain values: its name and source, sizes,
        device, precision, limits and default pipeline (the front-ends' Info and /info)."""
        engine = self.engine_for(model)
        pipeline = engine.pipeline
        return {
            "model": engine.model_name, "name": engine.name, "weight_bytes": engine.weight_bytes,
            "kind": engine.kind, "tasks": list(engine.tasks), "labels": list(engine.labels),
            "hidden_size": engine.hidden_size,
            "num_layers": engine.num_layers, "max_input_tokens": engine.max_length,
            "device": str(engine.device), "dtype": engine.dtype,
            "limits": dict(vars(self.limits)),
            "pipeline": {
                "source": pipeline.source, "modules": list(pipeline.modules),
                "pooling": list(pipeline.pooling), "include_prompt": pipeline.include_prompt,
                "dense": [{"in_features": d.in_features, "out_features": d.out_features,
                           "bias": d.bias is not None, "activation": d.activation_name}
                          for d in pipeline.dense],
                "normalize": pipeline.normalizes, "dimensions": engine.output_width,
                "prompts": dict(pipeline.prompts),
                "default_prompt_name": pipeline.default_prompt_name or ""},
            "tokenizer_sha256": engine.tokenizer_sha256,
            "tokenizing_sha256": engine.tokenizing_sha256,
            "forward_flops": engine.FLOPS_FORMULA,
        }

    def models(self) -> list[dict]:
        """info() of every served model, the default first (ListModels, /v1/models)."""
        return [self.info(name) for name in self.engines]

    # ------------------------------------------------------------------ the path

    async def admit(self, texts: int, wait: bool, lane: str = INTERACTIVE) -> None:
        """Take room for `texts` in the lane's queue before any work. When there is none, a call
        that does not wait fails at once (overloaded) and one that waits (a stream message)
        waits its turn (admission.py). Each lane has room of its own: a bulk flood never fills
        the interactive lane's."""
        admission = self.admissions[lane]
        if wait:
            await admission.take(texts)
        elif not admission.try_take(texts):
            raise EmbedError.overloaded(
                f"queue full: {admission.queued} texts waiting and {admission.waiting} requests "
                f"in line in the {lane} lane, limit {self.limits.max_queue_texts} texts "
                f"(max_queue_texts); retry later")

    async def _on_tokenizer(self, small: bool, work: Callable, *args):
        """work(*args): here when its input is small (microseconds: not worth a thread hop),
        else on a tokenizer thread so the loop keeps serving."""
        if small:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work, *args)

    async def tokenize(self, texts: Sequence[str], truncate: bool,
                       add: Callable[[Tokenized], int], model: str | None = None) -> None:
        """Token ids, strings and character offsets, a chunk of texts at a time: add(chunk) puts
        one chunk into the front-end's answer and returns the bytes it added; past
        max_response_bytes, EmbedError (too large). Chunks are tokenized and converted on a
        tokenizer thread (but for a small request): the tokenizer's per-token objects exist for
        one chunk at a time, and the loop builds none of the answer (built whole on the loop,
        10,000 texts of 256 tokens held it 7 s and took over 1 GB: tests/test_hostile.py). A
        caller that goes away stops it at the next chunk. It shares the tokenizer threads, so it
        takes room in the queue like an embedding call (and never waits for it)."""
        engine = self.engine_for(model)
        self.check_texts(texts)
        await self.admit(len(texts), wait=False)
        gone = threading.Event()  # the caller went away: stop at the next chunk
        try:
            await self._on_tokenizer(sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS,
                                     self._tokenize_into, engine, texts, truncate, add, gone)
        except asyncio.CancelledError:
            gone.set()
            raise
        finally:
            self.admissions[INTERACTIVE].release(len(texts))

    def _tokenize_into(self, engine: Engine, texts: Sequence[str], truncate: bool,
                       add: Callable[[Tokenized], int], gone: threading.Event) -> None:
        size, limit = 0, self.limits.max_response_bytes
        for first in range(0, len(texts), TOKENIZE_CHUNK_TEXTS):
            if gone.is_set():
                return
            chunk = texts[first:first + TOKENIZE_CHUNK_TEXTS]
            size += add(engine.tokenize(chunk, truncate, details=True, first=first))
            if size > limit:
                raise EmbedError.too_large(
                    f"the response is over the limit of {limit:,} bytes (max_response_bytes) "
                    f"after {first + len(chunk):,} of {len(texts):,} texts; send fewer texts")

    async def embed(self, call: EmbedCall, wait: bool = False, caller: object = None) -> JobResult:
        """Validate, admit, tokenize, queue, await. Raises EmbedError. The size of the answer is
        checked before any work (for token-level output, once the tokens are counted); room in
        the queue is taken before tokenizing and given back by the batcher when the texts leave
        it (or here, if they never reach it). caller: whose turn this is in the batcher (a
        stream's messages share one)."""
        sequence = next(self._sequence)  # before any await: the order requests came in
        engine = self.engine_for(call.model)
        require(engine, "embed")
        if call.token_lengths and call.texts:
            raise EmbedError.invalid("texts and token_ids: send one or the other, not both")
        if call.token_ids and not call.token_lengths:
            raise EmbedError.invalid(f"token_ids: {len(call.token_ids):,} bytes but no "
                                     f"token_lengths; say how many ids belong to each text")
        if call.token_lengths:
            self.check_texts(call.token_lengths, "token_lengths")
            if call.tokenizing_sha256 and \
                    call.tokenizing_sha256.lower() != engine.tokenizing_sha256:
                raise EmbedError(ErrorKind.STALE, (
                    f"token_ids were made for tokenizing {call.tokenizing_sha256[:16]}, not model "
                    f"{engine.name}'s {engine.tokenizing_sha256[:16]} (its tokenizer, prompts "
                    f"or max length): what it serves changed, or replicas differ; fetch "
                    f"GetTokenizer and Info again"))
        else:
            self.check_texts(call.texts)
        options = self.options(call)
        if not options.token_level:
            self.check_response_size(call.items, options, call.dtype)
        if call.token_lengths:  # checked, not tokenized: vectorized numpy
            data, call.token_ids = call.token_ids, b""  # the rows are views of these bytes
            work = (len(data) <= INLINE_TOKEN_ID_BYTES, engine.token_ids, data,
                    call.token_lengths, call.truncate)
        else:
            work = (sum(map(len, call.texts)) <= INLINE_TOKENIZE_CHARS, engine.tokenize,
                    call.texts, call.truncate, False, options.prompt)

        def tokenized(tokens: Tokenized) -> None:
            if call.texts:
                del call.texts[:]  # tokenized: the strings can go
            if options.token_level:
                self.check_response_size(tokens.ids.total, options, call.dtype)

        return await self._compute(engine, call.items, options, call.dtype, call.priority, wait,
                                   caller, sequence, work, tokenized,
                                   "token_ids" if call.token_lengths else "texts")

    async def score(self, call: ScoreCall, wait: bool = False, caller: object = None) -> JobResult:
        """A cross-encoder's scores of texts or text pairs (Rerank, Classify): validated,
        admitted, tokenized as pairs, queued and computed like embeddings (the same limits,
        lanes and batches), one row of label scores per item. Raises EmbedError."""
        sequence = next(self._sequence)
        engine = self.engine_for(call.model)
        require(engine, call.task)
        if call.seconds is None:
            self.check_texts(call.firsts, call.first_field)
        else:
            self.check_texts(call.seconds, call.second_field)
            if len(call.seconds) != len(call.firsts):
                raise EmbedError.invalid(
                    f"{call.second_field}: {len(call.seconds)} texts for "
                    f"{len(call.firsts)} in {call.first_field}; send one per text, or none")
            self.check_chars(call.firsts, call.first_field)
        options = engine.score_options(call.task, call.raw_scores)
        self.check_response_size(call.items, options, "float32")
        work = (sum(map(len, call.firsts)) + sum(map(len, call.seconds or ()))
                <= INLINE_TOKENIZE_CHARS, engine.tokenize_pairs, call.firsts, call.seconds,
                call.truncate, call.second_field if call.task == "rerank" else call.first_field)
        return await self._compute(engine, call.items, options, "float32", call.priority, wait,
                                   caller, sequence, work, field=call.first_field
                                   if call.seconds is None else call.second_field)

    async def embed_sparse(self, call: SparseCall, wait: bool = False,
                           caller: object = None) -> JobResult:
        """A SPLADE model's sparse vectors of texts: validated, the answer's size bounded before
        any compute (every text at its top_k, or all the vocabulary, 8 bytes a value), then
        the path of every embedding. Raises EmbedError."""
        sequence = next(self._sequence)
        engine = self.engine_for(call.model)
        require(engine, "embed_sparse")
        self.check_texts(call.texts)
        options = engine.sparse_options(call.top_k)
        size = call.items * (options.top_k or options.width) * 8
        if size > self.limits.max_response_bytes:
            raise EmbedError.too_large(
                f"the response could be {size:,} bytes ({call.items:,} texts x "
                f"{options.top_k or options.width:,} values of 8 bytes), over the limit of "
                f"{self.limits.max_response_bytes:,} (max_response_bytes); send fewer texts or "
                f"a smaller top_k")
        work = (sum(map(len, call.texts)) <= INLINE_TOKENIZE_CHARS, engine.tokenize, call.texts,
                call.truncate)
        return await self._compute(engine, call.items, options, "float32", call.priority, wait,
                                   caller, sequence, work)

    def sparse_cost(self, call: SparseCall, request_bytes: int) -> int:
        """What an EmbedSparse request may hold: its bytes and its answer's."""
        try:
            engine = self.engine_for(call.model)
            require(engine, "embed_sparse")
            options = engine.sparse_options(call.top_k)
        except EmbedError:  # answered with its error, at once
            return request_bytes
        return request_bytes + min(call.items * (options.top_k or options.width) * 8,
                                   self.limits.max_response_bytes)

    async def _compute(self, engine: Engine, items: int, options, dtype: str, lane: str,
                       wait: bool, caller: object, sequence: int, work: tuple,
                       tokenized: Callable[[Tokenized], None] | None = None,
                       field: str = "texts") -> JobResult:
        """The path every computed request takes once checked: room in its lane, its
        tokenizing (work: (small, function, *args) for _on_tokenizer), a job for the batcher,
        its answer. tokenized(tokens): checks and clean-up once the tokens exist. field: what
        the request calls its items, for an item that has no tokens."""
        if lane not in LANES:
            raise EmbedError.invalid(f"priority: unknown value {lane!r}; use one of {LANES}")
        await self.admit(items, wait, lane)
        job = None
        try:
            tokens = await self._on_tokenizer(*work)
            del work
            refuse_empty(tokens, field)
            if tokenized is not None:
                tokenized(tokens)
            done, on_done = completion()
            job = Job(tokens.ids, options, dtype, on_done, truncated_items=sum(tokens.truncated),
                      caller=caller, sequence=sequence, lane=lane, engine=engine,
                      type_ids=tokens.type_ids)
            self.batcher.submit(job)
            result = await done
        except asyncio.CancelledError:  # the caller went away or its deadline passed
            if job is not None:
                job.cancelled = True  # the batcher drops its texts still queued
            raise
        finally:
            if job is None:  # never reached the queue: its room is ours to give back
                self.admissions[lane].release(items)
        if isinstance(result, EmbedError):
            raise result
        self.metrics.tokens.labels(engine.name).inc(result.usage.tokens)
        self.metrics.truncated.labels(engine.name).inc(result.usage.truncated_items)
        return result

    async def observed(self, rpc: str, call: EmbedCall | ScoreCall | SparseCall,
                       wait: bool = False, caller: object = None,
                       codes: dict | None = None) -> JobResult:
        """embed(), score() or embed_sparse(), as the call is, counted and timed by RPC and
        outcome (once per request, success or not); `codes` names the outcome of each
        EmbedError kind in the front-end's terms."""
        started, code, texts = time.perf_counter(), "OK", call.items
        # by the model served: a name sent that is not served is not a label (any string could be)
        model = call.model if call.model in self.engines else "" if call.model else self.engine.name
        compute = self.score if isinstance(call, ScoreCall) else \
            self.embed_sparse if isinstance(call, SparseCall) else self.embed
        try:
            return await compute(call, wait, caller)
        except EmbedError as error:
            code = (codes or {}).get(error.kind, error.kind.name)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels(rpc, code, model).inc()
            self.metrics.texts.labels(rpc, code, model).inc(texts)
            self.metrics.latency.labels(rpc, model).observe(time.perf_counter() - started)


def ranking(scores: np.ndarray, top_n: int = 0) -> list[tuple[int, float]]:
    """(index, score) best first, ties in document order (a stable sort, as CrossEncoder.rank);
    the first top_n (0 or less: all)."""
    order = np.argsort(-scores, kind="stable")
    if top_n > 0:
        order = order[:top_n]
    return [(int(i), float(scores[i])) for i in order]


def refuse_empty(tokens: Tokenized, field: str) -> None:
    """A forward pass needs a token a text. A tokenizer that adds no special tokens makes none of
    an empty or all-space text (such a text once stopped every forward worker)."""
    empty = np.flatnonzero(tokens.ids.lengths == 0)
    if empty.size:
        raise EmbedError.invalid(f"{field}[{empty[0]}] has no tokens: this model's tokenizer "
                                 f"adds none of its own, and the text is empty or only spaces")


def require(engine: Engine, task: str) -> None:
    """The model does this task (its kind's), or UNSUPPORTED naming the tasks it does."""
    if task not in engine.tasks:
        raise EmbedError.unsupported(
            f"model {engine.name} is a{'n' if engine.kind[0] in 'aeiou' else ''} {engine.kind} "
            f"model: it does {', '.join(engine.tasks)}, not {task}")


def completion() -> tuple[asyncio.Future, Callable]:
    """A future on the running loop, and the Job.on_done callback (called on the batcher's
    forward worker that finished it) that settles it with the job's result."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result) -> None:
        if not done.done():  # the caller may have gone
            done.set_result(result)

    return done, lambda result: loop.call_soon_threadsafe(settle, result)


async def warm_up(core: Core) -> None:
    """For each model, one text of its longest length through the whole path, its pipeline
    included (on a forward worker, like every forward pass): a model that cannot take its max
    length fails here, at start, naming it, not on a user's request."""
    for name, engine in core.engines.items():
        longest = "warm-up " * engine.max_length
        try:
            if "embed" in engine.tasks:
                await core.embed(EmbedCall([longest], model=name))
            elif "embed_sparse" in engine.tasks:
                await core.embed_sparse(SparseCall([longest], model=name))
            else:  # a cross-encoder: a pair of the longest
                await core.score(ScoreCall("classify", [longest], [longest], model=name))
        except EmbedError as error:
            raise RuntimeError(f"model {name} ({engine.model_name}): warm-up failed: "
                               f"{error.message}") from None

