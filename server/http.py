"""HTTP front-end over the same core as gRPC: OpenAI-compatible `POST /v1/embeddings` and
`GET /v1/models`, text-embeddings-inference-compatible `POST /embed` and `POST /tokenize`,
`GET /info`, `GET /health`, `GET /metrics`, OpenAPI docs at `/docs`. A request names its model
(OpenAI's `model`, a `model` field or query parameter elsewhere); none: the default.

JSON is converted here and nowhere else: limits, admission, tokenizing, metrics and semantics are
the core's (core.py), shared with gRPC. Bearer tokens are the same as gRPC's; errors use OpenAI's
shape ({"error": {"message", "type", "code"}}) with the matching status: 400 bad input, 401 no valid
token, 404 a model not served (code model_not_found), 413 over a size limit, 429 queue full,
500 a failure of the server's own. FastAPI on uvicorn,
on the gRPC server's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from json.decoder import scanstring
from typing import Annotated, Iterable, Literal, Union

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .budget import MemoryBudget
from .core import Core, EmbedCall, ScoreCall, SparseCall, ranking
from .errors import EmbedError, ErrorKind
from .security import bearer_allowed
from .token_rows import TokenRows

log = logging.getLogger("bertstream.http")

HTTP_STATUS = {ErrorKind.INVALID: 400, ErrorKind.TOO_LARGE: 413, ErrorKind.OVERLOADED: 429,
               ErrorKind.INTERNAL: 500, ErrorKind.NOT_FOUND: 404, ErrorKind.UNSUPPORTED: 400,
               ErrorKind.STALE: 409}
ERROR_CODES = {ErrorKind.NOT_FOUND: "model_not_found"}  # OpenAI's error codes
STATUS_LABELS = {kind: str(status) for kind, status in HTTP_STATUS.items()}  # metric labels
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
OPEN_PATHS = ("/docs", "/openapi.json")  # no data behind them
OTHER_STRINGS = 32  # a body's strings besides its texts: field names, model, prompt_name, ...
# JSON strings and other values a text may take, by route (BodyLimit): Cohere's documents may be
# {"text": ...} (two strings, one more value), a /predict pair is ["a", "b"] (two strings, three
# values with its commas); elsewhere a text is one string and one comma.
PER_TEXT = {"/v1/rerank": (2, 2), "/v2/rerank": (2, 2), "/predict": (2, 3)}


def whole_unicode(text: str) -> str:
    """JSON can spell a lone surrogate (\\ud800), which is no Unicode text: the tokenizer and the
    JSON encoder refuse it (it got 500), so the request gets 400 naming it."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as error:
            raise ValueError(f"a lone surrogate (U+{ord(text[error.start]):04X}) at character "
                             f"{error.start}; send whole Unicode characters") from None
    return text


Text = Annotated[StrictStr, AfterValidator(whole_unicode)]
# Lists fail at their first bad item: pydantic otherwise makes an error for every item, for each
# member of a union (30 million ints in a 60 MB body took 7 GB).
Texts = Annotated[list[Text], Field(fail_fast=True)]
TokenIds = Annotated[list[StrictInt], Field(fail_fast=True)]


class OpenAIEmbeddingRequest(BaseModel):
    input: Union[Text, Texts, TokenIds, Annotated[list[TokenIds], Field(fail_fast=True)]] = \
        Field(description="A text or a list of texts. Token-id arrays are refused (OpenAI's are "
                          "tiktoken's), unless bertstream_token_ids says they are this model's.")
    bertstream_token_ids: bool = Field(
        False, description="bertstream's own: `input` holds this model's token ids (one array, "
        "or one per text), made by its tokenizer (GET /tokenizer.json), special tokens "
        "included; checked as EmbedRequest.token_ids are.")
    bertstream_tokenizing_sha256: Text | None = Field(
        None, description="bertstream's own: the tokenizing_sha256 of GET /info the ids were "
        "made for (the model's tokenizer, prompts and max length); not the model's now: 409.")
    model: Text | None = Field(None, description="A served model's name (GET /v1/models); "
                                             "none: the default.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Keep the first N values (renormalized).")
    user: Text | None = None


class TEIEmbedRequest(BaseModel):
    inputs: Union[Text, Texts]
    normalize: bool = True
    truncate: bool = False
    prompt_name: Text | None = None
    dimensions: int | None = None
    model: Text | None = Field(None, description="A served model's name; none: the default.")


class TEISparseRequest(BaseModel):
    inputs: Union[Text, Texts]
    truncate: bool = False  # as TEI
    top_k: int | None = Field(None, description="Keep each vector's top_k largest values.")
    model: Text | None = Field(None, description="A served model's name; none: the default.")


class TEIRerankRequest(BaseModel):
    query: Text
    texts: Texts
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = False  # as TEI
    model: Text | None = Field(None, description="A served model's name; none: the default.")


class CohereDocument(BaseModel):
    text: Text


class CohereRerankRequest(BaseModel):
    """Cohere's and Jina's rerank body (what LangChain's and LlamaIndex's rerankers send)."""
    query: Text
    documents: list[Union[Text, CohereDocument]]
    top_n: int | None = None
    return_documents: bool = False
    model: Text | None = None


class TEIPredictRequest(BaseModel):
    """As text-embeddings-inference reads it: a text; two texts, one pair; or a list of texts
    ([text] as well) or of [text, text_pair] pairs."""
    inputs: Union[Text, list[Union[Text, Annotated[list[Text], Field(min_length=1,
                                                                        max_length=2)]]]]
    raw_scores: bool = False
    truncate: bool = False
    model: Text | None = Field(None, description="A served model's name; none: the default.")


class TEITokenizeRequest(BaseModel):
    inputs: Union[Text, Texts]
    model: Text | None = Field(None, description="A served model's name; none: the default.")


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"),
                      "param": None, "code": code}}


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status)


def embed_error_response(error: EmbedError) -> JSONResponse:
    return error_response(HTTP_STATUS[error.kind], error.message, ERROR_CODES.get(error.kind))


def model_entry(info: dict) -> dict:
    """A served model in OpenAI's shape (GET /v1/models)."""
    return {"id": info["name"], "object": "model", "created": 0, "owned_by": "bertstream"}


def token_ids_of(value) -> tuple[bytes, list[int]]:
    """OpenAI-shaped token-id input (one array of ints, or one per text) as EmbedRequest's
    token_ids bytes (little-endian int32) and token_lengths; EmbedError names a bad item (the
    core checks the ids against the vocabulary, as gRPC's)."""
    if isinstance(value, str) or (value and isinstance(value[0], str)):
        raise EmbedError.invalid("input: bertstream_token_ids is true, but input holds text; "
                                 "send token-id arrays, or leave bertstream_token_ids out")
    rows = [value] if value and isinstance(value[0], int) else value  # one array: one text
    try:
        tokens = TokenRows.of(rows)  # one C loop over the lists
    except (OverflowError, ValueError):
        first = next(i for i, row in enumerate(rows)
                     if not all(-2**31 <= id < 2**31 for id in row))
        raise EmbedError.invalid(f"input[{first}]: a token id outside int32 (this model's ids "
                                 f"are its vocabulary's)") from None
    return tokens.flat.astype("<i4", copy=False).tobytes(), tokens.lengths.tolist()


def texts_of(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value and not all(isinstance(item, str) for item in value):
        raise EmbedError.invalid("input: token-id arrays are another tokenizer's ids; send text "
                                 "(with LangChain's OpenAIEmbeddings: check_embedding_ctx_length"
                                 "=False)")
    return list(value)


# Values per piece of a JSON answer: ~3 ms of encoding each, between which the event loop serves
# everyone else (10,000 vectors at once held it 0.15 s with orjson, 3.3 s with json:
# benchmarks/probes/json_answer.py).
JSON_PIECE_VALUES = 1 << 16


def json_stream(head: bytes, pieces: Iterable[bytes], tail: bytes,
                sent=lambda: None) -> StreamingResponse:
    """head, then the pieces (each some items of one JSON array, encoded, no brackets) joined by
    commas, then tail. Sent as they are encoded, so the answer is never whole in memory twice,
    and a caller that does not read stops the encoding (the transport's flow control). sent():
    once the answer has gone, or the caller with it."""
    async def body():
        try:
            yield head
            for number, piece in enumerate(pieces):
                yield b"," + piece if number else piece
                await asyncio.sleep(0)  # let the loop serve others between pieces
            yield tail
        finally:
            sent()

    return StreamingResponse(body(), media_type="application/json")


def row_pieces(vectors: np.ndarray, encode) -> Iterable[bytes]:
    """encode(first, rows) of a few rows at a time: each returns those rows' items, encoded."""
    step = max(1, JSON_PIECE_VALUES // max(1, vectors.shape[1]))
    for first in range(0, len(vectors), step):
        yield orjson.dumps(encode(first, vectors[first:first + step]),
                           option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]


def connection_key(scope) -> str:
    """The connection a request came on: its account in the memory budget."""
    host, port = scope.get("client") or ("?", 0)
    return f"http:{host}:{port}"


def create_app(core: Core, serving, budget: MemoryBudget, tokens: list[bytes] = (),
               health_open: bool = True, metrics: bool = False) -> FastAPI:
    """serving(): whether to answer health with 200 (warmed up, healthy, not stopping). budget:
    what one connection may hold (budget.py), shared with gRPC."""
    app = FastAPI(title="bertstream", summary="Text embeddings over HTTP (OpenAI and "
                  "text-embeddings-inference compatible) beside gRPC", version="1")

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        path = request.url.path
        open_path = path in OPEN_PATHS or (health_open and path == "/health")
        if tokens and not open_path and not bearer_allowed(
                tokens, request.headers.get("authorization", "")):
            return error_response(401, "missing or invalid bearer token (Authorization: Bearer "
                                       "<token>)", "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in exc.errors()[:5])
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, a body not JSON
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(EmbedError)
    async def embed_error(request: Request, error: EmbedError):
        log.info("request failed", extra={"fields": {"kind": error.kind.value,
                                                     "error": error.message}})
        return embed_error_response(error)

    async def within_share(request: Request, cost: int, work):
        """await work() holding `cost` bytes against the request's connection (budget.py):
        its result, and sent() to call once the answer has gone. No room: EmbedError (429)."""
        task = asyncio.current_task()
        account = budget.open(connection_key(request.scope), task.cancel)
        hold, done = None, []

        def sent():
            if not done:
                done.append(True)
                if hold is not None:
                    hold.release()
                budget.close(account, task.cancel)

        try:
            hold = account.try_hold(cost)
            result = await work()
        except BaseException:
            sent()
            raise
        hold.ready()
        return result, sent

    async def embed(request: Request, call: EmbedCall):
        return await within_share(
            request, core.memory_cost(call, 0),  # the body: held by BodyLimit
            lambda: core.observed("http", call, codes=STATUS_LABELS))

    async def scored(request: Request, call: ScoreCall):
        return await within_share(
            request, core.score_cost(call, 0),
            lambda: core.observed("http", call, codes=STATUS_LABELS))

    @app.post("/embed_sparse", summary="text-embeddings-inference-compatible sparse embeddings")
    async def tei_embed_sparse(request: Request, body: TEISparseRequest):
        call = SparseCall(texts_of(body.inputs), top_k=body.top_k, truncate=body.truncate,
                          model=body.model or "")
        result, sent = await within_share(
            request, core.sparse_cost(call, 0),
            lambda: core.observed("http", call, codes=STATUS_LABELS))
        pieces = (orjson.dumps([{"index": int(i), "value": float(v)}
                                for i, v in zip(indices, values)])
                  for indices, values in result.sparse)
        return json_stream(b"[", pieces, b"]", sent)

    @app.post("/rerank", summary="text-embeddings-inference-compatible rerank")
    async def tei_rerank(request: Request, body: TEIRerankRequest):
        result, sent = await scored(request, ScoreCall.rerank(
            body.query, body.texts, "texts", raw_scores=body.raw_scores, truncate=body.truncate,
            model=body.model or ""))
        sent()
        return [{"index": i, "score": score, **({"text": body.texts[i]} if body.return_text
                                                else {})}
                for i, score in ranking(result.embeddings.as_float32()[:, 0])]

    @app.post("/v1/rerank", summary="Cohere- and Jina-style rerank")
    @app.post("/v2/rerank", summary="Cohere's v2 rerank (what its ClientV2 and LangChain's "
                                    "CohereRerank call)")
    async def cohere_rerank(request: Request, body: CohereRerankRequest):
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        result, sent = await scored(request, ScoreCall.rerank(body.query, documents,
                                                              model=body.model or ""))
        sent()
        ranked = ranking(result.embeddings.as_float32()[:, 0], body.top_n or 0)
        return {"model": core.engine_for(body.model).name,
                "results": [{"index": i, "relevance_score": score,
                             **({"document": {"text": documents[i]}} if body.return_documents
                                else {})} for i, score in ranked],
                "usage": {"total_tokens": result.usage.tokens}}

    @app.post("/predict", summary="text-embeddings-inference-compatible classification")
    async def tei_predict(request: Request, body: TEIPredictRequest):
        inputs = body.inputs
        single = isinstance(inputs, str) or (len(inputs) == 2 and all(
            isinstance(item, str) for item in inputs))  # TEI: two texts are one pair
        items = [inputs] if single else [item[0] if isinstance(item, list) and len(item) == 1
                                         else item for item in inputs]
        pairs = [not isinstance(item, str) for item in items]
        if any(pairs) and not all(pairs):
            raise EmbedError.invalid("inputs: texts and pairs mixed; send one or the other")
        pairs = bool(pairs) and pairs[0]
        if pairs:
            call = ScoreCall("classify", [a for a, _ in items], [b for _, b in items],
                             raw_scores=body.raw_scores, truncate=body.truncate,
                             model=body.model or "", first_field="inputs",
                             second_field="inputs")
        else:
            call = ScoreCall("classify", items, raw_scores=body.raw_scores,
                             truncate=body.truncate, model=body.model or "",
                             first_field="inputs")
        result, sent = await scored(request, call)
        sent()
        labels = core.engine_for(body.model).labels
        answers = [sorted(({"score": float(score), "label": label}
                           for label, score in zip(labels, row)),
                          key=lambda entry: -entry["score"])
                   for row in result.embeddings.as_float32()]
        return answers[0] if single else answers

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings")
    async def openai_embeddings(request: Request, body: OpenAIEmbeddingRequest):
        if body.bertstream_token_ids:  # this model's own ids: checked as gRPC's token_ids
            token_ids, lengths = token_ids_of(body.input)
            body.input = []  # the bytes are the one copy from here
            call = EmbedCall([], token_ids=token_ids, token_lengths=lengths,
                             tokenizing_sha256=body.bertstream_tokenizing_sha256 or "",
                             dimensions=body.dimensions or 0, model=body.model or "")
        else:
            call = EmbedCall(texts_of(body.input), dimensions=body.dimensions or 0,
                             model=body.model or "")
        result, sent = await embed(request, call)
        vectors = result.embeddings.as_float32()
        if body.encoding_format == "base64":
            def value(row):
                return base64.b64encode(row.tobytes()).decode()
        else:
            def value(row):
                return row  # orjson writes float32 arrays itself, each value's shortest form

        def items(first, rows):
            return [{"object": "embedding", "index": first + i, "embedding": value(row)}
                    for i, row in enumerate(rows)]

        tokens_used = result.usage.tokens
        tail = orjson.dumps({"model": core.engine_for(body.model).name,
                             "usage": {"prompt_tokens": tokens_used, "total_tokens": tokens_used}})
        return json_stream(b'{"object":"list","data":[', row_pieces(vectors, items),
                           b"]," + tail[1:], sent)

    @app.post("/embed", summary="text-embeddings-inference-compatible embeddings")
    async def tei_embed(request: Request, body: TEIEmbedRequest):
        result, sent = await embed(request, EmbedCall(
            texts_of(body.inputs), normalize=body.normalize, truncate=body.truncate,
            prompt_name=body.prompt_name, dimensions=body.dimensions or 0,
            model=body.model or ""))
        vectors = result.embeddings.as_float32()
        return json_stream(b"[", row_pieces(vectors, lambda first, rows: rows), b"]", sent)

    @app.post("/tokenize", summary="The model's tokens of each text, with character offsets")
    async def tokenize(request: Request, body: TEITokenizeRequest):
        pieces = []

        # by id: a text spelling "[SEP]" gets the real one
        special_ids = core.engine_for(body.model).special_ids

        def add(chunk) -> int:  # on a tokenizer thread
            pieces.append(orjson.dumps([
                [{"id": i, "text": t, "start": start, "stop": end, "special": i in special_ids}
                 for i, t, (start, end) in zip(ids.tolist(), strings, offsets)]
                for ids, strings, offsets in zip(chunk.ids, chunk.tokens, chunk.offsets)])[1:-1])
            return len(pieces[-1])

        _, sent = await within_share(request, core.tokenize_cost(
                                         int(request.headers.get("content-length") or 0)),
                                     lambda: core.tokenize(texts_of(body.inputs), True, add,
                                                           body.model))
        return json_stream(b"[", pieces, b"]", sent)

    @app.get("/info", summary="A model (default: the default one), its default pipeline and the "
                              "limits")
    async def info(model: str = ""):
        return core.info(model)

    @app.get("/v1/models", summary="The served models, OpenAI-style; the first is the default")
    async def models():
        return {"object": "list", "data": [model_entry(info) for info in core.models()]}

    @app.get("/v1/models/{model:path}", summary="One served model, OpenAI-style")
    async def one_model(model: str):
        return model_entry(core.info(model))

    @app.get("/tokenizer.json", summary="A model's tokenizer (Hugging Face tokenizers JSON), "
                                        "to tokenize as the server does")
    async def tokenizer(model: str = ""):
        engine = core.engine_for(model)
        return Response(engine.tokenizer_json, media_type="application/json",
                        headers={"X-Tokenizer-SHA256": engine.tokenizer_sha256})

    @app.get("/health", summary="200 when serving (every model, or the one named); 503 before "
                                "warm-up, when unhealthy or stopping")
    async def health(model: str = ""):
        if serving(core.engine_for(model) if model else None):
            return {"status": "SERVING"}
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    if metrics:
        @app.get("/metrics", summary="Prometheus metrics")
        async def prometheus():
            import prometheus_client as prom

            return Response(prom.generate_latest(core.metrics.registry),
                            media_type=prom.CONTENT_TYPE_LATEST)

    return app


def json_counts(data: bytes, most: int) -> tuple[int, int] | None:
    """The strings of a JSON body, and its values besides them (commas, '[' and '{' outside the
    strings), counted without parsing it; past `most` strings, it stops; at a broken string, too
    (the parser stops there, having built what came before: counted). None: not UTF-8, which
    BodyLimit refuses (the parser would read UTF-16 or UTF-32, uncounted: 40 MB of them took
    1 GB and held the event loop 5 s). Parsed, 60 MB of tiny values took 1-7 GB: Python
    objects, and pydantic's error for each."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    strings = others = position = 0
    while strings <= most:
        quote = text.find('"', position)
        end = len(text) if quote == -1 else quote
        others += sum(text.count(mark, position, end) for mark in ",[{")
        if quote == -1:
            break
        strings += 1
        try:
            position = scanstring(text, quote + 1)[1]  # past the closing quote; escapes in C
        except ValueError:
            break
    return strings, others


class BodyLimit:
    """ASGI: a request body over `limit` bytes (the gRPC message limit) gets 413, read no further
    than the limit; so does one holding more JSON strings, or more other values, than `strings`,
    counted before anything parses them (json_counts; 60 MB of two-character texts is 10 million
    strings: parsed, they took 1 GB and held the event loop 1.8 s before the text count refused
    them).
    Any other body is read whole, then handed to the app."""

    def __init__(self, app, limit: int, max_texts: int, budget: MemoryBudget):
        self.app, self.limit, self.max_texts, self.budget = app, limit, max_texts, budget

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        # The body is held against the connection's share as it arrives, until its answer has
        # gone (500 connections could each hold a 64 MiB body otherwise).
        account = self.budget.open(connection_key(scope))
        holds = []
        try:
            await self._read_held(scope, receive, send, account, holds)
        except EmbedError as error:  # no room for the body
            await embed_error_response(error)(scope, receive, send)
        finally:
            for hold in holds:
                hold.release()
            self.budget.close(account)

    async def _read_held(self, scope, receive, send, account, holds):
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body.append(message.get("body", b""))
            holds.append(account.try_hold(len(body[-1])))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.limit:
                return await self._too_large(scope, receive, send)
        data = b"".join(body)
        del body
        per_string, per_value = PER_TEXT.get(scope.get("path", ""), (1, 1))
        strings = self.max_texts * per_string + OTHER_STRINGS
        values = self.max_texts * per_value + OTHER_STRINGS
        counted = json_counts(data, max(strings, values))
        if counted is None and data:
            response = error_response(400, "request body is not UTF-8: JSON between systems is "
                                           "UTF-8 (RFC 8259)")
            return await response(scope, receive, send)
        if counted is not None and (counted[0] > strings or counted[1] > values):
            what = (f"more than {strings:,} JSON strings" if counted[0] > strings else
                    f"more than {values:,} other JSON values")
            ids = b'"bertstream_token_ids"' in data  # each id is a JSON value of its own
            response = error_response(413, f"request body holds {what}; a request takes at most "
                                           f"max_texts_per_request texts" + (
                                               ", and over HTTP at most that many token ids in "
                                               "all: send more over gRPC (EmbedRequest."
                                               "token_ids, raw bytes)" if ids else ""))
            return await response(scope, receive, send)
        whole = {"type": "http.request", "body": data, "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return whole

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body over the limit of {self.limit:,} bytes "
                                       f"(max_message_bytes)")
        await response(scope, receive, send)


class ShutdownAnswers:
    """ASGI: a request still computing when shutdown's grace runs out (uvicorn cancels it) gets
    503 in OpenAI's error shape, not uvicorn's plain-text 500; a request cancelled because its
    connection was cut (budget.py) just ends."""

    def __init__(self, app, stopping):
        self.app, self.stopping = app, stopping

    async def __call__(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.stopping():
                return  # cut: the connection is closed after this
            if not started:
                await error_response(503, "the server is shutting down; retry on another "
                                          "replica or later")(scope, receive, send)


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 with bounds for slow and idle clients: a request's headers must arrive
    within `read_timeout_s` of the connection's start or of its previous answer, and its body
    within as long again plus a second per MIN_BODY_RATE bytes it declares (else 408 and closed;
    uvicorn alone waits forever: 1,100 such connections filled the descriptor table and locked
    gRPC out); past `max_connections` open, a new connection gets 503 and is closed at once.
    start_http sets both on a subclass of its own. (With TLS, a connection counts from the end
    of its handshake, which asyncio bounds at 60 s.)"""

    read_timeout_s = 10.0
    max_connections = 1000
    _refused_logged = 0.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._read_deadline = None
        if len(self.connections) > self.max_connections:
            now = time.monotonic()
            if now - GuardedH11._refused_logged > LOG_EVERY_S:
                GuardedH11._refused_logged = now
                log.warning("HTTP connections at their cap: new ones get 503", extra={
                    "fields": {"max_connections": self.max_connections}})
            transport.write(raw_response(503, "too many open connections; retry later"))
            transport.close()
            return
        self._arm()

    def _arm(self, seconds: float | None = None):
        self._disarm()
        self._read_deadline = self.loop.call_later(seconds or self.read_timeout_s,
                                                   self._read_timed_out)

    def _disarm(self):
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _reading(self) -> bool:
        """A request has not arrived whole yet (none begun, or its body still coming)."""
        cycle = self.cycle
        return cycle is None or cycle.response_complete or cycle.more_body

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if not self._reading():
            self._disarm()
        elif self.cycle is not cycle:  # a new request's headers are in: time for its body
            declared = dict(self.headers or ()).get(b"content-length", b"0")
            body = int(declared) if declared.isdigit() else 0
            self._arm(self.read_timeout_s + body / MIN_BODY_RATE)

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _read_timed_out(self):
        self._read_deadline = None
        if self.transport.is_closing() or not self._reading():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(raw_response(408, "the request did not arrive in time "
                                                   f"(http_read_timeout_s {self.read_timeout_s:g}"
                                                   f", and 1 s per {MIN_BODY_RATE:,} body bytes)"))
        self.transport.close()


def raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape, written past h11 (no request read)."""
    body = orjson.dumps(error_body(status, message))
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


MIN_BODY_RATE = 1 << 20  # bytes/s a request body may arrive at, at the slowest
LOG_EVERY_S = 10.0  # one complaint (a full descriptor table, the connection cap) at most this often


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every failed accept() when the descriptor table is full;
    log one line per LOG_EVERY_S instead (and everything else as before)."""
    last = [0.0]
    default = loop.get_exception_handler()

    def handler(loop, context):
        if "accept" in str(context.get("message", "")):
            now = time.monotonic()
            if now - last[0] > LOG_EVERY_S:
                last[0] = now
                log.warning("accept failed: %s (logged once per %g s)",
                            context.get("exception"), LOG_EVERY_S)
            return
        if default is None:
            loop.default_exception_handler(context)
        else:
            default(loop, context)

    loop.set_exception_handler(handler)


def connection_cap(requested: int | None) -> int:
    """HTTP connections allowed open at once: the request, or half the descriptors free at start
    (the other half stays for gRPC, the model's files and the rest)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = soft - len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else soft
    return requested or max(16, free // 2)


class _Server(uvicorn.Server):
    """uvicorn on the gRPC server's loop: signals stay the CLI's (it stops both front-ends)."""

    def capture_signals(self):
        return contextlib.nullcontext()


async def start_http(app: FastAPI, host: str, port: int, body_limit: int, max_texts: int,
                     budget: MemoryBudget, stopping, tls_cert=None, tls_key=None,
                     tls_client_ca=None, read_timeout_s: float = 10.0,
                     max_connections: int | None = None) -> _Server:
    """Serve `app` on host:port (TLS with the gRPC flags' files; with a client CA, mutual TLS)
    on the running loop; returns once listening. server.should_exit = True stops it. Bodies:
    at most body_limit bytes, and room for max_texts texts' strings (and the other fields').
    stopping(): whether the server is shutting down (cut requests then get 503)."""
    import ssl

    options = {}
    if tls_cert:
        options = dict(ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        if tls_client_ca:
            options.update(ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    wrapped = ShutdownAnswers(BodyLimit(app, body_limit, max_texts, budget),
                              stopping)
    protocol = type("GuardedH11", (GuardedH11,), {
        "read_timeout_s": read_timeout_s, "max_connections": connection_cap(max_connections)})
    quiet_accept_errors(asyncio.get_running_loop())
    server = _Server(uvicorn.Config(wrapped, host=host, port=port, http=protocol,
                                    log_level="warning", lifespan="off", **options))
    server.task = asyncio.ensure_future(server.serve())
    while not server.started:
        if server.task.done():  # could not listen: raise its error
            server.task.result()
            raise OSError(f"HTTP server on {host}:{port} did not start")
        await asyncio.sleep(0.02)
    return server
