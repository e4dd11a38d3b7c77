"""The blocking client."""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np

from .core import (EMBED_RPC, SEND_ATTEMPTS, SPARSE_RPC, Classified, EmbedStreamError,
                   LocalTokenizer, Rpc, Usage, batches, build_request, check_combine_strategy,
                   classified_of, classify_request, combine_tokens, decode_response,
                   embed_request, make_channel, ranked_of, rerank_request, send_again, sparse_of,
                   made_for_another, sparse_request, stale_tokenizer, tokens_request)
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc


class Client:
    """A blocking client.

    target: "host:port", any gRPC target string ("dns:///name:port" with many addresses), or a
    list of "host:port" replicas; calls are spread over all addresses (round robin) and a call
    failed by a vanished replica is retried on another. token: sent as
    `authorization: Bearer <token>`. TLS: tls=True, tls_ca, tls_cert, tls_key (see make_channel).
    tokenize_locally: tokenize here with the server's own tokenizer (fetched once, on the first
    call) and send token ids: the same vectors, the tokenizing on this machine's cores.
    model: the served model (list_models()) calls use unless they name one (None: the server's
    default).
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *,
                 timeout: float | None = None, token: str | None = None,
                 channel: grpc.Channel | None = None, tokenize_locally: bool = False,
                 model: str | None = None, **tls):
        self._channel = channel or make_channel(target, **tls)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._replicas = not isinstance(target, str) and len(target) > 1
        self.timeout = timeout
        self.last_usage: Usage | None = None  # usage of the latest response received
        self.tokenize_locally = tokenize_locally
        self.model = model
        self._local: dict[str, LocalTokenizer] = {}  # model -> its tokenizer, when asked for

    def _prepared(self, request: pb.EmbedRequest) -> pb.EmbedRequest:
        """The request as it goes out: for the client's model unless it names one; its texts
        as token ids when tokenizing locally."""
        request.model = request.model or self.model or ""
        if not self.tokenize_locally:
            return request
        if request.model not in self._local:
            tokenizer = self._stub.GetTokenizer(pb.TokenizerRequest(model=request.model),
                                                timeout=self.timeout, metadata=self._metadata)
            self._local[request.model] = LocalTokenizer(tokenizer, self.info(request.model))
        return self._local[request.model].convert(request)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _embed(self, request: pb.EmbedRequest):
        texts = list(request.texts) if self.tokenize_locally else None  # _prepared drops them
        try:
            response = self._stub.Embed(self._prepared(request), timeout=self.timeout,
                                        metadata=self._metadata)
        except grpc.RpcError as error:  # the server's tokenizer changed: once more, anew
            if not stale_tokenizer(error, request, texts, self._local):
                raise
            response = self._stub.Embed(self._prepared(request), timeout=self.timeout,
                                        metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return decode_response(response)

    def embed(self, texts: Sequence[str], pooling: str | None = None,
              layers: Sequence[int] = (-1,), layer_combine: str = "concat",
              normalize: bool | None = None, dtype: str = "float32", truncate: bool = True,
              prompt_name: str | None = None, prompt: str | None = None,
              dimensions: int | None = None, priority: str | None = None,
              model: str | None = None):
        """One vector per text: float32 (n, width) for the float dtypes; Int8Embeddings for int8;
        packed sign bits uint8 (n, ceil(width / 8)) for binary.

        By default (pooling=None) the model's own embedding, what SentenceTransformer(model)
        .encode gives: its pooling, Dense and Normalize, its default prompt. A pooling name
        ("mean", "max", "cls", "mean_max", "mean_sqrt_len", "weightedmean", "lasttoken") gives
        that raw pooling of `layers`, normalized only if normalize=True. prompt_name (one of the
        model's prompts) or prompt (free text) is prepended to every text; dimensions keeps the
        first k values (renormalized when the output is normalized). priority: the server's lane,
        "interactive" (None: the default) or "bulk" (corpus work: it fills what interactive
        calls leave; a unary call gets RESOURCE_EXHAUSTED when its lane is full, a stream
        message waits: `stream(..., priority="bulk")` for corpus work). model: a served model's
        name (list_models(); None: the client's model)."""
        return self._embed(embed_request(
            texts, pooling=pooling, layers=layers, layer_combine=layer_combine,
            normalize=normalize, dtype=dtype, truncate=truncate, prompt_name=prompt_name,
            prompt=prompt, dimensions=dimensions, priority=priority, model=model))

    def embed_tokens(self, texts: Sequence[str], layers: Sequence[int] = (-1,),
                     layer_combine: str = "concat", normalize: bool = False,
                     truncate: bool = True, prompt_name: str | None = None,
                     prompt: str | None = None, priority: str | None = None,
                     model: str | None = None) -> list[np.ndarray]:
        """Token-level vectors: one (tokens, width) float32 array per text, exactly its own
        tokens ([CLS] and [SEP] included, a prompt's too); `tokenize` gives the matching
        strings and offsets."""
        return self._embed(tokens_request(
            texts, layers=layers, layer_combine=layer_combine, normalize=normalize,
            truncate=truncate, prompt_name=prompt_name, prompt=prompt, priority=priority,
            model=model))

    def stream(self, texts: Iterable[str], batch_size: int = 64, window: int = 64,
               spread: bool | None = None, message_timeout: float | None = None,
               **options) -> Iterator:
        """Embed any iterable of texts with bounded memory: messages of batch_size texts, at most
        `window` in flight; yields one result per message, in input order (what `embed` returns
        for those texts, or with pooling="none" a list of token arrays).

        One EmbedStream carries them; with spread (default: when several replicas were given),
        each message is its own call instead, so they spread over every replica and a message
        whose replica dies is retried on another. A message the server rejects raises
        EmbedStreamError (stream) or grpc.RpcError (spread). message_timeout: seconds each
        message may wait for its answer (the deadline of each call when spread); past it, the
        stream is cancelled and EmbedStreamError (DEADLINE_EXCEEDED) raised.
        """
        if window < 1:
            raise ValueError("window must be >= 1")  # before the tokenizer is fetched
        if self.tokenize_locally:  # fetch the tokenizer now, not on gRPC's sending thread
            self._prepared(build_request(["a"], model=options.get("model")))
        requests = (self._prepared(build_request(batch, str(number), **options))
                    for number, batch in enumerate(batches(texts, batch_size)))
        return self._forgetting_stale(
            self._corpus(EMBED_RPC, requests, window, spread, message_timeout),
            options.get("model") or self.model or "")

    def _forgetting_stale(self, results: Iterator, model: str) -> Iterator:
        """A stream's results; if the server refuses its token ids as made for what it served
        before, the stream fails, and the client's tokenizer is fetched again next time."""
        try:
            yield from results
        except (EmbedStreamError, grpc.RpcError) as error:
            if made_for_another(error):
                self._local.pop(model, None)
            raise

    def stream_sparse(self, texts: Iterable[str], batch_size: int = 64, window: int = 64,
                      spread: bool | None = None, message_timeout: float | None = None,
                      top_k: int | None = None, truncate: bool = True, model: str | None = None,
                      priority: str | None = None) -> Iterator:
        """As stream, for a sparse model: per message, what embed_sparse returns for its texts
        (an (indices, values) pair per text), in input order, at most `window` in flight."""
        requests = (sparse_request(batch, str(number), top_k=top_k, truncate=truncate,
                                   model=model or self.model, priority=priority)
                    for number, batch in enumerate(batches(texts, batch_size)))
        return self._corpus(SPARSE_RPC, requests, window, spread, message_timeout)

    def _corpus(self, rpc: Rpc, requests, window: int, spread: bool | None,
                message_timeout: float | None) -> Iterator:
        if window < 1:
            raise ValueError("window must be >= 1")
        if self._replicas if spread is None else spread:
            return self._spread(rpc, requests, window, message_timeout)
        return self._one_stream(rpc, requests, window, message_timeout)

    def _one_stream(self, rpc: Rpc, requests, window: int, message_timeout: float | None):
        slots = threading.Semaphore(window)
        stop = threading.Event()
        failures = []  # from reading the texts, which runs on gRPC's sending thread
        sent_at = collections.deque()  # when each unanswered message went out, oldest first

        def paced():
            try:
                for request in requests:
                    while not slots.acquire(timeout=0.1):  # wait for a response to free a slot
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    sent_at.append((request.request_id, time.monotonic()))
                    yield request
            except Exception as exc:  # end the stream cleanly; the caller gets exc after the
                failures.append(exc)  # answers to what was sent before it

        responses = getattr(self._stub, rpc.stream)(paced(), timeout=self.timeout,
                                                    metadata=self._metadata)
        late = []

        def watchdog():  # cancels the stream when its oldest unanswered message is overdue
            while not stop.wait(min(1.0, message_timeout / 4)):
                if sent_at and time.monotonic() - sent_at[0][1] > message_timeout:
                    late.append(sent_at[0][0])
                    responses.cancel()
                    return

        if message_timeout:
            threading.Thread(target=watchdog, daemon=True, name="bertstream-watchdog").start()
        try:
            for response in responses:
                sent_at.popleft()
                slots.release()
                self.last_usage = Usage.of(response)
                yield rpc.decode(response)
        except grpc.RpcError:
            if late:
                raise EmbedStreamError(late[0], grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"no answer within {message_timeout} s") from None
            raise
        finally:
            stop.set()
            responses.cancel()
        if failures:
            raise failures[0]

    def _spread(self, rpc: Rpc, requests, window: int, message_timeout: float | None = None):
        in_flight = collections.deque()
        timeout = message_timeout or self.timeout
        try:
            for request in requests:
                in_flight.append((request, self._send(rpc, request, timeout)))
                if len(in_flight) >= window:
                    yield self._settle(rpc, *in_flight.popleft(), timeout)
            while in_flight:
                yield self._settle(rpc, *in_flight.popleft(), timeout)
        finally:
            for _, future in in_flight:
                future.cancel()

    def _send(self, rpc: Rpc, request, timeout: float | None):
        return getattr(self._stub, rpc.unary).future(request, timeout=timeout,
                                                      metadata=self._metadata)

    def _settle(self, rpc: Rpc, request, future, timeout: float | None):
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                response = future.result()
                break
            except grpc.RpcError as error:
                if not send_again(error, attempt):
                    raise
                future = self._send(rpc, request, timeout)  # its replica went away: another takes it
        self.last_usage = Usage.of(response)
        return rpc.decode(response)

    def tokenize(self, texts: Sequence[str], truncate: bool = True,
                 model: str | None = None) -> list[list[dict]]:
        """Per text, its tokens as dicts: id, text (token string), start, end (character offsets;
        special tokens have start == end == 0)."""
        response = self._stub.Tokenize(
            pb.TokenizeRequest(texts=list(texts), truncate=truncate,
                               model=model or self.model or ""),
            timeout=self.timeout, metadata=self._metadata)
        return tokens_of(response)

    def info(self, model: str | None = None) -> dict:
        """What the server runs for the model (None: the client's model, else the default)."""
        return info_of(self._stub.Info(pb.InfoRequest(model=model or self.model or ""),
                                       timeout=self.timeout, metadata=self._metadata))

    def embed_sparse(self, texts: Sequence[str], top_k: int | None = None,
                     truncate: bool = True, model: str | None = None,
                     priority: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's SPLADE vector on a sparse model: (indices int32 ascending, values
        float32) per text; top_k keeps each vector's largest values (None: the model's
        max_active_dims, else every non-zero value)."""
        response = self._stub.EmbedSparse(sparse_request(
            texts, top_k=top_k, truncate=truncate, model=model or self.model,
            priority=priority), timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return sparse_of(response)

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
               return_documents: bool = False, raw_scores: bool = False, truncate: bool = True,
               model: str | None = None, priority: str | None = None) -> list[dict]:
        """A cross-encoder's relevance of each document to the query, best first: dicts of
        index (into documents), score (the model's activation, as CrossEncoder.predict; logits
        with raw_scores) and, with return_documents, document; the best top_n only."""
        response = self._stub.Rerank(rerank_request(
            query, documents, top_n=top_n, return_documents=return_documents,
            raw_scores=raw_scores, truncate=truncate, model=model or self.model,
            priority=priority), timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return ranked_of(response, return_documents)

    def classify(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 raw_scores: bool = False, truncate: bool = True, model: str | None = None,
                 priority: str | None = None) -> Classified:
        """Each label's score for each text (or pair texts[i], pairs[i]): softmax over the
        labels, or sigmoid for one label or a multi-label model; logits with raw_scores.
        Classified(labels, scores (n, labels))."""
        response = self._stub.Classify(classify_request(
            texts, pairs, raw_scores=raw_scores, truncate=truncate, model=model or self.model,
            priority=priority), timeout=self.timeout, metadata=self._metadata)
        self.last_usage = Usage.of(response)
        return classified_of(response)

    def list_models(self) -> list[dict]:
        """info() of every model the server serves, its default first."""
        response = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                         metadata=self._metadata)
        return [info_of(model) for model in response.models]

    def encode_sentences(self, text_list: Sequence[str], combine_strategy=None,
                         batch_size: int = 32):
        """simpletransformers' `RepresentationModel.encode_sentences`, with masked semantics.

        combine_strategy:
          None     one (tokens, hidden) array per text, exactly its own tokens. simpletransformers
                   returns a padded array and fails when batches pad to different lengths.
          "mean"   masked mean (n, hidden): padding never counts, so a text's vector does not
                   depend on its batch. simpletransformers averages padding positions in.
          "max"    masked max (n, hidden) (not in simpletransformers).
          "concat" (n, L * hidden), L = the longest text of the whole list; each text's token
                   vectors in order, then zeros (simpletransformers pads with the model's outputs
                   at [PAD] positions, and only within one batch).
          int i    the i-th real token of each text; negative counts from its last real token
                   ([SEP] for -1). simpletransformers picks a [PAD] position for short texts.
        The model's own tokenizer settings (e.g. lower-casing) apply; its last hidden layer is used.
        """
        check_combine_strategy(combine_strategy)
        texts = list(text_list)
        if combine_strategy in ("mean", "max"):
            parts = [self.embed(batch, combine_strategy, normalize=False)
                     for batch in batches(texts, batch_size)]
            return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        tokens = [row for batch in batches(texts, batch_size) for row in self.embed_tokens(batch)]
        return tokens if combine_strategy is None else combine_tokens(tokens, combine_strategy)


def tokens_of(response: pb.TokenizeResponse) -> list[list[dict]]:
    return [[{"id": t.id, "text": t.text, "start": t.start, "end": t.end} for t in text.tokens]
            for text in response.texts]


def info_of(response: pb.InfoResponse) -> dict:
    return {
        "model": response.model, "name": response.name, "weight_bytes": response.weight_bytes,
        "kind": response.kind, "tasks": list(response.tasks), "labels": list(response.labels),
        "hidden_size": response.hidden_size,
        "num_layers": response.num_layers, "max_input_tokens": response.max_input_tokens,
        "device": response.device, "dtype": response.dtype,
        "limits": {field.name: getattr(response.limits, field.name)
                   for field in response.limits.DESCRIPTOR.fields},
        "pipeline": pipeline_of(response.pipeline),
        "tokenizer_sha256": response.tokenizer_sha256, "forward_flops": response.forward_flops,
        "tokenizing_sha256": response.tokenizing_sha256,
    }


def pipeline_of(pipeline: pb.Pipeline) -> dict:
    return {
        "source": pipeline.source, "modules": list(pipeline.modules),
        "pooling": list(pipeline.pooling), "include_prompt": pipeline.include_prompt,
        "dense": [{"in_features": d.in_features, "out_features": d.out_features, "bias": d.bias,
                   "activation": d.activation} for d in pipeline.dense],
        "normalize": pipeline.normalize, "dimensions": pipeline.dimensions,
        "prompts": dict(pipeline.prompts), "default_prompt_name": pipeline.default_prompt_name,
    }
