"""The HTTP front-end, with the clients people already use (the real `openai` package and
LangChain's OpenAIEmbeddings), against the gRPC front-end of the same server: one core, the same
vectors, the same limits, auth and statuses. The server's model is conftest's fleet_model
(all-MiniLM-L6-v2 cut to one layer): what is compared is the two front-ends' answers."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bertstream.client import Client
from bertstream.server.limits import Limits
from bertstream.server.security import Security
from tests.conftest import TEST_LIMITS, ServerThread

TOKEN = "http-test-token"
ATOL = 1e-5
MODEL = "one-layer"  # the name conftest's fleet_engine is served as


@pytest.fixture(scope="module")
def served(fleet_engine):
    server = ServerThread(fleet_engine, Limits(**TEST_LIMITS), http_port=0,
                          security=Security(auth_tokens=(TOKEN.encode(),)), http_metrics=True)
    server.base = f"http://127.0.0.1:{server.running.http_port}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def grpc_client(served):
    with Client(served.target, timeout=120, token=TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def texts(corpus):
    return list(corpus[:30]) + ["a", max(corpus, key=len), "日本語の文章。"]


def post(served, path, body, token=TOKEN, raw: bytes | None = None):
    """(status, parsed JSON) of a POST; errors included."""
    request = urllib.request.Request(
        served.base + path, data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(served, path, token=TOKEN):
    request = urllib.request.Request(served.base + path, headers={
        **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize("dimensions", [None, 128])
def test_openai_sdk_gets_the_grpc_vectors(served, grpc_client, texts, encoding_format,
                                          dimensions):
    from openai import OpenAI

    openai = OpenAI(base_url=served.base + "/v1", api_key=TOKEN, max_retries=0)
    options = {"dimensions": dimensions} if dimensions else {}
    response = openai.embeddings.create(model=MODEL, input=texts,
                                        encoding_format=encoding_format, **options)
    got = np.array([item.embedding for item in response.data], dtype=np.float32) \
        if encoding_format == "float" else \
        np.stack([np.frombuffer(base64.b64decode(item.embedding), "<f4")
                  for item in response.data])
    expected = grpc_client.embed(texts, dimensions=dimensions)
    assert got.shape == expected.shape == (len(texts), dimensions or 384)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert [item.index for item in response.data] == list(range(len(texts)))
    assert response.model == MODEL
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(texts)


def test_openai_sdk_one_string_and_its_default_encoding(served, grpc_client):
    from openai import OpenAI

    openai = OpenAI(base_url=served.base + "/v1", api_key=TOKEN, max_retries=0)
    response = openai.embeddings.create(model=MODEL, input="one text")  # SDK default: base64
    np.testing.assert_allclose(np.array(response.data[0].embedding, dtype=np.float32),
                               grpc_client.embed(["one text"])[0], rtol=0, atol=ATOL)


def test_openai_sdk_without_a_valid_token_gets_401(served):
    from openai import AuthenticationError, OpenAI

    for key in ("wrong-token", TOKEN + "x"):
        with pytest.raises(AuthenticationError) as info:
            OpenAI(base_url=served.base + "/v1", api_key=key, max_retries=0).embeddings.create(
                model=MODEL, input=["x"])
        assert info.value.status_code == 401


def test_langchain_openai_embeddings(served, grpc_client, texts):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=MODEL, base_url=served.base + "/v1",
                                  api_key=TOKEN, check_embedding_ctx_length=False,
                                  max_retries=0)
    np.testing.assert_allclose(np.array(embeddings.embed_documents(texts), dtype=np.float32),
                               grpc_client.embed(texts), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.array(embeddings.embed_query(texts[0]), dtype=np.float32),
                               grpc_client.embed(texts[:1])[0], rtol=0, atol=ATOL)
    short = OpenAIEmbeddings(model=MODEL, base_url=served.base + "/v1", api_key=TOKEN,
                             check_embedding_ctx_length=False, dimensions=64, max_retries=0)
    np.testing.assert_allclose(np.array(short.embed_documents(texts[:5]), dtype=np.float32),
                               grpc_client.embed(texts[:5], dimensions=64), rtol=0, atol=ATOL)


def test_tei_embed_and_tokenize(served, grpc_client, texts):
    status, vectors = post(served, "/embed", {"inputs": texts[:5], "truncate": True})
    assert status == 200
    np.testing.assert_allclose(np.array(vectors, dtype=np.float32), grpc_client.embed(texts[:5]),
                               rtol=0, atol=ATOL)
    status, raw = post(served, "/embed", {"inputs": "plain", "normalize": False})
    assert status == 200
    np.testing.assert_allclose(np.array(raw, dtype=np.float32),
                               grpc_client.embed(["plain"], normalize=False), rtol=0, atol=ATOL)
    status, error = post(served, "/embed", {"inputs": [max(texts, key=len)]})  # TEI: no truncation
    assert status == 400 and "truncate is false" in error["error"]["message"]
    status, tokens = post(served, "/tokenize", {"inputs": ["Hello world"]})
    assert status == 200
    assert [t["text"] for t in tokens[0]] == [t["text"] for t in
                                              grpc_client.tokenize(["Hello world"])[0]]


def test_json_answers_sent_in_pieces_are_whole(served, grpc_client, texts, monkeypatch):
    """JSON answers are encoded and sent a few rows at a time (and Tokenize's a few texts at a
    time): with two rows a piece, every answer still parses to the gRPC front-end's values."""
    from bertstream.server import core, http

    monkeypatch.setattr(http, "JSON_PIECE_VALUES", 2 * 384 + 1)
    monkeypatch.setattr(core, "TOKENIZE_CHUNK_TEXTS", 4)
    expected = grpc_client.embed(texts)
    tokens_used = grpc_client.last_usage.tokens
    status, body = post(served, "/v1/embeddings", {"input": texts, "model": MODEL})
    assert status == 200 and body["object"] == "list" and body["model"] == MODEL
    assert body["usage"] == {"prompt_tokens": tokens_used, "total_tokens": tokens_used}
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([item["embedding"] for item in body["data"]],
                                        dtype=np.float32), expected, rtol=0, atol=ATOL)
    status, body = post(served, "/v1/embeddings", {"input": texts, "encoding_format": "base64"})
    assert status == 200
    np.testing.assert_allclose(np.stack([np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
                                         for item in body["data"]]), expected, rtol=0, atol=ATOL)
    status, vectors = post(served, "/embed", {"inputs": texts, "truncate": True})
    assert status == 200
    np.testing.assert_allclose(np.array(vectors, dtype=np.float32), expected, rtol=0, atol=ATOL)
    status, tokens = post(served, "/tokenize", {"inputs": texts})
    assert status == 200
    assert [[(t["id"], t["text"], t["start"], t["stop"]) for t in text] for text in tokens] == [
        [(t["id"], t["text"], t["start"], t["end"]) for t in text]
        for text in grpc_client.tokenize(texts)]


def test_a_body_of_more_strings_than_texts_is_refused_before_it_is_parsed(served):
    """Strings are counted in the raw body (a parse of millions of tiny ones costs a GB); quotes
    escaped inside a text do not count against it."""
    limit = TEST_LIMITS["max_texts_per_request"]
    status, error = post(served, "/v1/embeddings", {"input": ["ab"] * (limit + 100)})
    assert status == 413 and "JSON strings" in error["error"]["message"], error
    quoted = [f'{i} said "hi", then "bye" \\"' for i in range(limit)]  # 5 quotes each, escaped
    status, body = post(served, "/v1/embeddings", {"input": quoted, "model": MODEL})
    assert status == 200 and len(body["data"]) == limit
    # The same body in UTF-16 (which a JSON parser reads): refused, not parsed uncounted (40 MB
    # of them took 1 GB and held the event loop 5 s); values before a broken string count.
    many = json.dumps({"input": ["ab"] * (limit + 100)})
    status, error = post(served, "/v1/embeddings", None, raw=many.encode("utf-16"))
    assert status == 400 and "not UTF-8" in error["error"]["message"], error
    broken = '{"input": [' + "[]," * (limit + 100) + '"a\\x"]}'  # an escape no JSON has
    status, error = post(served, "/v1/embeddings", None, raw=broken.encode())
    assert status == 413 and "other JSON values" in error["error"]["message"], error


def test_info_health_metrics_and_docs(served, grpc_client):
    status, body = get(served, "/info")
    assert status == 200 and json.loads(body) == grpc_client.info()
    assert get(served, "/health", token=None) == (200, b'{"status":"SERVING"}')
    served.running.stopping = True  # as from SIGTERM on, while calls in flight finish
    try:
        assert get(served, "/health", token=None) == (503, b'{"status":"NOT_SERVING"}')
    finally:
        served.running.stopping = False
    status, body = get(served, "/metrics")
    assert status == 200
    assert f'bertstream_requests_total{{code="OK",model="{MODEL}",rpc="http"}}'.encode() in body
    assert get(served, "/docs", token=None)[0] == 200
    assert get(served, "/info", token=None)[0] == 401
    assert get(served, "/metrics", token=None)[0] == 401


@pytest.mark.parametrize("body, raw, status, message", [
    (None, b"{not json", 400, "invalid request"),
    ({"input": 42}, None, 400, "input"),
    ({"input": [1, 2, 3]}, None, 400, "token-id arrays"),
    ({"input": [[1, 2], [3]]}, None, 400, "token-id arrays"),
    ({"input": []}, None, 400, "texts: empty"),
    ({"input": ["x"], "encoding_format": "hex"}, None, 400, "encoding_format"),
    ({"input": ["x"], "dimensions": 999}, None, 400, "dimensions = 999"),
    ({"input": ["x"] * 501}, None, 413, "max_texts_per_request"),
    ({"input": ["x" * 20_001]}, None, 413, "max_chars_per_text"),
])
def test_bad_requests_get_the_documented_status(served, body, raw, status, message):
    got, error = post(served, "/v1/embeddings", body, raw=raw)
    assert got == status, error
    assert message in error["error"]["message"]
    assert error["error"]["type"]


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", b'{"input": "abc\\ud800def"}'),
    ("/v1/embeddings", b'{"input": ["fine", "abc\\udfffdef"]}'),
    ("/v1/embeddings", b'{"input": "fine", "model": "\\ud800"}'),
    ("/v1/embeddings", b'{"input": "fine", "user": "\\ud800"}'),
    ("/embed", b'{"inputs": ["abc\\ud800"]}'),
    ("/embed", b'{"inputs": "fine", "prompt_name": "\\ud800"}'),
    ("/tokenize", b'{"inputs": "abc\\ud800def"}'),
])
def test_a_lone_surrogate_gets_400_naming_it(served, path, body):
    """JSON can spell a lone surrogate; it is no text: 400, never a 500 (it got a plain-text
    500 from the tokenizer, or from the JSON encoder after the embedding was computed)."""
    got, error = post(served, path, None, raw=body)
    assert got == 400, error
    assert "lone surrogate" in error["error"]["message"], error
    assert post(served, "/v1/embeddings", None, raw=b'{"input": "a pair \\ud83d\\ude00 is fine"}')[0] == 200


def test_missing_token(served):
    status, error = post(served, "/v1/embeddings", {"input": ["x"]}, token=None)
    assert status == 401 and error["error"]["type"] == "authentication_error"


def raw_http(port: int, head: str, body_parts) -> bytes:
    """Send a request by hand (a declared size it never sends in full, or chunks) and read the
    status line; the server may answer before the body is all there."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode())
        try:
            for part in body_parts:
                connection.sendall(part)
        except OSError:  # the server answered and closed early: read what it said
            pass
        reply = b""
        while not reply.endswith(b"}}") and (part := connection.recv(4096)):
            reply += part
        return reply


def test_a_full_queue_gets_429_and_bodies_over_the_message_limit_413(engine):
    from concurrent.futures import ThreadPoolExecutor

    server = ServerThread(engine, Limits(**{**TEST_LIMITS, "max_queue_texts": 4,
                                            "max_message_bytes": 10_000}), http_port=0)
    port = server.running.http_port
    server.base = f"http://127.0.0.1:{port}"
    try:
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(
                lambda i: post(server, "/v1/embeddings", {"input": [f"text {i} {j}"
                                                                    for j in range(4)]},
                               token=None)[0], range(32)))
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        declared = raw_http(port, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                  "Content-Type: application/json\r\nContent-Length: 50000\r\n"
                                  "\r\n", [b"{" * 1000])
        assert declared.startswith(b"HTTP/1.1 413") and b"max_message_bytes" in declared
        chunk = b"x" * 4000
        chunked = raw_http(port, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                 "Content-Type: application/json\r\n"
                                 "Transfer-Encoding: chunked\r\n\r\n",
                           [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 4 + [b"0\r\n\r\n"])
        assert chunked.startswith(b"HTTP/1.1 413") and b"max_message_bytes" in chunked
    finally:
        server.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=12)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"input": json_values}, optional={
        "encoding_format": json_values, "dimensions": json_values, "model": json_values,
        "user": json_values}).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, path=st.sampled_from(["/v1/embeddings", "/embed", "/tokenize"]))
def test_fuzzed_bodies_never_get_a_500(served, body, path):
    status, reply = post(served, path, None, raw=body)
    assert status in (200, 400, 404, 413), (status, reply)
    if status == 404:  # a model name that is not served, and only that
        assert reply["error"]["code"] == "model_not_found", reply
    if status != 200:
        assert reply["error"]["message"]


def test_a_request_cut_by_shutdown_gets_503_in_openai_shape(engine, corpus):
    """A request still computing when shutdown's grace runs out: 503 with OpenAI's error body
    (uvicorn alone answered a plain-text 500)."""
    from concurrent.futures import ThreadPoolExecutor

    server = ServerThread(engine, Limits(**TEST_LIMITS), http_port=0)
    server.base = f"http://127.0.0.1:{server.running.http_port}"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/v1/embeddings",
                              {"input": [max(corpus, key=len)] * 500}, None)
        time.sleep(1.0)  # admitted and computing (500 texts of 256 tokens: seconds)
        server.stop(grace=0.1)
        status, error = pending.result(timeout=60)
    assert status == 503, error
    assert error["error"]["type"] == "server_error" and "shutting down" in error["error"]["message"]


def test_a_text_that_spells_a_special_token_is_reported_as_embedded(served, grpc_client):
    """"[SEP]" inside a text gets the real [SEP] id (as Hugging Face tokenizers and
    sentence-transformers give it), and /tokenize says so: it reported it "special": false."""
    status, body = post(served, "/tokenize", {"inputs": "before [SEP] after"})
    assert status == 200
    tokens = body[0]
    inner = [t for t in tokens if t["text"] == "[SEP]" and t["stop"] > 0]
    assert len(inner) == 1 and inner[0]["special"], tokens
    assert tokens[-1]["text"] == "[SEP]" and tokens[-1]["special"]  # the one the tokenizer adds
    assert [t["id"] for t in tokens] == [t["id"] for t in grpc_client.tokenize(
        ["before [SEP] after"])[0]]
    assert not any(t["special"] for t in tokens[1:-1] if t["text"] != "[SEP]")


def test_the_servers_tokenizer_is_handed_out(served, grpc_client, engine):
    """GET /tokenizer.json: the tokenizer that gRPC's GetTokenizer gives, under the hash Info
    names; it tokenizes as the server does."""
    from tokenizers import Tokenizer

    status, body = get(served, "/tokenizer.json")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == grpc_client.info()["tokenizer_sha256"]
    text = "Hello, WORLD: the tokenizer here is the server's"
    assert Tokenizer.from_str(body.decode()).encode(text).ids == \
        engine.tokenize([text]).ids[0].tolist()
    assert get(served, "/tokenizer.json", token=None)[0] == 401


def test_this_models_token_ids_over_http_when_the_request_says_so(served, grpc_client, texts):
    """OpenAI's token arrays are tiktoken's, so /v1/embeddings refuses them; with bertstream's
    own `bertstream_token_ids`, they are this model's ids (its /tokenizer.json), checked as
    gRPC's token_ids, and embed as their texts; with a tokenizer hash not the model's, 409."""
    from tokenizers import Tokenizer

    status, body = get(served, "/tokenizer.json")
    tokenizer, sha = Tokenizer.from_str(body.decode()), grpc_client.info()["tokenizing_sha256"]
    ids = [encoding.ids for encoding in tokenizer.encode_batch(texts[:5])]
    refused = post(served, "/v1/embeddings", {"input": ids})
    assert refused[0] == 400 and "another tokenizer's ids" in refused[1]["error"]["message"]
    for request in ({"input": ids, "bertstream_token_ids": True},
                    {"input": ids, "bertstream_token_ids": True,
                     "bertstream_tokenizing_sha256": sha}):
        status, answer = post(served, "/v1/embeddings", request)
        assert status == 200, answer
        got = np.array([item["embedding"] for item in answer["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, grpc_client.embed(texts[:5]), rtol=0, atol=1e-6)
    status, answer = post(served, "/v1/embeddings", {"input": ids[0], "bertstream_token_ids": True})
    assert status == 200 and len(answer["data"]) == 1  # one array: one text
    # The OpenAI SDK sends token arrays as they are; the flag goes in its extra_body.
    from openai import OpenAI

    openai = OpenAI(base_url=served.base + "/v1", api_key=TOKEN, max_retries=0)
    response = openai.embeddings.create(model=MODEL, input=ids, encoding_format="float",
                                        extra_body={"bertstream_token_ids": True,
                                                    "bertstream_tokenizing_sha256": sha})
    np.testing.assert_allclose(np.array([item.embedding for item in response.data],
                                        dtype=np.float32),
                               grpc_client.embed(texts[:5]), rtol=0, atol=1e-6)
    for body, code, message in [
            ({"bertstream_tokenizing_sha256": "0" * 64}, 409, "fetch GetTokenizer and Info"),
            ({"input": [ids[0], [101, 2**40, 102]]}, 400, "input[1]: a token id outside"),
            ({"input": [ids[0], [101, 10**30, 102]]}, 400, "input[1]: a token id outside"),
            ({"input": [ids[0], [101, 10**6, 102]]}, 400, "[1]: id 1000000 is outside"),
            ({"input": [ids[0], [7592, 102]]}, 400, "[1] does not start with"),
            ({"input": "a text"}, 400, "input holds text")]:
        status, answer = post(served, "/v1/embeddings",
                              {"input": ids, "bertstream_token_ids": True, **body})
        assert status == code and message in answer["error"]["message"], (body, answer)
    # Counted before parsing, as every body's values are: each id is one (a Python int parsed)
    many = [[101] + [2000] * 100 + [102]] * (TEST_LIMITS["max_texts_per_request"] // 100 + 1)
    status, answer = post(served, "/v1/embeddings", {"input": many, "bertstream_token_ids": True})
    assert status == 413 and "send more over gRPC" in answer["error"]["message"], answer
