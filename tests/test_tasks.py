"""Cross-encoders on the same engine: Rerank and Classify over gRPC and HTTP, against
sentence-transformers' own CrossEncoder on the same folders.

Two tiny random cross-encoders, saved by CrossEncoder: a BERT with one label (a reranker:
sigmoid scores) and a DistilBERT with three (a classifier: softmax), served in one server beside
all-MiniLM-L6-v2. Pairs include a document over the max length (40 tokens), one character and
non-Latin text.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch

from bertstream.client import AsyncClient, Client
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.engine import DEFAULT_MODEL_NAME
from bertstream.server.limits import Limits
from tests.conftest import TEST_DEVICE, TEST_LIMITS, ServerThread, served_models
from tests.test_several_models import post
from tests.tiny_models import CROSS_ENCODERS, build_cross_encoder

ATOL = 1e-5
RERANKER, CLASSIFIER = "ce-bert", "ce-distilbert"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("cross-encoders")
    return {f"ce-{name}": build_cross_encoder(name, root, corpus) for name in CROSS_ENCODERS}


@pytest.fixture(scope="module")
def st(folders):
    """sentence-transformers' CrossEncoder on each folder: the reference."""
    from sentence_transformers import CrossEncoder

    return {name: CrossEncoder(str(folder), device="cpu") for name, folder in folders.items()}


@pytest.fixture(scope="module")
def served(engine, folders):
    with served_models(engine, folders[RERANKER], folders[CLASSIFIER]) as server:
        yield server


@pytest.fixture(scope="module")
def documents(corpus):
    """Short paragraphs, one over the max length, one character, non-Latin scripts, and two
    equal documents (a tie: the earlier first)."""
    short = sorted(corpus[:60], key=len)[:8]
    return short + [max(corpus, key=len), "a", "日本語の文章を埋め込む。", "Привет, мир!",
                    short[0]]


QUERY = "which paragraph answers the question about modules"


def test_rerank_equals_cross_encoder_predict_and_rank(served, st, documents):
    model = st[RERANKER]
    expected = model.predict([(QUERY, d) for d in documents])
    got = served.client.rerank(QUERY, documents, model=RERANKER, return_documents=True)
    assert sorted(r["index"] for r in got) == list(range(len(documents)))
    scores = np.array([r["score"] for r in sorted(got, key=lambda r: r["index"])])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=ATOL)
    assert [r["index"] for r in got] == [r["corpus_id"] for r in
                                         model.rank(QUERY, documents)]
    assert all(r["document"] == documents[r["index"]] for r in got)
    assert served.client.last_usage.truncated_items >= 1  # the long document was cut
    top = served.client.rerank(QUERY, documents, top_n=3, model=RERANKER)
    assert top == [{k: v for k, v in r.items() if k != "document"} for r in got[:3]]
    raw = served.client.rerank(QUERY, documents, raw_scores=True, model=RERANKER)
    logits = model.predict([(QUERY, d) for d in documents], activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(np.array([r["score"] for r in sorted(raw, key=lambda r: r["index"])]),
                               logits, rtol=0, atol=ATOL)


def test_classify_equals_cross_encoder_predict(served, st, documents):
    model = st[CLASSIFIER]
    pairs = [(QUERY, d) for d in documents]
    got = served.client.classify([QUERY] * len(documents), documents, model=CLASSIFIER)
    assert got.labels == CROSS_ENCODERS["distilbert"]
    np.testing.assert_allclose(got.scores, model.predict(pairs, apply_softmax=True),
                               rtol=0, atol=ATOL)
    raw = served.client.classify([QUERY] * len(documents), documents, raw_scores=True,
                                 model=CLASSIFIER)
    np.testing.assert_allclose(raw.scores, model.predict(pairs), rtol=0, atol=ATOL)


def test_classify_single_texts_equals_the_model_itself(served, folders, documents):
    """One text per item, as the tokenizer encodes it alone, through the transformers model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = str(folders[CLASSIFIER])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        logits = model(**tokenizer(documents, padding=True, truncation=True, max_length=40,
                                   return_tensors="pt")).logits
    got = served.client.classify(documents, model=CLASSIFIER)
    np.testing.assert_allclose(got.scores, torch.softmax(logits, -1).numpy(), rtol=0, atol=ATOL)


def test_the_reranker_classifies_with_its_sigmoid(served, st, documents):
    got = served.client.classify([QUERY] * 3, documents[:3], model=RERANKER)
    assert got.labels == ["relevance"] and got.scores.shape == (3, 1)
    np.testing.assert_allclose(got.scores[:, 0], st[RERANKER].predict(
        [(QUERY, d) for d in documents[:3]]), rtol=0, atol=ATOL)


def test_a_task_the_model_does_not_do_is_refused_naming_its_tasks(served):
    client = served.client
    cases = [(lambda: client.rerank("q", ["d"]), f"model {DEFAULT_MODEL_NAME}", "embed"),
             (lambda: client.embed(["x"], model=RERANKER), RERANKER, "rerank, classify"),
             (lambda: client.rerank("q", ["d"], model=CLASSIFIER), CLASSIFIER, "classify"),
             (lambda: client.classify(["x"]), DEFAULT_MODEL_NAME, "embed")]
    for call, model, tasks in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert model in info.value.details() and tasks in info.value.details(), \
            info.value.details()


def test_bad_rerank_and_classify_requests_name_what_was_wrong(served, documents):
    client = served.client
    cases = [
        (lambda: client.rerank("q", [], model=RERANKER), "documents: empty"),
        (lambda: client.rerank("q", documents, truncate=False, model=RERANKER),
         f"documents[{documents.index(max(documents, key=len))}] has"),
        (lambda: client.classify(["a", "b"], ["only one"], model=CLASSIFIER),
         "text_pairs: 1 texts for 2"),
        (lambda: client.classify([], model=CLASSIFIER), "texts: empty"),
        (lambda: client.rerank("q" * 200_000, ["d"], model=RERANKER), "query[0]: 200000"),
    ]
    for call, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert message in info.value.details(), info.value.details()


def test_rerank_stream_answers_in_order_and_goes_on_after_a_bad_request(served, st, documents):
    stub = pb_grpc.EmbedderStub(served.client._channel)
    queries = [f"query number {i}" for i in range(6)]
    requests = [pb.RerankRequest(request_id=str(i), query=q, documents=documents, model=RERANKER)
                for i, q in enumerate(queries)]
    requests.insert(3, pb.RerankRequest(request_id="bad", query="q", model=RERANKER))
    responses = list(stub.RerankStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    assert responses[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for response, query in zip(responses[:3] + responses[4:], queries):
        expected = st[RERANKER].predict([(query, d) for d in documents])
        got = np.zeros(len(documents))
        for result in response.results:
            got[result.index] = result.score
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_the_async_client_reranks_and_classifies(served, documents):
    import asyncio

    async def run():
        async with AsyncClient(served.target, timeout=60, model=RERANKER) as client:
            return (await client.rerank(QUERY, documents),
                    await client.classify(documents[:2], model=CLASSIFIER))

    ranked, classified = asyncio.run(run())
    assert ranked == served.client.rerank(QUERY, documents, model=RERANKER)
    np.testing.assert_array_equal(
        classified.scores, served.client.classify(documents[:2], model=CLASSIFIER).scores)


def test_info_and_list_models_say_the_kind_and_tasks(served):
    models = {m["name"]: m for m in served.client.list_models()}
    assert models[DEFAULT_MODEL_NAME]["kind"] == "embedding"
    assert models[DEFAULT_MODEL_NAME]["tasks"] == ["embed", "tokenize"]
    assert models[RERANKER]["kind"] == "cross-encoder"
    assert models[RERANKER]["tasks"] == ["rerank", "classify", "tokenize"]
    assert models[CLASSIFIER]["tasks"] == ["classify", "tokenize"]
    assert models[CLASSIFIER]["labels"] == CROSS_ENCODERS["distilbert"]


def test_http_rerank_in_tei_and_cohere_shapes(served, documents):
    expected = served.client.rerank(QUERY, documents, model=RERANKER, return_documents=True)
    status, body = post(served, "/rerank", {"query": QUERY, "texts": documents,
                                            "model": RERANKER, "return_text": True,
                                            "truncate": True})
    assert status == 200
    assert [(r["index"], r["text"]) for r in body] == \
        [(r["index"], r["document"]) for r in expected]
    np.testing.assert_allclose([r["score"] for r in body], [r["score"] for r in expected],
                               rtol=0, atol=ATOL)
    status, body = post(served, "/rerank", {"query": QUERY, "texts": documents,
                                            "model": RERANKER})
    assert status == 400 and "truncate is false" in body["error"]["message"]  # TEI's default
    status, body = post(served, "/v1/rerank", {
        "model": RERANKER, "query": QUERY, "top_n": 4, "return_documents": True,
        "documents": [documents[0], *({"text": d} for d in documents[1:])]})
    assert status == 200 and body["model"] == RERANKER and body["usage"]["total_tokens"] > 0
    assert [(r["index"], r["document"]["text"]) for r in body["results"]] == \
        [(r["index"], r["document"]) for r in expected[:4]]
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                               [r["score"] for r in expected[:4]], rtol=0, atol=ATOL)
    status, body = post(served, "/v1/rerank", {"query": QUERY, "documents": ["d"]})
    assert status == 400 and "it does embed, tokenize, not rerank" in body["error"]["message"]
    status, body = post(served, "/v1/rerank", {"query": QUERY, "documents": [],
                                               "model": RERANKER})
    assert status == 400 and "documents: empty" in body["error"]["message"]


def test_http_predict_in_tei_shape(served, documents):
    expected = served.client.classify(documents[:3], model=CLASSIFIER)
    status, body = post(served, "/predict", {"inputs": documents[:3], "model": CLASSIFIER,
                                             "truncate": True})
    assert status == 200 and len(body) == 3
    for answer, scores in zip(body, expected.scores):
        assert [entry["score"] for entry in answer] == sorted(
            (entry["score"] for entry in answer), reverse=True)
        by_label = {entry["label"]: entry["score"] for entry in answer}
        np.testing.assert_allclose([by_label[label] for label in expected.labels], scores,
                                   rtol=0, atol=ATOL)
    status, single = post(served, "/predict", {"inputs": documents[0], "model": CLASSIFIER})
    assert status == 200 and {e["label"] for e in single} == set(CROSS_ENCODERS["distilbert"])
    pairs = served.client.classify([QUERY], [documents[0]], raw_scores=True, model=CLASSIFIER)
    status, body = post(served, "/predict", {"inputs": [[QUERY, documents[0]]],
                                             "raw_scores": True, "model": CLASSIFIER})
    assert status == 200
    np.testing.assert_allclose([{e["label"]: e["score"] for e in body[0]}[label]
                                for label in pairs.labels], pairs.scores[0], rtol=0, atol=ATOL)


def test_the_cohere_sdk_reranks_against_the_server(served, documents):
    """Cohere's own Python SDK (what LangChain's and LlamaIndex's Cohere rerankers wrap),
    pointed at the server."""
    import cohere

    client = cohere.Client(api_key="none", base_url=served.base)
    answer = client.rerank(model=RERANKER, query=QUERY, documents=documents, top_n=3)
    expected = served.client.rerank(QUERY, documents, top_n=3, model=RERANKER)
    assert [r.index for r in answer.results] == [r["index"] for r in expected]
    np.testing.assert_allclose([r.relevance_score for r in answer.results],
                               [r["score"] for r in expected], rtol=0, atol=ATOL)


def test_langchains_cohere_reranker_gets_the_grpc_scores(served, documents):
    """LangChain's CohereRerank (Cohere's ClientV2, POST /v2/rerank) as a retrieval pipeline
    uses it: documents in, the best top_n out with their relevance scores."""
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(model=RERANKER, cohere_api_key="none", base_url=served.base,
                            top_n=4)
    kept = reranker.compress_documents([Document(page_content=d) for d in documents], QUERY)
    expected = served.client.rerank(QUERY, documents, top_n=4, model=RERANKER)
    assert [d.page_content for d in kept] == [documents[r["index"]] for r in expected]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in kept],
                               [r["score"] for r in expected], rtol=0, atol=ATOL)


def test_pairs_long_on_both_sides_are_cut_as_cross_encoder_cuts_them(served, st, corpus):
    """Longest first, both sides over the max length; one side of long words (one [UNK] each)
    that a cut at a space would shorten too much; empty and one-character sides."""
    long_words = " ".join(["x" * 150] * 50)
    long_text = max(corpus, key=len)
    pairs = [(long_text, long_text), (long_words, long_text), (long_text, long_words),
             (corpus[0], long_text), (long_text, ""), ("", "a"), ("a", long_text[:300])]
    for name in (RERANKER, CLASSIFIER):
        got = served.client.classify([a for a, _ in pairs], [b for _, b in pairs],
                                     raw_scores=True, model=name)
        want = st[name].predict(pairs, activation_fn=torch.nn.Identity())
        np.testing.assert_allclose(got.scores.reshape(want.shape), want, rtol=0, atol=ATOL)


def test_the_activation_the_folder_names_is_the_one_applied(folders, st, documents, tmp_path):
    """config_sentence_transformers.json's activation_fn, as CrossEncoder reads it first."""
    import shutil

    from sentence_transformers import CrossEncoder

    from bertstream.server.engine import Engine

    folder = tmp_path / "identity"
    shutil.copytree(folders[RERANKER], folder)
    saved = json.loads((folder / "config_sentence_transformers.json").read_text())
    saved["activation_fn"] = "torch.nn.modules.linear.Identity"
    (folder / "config_sentence_transformers.json").write_text(json.dumps(saved))
    server = ServerThread(Engine(str(folder), device=TEST_DEVICE, dtype="float32"),
                          Limits(**TEST_LIMITS))
    try:
        with Client(server.target, timeout=60) as client:
            got = client.rerank(QUERY, documents)
        want = CrossEncoder(str(folder), device="cpu").predict([(QUERY, d) for d in documents])
        assert want.min() < 0 or want.max() > 1  # logits: no sigmoid applied
        np.testing.assert_allclose([r["score"] for r in sorted(got, key=lambda r: r["index"])],
                                   want, rtol=0, atol=ATOL)
    finally:
        server.stop()


def test_a_bad_enum_in_a_rerank_stream_is_answered_and_the_stream_goes_on(served, documents):
    stub = pb_grpc.EmbedderStub(served.client._channel)
    requests = [pb.RerankRequest(request_id="0", query="q", documents=documents[:2],
                                 model=RERANKER),
                pb.RerankRequest(request_id="1", query="q", documents=documents[:2],
                                 model=RERANKER, priority=7),
                pb.RerankRequest(request_id="2", query="q", documents=documents[:2],
                                 model=RERANKER)]
    responses = list(stub.RerankStream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == ["0", "1", "2"]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "priority" in responses[1].error.message
    assert len(responses[2].results) == 2


def test_http_predict_reads_two_texts_as_one_pair_as_tei_does(served, documents):
    pair = served.client.classify([QUERY], [documents[0]], model=CLASSIFIER)
    status, body = post(served, "/predict", {"inputs": [QUERY, documents[0]],
                                             "model": CLASSIFIER})
    assert status == 200 and isinstance(body[0], dict)  # one answer: the pair's
    np.testing.assert_allclose([{e["label"]: e["score"] for e in body}[label]
                                for label in pair.labels], pair.scores[0], rtol=0, atol=ATOL)
    status, body = post(served, "/predict", {"inputs": [[QUERY], [documents[0]]],
                                             "model": CLASSIFIER})
    assert status == 200 and len(body) == 2  # one-element lists: single texts
    status, body = post(served, "/predict", {"inputs": [QUERY, [QUERY, documents[0]]],
                                             "model": CLASSIFIER})
    assert status == 400 and "mixed" in body["error"]["message"]


def test_http_takes_as_many_documents_and_pairs_as_grpc(served, documents):
    """The body's strings and values are counted before parsing: a Cohere document as
    {"text": ...} and a /predict pair take more of them than a text, and the route allows for
    it, up to max_texts_per_request items (they were refused at a half and a third of it)."""
    limit = TEST_LIMITS["max_texts_per_request"]
    many = (documents * (limit // len(documents) + 1))[:limit]
    status, body = post(served, "/v1/rerank", {"query": QUERY, "model": RERANKER, "top_n": 1,
                                               "documents": [{"text": d} for d in many]})
    assert status == 200 and len(body["results"]) == 1, body
    status, body = post(served, "/predict", {"inputs": [[QUERY, d] for d in many],
                                             "model": CLASSIFIER, "truncate": True})
    assert status == 200 and len(body) == limit
    status, body = post(served, "/v1/rerank", {"query": QUERY, "model": RERANKER,
                                               "documents": many + ["one more"]})
    assert status == 413 and f"over the limit of {limit}" in body["error"]["message"], body
