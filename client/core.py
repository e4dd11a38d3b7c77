"""What the blocking and the asyncio clients share: requests, decoding, channels, result shapes."""

from __future__ import annotations

import itertools
import json
import socket
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import grpc
import numpy as np

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import labels

# None: the model's own pipeline (pooling, Dense, Normalize, default prompt), as the server reports
# it in info()["pipeline"]; a name: that raw pooling.
POOLINGS = {None: pb.POOLING_UNSPECIFIED, **labels(pb.Pooling)}
COMBINES = labels(pb.LayerCombine)
DTYPES = labels(pb.DType)
PRIORITIES = {None: pb.PRIORITY_UNSPECIFIED, **labels(pb.Priority)}
QUANTIZED = ("int8", "binary")  # not float vectors: embed() returns them as they are
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# Spread calls over every address a target has (several replicas, or a DNS name with many
# records), and let gRPC itself retry a call that failed with UNAVAILABLE (a replica went away)
# on another one. Streams are retried only before their first response (gRPC's rule).
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "bertstream.v1.Embedder"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})
# A message sent to a replica that then died is sent again, this many times in all (the server
# computes it from scratch, so a retry can neither lose nor duplicate a row).
SEND_ATTEMPTS = 5


def send_again(error: grpc.RpcError, attempt: int) -> bool:
    """Whether a spread message that failed on its `attempt`-th send goes out once more: only
    when its replica went away (UNAVAILABLE), SEND_ATTEMPTS sends in all."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and attempt < SEND_ATTEMPTS
# While calls are open, ping the server every KEEPALIVE_S and give up on it KEEPALIVE_TIMEOUT_S
# later: a replica that vanishes without a TCP reset (power loss, a partition) fails its calls as
# UNAVAILABLE within seconds, and they are sent again elsewhere, instead of stalling a corpus job
# until the operating system gives up on the connection (many minutes).
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 5, 5
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                   ("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
                   ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
                   ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
                   # newer gRPC cores time a ping out by this one (default 60 s)
                   ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
                   ("grpc.http2.max_pings_without_data", 0)]


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

    @classmethod
    def of(cls, response: pb.EmbedResponse) -> "Usage":
        u = response.usage
        return cls(u.tokens, u.truncated_items, u.queue_ns, u.compute_ns)


class EmbedStreamError(RuntimeError):
    """A stream message the server answered with an error (the stream itself went on)."""

    def __init__(self, request_id: str, code: grpc.StatusCode, message: str):
        super().__init__(f"request {request_id!r}: {code.name}: {message}")
        self.request_id, self.code, self.message = request_id, code, message


def decode_tensor(tensor: pb.Tensor):
    """A wire Tensor -> numpy: float32 for the float dtypes, Int8Embeddings for int8, packed
    uint8 sign bits (n, ceil(width / 8)) for binary."""
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


def decode_response(response: pb.EmbedResponse):
    """The result a response carries: an array per decode_tensor, or for token-level output a
    list of (tokens, width) arrays. A stream message's error raises EmbedStreamError."""
    _raise_stream_error(response)
    result = decode_tensor(response.embeddings)
    return split_tokens(result, response.lengths) if response.lengths else result


def _raise_stream_error(response) -> None:
    if response.HasField("error"):
        raise EmbedStreamError(response.request_id,
                               STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN),
                               response.error.message)


class Rpc(NamedTuple):
    """A kind of corpus call, as Client.stream and stream_sparse send it: the stub's streaming
    method, its unary twin (for spreading over replicas), and what decodes an answer."""
    stream: str
    unary: str
    decode: object


def split_tokens(vectors: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    return np.split(vectors, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _choice(table: dict, value: str, name: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{name} must be one of {tuple(table)}, got {value!r}") from None


def build_request(texts: Sequence[str], request_id: str = "", *, pooling: str | None = None,
                  layers: Sequence[int] = (-1,), layer_combine: str = "concat",
                  normalize: bool | None = None, dtype: str = "float32", truncate: bool = True,
                  prompt_name: str | None = None, prompt: str | None = None,
                  dimensions: int | None = None, priority: str | None = None,
                  model: str | None = None) -> pb.EmbedRequest:
    """pooling, normalize: None leaves them to the model (its pipeline; see Engine.options).
    priority: "interactive" (None: the server's default, interactive) or "bulk". model: a
    served model's name (None: the client's, else the server's default)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return pb.EmbedRequest(
        request_id=request_id, texts=list(texts), pooling=_choice(POOLINGS, pooling, "pooling"),
        layers=list(layers), layer_combine=_choice(COMBINES, layer_combine, "layer_combine"),
        normalize=normalize, dtype=_choice(DTYPES, dtype, "dtype"), truncate=truncate,
        prompt_name=prompt_name or "", prompt=prompt, dimensions=dimensions or 0,
        priority=_choice(PRIORITIES, priority, "priority"), model=model or "")


def embed_request(texts: Sequence[str], **options) -> pb.EmbedRequest:
    """The request of Client.embed / AsyncClient.embed (options: build_request's)."""
    if options.get("pooling") == "none":
        raise ValueError("pooling 'none' is token-level: use embed_tokens()")
    return build_request(texts, **options)


def tokens_request(texts: Sequence[str], **options) -> pb.EmbedRequest:
    """The request of Client.embed_tokens / AsyncClient.embed_tokens."""
    return build_request(texts, pooling="none", **options)


def sparse_request(texts: Sequence[str], request_id: str = "", *, top_k: int | None = None,
                   truncate: bool = True, model: str | None = None,
                   priority: str | None = None) -> pb.EmbedSparseRequest:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return pb.EmbedSparseRequest(request_id=request_id, texts=list(texts), top_k=top_k or 0,
                                 truncate=truncate, model=model or "",
                                 priority=_choice(PRIORITIES, priority, "priority"))


def sparse_of(response: pb.EmbedSparseResponse) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: (indices int32 ascending, values float32). A stream message's error raises
    EmbedStreamError."""
    _raise_stream_error(response)
    return [(np.frombuffer(v.indices, "<i4").astype(np.int32),
             np.frombuffer(v.values, "<f4").astype(np.float32)) for v in response.embeddings]


EMBED_RPC = Rpc("EmbedStream", "Embed", decode_response)
SPARSE_RPC = Rpc("EmbedSparseStream", "EmbedSparse", sparse_of)


def rerank_request(query: str, documents: Sequence[str], request_id: str = "", *,
                   top_n: int | None = None, return_documents: bool = False,
                   raw_scores: bool = False, truncate: bool = True, model: str | None = None,
                   priority: str | None = None) -> pb.RerankRequest:
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not one string")
    return pb.RerankRequest(
        request_id=request_id, query=query, documents=list(documents), top_n=top_n or 0,
        return_documents=return_documents, raw_scores=raw_scores, truncate=truncate,
        model=model or "", priority=_choice(PRIORITIES, priority, "priority"))


def ranked_of(response: pb.RerankResponse, with_documents: bool) -> list[dict]:
    """Rerank's results, best first: index, score (and document)."""
    return [{"index": r.index, "score": r.score, **({"document": r.document}
                                                    if with_documents else {})}
            for r in response.results]


def classify_request(texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                     raw_scores: bool = False, truncate: bool = True, model: str | None = None,
                     priority: str | None = None) -> pb.ClassifyRequest:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return pb.ClassifyRequest(
        texts=list(texts), text_pairs=list(pairs or ()), raw_scores=raw_scores,
        truncate=truncate, model=model or "", priority=_choice(PRIORITIES, priority, "priority"))


class Classified(NamedTuple):
    labels: list[str]     # the model's labels, in order
    scores: np.ndarray    # float32 (texts, labels)


def classified_of(response: pb.ClassifyResponse) -> Classified:
    return Classified(list(response.labels), decode_tensor(response.scores))


class LocalTokenizer:
    """The server's own tokenizer (GetTokenizer), run here: requests then carry token ids, which
    the server checks instead of tokenizing. The tokenizing moves to the machine that reads the
    texts (a corpus job's, with cores to spare); the vectors stay the same."""

    def __init__(self, tokenizer: pb.TokenizerResponse, info: dict):
        import hashlib

        from tokenizers import Tokenizer

        if hashlib.sha256(tokenizer.tokenizer_json.encode()).hexdigest() != tokenizer.sha256:
            raise ValueError("the server's tokenizer does not match its own hash")
        if info.get("tokenizer_sha256") not in (None, tokenizer.sha256):
            raise ValueError("the server's tokenizer is not the one its Info names (replicas "
                             "with different models?)")
        # Untruncated here: the server cuts an over-long text as its tokenizer would and counts it
        # in usage, or refuses it with truncate=False (naming its real length). With truncation
        # on, what goes out is cut to one id over the max (the end's special tokens kept), so a
        # 100,000-character text costs a kilobyte on the wire, not a hundred.
        self._tokenizer = Tokenizer.from_str(tokenizer.tokenizer_json)
        self._tokenizer.no_truncation()
        # sent with the ids: a server whose tokenizer, prompts or max length are not these
        # refuses them
        self.sha256 = info.get("tokenizing_sha256", "")
        self._max = info["max_input_tokens"]
        encoding = self._tokenizer.encode("a")
        after = next((i for i, special in enumerate(reversed(encoding.special_tokens_mask))
                      if not special), 0)
        self._suffix = encoding.ids[len(encoding.ids) - after:]
        pipeline = info["pipeline"]
        self._prompts, self._default_prompt = pipeline["prompts"], pipeline["default_prompt_name"]
        self._max_chars = info.get("limits", {}).get("max_chars_per_text")

    def refused_by_the_server(self, request: pb.EmbedRequest) -> bool:
        """A request the server would refuse as texts (a prompt name it does not have, a text
        over its max_chars_per_text): sent as texts, it is refused by the server's own
        check and words, as the server-tokenized request is, not tokenized here."""
        return bool(request.prompt_name and request.prompt_name not in self._prompts) or \
            (self._max_chars is not None and any(len(text) > self._max_chars
                                                 for text in request.texts))

    def _prompt(self, request: pb.EmbedRequest) -> str:
        """The text the server would put before each text of this request."""
        if request.prompt_name:
            return self._prompts[request.prompt_name]
        if request.HasField("prompt"):
            return request.prompt
        if request.pooling == pb.POOLING_UNSPECIFIED and self._default_prompt:
            return self._prompts[self._default_prompt]
        return ""

    def convert(self, request: pb.EmbedRequest) -> pb.EmbedRequest:
        """The request with its texts replaced by their token ids (prompt included); as it is,
        if the server would refuse it as texts."""
        if self.refused_by_the_server(request):
            return request
        prompt = self._prompt(request)
        encodings = self._tokenizer.encode_batch_fast([prompt + text for text in request.texts])
        rows = [encoding.ids for encoding in encodings]
        if request.truncate:
            keep = self._max + 1 - len(self._suffix)
            rows = [row[:keep] + self._suffix if len(row) > self._max + 1 else row
                    for row in rows]
        lengths = [len(row) for row in rows]
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype="<i4", count=sum(lengths))
        del request.texts[:]
        request.token_ids, request.token_lengths[:] = ids.tobytes(), lengths
        request.tokenizing_sha256 = self.sha256
        return request


def made_for_another(error: grpc.RpcError | EmbedStreamError) -> bool:
    """Whether the server refused token ids made for what it no longer serves (its tokenizer,
    prompts or max length: EmbedRequest.tokenizing_sha256)."""
    code, message = (error.code, error.message) if isinstance(error, EmbedStreamError) else \
        (error.code(), error.details() or "")
    return code == grpc.StatusCode.FAILED_PRECONDITION and \
        message.startswith("token_ids were made for tokenizing")


def stale_tokenizer(error: grpc.RpcError, request: pb.EmbedRequest, texts: list[str] | None,
                    tokenizers: dict) -> bool:
    """Whether the server refused token ids made for what it no longer serves (made_for_another).
    If so, the request is its texts again (`texts`: what it held before it was converted) and
    that tokenizer is forgotten, to be fetched again."""
    if texts is None or not made_for_another(error):
        return False
    tokenizers.pop(request.model, None)
    request.texts[:], request.token_ids, request.tokenizing_sha256 = texts, b"", ""
    del request.token_lengths[:]
    return True


def batches(texts, batch_size: int):
    """Lists of batch_size texts from any iterable, lazily."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------- channels

def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC target string. Several "host:port" targets become one static address list
    ("ipv4:a:p,b:q"), which the round_robin policy spreads calls over."""
    if isinstance(target, str):
        return target
    targets = list(target)
    if len(targets) == 1:
        return targets[0]
    addresses, families = [], set()
    for item in targets:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"target {item!r}: expected host:port")
        for family, _, _, _, sockaddr in socket.getaddrinfo(host.strip("[]"), int(port),
                                                            type=socket.SOCK_STREAM):
            families.add(family)
            ip = sockaddr[0]
            addresses.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
            break
    if len(families) > 1:
        raise ValueError("targets mix IPv4 and IPv6 addresses; use one family")
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


def _read(value):
    """PEM material given as bytes, or as the path of a file holding it."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as file:
        return file.read()


def channel_credentials(tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None):
    """None for plaintext, else TLS credentials. tls_ca: the CA to trust (default: the system's);
    tls_cert + tls_key: this client's certificate, for mutual TLS."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                        private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


def channel_options(tls_server_name: str | None = None) -> list:
    options = list(CHANNEL_OPTIONS)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


def make_channel(target, *, tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 tls_server_name: str | None = None, aio: bool = False):
    """A blocking (or, aio=True, asyncio) channel to one target or several replicas."""
    module = grpc.aio if aio else grpc
    credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
    options = channel_options(tls_server_name)
    if credentials is None:
        return module.insecure_channel(channel_target(target), options=options)
    return module.secure_channel(channel_target(target), credentials, options=options)


# ---------------------------------------------------------------------- simpletransformers shapes

def check_combine_strategy(strategy) -> None:
    if strategy is None or strategy in ("mean", "max", "concat") or (
            isinstance(strategy, int) and not isinstance(strategy, bool)):
        return
    raise ValueError("combine_strategy must be None, 'mean', 'max', 'concat' or an int, "
                     f"got {strategy!r}")


def combine_tokens(tokens: list[np.ndarray], strategy):
    """Token-level results -> encode_sentences' shape for "concat" or an int token index."""
    if strategy == "concat":
        longest = max((len(t) for t in tokens), default=0)
        hidden = tokens[0].shape[1] if tokens else 0
        out = np.zeros((len(tokens), longest, hidden), dtype=np.float32)
        for row, t in zip(out, tokens):
            row[:len(t)] = t
        return out.reshape(len(tokens), longest * hidden)
    for i, t in enumerate(tokens):
        if not -len(t) <= strategy < len(t):
            raise IndexError(f"token index {strategy} is out of range for text {i} "
                             f"({len(t)} tokens)")
    return np.stack([t[strategy] for t in tokens]) if tokens else np.zeros((0, 0), np.float32)


def pad_tokens(tokens: list[np.ndarray]) -> np.ndarray:
    """(n, longest, hidden), zeros after each text's tokens."""
    if not tokens:
        return np.zeros((0, 0, 0), dtype=np.float32)
    longest = max(len(t) for t in tokens)
    return combine_tokens(tokens, "concat").reshape(len(tokens), longest, -1)
