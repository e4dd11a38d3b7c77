"""gRPC transport: protobuf <-> engine values, status codes, health, reflection.

Protobuf is converted here and nowhere else. Unary Embed and every EmbedStream message go through
one path, `_embed`; they differ only in how an EmbedError reaches the caller (a status for unary, an
error response for a stream message, which does not end the stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.admission import Admission
from bertstream.server.batcher import Batcher, Job, JobResult
from bertstream.server.engine import Engine
from bertstream.server.errors import EmbedError, ErrorKind
from bertstream.server.metrics import Metrics
from bertstream.server.security import TokenAuthInterceptor, server_credentials

log = logging.getLogger("bertstream.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name

STATUS_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

# POOLING_UNSPECIFIED (None) is the model's own pipeline.
POOLING_NAMES = {pb.POOLING_UNSPECIFIED: None, pb.POOLING_MEAN: "mean", pb.POOLING_MAX: "max",
                 pb.POOLING_CLS: "cls", pb.POOLING_MEAN_MAX: "mean_max", pb.POOLING_NONE: "none",
                 pb.POOLING_MEAN_SQRT_LEN: "mean_sqrt_len",
                 pb.POOLING_WEIGHTED_MEAN: "weightedmean", pb.POOLING_LAST_TOKEN: "lasttoken"}
COMBINE_NAMES = {pb.LAYER_COMBINE_UNSPECIFIED: "concat", pb.LAYER_COMBINE_CONCAT: "concat",
                 pb.LAYER_COMBINE_MEAN: "mean"}
DTYPE_NAMES = {pb.DTYPE_UNSPECIFIED: "float32", pb.DTYPE_FLOAT32: "float32",
               pb.DTYPE_FLOAT16: "float16", pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_INT8: "int8",
               pb.DTYPE_BINARY: "binary"}
# Requests up to this many characters are tokenized on the event loop (tens of microseconds);
# bigger ones on a worker thread so the loop keeps serving.
INLINE_TOKENIZE_CHARS = 2000
DTYPE_ENUMS = {name: number for number, name in DTYPE_NAMES.items() if number}


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int = 10_000
    max_chars_per_text: int = 100_000
    max_batch_tokens: int = 2048
    max_message_bytes: int = 64 * 2**20
    stream_window: int = 64  # stream messages read ahead of their responses
    max_queue_texts: int = 100_000  # texts admitted and still waiting in the pool, all callers
    max_response_bytes: int = 64 * 2**20  # one response's tensor bytes, known before any compute


@dataclass(frozen=True)
class Security:
    auth_tokens: tuple[bytes, ...] = ()  # empty: no authentication
    health_open: bool = True  # health checks need no token (for probes)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS


class _Undecodable:
    def __init__(self, error: Exception):
        self.message = f"the message is not a valid protobuf request: {error}"


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the request message (bad wire format, invalid UTF-8 in a
    string) get INVALID_ARGUMENT, instead of gRPC's UNKNOWN and a logged traceback. A stream is
    ended by such a message: it has no request_id to answer."""

    PREFIX = f"/{SERVICE_NAME}/"

    def __init__(self):
        self._wrapped = {}  # method -> (its handler, the tolerant one): built once, not per call

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.PREFIX):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._tolerant(handler))
        return cached[1]

    @staticmethod
    def _tolerant(handler):
        parse = handler.request_deserializer

        def tolerant(data: bytes):
            try:
                return parse(data)
            except DecodeError as error:
                return _Undecodable(error)

        async def refuse(undecodable: _Undecodable, context):
            log.info("request failed", extra={"fields": {"kind": "invalid",
                                                         "error": undecodable.message}})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable.message)

        if handler.unary_unary:
            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await handler.unary_unary(request, context)
            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=tolerant,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            async def stream(request_iterator, context):
                # An undecodable message ends the stream's input there: the messages before it
                # are still answered, then the stream ends with INVALID_ARGUMENT.
                undecodable = []

                async def checked():
                    async for request in request_iterator:
                        if isinstance(request, _Undecodable):
                            undecodable.append(request)
                            return
                        yield request
                async for response in handler.stream_stream(checked(), context):
                    yield response
                if undecodable:
                    await refuse(undecodable[0], context)
            return grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=tolerant,
                response_serializer=handler.response_serializer)
        return handler


def enum_name(table: dict, value: int, field: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise EmbedError.invalid(f"{field}: unknown enum value {value}") from None


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, engine: Engine, batcher: Batcher, limits: Limits, admission: Admission):
        self.engine = engine
        self.batcher = batcher
        self.limits = limits
        self.admission = admission
        self.metrics = batcher.metrics
        # Tokenizing a big message takes milliseconds; keep it off the event loop.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bertstream-tok")

    # ------------------------------------------------------------------ the shared path

    def _check_texts(self, texts) -> None:
        if not texts:
            raise EmbedError.invalid("texts: empty; send at least one text")
        if len(texts) > self.limits.max_texts_per_request:
            raise EmbedError.invalid(
                f"texts: {len(texts)} texts, over the limit of {self.limits.max_texts_per_request} "
                f"per request (max_texts_per_request)")
        for i, text in enumerate(texts):
            if len(text) > self.limits.max_chars_per_text:
                raise EmbedError.invalid(
                    f"texts[{i}]: {len(text)} characters, over the limit of "
                    f"{self.limits.max_chars_per_text} (max_chars_per_text)")

    async def _admit(self, texts: int, wait: bool) -> None:
        """Take room for `texts` in the pool before any work. When there is none, a unary call
        fails at once (RESOURCE_EXHAUSTED) and a stream message waits its turn, so its stream
        stops being read and gRPC flow control slows the sender (admission.py)."""
        if wait:
            await self.admission.take(texts)
        elif not self.admission.try_take(texts):
            raise EmbedError.overloaded(
                f"queue full: {self.admission.queued} texts waiting and "
                f"{self.admission.waiting} requests in line, limit {self.limits.max_queue_texts} "
                f"texts (max_queue_texts); retry later")

    def _check_response_size(self, rows: int, options, dtype: str) -> None:
        """Refuse a response over max_response_bytes before computing it: rows are texts, or
        for token-level output, tokens."""
        size = response_bytes(rows, options.width, dtype)
        if size > self.limits.max_response_bytes:
            unit = "tokens" if options.token_level else "texts"
            raise EmbedError.invalid(
                f"the response would be {size:,} bytes ({rows:,} {unit} x {options.width} values "
                f"in {dtype}), over the limit of {self.limits.max_response_bytes:,} "
                f"(max_response_bytes); send fewer texts, layers or dimensions")

    async def _tokenize(self, request, details: bool = False, prompt: str | None = None):
        texts = list(request.texts)
        truncate = request.truncate if request.HasField("truncate") else True
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:  # microseconds: not worth a thread hop
            return self.engine.tokenize(texts, truncate, details, prompt)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self.engine.tokenize, texts, truncate, details, prompt)

    def _options(self, request: pb.EmbedRequest):
        return self.engine.options(
            enum_name(POOLING_NAMES, request.pooling, "pooling"), request.layers,
            enum_name(COMBINE_NAMES, request.layer_combine, "layer_combine"),
            request.normalize if request.HasField("normalize") else None,
            request.prompt_name or None, request.prompt if request.HasField("prompt") else None,
            request.dimensions)

    async def _embed(self, request: pb.EmbedRequest, streaming: bool,
                     caller: object = None) -> pb.EmbedResponse:
        """Validate, admit, tokenize, queue, await, convert. Raises EmbedError. The size of
        the answer is checked before any work (for token-level output, once the tokens are
        counted); room in the pool is taken before tokenizing and given back by the batcher
        when the texts leave the pool (or here, if they never reach it)."""
        self._check_texts(request.texts)
        options = self._options(request)
        dtype = enum_name(DTYPE_NAMES, request.dtype, "dtype")
        texts = len(request.texts)
        if not options.token_level:
            self._check_response_size(texts, options, dtype)
        await self._admit(texts, wait=streaming)
        job = None
        try:
            tokens = await self._tokenize(request, prompt=options.prompt)
            del request.texts[:]  # tokenized: the strings (up to max_message_bytes) can go
            if options.token_level:
                self._check_response_size(sum(map(len, tokens.ids)), options, dtype)
            done, on_done = completion()
            job = Job(tokens.ids, options, dtype, on_done, truncated_items=sum(tokens.truncated),
                      caller=caller)
            self.batcher.submit(job)
            result = await done
        except asyncio.CancelledError:  # the caller went away or its deadline passed
            if job is not None:
                job.cancelled = True  # the batcher drops its texts still queued
            raise
        finally:
            if job is None:  # never reached the pool: its room is ours to give back
                self.admission.release(texts)
        if isinstance(result, EmbedError):
            raise result
        self.metrics.tokens.inc(result.usage.tokens)
        self.metrics.truncated.inc(result.usage.truncated_items)
        return to_response(request.request_id, result)

    async def _observed_embed(self, rpc: str, request: pb.EmbedRequest,
                              caller: object = None) -> pb.EmbedResponse:
        """_embed, counted and timed by RPC and outcome (once per request, success or not)."""
        started, code, texts = time.perf_counter(), "OK", len(request.texts)
        try:
            return await self._embed(request, streaming=rpc == "EmbedStream", caller=caller)
        except EmbedError as error:
            code = STATUS_CODES[error.kind].name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels(rpc, code).inc()
            self.metrics.texts.labels(rpc, code).inc(texts)
            self.metrics.latency.labels(rpc).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ RPCs

    async def Embed(self, request, context):
        try:
            return await self._observed_embed("Embed", request)
        except EmbedError as error:
            await abort(context, error)

    async def EmbedStream(self, request_iterator, context):
        # Requests are read ahead of their responses and answered strictly in request order.
        # Read-ahead stops at stream_window messages, or once the messages in flight hold
        # max_message_bytes of requests and expected responses (so a sender of big messages, or
        # a caller that never reads its answers, holds at most about twice that); then gRPC flow
        # control slows the sender. All of a stream's messages are one caller to the batcher.
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self.limits.stream_window)
        budget, held = self.limits.max_message_bytes, [0]
        room = asyncio.Condition()
        caller = object()
        self.metrics.streams_open.inc()

        async def read_requests():
            async for request in request_iterator:
                cost = self._stream_cost(request)
                await in_flight.put((request.request_id, cost, asyncio.ensure_future(
                    self._observed_embed("EmbedStream", request, caller))))
                held[0] += cost
                async with room:
                    await room.wait_for(lambda: held[0] < budget)
            await in_flight.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (entry := await in_flight.get()) is not None:
                request_id, cost, task = entry
                try:
                    yield await task
                except EmbedError as error:
                    log.info("stream request failed", extra={"fields": {
                        "request_id": request_id, "kind": error.kind.value, "error": error.message}})
                    yield pb.EmbedResponse(request_id=request_id, error=pb.Error(
                        code=STATUS_CODES[error.kind].value[0], message=error.message))
                held[0] -= cost
                async with room:
                    room.notify_all()
            await reader  # re-raises a transport error from the reading side
        finally:
            self.metrics.streams_open.dec()
            reader.cancel()
            while not in_flight.empty():
                entry = in_flight.get_nowait()
                if entry is not None:
                    entry[2].cancel()

    def _stream_cost(self, request: pb.EmbedRequest) -> int:
        """What a stream message may hold in memory: its own bytes and its response's (for
        token-level output, at most max_response_bytes)."""
        try:
            options = self._options(request)
            dtype = enum_name(DTYPE_NAMES, request.dtype, "dtype")
        except EmbedError:  # answered with an error, at once
            return request.ByteSize()
        rows = len(request.texts) * (self.engine.max_length if options.token_level else 1)
        return request.ByteSize() + min(response_bytes(rows, options.width, dtype),
                                        self.limits.max_response_bytes)

    async def Tokenize(self, request, context):
        try:
            self._check_texts(request.texts)
            await self._admit(len(request.texts), wait=False)  # it shares the tokenizer threads
            try:
                tokens = await self._tokenize(request, details=True)
            finally:
                self.admission.release(len(request.texts))
        except EmbedError as error:
            await abort(context, error)
        return pb.TokenizeResponse(texts=[
            pb.TokenizedText(truncated=truncated, tokens=[
                pb.Token(id=i, text=t, start=start, end=end)
                for i, t, (start, end) in zip(ids.tolist(), strings, offsets)])
            for ids, strings, offsets, truncated in
            zip(tokens.ids, tokens.tokens, tokens.offsets, tokens.truncated)])

    async def Info(self, request, context):
        engine, limits = self.engine, self.limits
        return pb.InfoResponse(
            model=engine.model_name, hidden_size=engine.hidden_size, num_layers=engine.num_layers,
            max_input_tokens=engine.max_length, device=str(engine.device), dtype=engine.dtype,
            limits=pb.Limits(max_texts_per_request=limits.max_texts_per_request,
                             max_chars_per_text=limits.max_chars_per_text,
                             max_batch_tokens=limits.max_batch_tokens,
                             max_message_bytes=limits.max_message_bytes,
                             stream_window=limits.stream_window,
                             max_queue_texts=limits.max_queue_texts,
                             max_response_bytes=limits.max_response_bytes),
            pipeline=pipeline_info(engine))


def pipeline_info(engine: Engine) -> pb.Pipeline:
    pipeline = engine.pipeline
    return pb.Pipeline(
        source=pipeline.source, modules=pipeline.modules, pooling=pipeline.pooling,
        include_prompt=pipeline.include_prompt,
        dense=[pb.DenseLayer(in_features=d.in_features, out_features=d.out_features,
                             bias=d.bias is not None, activation=d.activation_name)
               for d in pipeline.dense],
        normalize=pipeline.normalizes, dimensions=engine.output_width, prompts=pipeline.prompts,
        default_prompt_name=pipeline.default_prompt_name or "")


async def warm_up(batcher: Batcher, engine: Engine, admission: Admission) -> None:
    """One text of the longest length through the whole path, the model's pipeline included (on
    a forward worker, like every forward pass): a model that cannot take its max length fails
    here, at start, not on a user's request."""
    done, on_done = completion()
    options = engine.options()
    longest = engine.tokenize(["warm-up " * engine.max_length], prompt=options.prompt).ids
    await admission.take(1)  # the batcher gives it back, as for every text
    batcher.submit(Job(longest, options, "float32", on_done))
    result = await done
    if isinstance(result, EmbedError):
        raise RuntimeError(f"warm-up failed: {result.message}")


def response_bytes(rows: int, width: int, dtype: str) -> int:
    """Bytes of a response tensor: rows x width values in the wire dtype (int8 adds a float32
    scale per row; binary packs 8 values a byte)."""
    if dtype == "binary":
        return rows * -(-width // 8)
    if dtype == "int8":
        return rows * (width + 4)
    return rows * width * (4 if dtype == "float32" else 2)


def completion() -> tuple[asyncio.Future, Callable]:
    """A future on the running loop, and the Job.on_done callback (called on the batcher's
    forward worker that finished it) that settles it with the job's result."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result) -> None:
        if not done.done():  # the caller may have gone
            done.set_result(result)

    return done, lambda result: loop.call_soon_threadsafe(settle, result)


async def abort(context, error: EmbedError):
    log.info("request failed", extra={"fields": {"kind": error.kind.value,
                                                 "error": error.message}})
    await context.abort(STATUS_CODES[error.kind], error.message)


def to_response(request_id: str, result: JobResult) -> pb.EmbedResponse:
    packed, usage = result.embeddings, result.usage
    return pb.EmbedResponse(
        request_id=request_id,
        embeddings=pb.Tensor(dtype=DTYPE_ENUMS[packed.dtype], shape=packed.shape, data=packed.data,
                             scales=packed.scales.tolist() if packed.scales is not None else []),
        lengths=result.lengths or [],
        usage=pb.Usage(tokens=usage.tokens, truncated_items=usage.truncated_items,
                       queue_ns=usage.queue_ns, compute_ns=usage.compute_ns))


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    batcher: Batcher
    health: health.aio.HealthServicer
    watch: asyncio.Task
    admission: Admission

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new calls, give calls in flight `grace` seconds, then
        finish the batcher's work and stop its threads."""
        self.watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)


async def start_server(engine: Engine, limits: Limits, host: str = "127.0.0.1", port: int = 50051,
                       security: Security = Security()) -> RunningServer:
    """Start serving (port 0: any free port, see .port). Health says NOT_SERVING until one
    warm-up text has gone through the model. batcher.metrics holds the Prometheus registry."""
    metrics = Metrics()
    metrics.model.info({"model": engine.model_name, "device": str(engine.device),
                        "dtype": engine.dtype, "max_length": str(engine.max_length)})
    admission = Admission(limits.max_queue_texts, asyncio.get_running_loop())
    batcher = Batcher(engine, limits.max_batch_tokens, metrics, on_leave=admission.release)
    interceptors = [DecodeErrorInterceptor()]
    if security.auth_tokens:  # runs first: the unauthenticated never reach anything else
        interceptors.insert(0, TokenAuthInterceptor(list(security.auth_tokens),
                                                    security.health_open))
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", -1),
               # Clients ping every KEEPALIVE_S while calls are open (client/core.py), to notice a
               # server that vanished; accept those pings instead of answering GOAWAY.
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
               ("grpc.http2.max_ping_strikes", 0)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_EmbedderServicer_to_server(EmbedderService(engine, batcher, limits, admission),
                                           server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{host}:{port}"
    if security.tls_cert:
        bound = server.add_secure_port(address, server_credentials(
            security.tls_cert, security.tls_key, security.tls_client_ca))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"could not listen on {address}")
    await server.start()
    await warm_up(batcher, engine, admission)
    watch = asyncio.ensure_future(watch_health(batcher, health_servicer))
    return RunningServer(server, bound, batcher, health_servicer, watch, admission)


HEALTH_CHECK_S = 0.5


async def watch_health(batcher: Batcher, servicer: health.aio.HealthServicer) -> None:
    """SERVING while the batcher is healthy (every forward worker alive, the engine not failing
    pass after pass); NOT_SERVING otherwise, so probes and balancers move traffic away."""
    serving = None
    while True:
        healthy = batcher.healthy()
        if healthy != serving:
            status = health_pb2.HealthCheckResponse.SERVING if healthy else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)
            if serving is not None:
                log.warning("health: %s", "SERVING" if healthy else
                            "NOT_SERVING (forward workers died or the engine keeps failing)")
            serving = healthy
        await asyncio.sleep(HEALTH_CHECK_S)
