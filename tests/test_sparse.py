"""SPLADE sparse vectors on the same engine: EmbedSparse over gRPC and HTTP against
sentence-transformers' own SparseEncoder on the same folders.

Two tiny random BERT masked-language models with SpladePooling, one with max pooling and one with
sum, saved by SparseEncoder, served in one server beside all-MiniLM-L6-v2. Texts include one over
the max length (40 tokens), one character and non-Latin scripts.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from bertstream.client import AsyncClient, Client, EmbedStreamError
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.engine import DEFAULT_MODEL_NAME
from bertstream.server.limits import Limits
from tests.conftest import TEST_DEVICE, TEST_LIMITS, ServerThread, served_models
from tests.tiny_models import build_sparse_encoder

ATOL = 1e-5
POOLINGS = ("max", "sum")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("sparse")
    return {f"splade-{pooling}": build_sparse_encoder(pooling, root, corpus)
            for pooling in POOLINGS}


@pytest.fixture(scope="module")
def st(folders):
    from sentence_transformers import SparseEncoder

    return {name: SparseEncoder(str(folder), device="cpu") for name, folder in folders.items()}


@pytest.fixture(scope="module")
def served(engine, folders):
    with served_models(engine, *folders.values()) as server:
        yield server


@pytest.fixture(scope="module")
def texts(corpus):
    return sorted(corpus[:60], key=len)[:8] + [max(corpus, key=len), "a",
                                                "日本語の文章を埋め込む。", "Привет, мир!"]


def expected(model, texts, max_active_dims=None):
    """SparseEncoder.encode's vectors as (indices, values) per text."""
    dense = model.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False,
                         max_active_dims=max_active_dims).cpu().numpy()
    return [(np.flatnonzero(row), row[np.flatnonzero(row)]) for row in dense]


def assert_same(got, want):
    assert len(got) == len(want)
    for (indices, values), (want_indices, want_values) in zip(got, want):
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_allclose(values, want_values, rtol=0, atol=ATOL)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_sparse_vectors_equal_sparse_encoder(served, st, texts, pooling):
    name = f"splade-{pooling}"
    got = served.client.embed_sparse(texts, model=name)
    assert_same(got, expected(st[name], texts))
    assert all(np.all(np.diff(indices) > 0) for indices, _ in got)  # ascending
    assert served.client.last_usage.truncated_items == 1  # the long text
    top = served.client.embed_sparse(texts, top_k=5, model=name)
    assert_same(top, expected(st[name], texts, max_active_dims=5))
    assert all(len(indices) <= 5 for indices, _ in top)


def test_the_models_max_active_dims_applies_by_default(folders, texts, tmp_path):
    import shutil

    from sentence_transformers import SparseEncoder

    from bertstream.server.engine import Engine

    folder = tmp_path / "capped"
    shutil.copytree(folders["splade-max"], folder)
    saved = json.loads((folder / "config_sentence_transformers.json").read_text())
    saved["max_active_dims"] = 7
    (folder / "config_sentence_transformers.json").write_text(json.dumps(saved))
    server = ServerThread(Engine(str(folder), device=TEST_DEVICE, dtype="float32"),
                          Limits(**TEST_LIMITS))
    try:
        with Client(server.target, timeout=60) as client:
            got = client.embed_sparse(texts)
        assert_same(got, expected(SparseEncoder(str(folder), device="cpu"), texts))
        assert max(len(indices) for indices, _ in got) == 7
    finally:
        server.stop()


def test_sparse_requests_are_bounded_and_refused_clearly(served, texts):
    client = served.client
    cases = [
        (lambda: client.embed_sparse([], model="splade-max"), grpc.StatusCode.INVALID_ARGUMENT,
         "texts: empty"),
        (lambda: client.embed_sparse(texts, top_k=10**6, model="splade-max"),
         grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (lambda: client.embed_sparse(texts, truncate=False, model="splade-max"),
         grpc.StatusCode.INVALID_ARGUMENT, "truncate is false"),
        (lambda: client.embed_sparse(texts), grpc.StatusCode.FAILED_PRECONDITION,
         "not embed_sparse"),
        (lambda: client.embed(texts, model="splade-sum"), grpc.StatusCode.FAILED_PRECONDITION,
         "it does embed_sparse, tokenize"),
        # every text could hold the whole vocabulary: its size is known before any compute
        (lambda: client.embed_sparse(["x"] * 500, model="splade-max"), None, None),
    ]
    for call, code, message in cases:
        if code is None:
            assert len(call()) == 500
            continue
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code and message in info.value.details(), \
            info.value.details()


def test_a_sparse_answer_over_the_response_limit_is_refused_before_compute(engine, folders):
    from bertstream.server.engine import Engine

    sparse = Engine(str(folders["splade-max"]), device=TEST_DEVICE, dtype="float32")
    limit = 8 * sparse.output_width * 10  # ten texts at the whole vocabulary
    server = ServerThread(sparse, Limits(**{**TEST_LIMITS, "max_response_bytes": limit}))
    try:
        with Client(server.target, timeout=60) as client:
            assert len(client.embed_sparse(["x"] * 10)) == 10
            with pytest.raises(grpc.RpcError) as info:
                client.embed_sparse(["x"] * 11)
            assert "max_response_bytes" in info.value.details()
            assert len(client.embed_sparse(["x"] * 11, top_k=5)) == 11
    finally:
        server.stop()


def test_the_sparse_stream_answers_in_order(served, st, texts):
    stub = pb_grpc.EmbedderStub(served.client._channel)
    requests = [pb.EmbedSparseRequest(request_id=str(i), texts=texts[i:i + 3], model="splade-sum")
                for i in range(0, len(texts), 3)]
    requests.insert(1, pb.EmbedSparseRequest(request_id="bad", model="splade-sum"))
    responses = list(stub.EmbedSparseStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    got = [(np.frombuffer(v.indices, "<i4"), np.frombuffer(v.values, "<f4"))
           for r in responses if not r.HasField("error") for v in r.embeddings]
    assert_same(got, expected(st["splade-sum"], texts))
    assert responses[0].dimensions == st["splade-sum"].get_embedding_dimension()


def test_http_embed_sparse_in_tei_shape(served, texts):
    want = served.client.embed_sparse(texts, model="splade-max")
    request = urllib.request.Request(
        served.base + "/embed_sparse", headers={"Content-Type": "application/json"},
        data=json.dumps({"inputs": texts, "model": "splade-max", "truncate": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert len(body) == len(texts)
    for entries, (indices, values) in zip(body, want):
        assert [e["index"] for e in entries] == indices.tolist()
        np.testing.assert_allclose([e["value"] for e in entries], values, rtol=0, atol=ATOL)
    request = urllib.request.Request(
        served.base + "/embed_sparse", headers={"Content-Type": "application/json"},
        data=json.dumps({"inputs": "x", "model": DEFAULT_MODEL_NAME}).encode())
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400 and b"not embed_sparse" in info.value.read()


def test_the_async_client_embeds_sparse(served, texts):
    async def run():
        async with AsyncClient(served.target, timeout=60, model="splade-max") as client:
            return await client.embed_sparse(texts)

    assert_same(asyncio.run(run()), served.client.embed_sparse(texts, model="splade-max"))
    kinds = {m["name"]: (m["kind"], m["tasks"]) for m in served.client.list_models()}
    assert kinds["splade-max"] == ("sparse", ["embed_sparse", "tokenize"])


def test_the_clients_stream_sparse_vectors_in_order(served, st, texts):
    want = expected(st["splade-sum"], texts)
    client = served.client
    for spread in (False, True):  # one EmbedSparseStream; one EmbedSparse call per message
        messages = list(client.stream_sparse(iter(texts), batch_size=3, window=2, spread=spread,
                                             model="splade-sum"))
        assert [len(m) for m in messages] == [3, 3, 3, 3]
        assert_same([row for message in messages for row in message], want)
    with pytest.raises(EmbedStreamError) as info:  # the long text, with truncation off
        list(client.stream_sparse(texts, batch_size=4, truncate=False, model="splade-sum"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.request_id == "2"

    async def run():
        async with AsyncClient(served.target, timeout=60, model="splade-sum") as aio:
            return [row async for message in aio.stream_sparse(texts, batch_size=5, top_k=4)
                    for row in message]

    assert_same(asyncio.run(run()), expected(st["splade-sum"], texts, max_active_dims=4))


def read_sparse(path) -> list:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column_names == ["id", "indices", "values"]
    assert table.column("id").to_pylist() == list(range(table.num_rows))
    return [(np.array(i, dtype=np.int32), np.array(v, dtype=np.float32))
            for i, v in zip(table.column("indices").to_pylist(),
                            table.column("values").to_pylist())]


def test_embed_sparse_command_writes_parquet_and_resumes_exactly(served, st, texts, tmp_path,
                                                                 monkeypatch, capsys):
    from bertstream.client import corpus_io
    from bertstream.client.cli import main

    source = tmp_path / "in.jsonl"
    rows = texts * 3
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    target = tmp_path / "sparse.parquet"
    base = ["embed", str(source), "-o", str(target), "--server", served.target, "--sparse",
            "--model", "splade-max", "--batch-size", "4", "--window", "2", "--commit-rows", "8",
            "--no-progress"]
    want = expected(st["splade-max"], rows, max_active_dims=6)
    appended, append = [], corpus_io.ParquetWriter.append

    def interrupted(writer, vectors):  # Ctrl-C on the fourth message
        appended.append(len(vectors))
        if len(appended) == 4:
            raise KeyboardInterrupt
        append(writer, vectors)

    monkeypatch.setattr(corpus_io.ParquetWriter, "append", interrupted)
    assert main(base + ["--top-k", "6"]) == 130
    monkeypatch.setattr(corpus_io.ParquetWriter, "append", append)
    capsys.readouterr()
    assert main(base + ["--top-k", "5", "--resume"]) == 2  # not the same run
    assert "--top-k: 6 then, 5 now" in capsys.readouterr().err
    assert main(base + ["--top-k", "6", "--resume"]) == 0
    assert_same(read_sparse(target), want)

    for extra, message in ((["--pooling", "mean"], "--pooling does not apply to --sparse"),
                           (["-o", str(tmp_path / "s.npy")], "sparse vectors are written to "
                                                             ".parquet"),
                           (["--no-truncate"], "INVALID_ARGUMENT")):
        assert main(base + extra) != 0
        assert message in capsys.readouterr().err


def test_a_sparse_models_padding_is_never_free(engine, folders):
    """On a GPU a lead may be one pass while its padding's compute is small (Queue's free_flops);
    a SPLADE model's masked-language head runs over every padded position, which the FLOPs
    formula leaves out, so its padding never counts as free."""
    import copy

    import torch

    from bertstream.server.engine import Engine
    from bertstream.server.limits import FREE_PADDING_FLOPS_BY_DEVICE

    on_gpu = [copy.copy(engine), copy.copy(Engine(str(folders["splade-max"]), device="cpu",
                                                  dtype="float32"))]
    for model in on_gpu:
        model.device = torch.device("cuda")  # what is read of it: the device's kind
    dense, sparse = on_gpu
    assert dense.free_padding_flops == FREE_PADDING_FLOPS_BY_DEVICE["cuda"] > 0
    assert sparse.free_padding_flops == 0


def test_sparse_vectors_pooled_on_the_device_equal_the_kernels(folders, texts):
    """A GPU pools SPLADE's logits where they are (server/device_pooling.py): the same sparse
    vectors as the kernels', for both poolings (run here on CPU tensors)."""
    import numpy as np

    from bertstream.server.engine import Engine

    for folder in folders.values():
        engine = Engine(str(folder), device="cpu", dtype="float32")
        options = engine.sparse_options(None)
        logits, lengths = engine.forward(engine.tokenize(texts).ids)
        rows = np.arange(len(texts))
        pooled = {}
        for on_device in (False, True):
            engine.pool_on_device = on_device
            pooled[on_device] = engine.pool(logits, lengths, rows, options)
        for (indices, values), (device_indices, device_values) in zip(pooled[False],
                                                                      pooled[True]):
            np.testing.assert_array_equal(device_indices, indices)
            np.testing.assert_allclose(device_values, values, rtol=1e-5, atol=1e-6)
