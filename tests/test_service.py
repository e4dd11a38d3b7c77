"""The service end to end over real gRPC on localhost, against references computed directly."""

from __future__ import annotations

import threading
import time
import unicodedata

import grpc
import numpy as np
import pytest

from bertstream.client import Client, EmbedStreamError, Int8Embeddings, decode_tensor
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from tests.conftest import TEST_DEVICE

SHORT = ["This is a sample sentence.", "Another sentence for embedding.",
         "The quick brown fox jumps over the lazy dog.", "Hi"]


@pytest.fixture(scope="module")
def texts(corpus):
    # Mixed lengths, including some over the 256-token limit (truncated).
    picked = list(corpus[:16]) + sorted(corpus, key=len)[-3:] + SHORT
    return picked


def pool_tokens(tokens, pooling):
    return {"mean": lambda: tokens.mean(0), "max": lambda: tokens.max(0), "cls": lambda: tokens[0],
            "mean_max": lambda: np.concatenate([tokens.mean(0), tokens.max(0)])}[pooling]()


def reference_pool(hidden_layers, pooling, layers=(-1,), combine="concat", normalize=False):
    """Layers combined per token (concat: side by side; mean: element-wise), then pooled."""
    chosen = [hidden_layers[layer].astype(np.float64) for layer in layers]
    if combine == "mean":
        vec = pool_tokens(np.mean(chosen, axis=0), pooling)
    else:  # pooling commutes with per-token concatenation; mean_max is [mean|max] per layer
        vec = np.concatenate([pool_tokens(tokens, pooling) for tokens in chosen])
    return vec / np.linalg.norm(vec) if normalize else vec


# ---------------------------------------------------------------- semantics

def test_mean_matches_sentence_transformers(client, corpus):
    from sentence_transformers import SentenceTransformer

    from bertstream.server.engine import default_model_path

    # Of every length, several batches' worth; the longest are truncated. (test_models.py holds
    # the model's other options against sentence-transformers.)
    texts = sorted(corpus[:600], key=len)[::20] + sorted(corpus, key=len)[-5:]
    model = SentenceTransformer(default_model_path(), device="cpu")
    expected = model.encode(texts, batch_size=32, convert_to_numpy=True)
    got = client.embed(texts)  # the model's pipeline: masked mean, then Normalize
    assert got.shape == expected.shape == (35, 384)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # An explicit mean is the raw building block: the same direction, not normalized.
    raw = client.embed(texts, pooling="mean")
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), expected,
                               rtol=0, atol=1e-5)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.1


@pytest.mark.parametrize("pooling, layers, combine, normalize", [
    ("mean", (-1,), "concat", False),
    ("max", (-1,), "concat", False),
    ("cls", (-1,), "concat", False),
    ("mean_max", (-1,), "concat", False),
    ("mean", (0,), "concat", False),
    ("max", (6,), "concat", False),
    ("mean", (2, -1), "concat", False),
    ("max", (2, -1), "mean", False),
    ("mean_max", (1, 3, 5), "mean", True),
    ("mean", (-1,), "concat", True),
])
def test_pooling_and_layers_match_direct_forward(client, reference, texts, pooling, layers,
                                                 combine, normalize):
    got = client.embed(texts, pooling=pooling, layers=layers, layer_combine=combine,
                       normalize=normalize)
    expected = np.stack([reference_pool(reference(t), pooling, layers, combine, normalize)
                         for t in texts])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)


def test_batch_invariance(engine, corpus):
    """A text's vector is the same alone as padded inside a batch of longer texts (the forward
    pass and pooling, as a forward worker runs them: the queue no longer pads a short text to
    long ones, so it is built here)."""
    options = engine.options()
    longer = list(engine.tokenize(sorted(corpus, key=len)[-8:]).ids)
    for text in SHORT:
        ids = list(engine.tokenize([text]).ids)
        alone = engine.pool(*engine.forward(ids), np.arange(1), options)[0]
        hidden, lengths = engine.forward(longer[:4] + ids + longer[4:])
        assert lengths[4] < lengths.max()  # padded
        inside = engine.pool(hidden, lengths, np.arange(len(lengths)), options)[4]
        assert np.abs(alone - inside).max() <= 1e-4


def test_token_level_matches_direct_forward(client, reference, texts):
    got = client.embed_tokens(texts, layers=(-1, 0))
    assert len(got) == len(texts)
    for text, tokens in zip(texts, got):
        layers = reference(text)
        expected = np.concatenate([layers[-1], layers[0]], axis=1)
        assert tokens.shape == expected.shape
        np.testing.assert_allclose(tokens, expected, atol=2e-4, rtol=1e-4)


def test_tokenize_aligns_with_text(client):
    text = "Naïve café, tokenization!"
    [tokens] = client.tokenize([text])
    assert tokens[0]["text"] == "[CLS]" and tokens[-1]["text"] == "[SEP]"
    assert tokens[0]["start"] == tokens[0]["end"] == 0
    for token in tokens[1:-1]:
        # The uncased tokenizer lower-cases and strips accents; offsets point into the raw text.
        piece = unicodedata.normalize("NFD", text[token["start"]:token["end"]].lower())
        piece = "".join(c for c in piece if not unicodedata.combining(c))
        assert token["text"].removeprefix("##") == piece
    assert len(tokens) == len(client.embed_tokens([text])[0])


def test_truncation_is_counted(client, corpus):
    longest = max(corpus, key=len)
    client.embed([longest, "short"])
    assert client.last_usage.truncated_items == 1
    assert client.last_usage.tokens == 256 + 3


def test_info(client):
    info = client.info()
    assert info["hidden_size"] == 384 and info["num_layers"] == 6
    assert info["max_input_tokens"] == 256 and info["device"] == TEST_DEVICE
    assert info["limits"] == {"max_texts_per_request": 500, "max_chars_per_text": 20_000,
                              "max_batch_tokens": 2048, "max_message_bytes": 64 * 2**20,
                              "stream_window": 64, "max_queue_texts": 100_000,
                              "max_response_bytes": 64 * 2**20, "max_held_bytes": 2**30,
                              "max_connection_held_bytes": 128 * 2**20, "stall_timeout_s": 30.0,
                              "max_concurrent_streams": 100, "http_read_timeout_s": 10.0,
                              "max_http_connections": 0, "bulk_share": 0.2}


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="bertstream.v1.Embedder"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "bertstream.v1.Embedder" in names and "grpc.health.v1.Health" in names


# ---------------------------------------------------------------- dtypes on the wire

def test_every_dtype_decodes(client, texts):
    exact = client.embed(texts, normalize=True)
    half = client.embed(texts, normalize=True, dtype="float16")
    np.testing.assert_allclose(half, exact, atol=1e-3)
    brain = client.embed(texts, normalize=True, dtype="bfloat16")
    np.testing.assert_allclose(brain, exact, atol=np.abs(exact).max() * 2**-8)
    assert not np.array_equal(brain, half)
    quantized = client.embed(texts, normalize=True, dtype="int8")
    assert isinstance(quantized, Int8Embeddings) and quantized.q.dtype == np.int8
    assert np.all(np.abs(quantized.dequantize() - exact) <= quantized.scales[:, None] * 0.5 + 1e-6)
    bits = client.embed(texts, normalize=True, dtype="binary")
    assert bits.shape == (len(texts), 384 // 8)
    np.testing.assert_array_equal(bits, np.packbits(exact > 0, axis=1))


# ---------------------------------------------------------------- streams

def test_stream_yields_in_input_order(client, corpus):
    texts = list(corpus[:150])
    parts = list(client.stream(iter(texts), batch_size=16, window=4))
    assert len(parts) == 10
    np.testing.assert_allclose(np.concatenate(parts), client.embed(texts), atol=1e-4)


def test_stream_token_level(client, texts):
    parts = list(client.stream(texts, batch_size=5, pooling="none"))
    flat = [t for part in parts for t in part]
    for got, expected in zip(flat, client.embed_tokens(texts)):
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_two_concurrent_streams_keep_order(server, corpus, client):
    """Two streams, 60 messages each, all sent before any response is read."""
    messages = 60
    expected = {text: vec for text, vec in zip(corpus[:2 * messages],
                                               client.embed(list(corpus[:2 * messages])))}
    results, errors = {}, []

    def run(stream_number):
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.EmbedderStub(channel)
                mine = corpus[stream_number * messages:(stream_number + 1) * messages]
                requests = [pb.EmbedRequest(request_id=f"{stream_number}-{i}", texts=[text])
                            for i, text in enumerate(mine)]
                responses = list(stub.EmbedStream(iter(requests), timeout=120))
                results[stream_number] = (mine, responses)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for number, (mine, responses) in results.items():
        assert [r.request_id for r in responses] == [f"{number}-{i}" for i in range(messages)]
        for text, response in zip(mine, responses):
            np.testing.assert_allclose(decode_tensor(response.embeddings)[0], expected[text],
                                       atol=1e-4)


def test_bad_message_in_stream_gets_error_and_stream_goes_on(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        requests = [pb.EmbedRequest(request_id="ok-1", texts=["fine"]),
                    pb.EmbedRequest(request_id="bad", texts=[]),
                    pb.EmbedRequest(request_id="bad-layer", texts=["x"], layers=[42],
                                    pooling=pb.POOLING_MEAN),
                    pb.EmbedRequest(request_id="ok-2", texts=["also fine", "two"])]
        responses = list(stub.EmbedStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == ["ok-1", "bad", "bad-layer", "ok-2"]
    assert not responses[0].HasField("error") and tuple(responses[0].embeddings.shape) == (1, 384)
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "texts: empty" in responses[1].error.message
    assert "layers[0] = 42" in responses[2].error.message
    assert tuple(responses[3].embeddings.shape) == (2, 384)


def test_client_stream_raises_on_error_response(client):
    with pytest.raises(EmbedStreamError, match="layers"):
        list(client.stream(["a", "b"], batch_size=1, layers=(99,)))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("request_fields, message", [
    (dict(texts=[]), "texts: empty"),
    (dict(texts=["ok", "x" * 20_001]), "texts[1]: 20001 characters, over the limit of 20000"),
    (dict(texts=["a"] * 501), "texts: 501 texts, over the limit of 500"),
    (dict(texts=["a"], layers=[7], pooling=pb.POOLING_MAX),
     "layers[0] = 7 is out of range; this model has layers -7..6"),
    (dict(texts=["a"], layers=[-1, -8], pooling=pb.POOLING_MAX), "layers[1] = -8 is out of range"),
    (dict(texts=["a"], pooling=99), "pooling: unknown enum value 99"),
    (dict(texts=["a"], layer_combine=7), "layer_combine: unknown enum value 7"),
    (dict(texts=["a"], dtype=42), "dtype: unknown enum value 42"),
    (dict(texts=["short", "word " * 400], truncate=False),
     "texts[1] has 402 tokens, over the model's maximum of 256 (truncate is false)"),
])
def test_bad_input_is_invalid_argument(server, client, request_fields, message):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(**request_fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert client.embed(["still serving"]).shape == (1, 384)


def test_tokenize_bad_input(client):
    with pytest.raises(grpc.RpcError) as info:
        client.tokenize([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tokenize_in_chunks_answers_as_whole(client, corpus, monkeypatch):
    """Tokenize answers are built a few texts at a time (Core.tokenize): chunk edges change
    nothing, and an error names the request's item, not the chunk's."""
    from bertstream.server import core

    texts = list(corpus[:60]) + ["Hello world"] * 3  # over the inline size: tokenizer threads
    assert sum(map(len, texts)) > core.INLINE_TOKENIZE_CHARS
    whole = client.tokenize(texts)
    assert [t[1]["text"] for t in whole[-3:]] == ["hello"] * 3
    monkeypatch.setattr(core, "TOKENIZE_CHUNK_TEXTS", 3)
    assert client.tokenize(texts) == whole
    with pytest.raises(grpc.RpcError) as info:
        client.tokenize(texts[:5] + [max(corpus, key=len)], truncate=False)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("texts[5] has ")


def test_a_tokenize_whose_caller_went_away_stops(client, engine, monkeypatch):
    """A Tokenize past its deadline stops at its next chunk instead of building the rest of an
    answer nobody reads."""
    from bertstream.server import core

    chunks, tokenize = [], engine.tokenize

    def slow(*args, **kwargs):
        chunks.append(1)
        time.sleep(0.05)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(core, "TOKENIZE_CHUNK_TEXTS", 10)
    monkeypatch.setattr(engine, "tokenize", slow)
    with pytest.raises(grpc.RpcError) as info:  # 50 chunks: 2.5 s of work
        pb_grpc.EmbedderStub(client._channel).Tokenize(
            pb.TokenizeRequest(texts=["word " * 300] * 500), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Still going, it would add a chunk every 0.05 s until all 50 are done: wait until no
    # chunk came for half a second (or the 2.5 s of work are long over).
    seen, deadline = -1, time.monotonic() + 4
    while len(chunks) != seen and time.monotonic() < deadline:
        seen = len(chunks)
        time.sleep(0.5)
    assert len(chunks) <= 15, len(chunks)


def test_tokenize_answer_is_bounded(engine, corpus):
    """A Tokenize answer past max_response_bytes is refused, naming the limit, and its room in
    the queue is given back; one under it is answered."""
    from bertstream.server.limits import Limits
    from tests.conftest import TEST_LIMITS, ServerThread

    server = ServerThread(engine, Limits(**{**TEST_LIMITS, "max_response_bytes": 20_000}))
    try:
        with Client(server.target, timeout=60) as small:
            assert len(small.tokenize(list(corpus[:10]))) == 10
            with pytest.raises(grpc.RpcError) as info:
                small.tokenize([max(corpus, key=len)] * 300)  # 300 x 256 tokens: ~1.3 MB
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_response_bytes" in info.value.details()
            assert server.admission.queued == 0
    finally:
        server.stop()


def test_client_validates_before_sending(client):
    with pytest.raises(ValueError, match="pooling must be one of"):
        client.embed(["a"], pooling="median")
    with pytest.raises(TypeError, match="not one string"):
        client.embed("a string, not a list")


# ---------------------------------------------------------------- encode_sentences

def test_encode_sentences_shapes_and_masked_semantics(client, reference):
    texts = SHORT
    mean = client.encode_sentences(texts, combine_strategy="mean", batch_size=2)
    np.testing.assert_allclose(mean, client.embed(texts, pooling="mean"), atol=1e-5)
    maxed = client.encode_sentences(texts, combine_strategy="max")
    assert maxed.shape == (4, 384)
    tokens = client.encode_sentences(texts)
    assert [t.shape[0] for t in tokens] == [len(reference(t)[-1]) for t in texts]
    first = client.encode_sentences(texts, combine_strategy=0)
    np.testing.assert_allclose(first, client.embed(texts, pooling="cls"), atol=1e-5)
    last = client.encode_sentences(texts, combine_strategy=-1, batch_size=3)
    np.testing.assert_allclose(last, np.stack([reference(t)[-1][-1] for t in texts]), atol=2e-4)
    concat = client.encode_sentences(texts, combine_strategy="concat", batch_size=2)
    longest = max(t.shape[0] for t in tokens)
    assert concat.shape == (4, longest * 384)
    rows = concat.reshape(4, longest, 384)
    short = texts.index("Hi")
    np.testing.assert_array_equal(rows[short, len(tokens[short]):], 0)
    with pytest.raises(ValueError, match="combine_strategy"):
        client.encode_sentences(texts, combine_strategy="sum")
    with pytest.raises(IndexError, match="out of range"):
        client.encode_sentences(texts, combine_strategy=5)
