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

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.batcher import Batcher, Job, JobResult
from bertstream.server.engine import Engine
from bertstream.server.errors import EmbedError, ErrorKind
from bertstream.server.metrics import Metrics

log = logging.getLogger("bertstream.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name

STATUS_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

POOLING_NAMES = {pb.POOLING_UNSPECIFIED: "mean", pb.POOLING_MEAN: "mean", pb.POOLING_MAX: "max",
                 pb.POOLING_CLS: "cls", pb.POOLING_MEAN_MAX: "mean_max", pb.POOLING_NONE: "none"}
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


def enum_name(table: dict, value: int, field: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise EmbedError.invalid(f"{field}: unknown enum value {value}") from None


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, engine: Engine, batcher: Batcher, limits: Limits):
        self.engine = engine
        self.batcher = batcher
        self.limits = limits
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

    async def _embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        """Validate, tokenize, queue, await, convert. Raises EmbedError."""
        self._check_texts(request.texts)
        options = self.engine.options(
            enum_name(POOLING_NAMES, request.pooling, "pooling"), request.layers,
            enum_name(COMBINE_NAMES, request.layer_combine, "layer_combine"), request.normalize)
        dtype = enum_name(DTYPE_NAMES, request.dtype, "dtype")
        truncate = request.truncate if request.HasField("truncate") else True
        loop = asyncio.get_running_loop()
        texts = list(request.texts)
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:  # microseconds: not worth a thread hop
            tokens = self.engine.tokenize(texts, truncate)
        else:
            tokens = await loop.run_in_executor(self._tokenize_pool, self.engine.tokenize, texts,
                                                truncate)

        done: asyncio.Future = loop.create_future()

        def on_done(result):  # called on the pooling thread
            loop.call_soon_threadsafe(_settle, done, result)

        job = Job(tokens.ids, options, dtype, on_done, truncated_items=sum(tokens.truncated))
        self.batcher.submit(job)
        try:
            result = await done
        except asyncio.CancelledError:
            job.cancelled = True  # the batcher drops its queued texts
            raise
        if isinstance(result, EmbedError):
            raise result
        self.metrics.tokens.inc(result.usage.tokens)
        self.metrics.truncated.inc(result.usage.truncated_items)
        return to_response(request.request_id, result)

    async def _observed_embed(self, rpc: str, request: pb.EmbedRequest) -> pb.EmbedResponse:
        """_embed, counted and timed by RPC and outcome (once per request, success or not)."""
        started, code = time.perf_counter(), "OK"
        try:
            return await self._embed(request)
        except EmbedError as error:
            code = STATUS_CODES[error.kind].name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels(rpc, code).inc()
            self.metrics.texts.labels(rpc, code).inc(len(request.texts))
            self.metrics.latency.labels(rpc).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ RPCs

    async def Embed(self, request, context):
        try:
            return await self._observed_embed("Embed", request)
        except EmbedError as error:
            await abort(context, error)

    async def EmbedStream(self, request_iterator, context):
        # Requests are read ahead of their responses (at most stream_window of them, so a fast
        # sender is slowed by flow control) and answered strictly in request order.
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self.limits.stream_window)

        async def read_requests():
            async for request in request_iterator:
                await in_flight.put((request.request_id, asyncio.ensure_future(
                    self._observed_embed("EmbedStream", request))))
            await in_flight.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (entry := await in_flight.get()) is not None:
                request_id, task = entry
                try:
                    yield await task
                except EmbedError as error:
                    log.info("stream request failed", extra={"fields": {
                        "request_id": request_id, "kind": error.kind.value, "error": error.message}})
                    yield pb.EmbedResponse(request_id=request_id, error=pb.Error(
                        code=STATUS_CODES[error.kind].value[0], message=error.message))
            await reader  # re-raises a transport error from the reading side
        finally:
            reader.cancel()
            while not in_flight.empty():
                entry = in_flight.get_nowait()
                if entry is not None:
                    entry[1].cancel()

    async def Tokenize(self, request, context):
        try:
            self._check_texts(request.texts)
            truncate = request.truncate if request.HasField("truncate") else True
            tokens = await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, lambda: self.engine.tokenize(list(request.texts), truncate,
                                                                  details=True))
        except EmbedError as error:
            await abort(context, error)
        return pb.TokenizeResponse(texts=[
            pb.TokenizedText(truncated=truncated, tokens=[
                pb.Token(id=i, text=t, start=start, end=end)
                for i, t, (start, end) in zip(ids, strings, offsets)])
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
                             stream_window=limits.stream_window))


async def warm_up(batcher: Batcher, engine: Engine) -> None:
    """One text through the whole path (on the forward thread, like every forward pass)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    options = engine.options("mean", (), "concat", False)
    batcher.submit(Job(engine.tokenize(["warm-up"]).ids, options, "float32",
                       lambda result: loop.call_soon_threadsafe(_settle, done, result)))
    result = await done
    if isinstance(result, EmbedError):
        raise RuntimeError(f"warm-up failed: {result.message}")


def _settle(future: asyncio.Future, result) -> None:
    if not future.done():  # the caller may have gone
        future.set_result(result)


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


async def start_server(engine: Engine, limits: Limits, host: str = "127.0.0.1",
                       port: int = 50051) -> tuple[grpc.aio.Server, int, Batcher]:
    """Start serving; returns the server, the bound port (useful with port 0) and the batcher
    (batcher.metrics holds the server's Prometheus registry).

    Health says NOT_SERVING until one warm-up forward pass has run.
    """
    metrics = Metrics()
    metrics.model.info({"model": engine.model_name, "device": str(engine.device),
                        "dtype": engine.dtype, "max_length": str(engine.max_length)})
    batcher = Batcher(engine, limits.max_batch_tokens, metrics)
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", -1)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_EmbedderServicer_to_server(EmbedderService(engine, batcher, limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    await warm_up(batcher, engine)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, batcher
