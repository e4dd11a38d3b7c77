"""The bundled bertstream client.

    from bertstream.client import Client
    with Client("127.0.0.1:50051") as client:
        vectors = client.embed(["first text", "second text"])          # (2, 384) float32

Results of `embed` by dtype: float32/float16/bfloat16 -> float32 array (n, width); int8 -> an
`Int8Embeddings` (q int8 (n, width), scales float32 (n,); q * scales[:, None] ~= vectors);
binary -> uint8 (n, ceil(width / 8)) sign bits, most significant first (np.unpackbits order).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

import grpc
import numpy as np

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc

__all__ = ["Client", "Int8Embeddings", "Usage", "decode_tensor", "EmbedStreamError"]

POOLINGS = {"mean": pb.POOLING_MEAN, "max": pb.POOLING_MAX, "cls": pb.POOLING_CLS,
            "mean_max": pb.POOLING_MEAN_MAX, "none": pb.POOLING_NONE}
COMBINES = {"concat": pb.LAYER_COMBINE_CONCAT, "mean": pb.LAYER_COMBINE_MEAN}
DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16,
          "bfloat16": pb.DTYPE_BFLOAT16, "int8": pb.DTYPE_INT8, "binary": pb.DTYPE_BINARY}


class Int8Embeddings(NamedTuple):
    q: np.ndarray       # int8 (n, width)
    scales: np.ndarray  # float32 (n,)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scales[:, None]


@dataclass(frozen=True)
class Usage:
    tokens: int
    truncated_items: int
    queue_ns: int
    compute_ns: int


class EmbedStreamError(RuntimeError):
    """A stream message the server answered with an error (the stream itself went on)."""

    def __init__(self, request_id: str, code: grpc.StatusCode, message: str):
        super().__init__(f"request {request_id!r}: {code.name}: {message}")
        self.request_id, self.code, self.message = request_id, code, message


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def decode_tensor(tensor: pb.Tensor):
    """A wire Tensor -> numpy, as described in the module docstring."""
    shape = tuple(tensor.shape)
    if tensor.dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)
    if tensor.dtype == pb.DTYPE_FLOAT16:
        return np.frombuffer(tensor.data, dtype="<f2").reshape(shape).astype(np.float32)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(tensor.data, dtype="<u2").reshape(shape)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if tensor.dtype == pb.DTYPE_INT8:
        q = np.frombuffer(tensor.data, dtype=np.int8).reshape(shape)
        return Int8Embeddings(q, np.asarray(tensor.scales, dtype=np.float32))
    if tensor.dtype == pb.DTYPE_BINARY:
        rows, width = shape
        return np.frombuffer(tensor.data, dtype=np.uint8).reshape(rows, (width + 7) // 8)
    raise ValueError(f"unknown tensor dtype {tensor.dtype}")


def _choice(table: dict, value: str, name: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{name} must be one of {tuple(table)}, got {value!r}") from None


def build_request(texts: Sequence[str], request_id: str = "", *, pooling: str = "mean",
                  layers: Sequence[int] = (-1,), layer_combine: str = "concat",
                  normalize: bool = False, dtype: str = "float32",
                  truncate: bool = True) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return pb.EmbedRequest(
        request_id=request_id, texts=list(texts), pooling=_choice(POOLINGS, pooling, "pooling"),
        layers=list(layers), layer_combine=_choice(COMBINES, layer_combine, "layer_combine"),
        normalize=normalize, dtype=_choice(DTYPES, dtype, "dtype"), truncate=truncate)


def split_tokens(vectors: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    return np.split(vectors, np.cumsum(lengths)[:-1]) if len(lengths) else []


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _read(value):
    """PEM material given as bytes, or as the path of a file holding it."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as file:
        return file.read()


def make_channel(target: str, *, tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 tls_server_name: str | None = None) -> grpc.Channel:
    """An insecure channel, or a TLS one (tls=True or any tls_* given). tls_ca: the CA to trust
    (default: the system's); tls_cert + tls_key: this client's certificate, for mutual TLS."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca), private_key=_read(tls_key),
        certificate_chain=_read(tls_cert))
    options = list(CHANNEL_OPTIONS)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return grpc.secure_channel(target, credentials, options=options)


class Client:
    """A blocking client. `target` is "host:port" (or any gRPC target string).

    token: sent as `authorization: Bearer <token>` on every call. TLS: see make_channel.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 token: str | None = None, channel: grpc.Channel | None = None, **tls):
        self._channel = channel or make_channel(target, **tls)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout
        self.last_usage: Usage | None = None  # usage of the latest embed/embed_tokens call

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    # ------------------------------------------------------------------ calls

    def _call(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        response = self._stub.Embed(request, timeout=self.timeout, metadata=self._metadata)
        usage = response.usage
        self.last_usage = Usage(usage.tokens, usage.truncated_items, usage.queue_ns,
                                usage.compute_ns)
        return response

    def embed(self, texts: Sequence[str], pooling: str = "mean", layers: Sequence[int] = (-1,),
              layer_combine: str = "concat", normalize: bool = False, dtype: str = "float32",
              truncate: bool = True):
        """One vector per text (see the module docstring for what each dtype returns)."""
        if pooling == "none":
            raise ValueError("pooling 'none' is token-level: use embed_tokens()")
        request = build_request(texts, pooling=pooling, layers=layers, layer_combine=layer_combine,
                                normalize=normalize, dtype=dtype, truncate=truncate)
        return decode_tensor(self._call(request).embeddings)

    def embed_tokens(self, texts: Sequence[str], layers: Sequence[int] = (-1,),
                     layer_combine: str = "concat", normalize: bool = False,
                     truncate: bool = True) -> list[np.ndarray]:
        """Token-level vectors: one (tokens, width) float32 array per text, exactly its own
        tokens ([CLS] and [SEP] included); `tokenize` gives the matching token strings/offsets."""
        request = build_request(texts, pooling="none", layers=layers, layer_combine=layer_combine,
                                normalize=normalize, truncate=truncate)
        response = self._call(request)
        return split_tokens(decode_tensor(response.embeddings), response.lengths)

    def stream(self, texts: Iterable[str], batch_size: int = 64, window: int = 32,
               **options) -> Iterator:
        """Embed any iterable of texts over one EmbedStream, with bounded memory.

        Texts are sent in messages of `batch_size`, at most `window` messages in flight; yields one
        result per message, in input order: what `embed` returns for those texts (or, with
        pooling="none", a list of per-text token arrays). A message the server rejects raises
        EmbedStreamError.
        """
        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be >= 1")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string")
        slots = threading.Semaphore(window)
        stop = threading.Event()

        def requests():
            batch, number = [], 0
            for text in texts:
                batch.append(text)
                if len(batch) == batch_size:
                    yield from send(batch, number)
                    batch, number = [], number + 1
            if batch:
                yield from send(batch, number)

        def send(batch, number):
            while not slots.acquire(timeout=0.1):  # wait for a response to free a slot
                if stop.is_set():
                    return
            if not stop.is_set():
                yield build_request(batch, str(number), **options)

        responses = self._stub.EmbedStream(requests(), timeout=self.timeout,
                                           metadata=self._metadata)
        try:
            for response in responses:
                slots.release()
                if response.HasField("error"):
                    raise EmbedStreamError(response.request_id,
                                           _STATUS_BY_NUMBER.get(response.error.code,
                                                                 grpc.StatusCode.UNKNOWN),
                                           response.error.message)
                result = decode_tensor(response.embeddings)
                yield split_tokens(result, response.lengths) if response.lengths else result
        finally:
            stop.set()
            responses.cancel()

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[dict]]:
        """Per text, its tokens as dicts: id, text (token string), start, end (character offsets;
        special tokens have start == end == 0)."""
        response = self._stub.Tokenize(pb.TokenizeRequest(texts=list(texts), truncate=truncate),
                                       timeout=self.timeout, metadata=self._metadata)
        return [[{"id": t.id, "text": t.text, "start": t.start, "end": t.end} for t in text.tokens]
                for text in response.texts]

    def info(self) -> dict:
        response = self._stub.Info(pb.InfoRequest(), timeout=self.timeout,
                                   metadata=self._metadata)
        return {
            "model": response.model, "hidden_size": response.hidden_size,
            "num_layers": response.num_layers, "max_input_tokens": response.max_input_tokens,
            "device": response.device, "dtype": response.dtype,
            "limits": {field.name: value for field, value in response.limits.ListFields()},
        }

    # ------------------------------------------------------------------ simpletransformers shape

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
        texts = list(text_list)
        if combine_strategy in ("mean", "max"):
            return self._batched(texts, batch_size, lambda part: self.embed(part, combine_strategy))
        if combine_strategy is not None and combine_strategy != "concat" and not isinstance(
                combine_strategy, int):
            raise ValueError("combine_strategy must be None, 'mean', 'max', 'concat' or an int, "
                             f"got {combine_strategy!r}")
        tokens = [row for start in range(0, len(texts), batch_size)
                  for row in self.embed_tokens(texts[start:start + batch_size])]
        if combine_strategy is None:
            return tokens
        if combine_strategy == "concat":
            longest = max((len(t) for t in tokens), default=0)
            hidden = tokens[0].shape[1] if tokens else 0
            out = np.zeros((len(tokens), longest, hidden), dtype=np.float32)
            for row, t in zip(out, tokens):
                row[:len(t)] = t
            return out.reshape(len(tokens), longest * hidden)
        index = combine_strategy
        for i, t in enumerate(tokens):
            if not -len(t) <= index < len(t):
                raise IndexError(f"token index {index} is out of range for text {i} "
                                 f"({len(t)} tokens)")
        return np.stack([t[index] for t in tokens]) if tokens else np.zeros((0, 0), np.float32)

    @staticmethod
    def _batched(texts, batch_size, embed):
        parts = [embed(texts[start:start + batch_size]) for start in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
