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
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.proto import labels
from .jobs import JobResult
from .budget import MemoryBudget
from .core import Core, EmbedCall, ScoreCall, SparseCall, ranking
from .errors import EmbedError, ErrorKind
from .security import Security, bearer_allowed

log = logging.getLogger("bertstream.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name

STATUS_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNSUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

CUT_STATUS_S = 1.0  # how long a cut call may take to send its status

STATUS_NAMES = {kind: code.name for kind, code in STATUS_CODES.items()}  # metric labels
# The names of the proto's enum values are its `label`s; UNSPECIFIED (0) is the default: the
# model's own pipeline (None), concatenated layers, float32.
POOLING_NAMES = {0: None, **{number: name for name, number in labels(pb.Pooling).items()}}
COMBINE_NAMES = {0: "concat", **{number: name for name, number in labels(pb.LayerCombine).items()}}
DTYPE_NAMES = {0: "float32", **{number: name for name, number in labels(pb.DType).items()}}
PRIORITY_NAMES = {0: "interactive",
                  **{number: name for name, number in labels(pb.Priority).items()}}
DTYPE_ENUMS = {name: number for number, name in DTYPE_NAMES.items() if number}


HEALTH_PREFIX = "/grpc.health.v1.Health/"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata matching one of the tokens.

    Tokens are compared in constant time (hmac.compare_digest), every token checked, so the time
    taken says nothing about how much of a guess was right. Health checks may stay open so that
    probes need no secret.
    """

    def __init__(self, tokens: list[bytes], health_open: bool = True):
        self._tokens = tokens
        self._health_open = health_open

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (authorization metadata)")

        async def refuse_stream(request_iterator, context):
            await refuse(None, context)
            yield  # pragma: no cover - makes this an async generator

        self._refusals = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse_stream),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse_stream),
        }

    def _allowed(self, metadata) -> bool:
        return bearer_allowed(self._tokens, next(
            (value for key, value in metadata or () if key == "authorization"), b""))

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self._health_open and method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        if self._allowed(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC say UNIMPLEMENTED
            return None
        return self._refusals[(handler.request_streaming, handler.response_streaming)]



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
        self.limits, self.metrics = core.limits, core.metrics

    async def _embed(self, rpc: str, request: pb.EmbedRequest,
                     caller: object = None) -> pb.EmbedResponse:
        """One request through the core (counted as `rpc`). Raises EmbedError."""
        call = embed_call(request)
        request.ClearField("token_ids")  # the call holds the one copy (each read makes one)
        result = await self.core.observed(
            rpc, call, wait=rpc == "EmbedStream", caller=caller, codes=STATUS_NAMES)
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
        return await self._unary(context, self._embed, "Embed", request, self._memory_cost)

    async def _say_cut(self, account, context) -> None:
        """A call cancelled because its connection was cut ends with RESOURCE_EXHAUSTED saying
        why, if the status can still get out (a peer that reads nothing never sees it)."""
        if account.cut:
            try:
                await asyncio.wait_for(abort(context, account.refusal()), CUT_STATUS_S)
            except asyncio.TimeoutError:
                pass

    async def EmbedStream(self, request_iterator, context):
        async for response in self._stream(request_iterator, context, "EmbedStream",
                                           self._embed, self._memory_cost, pb.EmbedResponse):
            yield response

    async def _stream(self, request_iterator, context, rpc: str, answer, cost, response_type):
        """A stream of requests, each answered by `answer(rpc, request, caller)` (an EmbedError
        becomes that message's `error`), holding `cost(request)` bytes until its answer left.
        Requests are read ahead of their responses and answered strictly in request order.
        Read-ahead stops at stream_window messages, or while the connection holds its share of
        requests and expected answers (budget.py: a caller that never reads stops being read,
        and is cut after stall_timeout_s); then gRPC flow control slows the sender. All of a
        stream's messages are one caller to the batcher."""
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self.limits.stream_window)
        account = await self._account(context)
        caller = object()
        holds = []  # of the messages read and not yet answered, in order
        self.metrics.streams_open.inc()

        async def read_requests():
            requests = aiter(request_iterator)
            try:
                while True:
                    await account.room()
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    holds.append(await account.hold(cost(request)))
                    await in_flight.put((request.request_id, asyncio.ensure_future(
                        answer(rpc, request, caller))))
            except Exception:  # the answers' loop must still end: `await reader` re-raises it
                await in_flight.put(None)
                raise
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
                    response = response_type(request_id=request_id, error=pb.Error(
                        code=STATUS_CODES[error.kind].value[0], message=error.message))
                holds[0].ready()
                yield response  # returns once the client's flow control has taken it
                holds.pop(0).release()
            await reader  # re-raises a transport error from the reading side
        except asyncio.CancelledError:
            for hold in holds:
                hold.release()
            await self._say_cut(account, context)
            raise
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
            return self.core.memory_cost(embed_call(request, with_ids=False),
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
            hold = await account.hold(self.core.tokenize_cost(request.ByteSize()))
            context.add_done_callback(lambda _: hold.release())
            await self.core.tokenize(request.texts, truncate, add, request.model)
        except EmbedError as error:
            await abort(context, error)
        hold.ready()
        return response

    async def Info(self, request, context):
        try:
            return info_response(self.core.info(request.model))
        except EmbedError as error:
            await abort(context, error)

    async def GetTokenizer(self, request, context):
        try:
            engine = self.core.engine_for(request.model)
        except EmbedError as error:
            await abort(context, error)
        return pb.TokenizerResponse(tokenizer_json=engine.tokenizer_json,
                                    sha256=engine.tokenizer_sha256)

    async def EmbedSparse(self, request, context):
        return await self._unary(context, self._embed_sparse, "EmbedSparse", request,
                                 self._sparse_cost)

    async def EmbedSparseStream(self, request_iterator, context):
        async for response in self._stream(request_iterator, context, "EmbedSparseStream",
                                           self._embed_sparse, self._sparse_cost,
                                           pb.EmbedSparseResponse):
            yield response

    def _sparse_cost(self, request) -> int:
        try:
            return self.core.sparse_cost(sparse_call(request), request.ByteSize())
        except EmbedError:
            return request.ByteSize()

    async def _embed_sparse(self, rpc: str, request,
                            caller: object = None) -> pb.EmbedSparseResponse:
        call = sparse_call(request)
        result = await self.core.observed(rpc, call, wait=rpc == "EmbedSparseStream",
                                          caller=caller, codes=STATUS_NAMES)
        return pb.EmbedSparseResponse(
            request_id=request.request_id, usage=usage_of(result.usage),
            dimensions=self.core.engine_for(call.model).output_width,
            embeddings=[pb.SparseVector(indices=indices.astype("<i4").tobytes(),
                                        values=values.astype("<f4").tobytes())
                        for indices, values in result.sparse])

    async def Rerank(self, request, context):
        return await self._unary(context, self._rerank, "Rerank", request, self._rerank_cost)

    async def RerankStream(self, request_iterator, context):
        async for response in self._stream(request_iterator, context, "RerankStream",
                                           self._rerank, self._rerank_cost, pb.RerankResponse):
            yield response

    async def Classify(self, request, context):
        return await self._unary(context, self._classify, "Classify", request,
                                 self._classify_cost)

    async def _unary(self, context, answer, rpc: str, request, cost):
        """One request answered by answer(rpc, request), holding cost(request) bytes against
        its connection until the answer has left."""
        account = await self._account(context)
        try:
            # Waits while this connection is at its share (its deadline bounds the wait).
            hold = await account.hold(cost(request))
            # Held until the answer has left (or the call ended), not until this returns.
            context.add_done_callback(lambda _: hold.release())
            response = await answer(rpc, request)
        except EmbedError as error:
            await abort(context, error)
        except asyncio.CancelledError:
            await self._say_cut(account, context)
            raise
        hold.ready()
        return response

    def _rerank_cost(self, request) -> int:
        try:
            call = rerank_call(request)
        except EmbedError:  # a bad enum: answered with an error, at once
            return request.ByteSize()
        # echoed documents are sent back: their bytes again
        return self.core.score_cost(call, request.ByteSize() * (1 + request.return_documents))

    def _classify_cost(self, request) -> int:
        try:
            return self.core.score_cost(classify_call(request), request.ByteSize())
        except EmbedError:
            return request.ByteSize()

    async def _rerank(self, rpc: str, request, caller: object = None) -> pb.RerankResponse:
        call = rerank_call(request)
        result = await self.core.observed(rpc, call, wait=rpc == "RerankStream", caller=caller,
                                          codes=STATUS_NAMES)
        ranked = ranking(result.embeddings.as_float32()[:, 0], request.top_n)
        return pb.RerankResponse(
            request_id=request.request_id, usage=usage_of(result.usage),
            results=[pb.RankedDocument(index=i, score=score, document=request.documents[i]
                                       if request.return_documents else "")
                     for i, score in ranked])

    async def _classify(self, rpc: str, request, caller: object = None) -> pb.ClassifyResponse:
        call = classify_call(request)
        result = await self.core.observed(rpc, call, caller=caller, codes=STATUS_NAMES)
        packed = result.embeddings
        return pb.ClassifyResponse(
            request_id=request.request_id, labels=self.core.engine_for(call.model).labels,
            scores=pb.Tensor(dtype=DTYPE_ENUMS["float32"], shape=packed.shape, data=packed.data),
            usage=usage_of(result.usage))

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[info_response(info) for info in self.core.models()])


def info_response(info: dict) -> pb.InfoResponse:
    """Core.info()'s values as the proto's InfoResponse."""
    info = dict(info)
    pipeline = dict(info.pop("pipeline"))
    dense = [pb.DenseLayer(**layer) for layer in pipeline.pop("dense")]
    return pb.InfoResponse(**info | {"limits": pb.Limits(**info["limits"])},
                           pipeline=pb.Pipeline(**pipeline, dense=dense))


def embed_call(request: pb.EmbedRequest, with_ids: bool = True) -> EmbedCall:
    """A request in the core's terms. Its texts stay the request's own (the core counts them
    before anything copies them, and empties them once tokenized): 64 MB of two-character texts
    is 15 million of them, and a list of them as Python strings took 1.7 GB before the count
    refused them. Bad enum numbers raise EmbedError naming the field. with_ids False leaves the
    token-id bytes out (a copy each time they are read; the memory cost needs only their count)."""
    return EmbedCall(
        texts=request.texts, pooling=enum_name(POOLING_NAMES, request.pooling, "pooling"),
        layers=tuple(request.layers),
        layer_combine=enum_name(COMBINE_NAMES, request.layer_combine, "layer_combine"),
        normalize=request.normalize if request.HasField("normalize") else None,
        prompt_name=request.prompt_name or None,
        prompt=request.prompt if request.HasField("prompt") else None,
        dimensions=request.dimensions, dtype=enum_name(DTYPE_NAMES, request.dtype, "dtype"),
        truncate=request.truncate if request.HasField("truncate") else True,
        token_ids=request.token_ids if with_ids else b"", token_lengths=request.token_lengths,
        tokenizing_sha256=request.tokenizing_sha256,
        priority=enum_name(PRIORITY_NAMES, request.priority, "priority"), model=request.model)


async def abort(context, error: EmbedError):
    log.info("request failed", extra={"fields": {"kind": error.kind.value,
                                                 "error": error.message}})
    await context.abort(STATUS_CODES[error.kind], error.message)


def sparse_call(request: pb.EmbedSparseRequest) -> SparseCall:
    return SparseCall(request.texts, top_k=request.top_k or None,
                      truncate=request.truncate if request.HasField("truncate") else True,
                      priority=enum_name(PRIORITY_NAMES, request.priority, "priority"),
                      model=request.model)


def rerank_call(request: pb.RerankRequest) -> ScoreCall:
    """A Rerank request in the core's terms: (query, document) pairs."""
    return ScoreCall.rerank(
        request.query, request.documents, raw_scores=request.raw_scores,
        truncate=request.truncate if request.HasField("truncate") else True,
        priority=enum_name(PRIORITY_NAMES, request.priority, "priority"), model=request.model)


def classify_call(request: pb.ClassifyRequest) -> ScoreCall:
    return ScoreCall(
        "classify", request.texts, request.text_pairs if request.text_pairs else None,
        raw_scores=request.raw_scores,
        truncate=request.truncate if request.HasField("truncate") else True,
        priority=enum_name(PRIORITY_NAMES, request.priority, "priority"), model=request.model)


def usage_of(usage) -> pb.Usage:
    return pb.Usage(tokens=usage.tokens, truncated_items=usage.truncated_items,
                    queue_ns=usage.queue_ns, compute_ns=usage.compute_ns)


def to_response(request_id: str, result: JobResult) -> pb.EmbedResponse:
    packed = result.embeddings
    return pb.EmbedResponse(
        request_id=request_id,
        embeddings=pb.Tensor(dtype=DTYPE_ENUMS[packed.dtype], shape=packed.shape, data=packed.data,
                             scales=packed.scales.tolist() if packed.scales is not None else []),
        lengths=result.lengths or [], usage=usage_of(result.usage))


class GrpcFrontEnd:
    """The gRPC server over a core: the Embedder service, health and reflection, TLS and bearer
    tokens, listening on host:port (port 0: any free one, see .port). Health says NOT_SERVING
    until set_serving says otherwise."""

    def __init__(self, core: Core, budget: MemoryBudget, security: Security):
        limits = core.limits
        interceptors = [DecodeErrorInterceptor()]
        if security.auth_tokens:  # runs first: the unauthenticated never reach anything else
            interceptors.insert(0, TokenAuthInterceptor(list(security.auth_tokens),
                                                        security.health_open))
        options = [("grpc.max_receive_message_length", limits.max_message_bytes),
                   ("grpc.max_send_message_length", -1),
                   # Clients ping every KEEPALIVE_S while calls are open (client/core.py), to
                   # notice a server that vanished; accept those pings instead of GOAWAY.
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                   ("grpc.http2.max_ping_strikes", 0),
                   # One connection opens at most this many calls at once (the HTTP/2 setting).
                   ("grpc.max_concurrent_streams", limits.max_concurrent_streams)]
        self.security = security
        self.models = list(core.engines)
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_EmbedderServicer_to_server(EmbedderService(core, budget), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        await self.set_serving({name: False for name in ("", *self.models)})
        address, security = f"{host}:{port}", self.security
        if security.tls_cert:
            self.port = self.server.add_secure_port(address, server_credentials(
                security.tls_cert, security.tls_key, security.tls_client_ca))
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not listen on {address}")
        await self.server.start()

    async def set_serving(self, serving: dict[str, bool]) -> None:
        """Health by service name: "" (and the Embedder service's name) for the whole server,
        each model's name for that model."""
        for name, up in serving.items():
            status = health_pb2.HealthCheckResponse.SERVING if up else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for service in (("", SERVICE_NAME) if name == "" else (name,)):
                await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, new calls refused, calls in flight get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def server_credentials(cert: str, key: str, client_ca: str | None = None):
    """TLS with the server's certificate and key; with client_ca, mutual TLS: a client must show
    a certificate signed by that CA or the handshake fails."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
