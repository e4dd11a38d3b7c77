"""EmbedRequest.token_ids: texts the client tokenized, checked by the server as its own
tokenizer would have made them; a bad item gets INVALID_ARGUMENT naming it."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest

from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from tests.conftest import TEST_LIMITS


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)


def ids_request(rows, **fields) -> pb.EmbedRequest:
    lengths = [len(row) for row in rows]
    flat = np.array([i for row in rows for i in row], dtype="<i4")
    return pb.EmbedRequest(token_ids=flat.tobytes(), token_lengths=lengths, **fields)


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    tensor = response.embeddings
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))


def test_ids_embed_as_their_texts(stub, engine, client):
    texts = ["the first text", "a second, longer text than the first one", "x", ""]
    ids = [row.tolist() for row in engine.tokenize(texts).ids]
    np.testing.assert_allclose(vectors(stub.Embed(ids_request(ids))), client.embed(texts),
                               rtol=0, atol=1e-6)


def test_an_over_long_text_is_cut_as_the_tokenizer_cuts_it(stub, engine, client):
    long_text = "word " * 400
    whole = engine._full.encode(long_text).ids
    assert len(whole) > engine.max_length
    response = stub.Embed(ids_request([whole]))
    assert response.usage.truncated_items == 1 and response.usage.tokens == engine.max_length
    np.testing.assert_allclose(vectors(response), client.embed([long_text]), rtol=0, atol=1e-6)
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(ids_request([[101, 2000, 102], whole], truncate=False))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"token_ids[1] has {len(whole)} tokens, over the model's maximum of " \
        f"{engine.max_length}" in info.value.details()


@pytest.mark.parametrize("rows, raw, message", [
    ([[101, 7592, 102], [101, 10**6, 102]], None, "token_ids[1]: id 1000000 is outside"),
    ([[101, 7592, 102], [101, -3, 102]], None, "token_ids[1]: id -3 is outside"),
    ([[101, 7592, 102], [7592, 2088, 102]], None, "token_ids[1] does not start with"),
    ([[101, 7592, 2088]], None, "token_ids[0] does not end with"),
    ([[101]], None, "token_ids[0]: 1 tokens; a text is at least 2"),
    ([[101, 7592, 102]], b"\x00" * 10, "token_ids: 10 bytes, but token_lengths add up to 3"),
    # the first bad item, whichever check finds it
    ([[101, 7592, 2088], [101, 10**6, 102]], None, "token_ids[0] does not end with"),
    ([[101, 7592, 102], [101], [10**6]], None, "token_ids[1]: 1 tokens"),
    ([[101, 7592, 102], [101, 7592, 2088, 102]], [-3, 10], "token_lengths[0] is -3: a text's"),
])
def test_bad_ids_are_refused_naming_the_item(stub, rows, raw, message):
    request = ids_request(rows)
    if isinstance(raw, list):  # lengths of its own
        del request.token_lengths[:]
        request.token_lengths.extend(raw)
    elif raw is not None:
        request.token_ids = raw
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details(), info.value.details()


def test_ids_without_lengths_are_refused(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(token_ids=b"\x65\x00\x00\x00"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_ids: 4 bytes but no token_lengths" in info.value.details()


def test_texts_and_ids_together_are_refused(stub):
    request = ids_request([[101, 7592, 102]])
    request.texts.append("hello")
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send one or the other" in info.value.details()


def test_too_many_id_texts_are_refused_before_any_work(stub):
    limit = TEST_LIMITS["max_texts_per_request"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(ids_request([[101, 7592, 102]] * (limit + 1)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_lengths" in info.value.details() and "max_texts_per_request" in \
        info.value.details()


def test_ids_made_for_another_tokenizing_are_refused_and_the_client_fetches_it_again(
        stub, engine, server, client):
    """Ids say what they were made for: the model's tokenizer, prompts and max length, hashed
    (Info.tokenizing_sha256). A client whose copy is not what is served now (the model or its
    prompts changed, or replicas differ) gets FAILED_PRECONDITION, not vectors of the wrong
    tokens; Client(tokenize_locally=True) then fetches the tokenizer again and sends once more."""
    from bertstream.client import Client

    sha = client.info()["tokenizing_sha256"]
    assert sha == engine.tokenizing_sha256 and sha != engine.tokenizer_sha256
    ids = [row.tolist() for row in engine.tokenize(["a text"]).ids]
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(ids_request(ids, tokenizing_sha256="0" * 64))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fetch GetTokenizer and Info again" in info.value.details()
    for sent in (sha, sha.upper()):
        assert vectors(stub.Embed(ids_request(ids, tokenizing_sha256=sent))).shape == (1, 384)
    texts = ["a text", "another text"]
    with Client(server.target, timeout=30, tokenize_locally=True) as local:
        np.testing.assert_allclose(local.embed(texts), client.embed(texts), rtol=0, atol=1e-6)
        local._local[""].sha256 = "0" * 64  # as if what the server serves had changed since
        np.testing.assert_allclose(local.embed(texts), client.embed(texts), rtol=0, atol=1e-6)
        assert local._local[""].sha256 == sha  # fetched again
        # A stream is not sent again (its rows may be half written): it fails, and the next
        # one fetches the tokenizer again.
        from bertstream.client import EmbedStreamError

        for spread in (False, True):
            local._local[""].sha256 = "0" * 64
            with pytest.raises((EmbedStreamError, grpc.RpcError)) as info:
                list(local.stream(texts, batch_size=1, spread=spread))
            assert "made for tokenizing" in str(info.value)
            np.testing.assert_allclose(np.concatenate(list(local.stream(texts, spread=spread))),
                                       client.embed(texts), rtol=0, atol=1e-6)

    async def the_async_client():
        from bertstream.client import AsyncClient

        async with AsyncClient(server.target, timeout=30, tokenize_locally=True) as local:
            await local.embed(["warm"])
            local._local[""].sha256 = "0" * 64
            return await local.embed(texts), local._local[""].sha256

    import asyncio

    vectors_now, now = asyncio.run(the_async_client())
    np.testing.assert_allclose(vectors_now, client.embed(texts), rtol=0, atol=1e-6)
    assert now == sha


def test_the_tokenizing_hash_changes_with_the_prompts_not_only_the_tokenizer(tiny_folders,
                                                                            tmp_path):
    """Fine-tunes of one base model share its tokenizer; a model whose default prompt differs
    tokenizes differently all the same (a client adding the old prompt got vectors 2e-3 off,
    with the tokenizer's hash matching)."""
    import json
    import shutil

    from bertstream.server.engine import Engine

    folder = tmp_path / "other-prompt"
    shutil.copytree(tiny_folders["distilbert"], folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert config.get("default_prompt_name"), "the tiny distilbert has a default prompt"
    config["prompts"] = {name: "other " + text for name, text in config["prompts"].items()}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    one, other = (Engine(str(path), device="cpu", dtype="float32")
                  for path in (tiny_folders["distilbert"], folder))
    assert one.tokenizer_sha256 == other.tokenizer_sha256
    assert one.tokenizing_sha256 != other.tokenizing_sha256


def test_get_tokenizer_hands_out_the_servers_tokenizer(stub, engine, client):
    from tokenizers import Tokenizer

    answer = stub.GetTokenizer(pb.TokenizerRequest())
    assert hashlib.sha256(answer.tokenizer_json.encode()).hexdigest() == answer.sha256
    assert answer.sha256 == client.info()["tokenizer_sha256"]
    text = "Tokenized on the client, as on the server"
    assert Tokenizer.from_str(answer.tokenizer_json).encode(text).ids == \
        engine.tokenize([text]).ids[0].tolist()


def test_forward_flops_and_tokens_are_counted(server, client, engine):
    """One call on an idle server is one forward pass: the counters grow by its tokens and by the
    formula Info names, from the model's config. A lone text has no padding; two texts of
    different lengths count the projections' and feed-forward's work over their real tokens only
    (the layers skip the padding), the attention's over the padded rows."""
    registry = server.batcher.metrics.registry

    def sample(name):
        return registry.get_sample_value(name, {"model": engine.name}) or 0.0

    names = ("bertstream_forward_flops_total", "bertstream_forward_real_tokens_total",
             "bertstream_forward_padded_tokens_total")
    h, i, layers = 384, 1536, 6  # all-MiniLM-L6-v2's config
    one, two = "one text, alone, through one forward pass", "and a shorter one"
    for texts in ([one], [one, two]):
        before = [sample(name) for name in names]
        lengths = [len(ids) for ids in engine.tokenize(texts).ids]
        client.embed(texts)
        real, rows, longest = sum(lengths), len(lengths), max(lengths)
        flops = layers * (real * (8 * h * h + 4 * h * i) + rows * longest * longest * 4 * h)
        assert [sample(name) - old for name, old in zip(names, before)] == \
            [flops, real, rows * longest], lengths
    assert 1.03 * real < rows * longest  # padded enough for the layers to skip it
    assert "8 h^2 + 4 h i" in client.info()["forward_flops"]


def test_cutting_over_long_id_texts_costs_about_their_bytes(engine):
    """A request's own ids are checked and cut in place: one text of 4 million ids (16 MB on the
    wire) and a few short ones cost the check at most a copy of the ids more (it once built
    three int64 arrays the length of every id: 4.5x the request)."""
    import tracemalloc

    prefix, suffix = engine.special_prefix, engine.special_suffix
    long_row = np.concatenate([prefix, np.full(4_000_000, 2000), suffix]).astype("<i4")
    short = np.array([*prefix, 7592, *suffix], dtype="<i4")
    data = np.concatenate([short, long_row, short]).tobytes()
    lengths = [len(short), len(long_row), len(short)]
    tracemalloc.start()
    try:
        tokens = engine.token_ids(data, lengths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * len(data), f"{peak / len(data):.1f}x the request's bytes"
    assert tokens.truncated == [False, True, False]
    cut = tokens.ids[1].tolist()
    assert len(cut) == engine.max_length and cut[-len(suffix):] == list(suffix)
    assert cut[:len(prefix)] == list(prefix) and set(cut[len(prefix):-len(suffix)]) == {2000}
    assert tokens.ids[0].tolist() == tokens.ids[2].tolist() == short.tolist()


def test_a_big_id_request_is_checked_off_the_event_loop(fleet_engine):
    """100 texts of 3,000 ids each (1.2 MB: the ids over the max length are cut) while another
    caller's Info calls (answered on the event loop, no compute) go on: the answer is 100 vectors
    of the cut texts, and the loop was never held up by the check. (A server of conftest's
    one-layer fleet_model: the check is what is tested, not the forward pass.)"""
    import threading
    import time

    from bertstream.client import Client
    from bertstream.server.limits import Limits
    from tests.conftest import ServerThread

    server = ServerThread(fleet_engine, Limits(**TEST_LIMITS))
    text_ids = fleet_engine._full.encode("word " * 3000).ids
    rows = [text_ids] * 100
    latencies, done = [], threading.Event()
    try:
        with grpc.insecure_channel(server.target) as channel, \
                Client(server.target, timeout=60) as client:
            stub = pb_grpc.EmbedderStub(channel)

            def small_caller():
                while not done.is_set():
                    started = time.perf_counter()
                    client.info()
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.01)

            other = threading.Thread(target=small_caller)
            other.start()
            try:
                response = stub.Embed(ids_request(rows), timeout=120)
            finally:
                done.set()
                other.join()
            assert response.usage.truncated_items == 100
            assert tuple(response.embeddings.shape) == (100, 384)
            np.testing.assert_allclose(vectors(response)[:1], client.embed(["word " * 3000]),
                                       rtol=0, atol=1e-6)
    finally:
        server.stop()
    assert latencies and max(latencies) < 1.0, latencies


@pytest.fixture(scope="module")
def no_special_tokens(tiny_folders, tmp_path_factory):
    """A tiny BERT whose tokenizer adds no special tokens (no post-processor, no [CLS] or [SEP]
    configured): an empty or all-space text has no tokens at all."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("no-special") / "bert"
    shutil.copytree(tiny_folders["bert"], folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for name in ("cls_token", "sep_token"):
        config.pop(name, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("texts, bad", [([""], 0), (["a text", "   "], 1)])
def test_a_text_of_no_tokens_is_refused_and_the_server_serves_on(engine, no_special_tokens,
                                                                 texts, bad):
    """An empty text through a tokenizer that adds nothing is zero tokens: no pass can take it
    (it once killed every forward worker). It gets INVALID_ARGUMENT naming it, by text and by
    token ids alike, and the server answers the next call."""
    from tests.conftest import served_models

    with served_models(engine, no_special_tokens) as served:
        model = no_special_tokens.name
        for local in (False, True):
            from bertstream.client import Client

            with Client(served.target, timeout=20, tokenize_locally=local) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.embed(texts, model=model)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                field = "token_ids" if local else "texts"
                assert f"{field}[{bad}]" in info.value.details(), info.value.details()
                assert client.embed(["a text"], model=model).shape[0] == 1


@pytest.mark.parametrize("texts, options, message", [
    (["fine", "x" * 20_001], {}, "texts[1]: 20001 characters, over the limit"),
    (["fine"], {"prompt_name": "nonesuch"}, "prompt_name"),
])
def test_what_the_server_refuses_as_texts_it_refuses_from_a_client_that_tokenizes(
        server, texts, options, message):
    """A request the server would refuse as texts is not tokenized by the client: the server
    refuses it, with its own status and words, both ways."""
    from bertstream.client import Client

    details = []
    for local in (False, True):
        with Client(server.target, timeout=30, tokenize_locally=local) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.embed(texts, **options)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details.append(info.value.details())
    assert details[0] == details[1] and message in details[0], details
