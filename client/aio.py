"""The asyncio client (grpc.aio): the methods of Client, awaited."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc
import numpy as np

from .core import (EMBED_RPC, SEND_ATTEMPTS, SPARSE_RPC, Classified, EmbedStreamError,
                   LocalTokenizer, Rpc, Usage, batches, build_request, check_combine_strategy,
                   classified_of, classify_request, combine_tokens, decode_response,
                   embed_request, make_channel, ranked_of, rerank_request, send_again, sparse_of,
                   made_for_another, sparse_request, stale_tokenizer, tokens_request)
from .sync import info_of, tokens_of
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc


class AsyncClient:
    """`async with AsyncClient(target) as client: vectors = await client.embed(texts)`.

    Same targets, token and TLS options as Client. Create it inside the event loop it is used on.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *,
                 timeout: float | None = None, token: str | None = None,
                 channel: grpc.aio.Channel | None = None, tokenize_locally: bool = False,
                 model: str | None = None, **tls):
        self._channel = channel or make_channel(target, aio=True, **tls)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._replicas = not isinstance(target, str) and len(target) > 1
        self.timeout = timeout
        self.last_usage: Usage | None = None
        self.tokenize_locally = tokenize_locally
        self.model = model
        self._local: dict[str, LocalTokenizer] = {}

    async def _prepared(self, request: pb.EmbedRequest) -> pb.EmbedRequest:
        """As Client._prepared; the tokenizing on a thread, off the event loop."""
        request.model = request.model or self.model or ""
        if not self.tokenize_locally:
            return request
        if request.model not in self._local:
            tokenizer = await self._stub.GetTokenizer(pb.TokenizerRequest(model=request.model),
                                                      timeout=self.timeout,
                                                      metadata=self._metadata)
            self._local[request.model] = LocalTokenizer(tokenizer, await self.info(request.model))
        return await asyncio.to_thread(self._local[request.model].convert, request)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _embed(self, request: pb.EmbedRequest):
        texts = list(request.texts) if self.tokenize_locally else None  # _prepared drops them
        try:
            response = await self._stub.Embed(await self._prepared(request),
                                              timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:  # the server's tokenizer changed: once more, anew
            if not stale_tokenizer(error, request, texts, self._local):
                raise
            response = await self._stub.Embed(await self._prepared(request),
                                              timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return decode_response(response)

    async def embed(self, texts: Sequence[str], pooling: str | None = None,
                    layers: Sequence[int] = (-1,), layer_combine: str = "concat",
                    normalize: bool | None = None, dtype: str = "float32", truncate: bool = True,
                    prompt_name: str | None = None, prompt: str | None = None,
                    dimensions: int | None = None, priority: str | None = None,
                    model: str | None = None):
        """As Client.embed."""
        return await self._embed(embed_request(
            texts, pooling=pooling, layers=layers, layer_combine=layer_combine,
            normalize=normalize, dtype=dtype, truncate=truncate, prompt_name=prompt_name,
            prompt=prompt, dimensions=dimensions, priority=priority, model=model))

    async def embed_tokens(self, texts: Sequence[str], layers: Sequence[int] = (-1,),
                           layer_combine: str = "concat", normalize: bool = False,
                           truncate: bool = True, prompt_name: str | None = None,
                           prompt: str | None = None, priority: str | None = None,
                           model: str | None = None) -> list[np.ndarray]:
        """As Client.embed_tokens."""
        return await self._embed(tokens_request(
            texts, layers=layers, layer_combine=layer_combine, normalize=normalize,
            truncate=truncate, prompt_name=prompt_name, prompt=prompt, priority=priority,
            model=model))

    async def stream(self, texts: Iterable[str] | AsyncIterable[str], batch_size: int = 64,
                     window: int = 64, spread: bool | None = None,
                     message_timeout: float | None = None, **options) -> AsyncIterator:
        """As Client.stream, for a plain or an async iterable of texts."""
        requests = (await self._prepared(request)
                    async for request in _requests(texts, batch_size, build_request, options))
        try:
            async for result in self._corpus(EMBED_RPC, requests, window, spread,
                                             message_timeout):
                yield result
        except (EmbedStreamError, grpc.RpcError) as error:  # fetched again next time
            if made_for_another(error):
                self._local.pop(options.get("model") or self.model or "", None)
            raise

    async def stream_sparse(self, texts: Iterable[str] | AsyncIterable[str], batch_size: int = 64,
                            window: int = 64, spread: bool | None = None,
                            message_timeout: float | None = None, top_k: int | None = None,
                            truncate: bool = True, model: str | None = None,
                            priority: str | None = None) -> AsyncIterator:
        """As Client.stream_sparse, for a plain or an async iterable of texts."""
        options = dict(top_k=top_k, truncate=truncate, model=model or self.model,
                       priority=priority)
        requests = _requests(texts, batch_size, sparse_request, options)
        async for result in self._corpus(SPARSE_RPC, requests, window, spread, message_timeout):
            yield result

    def _corpus(self, rpc: Rpc, requests, window: int, spread: bool | None,
                message_timeout: float | None) -> AsyncIterator:
        if window < 1:
            raise ValueError("window must be >= 1")
        if self._replicas if spread is None else spread:
            return self._spread(rpc, requests, window, message_timeout)
        return self._one_stream(rpc, requests, window, message_timeout)

    async def _one_stream(self, rpc: Rpc, requests, window: int, message_timeout: float | None):
        slots = asyncio.Semaphore(window)
        sent_at = collections.deque()  # when each unanswered message went out, oldest first

        async def paced():
            async for request in requests:
                await slots.acquire()
                sent_at.append((request.request_id, time.monotonic()))
                yield request

        call = getattr(self._stub, rpc.stream)(paced(), timeout=self.timeout,
                                               metadata=self._metadata)
        responses = call.__aiter__()
        try:
            while True:
                reading = asyncio.ensure_future(anext(responses))
                while not reading.done():  # waits; past message_timeout on the oldest: gives up
                    await asyncio.wait({reading}, timeout=message_timeout / 4
                                       if message_timeout else None)
                    if (not reading.done() and message_timeout and sent_at
                            and time.monotonic() - sent_at[0][1] > message_timeout):
                        reading.cancel()
                        raise EmbedStreamError(sent_at[0][0], grpc.StatusCode.DEADLINE_EXCEEDED,
                                               f"no answer within {message_timeout} s")
                try:
                    response = reading.result()
                except StopAsyncIteration:
                    return
                sent_at.popleft()
                slots.release()
                self.last_usage = Usage.of(response)
                yield rpc.decode(response)
        finally:
            call.cancel()

    async def _spread(self, rpc: Rpc, requests, window: int,
                      message_timeout: float | None = None):
        in_flight: list[tuple[object, asyncio.Task]] = []
        timeout = message_timeout or self.timeout
        try:
            async for request in requests:
                in_flight.append((request, self._send(rpc, request, timeout)))
                if len(in_flight) >= window:
                    yield await self._settle(rpc, *in_flight.pop(0), timeout)
            while in_flight:
                yield await self._settle(rpc, *in_flight.pop(0), timeout)
        finally:
            for _, task in in_flight:
                task.cancel()

    def _send(self, rpc: Rpc, request, timeout: float | None) -> asyncio.Task:
        return asyncio.ensure_future(getattr(self._stub, rpc.unary)(
            request, timeout=timeout, metadata=self._metadata))

    async def _settle(self, rpc: Rpc, request, task: asyncio.Task, timeout: float | None):
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                response = await task
                break
            except grpc.RpcError as error:
                if not send_again(error, attempt):
                    raise
                task = self._send(rpc, request, timeout)  # its replica went away: another takes it
        self.last_usage = Usage.of(response)
        return rpc.decode(response)

    async def tokenize(self, texts: Sequence[str], truncate: bool = True,
                       model: str | None = None) -> list[list[dict]]:
        return tokens_of(await self._stub.Tokenize(
            pb.TokenizeRequest(texts=list(texts), truncate=truncate,
                               model=model or self.model or ""),
            timeout=self.timeout, metadata=self._metadata))

    async def info(self, model: str | None = None) -> dict:
        return info_of(await self._stub.Info(pb.InfoRequest(model=model or self.model or ""),
                                             timeout=self.timeout, metadata=self._metadata))

    async def embed_sparse(self, texts: Sequence[str], top_k: int | None = None,
                     truncate: bool = True, model: str | None = None,
                     priority: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """As Client.embed_sparse."""
        response = await self._stub.EmbedSparse(sparse_request(
            texts, top_k=top_k, truncate=truncate, model=model or self.model,
            priority=priority), timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return sparse_of(response)

    async def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
                     return_documents: bool = False, raw_scores: bool = False,
                     truncate: bool = True, model: str | None = None,
                     priority: str | None = None) -> list[dict]:
        """As Client.rerank."""
        response = await self._stub.Rerank(rerank_request(
            query, documents, top_n=top_n, return_documents=return_documents,
            raw_scores=raw_scores, truncate=truncate, model=model or self.model,
            priority=priority), timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return ranked_of(response, return_documents)

    async def classify(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                       raw_scores: bool = False, truncate: bool = True,
                       model: str | None = None, priority: str | None = None) -> Classified:
        """As Client.classify."""
        response = await self._stub.Classify(classify_request(
            texts, pairs, raw_scores=raw_scores, truncate=truncate, model=model or self.model,
            priority=priority), timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return classified_of(response)

    async def list_models(self) -> list[dict]:
        response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                               metadata=self._metadata)
        return [info_of(model) for model in response.models]

    async def encode_sentences(self, text_list: Sequence[str], combine_strategy=None,
                               batch_size: int = 32):
        """As Client.encode_sentences."""
        check_combine_strategy(combine_strategy)
        texts = list(text_list)
        if combine_strategy in ("mean", "max"):
            parts = [await self.embed(batch, combine_strategy, normalize=False)
                     for batch in batches(texts, batch_size)]
            return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        tokens = [row for batch in batches(texts, batch_size)
                  for row in await self.embed_tokens(batch)]
        return tokens if combine_strategy is None else combine_tokens(tokens, combine_strategy)


async def _requests(texts, batch_size: int, build, options: dict):
    """Requests of batch_size texts (build(texts, request_id, **options)) from a plain or an
    async iterable, lazily."""
    if not hasattr(texts, "__aiter__"):
        for number, batch in enumerate(batches(texts, batch_size)):
            yield build(batch, str(number), **options)
        return
    batch, number = [], 0
    async for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield build(batch, str(number), **options)
            batch, number = [], number + 1
    if batch:
        yield build(batch, str(number), **options)
