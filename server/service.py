"""gRPC front-end: protobuf <-> core values, status codes, streams, health, reflection.

Protobuf is converted here and nowhere else; everything a request goes through besides (limits,
admission, tokenizing, the batcher) is the transport-free core (core.py). Unary Embed and every
EmbedStream message take the same core call; they differ only in how an EmbedError reaches the
caller (a status for unary, an error response for a stream message, which does not end the stream)
and in admission (a unary call fails at once when the queue is full, a stream message waits).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.admission import Admission
from bertstream.server.batcher import Batcher, JobResult
from bertstream.server.budget import MemoryBudget
from bertstream.server.core import Core, EmbedCall, warm_up
from bertstream.server.limits import Limits
from bertstream.server.engine import Engine
from bertstream.server.errors import EmbedError, ErrorKind
from bertstream.server.metrics import Metrics
from bertstream.server.security import TokenAuthInterceptor, server_credentials

log = logging.getLogger("bertstream.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name

STATUS_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

STATUS_NAMES = {kind: code.name for kind, code in STATUS_CODES.items()}  # metric labels
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
DTYPE_ENUMS = {name: number for number, name in DTYPE_NAMES.items() if number}


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
    def __init__(self, core: Core, budget: MemoryBudget):
        self.core, self.budget = core, budget
        self.engine, self.limits, self.metrics = core.engine, core.limits, core.metrics

    async def _embed(self, rpc: str, request: pb.EmbedRequest,
                     caller: object = None) -> pb.EmbedResponse:
        """One request through the core (counted as `rpc`). Raises EmbedError."""
        result = await self.core.observed_embed(
            rpc, embed_call(request), wait=rpc == "EmbedStream", caller=caller,
            codes=STATUS_NAMES)
        return to_response(request.request_id, result)

    async def _account(self, context):
        """This call's connection's account (budget.py), given back when the call ends; if the
        connection is cut, the call's task is cancelled. A cut connection's new calls get
        RESOURCE_EXHAUSTED."""
        task = asyncio.current_task()
        account = self.budget.open(context.peer(), task.cancel)
        context.add_done_callback(lambda _: self.budget.close(account, task.cancel))
        if account.cut:
            await abort(context, account.refusal())
        return account

    # ------------------------------------------------------------------ RPCs

    async def Embed(self, request, context):
        account = await self._account(context)
        try:
            hold = account.try_hold(self._memory_cost(request))
            # Held until the answer has left (or the call ended), not until this returns.
            context.add_done_callback(lambda _: hold.release())
            response = await self._embed("Embed", request)
        except EmbedError as error:
            await abort(context, error)
        hold.ready()
        return response

    async def EmbedStream(self, request_iterator, context):
        # Requests are read ahead of their responses and answered strictly in request order.
        # Read-ahead stops at stream_window messages, or while the connection holds its share
        # of requests and expected answers (budget.py: a caller that never reads stops being
        # read, and is cut after stall_timeout_s); then gRPC flow control slows the sender.
        # All of a stream's messages are one caller to the batcher.
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self.limits.stream_window)
        account = await self._account(context)
        caller = object()
        holds = []  # of the messages read and not yet answered, in order
        self.metrics.streams_open.inc()

        async def read_requests():
            requests = aiter(request_iterator)
            while True:
                await account.room()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    break
                holds.append(await account.hold(self._memory_cost(request)))
                await in_flight.put((request.request_id, asyncio.ensure_future(
                    self._embed("EmbedStream", request, caller))))
            await in_flight.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (entry := await in_flight.get()) is not None:
                request_id, task = entry
                try:
                    response = await task
                except EmbedError as error:
                    log.info("stream request failed", extra={"fields": {
                        "request_id": request_id, "kind": error.kind.value, "error": error.message}})
                    response = pb.EmbedResponse(request_id=request_id, error=pb.Error(
                        code=STATUS_CODES[error.kind].value[0], message=error.message))
                holds[0].ready()
                yield response  # returns once the client's flow control has taken it
                holds.pop(0).release()
            await reader  # re-raises a transport error from the reading side
        finally:
            self.metrics.streams_open.dec()
            reader.cancel()
            while not in_flight.empty():
                entry = in_flight.get_nowait()
                if entry is not None:
                    entry[1].cancel()
            for hold in holds:
                hold.release()

    def _memory_cost(self, request: pb.EmbedRequest) -> int:
        try:
            return self.core.memory_cost(embed_call(request),
                                         request.ByteSize())
        except EmbedError:  # a bad enum: answered with an error, at once
            return request.ByteSize()

    async def Tokenize(self, request, context):
        truncate = request.truncate if request.HasField("truncate") else True
        response = pb.TokenizeResponse()

        def add(chunk) -> int:  # on a tokenizer thread: the messages are built in place
            size = 0
            for ids, strings, offsets, truncated in zip(chunk.ids, chunk.tokens, chunk.offsets,
                                                        chunk.truncated):
                text = response.texts.add(truncated=truncated)
                tokens = text.tokens
                for i, t, (start, end) in zip(ids.tolist(), strings, offsets):
                    tokens.add(id=i, text=t, start=start, end=end)
                size += text.ByteSize()
            return size

        account = await self._account(context)
        try:
            hold = account.try_hold(self.core.tokenize_cost(request.ByteSize()))
            context.add_done_callback(lambda _: hold.release())
            await self.core.tokenize(request.texts, truncate, add)
        except EmbedError as error:
            await abort(context, error)
        hold.ready()
        return response

    async def Info(self, request, context):
        return info_response(self.core)


def info_response(core: Core) -> pb.InfoResponse:
    info = dict(core.info())
    pipeline = dict(info.pop("pipeline"))
    dense = [pb.DenseLayer(**layer) for layer in pipeline.pop("dense")]
    return pb.InfoResponse(**info | {"limits": pb.Limits(**info["limits"])},
                           pipeline=pb.Pipeline(**pipeline, dense=dense))


def embed_call(request: pb.EmbedRequest) -> EmbedCall:
    """A request in the core's terms. Its texts stay the request's own (the core counts them
    before anything copies them, and empties them once tokenized): 64 MB of two-character texts
    is 15 million of them, and a list of them as Python strings took 1.7 GB before the count
    refused them. Bad enum numbers raise EmbedError naming the field."""
    return EmbedCall(
        texts=request.texts, pooling=enum_name(POOLING_NAMES, request.pooling, "pooling"),
        layers=tuple(request.layers),
        layer_combine=enum_name(COMBINE_NAMES, request.layer_combine, "layer_combine"),
        normalize=request.normalize if request.HasField("normalize") else None,
        prompt_name=request.prompt_name or None,
        prompt=request.prompt if request.HasField("prompt") else None,
        dimensions=request.dimensions, dtype=enum_name(DTYPE_NAMES, request.dtype, "dtype"),
        truncate=request.truncate if request.HasField("truncate") else True)


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
    admission: Admission
    watch: asyncio.Task | None = None  # keeps gRPC health current, from the warm-up on
    http: object = None  # the HTTP front-end's server, when there is one
    http_port: int | None = None
    warmed: bool = False
    stopping: bool = False

    def serving(self) -> bool:
        """Warmed up, healthy and not stopping (HTTP /health; gRPC health says the same)."""
        return self.warmed and not self.stopping and self.batcher.healthy()

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new calls, give calls in flight `grace` seconds, then
        finish the batcher's work and stop its threads."""
        self.stopping = True
        if self.watch is not None:
            self.watch.cancel()
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.config.timeout_graceful_shutdown = grace
            self.http.should_exit = True
        await self.server.stop(grace)
        if self.http is not None:
            await self.http.task
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)


async def start_server(engine: Engine, limits: Limits, host: str = "127.0.0.1", port: int = 50051,
                       security: Security = Security(), http_port: int | None = None,
                       http_metrics: bool = False) -> RunningServer:
    """Start serving gRPC (port 0: any free port, see .port) and, with http_port, HTTP on the
    same core and loop. Health says NOT_SERVING (HTTP /health 503) until one warm-up text has
    gone through the model. batcher.metrics holds the Prometheus registry."""
    metrics = Metrics()
    metrics.model.info({"model": engine.model_name, "device": str(engine.device),
                        "dtype": engine.dtype, "max_length": str(engine.max_length)})
    admission = Admission(limits.max_queue_texts, asyncio.get_running_loop())
    batcher = Batcher(engine, limits.max_batch_tokens, metrics, on_leave=admission.release)
    core = Core(engine, batcher, limits, admission)
    budget = MemoryBudget(limits.max_held_bytes, limits.max_connection_held_bytes,
                          limits.stall_timeout_s)
    interceptors = [DecodeErrorInterceptor()]
    if security.auth_tokens:  # runs first: the unauthenticated never reach anything else
        interceptors.insert(0, TokenAuthInterceptor(list(security.auth_tokens),
                                                    security.health_open))
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", -1),
               # Clients ping every KEEPALIVE_S while calls are open (client/core.py), to notice a
               # server that vanished; accept those pings instead of answering GOAWAY.
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
               ("grpc.http2.max_ping_strikes", 0),
               # One connection opens at most this many calls at once (the HTTP/2 setting).
               ("grpc.max_concurrent_streams", limits.max_concurrent_streams)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_EmbedderServicer_to_server(EmbedderService(core, budget), server)
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
    running = RunningServer(server, bound, batcher, health_servicer, admission)
    if http_port is not None:
        from bertstream.server.http import create_app, start_http

        app = create_app(core, running.serving, budget, list(security.auth_tokens),
                         security.health_open, metrics=http_metrics)
        running.http = await start_http(
            app, host, http_port, limits.max_message_bytes, limits.max_texts_per_request,
            lambda: running.stopping, security.tls_cert, security.tls_key,
            security.tls_client_ca, limits.http_read_timeout_s, limits.max_http_connections)
        running.http_port = running.http.servers[0].sockets[0].getsockname()[1]
    await warm_up(core)
    running.warmed = True
    running.watch = asyncio.ensure_future(watch_health(batcher, health_servicer))
    return running


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
