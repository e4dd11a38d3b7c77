"""Several models in one server: each answers exactly as a server of its own would, over gRPC and
HTTP, every option included; a request names its model (an unknown one: NOT_FOUND / 404 listing
the served names); ListModels, /v1/models, Info, health and metrics per model; a model that cannot
start stops the whole server, naming it.

The server under test serves all-MiniLM-L6-v2 (the default), a tiny BERT (CLS, Normalize, prompts)
and a tiny DistilBERT (two poolings concatenated, prompt left out of pooling, a default prompt).
The one-model servers it is compared with run on the very same Engine objects, so any difference
is the server's, not the weights'.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from bertstream.client import AsyncClient, Client
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.engine import DEFAULT_MODEL_NAME
from bertstream.server.limits import Limits
from tests.conftest import TEST_DEVICE, TEST_LIMITS, ServerThread, serve_process
from tests.launcher import ServerProcess

TINY = ("bert", "distilbert")
NAMES = (DEFAULT_MODEL_NAME, *TINY)
EXACT = 1e-6

# Every option a request can take; each is sent to each model, served together and alone. A
# model that refuses one (a prompt name it lacks) must refuse it the same way in both.
OPTIONS = [
    {},
    dict(pooling="mean", layers=(-1, -2), layer_combine="mean"),
    dict(pooling="cls", normalize=True, layers=(0, -1)),
    dict(pooling="mean_max", normalize=False),
    dict(prompt_name="query"),
    dict(prompt="search: "),
    dict(dimensions=8),
    dict(dtype="float16"),
    dict(dtype="int8"),
    dict(dtype="binary"),
    dict(truncate=False),
    dict(priority="bulk"),
]


@pytest.fixture(scope="module")
def engines(engine, tiny_folders):
    from bertstream.server.engine import Engine

    tiny = [Engine(str(tiny_folders[name]), device=TEST_DEVICE, dtype="float32")
            for name in TINY]
    return [engine, *tiny]


@pytest.fixture(scope="module")
def together(engines):
    server = ServerThread(engines, Limits(**TEST_LIMITS), http_port=0, http_metrics=True)
    server.base = f"http://127.0.0.1:{server.running.http_port}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alone(engines):
    servers = {engine.name: ServerThread(engine, Limits(**TEST_LIMITS)) for engine in engines}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def texts(corpus):
    """Short paragraphs, one character, a text over every max length, non-Latin scripts."""
    return sorted(corpus[:40], key=len)[:5] + ["a", max(corpus, key=len), "日本語の文章を埋め込む。",
                                "Привет, мир!"]


def outcome(call):
    """What a call gave: its value, or its error's code and message."""
    try:
        return call()
    except grpc.RpcError as error:
        return error.code(), error.details()


def refused(result) -> bool:
    return isinstance(result, tuple) and isinstance(result[0], grpc.StatusCode)


def assert_same(got, want):
    if refused(want):
        assert got == want
    elif hasattr(want, "q"):  # int8: values and scales
        np.testing.assert_array_equal(got.q, want.q)
        np.testing.assert_allclose(got.scales, want.scales, rtol=0, atol=EXACT)
    elif isinstance(want, list):  # token level
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=EXACT)
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)


@pytest.mark.parametrize("name", NAMES)
def test_each_model_answers_as_a_server_of_its_own(together, alone, texts, name):
    refusals = 0
    with Client(together.target, timeout=120) as shared, \
            Client(alone[name].target, timeout=120) as own:
        for options in OPTIONS:
            want = outcome(lambda: own.embed(texts, **options))
            refusals += refused(want)
            assert_same(outcome(lambda: shared.embed(texts, model=name, **options)), want)
        assert refusals == (2 if name == DEFAULT_MODEL_NAME else 1)  # no prompts; truncate=False
        assert_same(shared.embed_tokens(texts, layers=[-2], model=name),
                    own.embed_tokens(texts, layers=[-2]))
        assert shared.tokenize(texts, model=name) == own.tokenize(texts)
        streamed = np.concatenate(list(shared.stream(texts, batch_size=3, model=name)))
        assert_same(streamed, own.embed(texts))
        prompted = own.embed(texts, prompt="search: ")
    with Client(together.target, timeout=120, model=name, tokenize_locally=True) as local:
        assert_same(local.embed(texts, prompt="search: "), prompted)
        assert local.info()["name"] == name


def test_the_default_model_is_the_first(together, alone, texts):
    with Client(together.target, timeout=60) as client, \
            Client(alone[DEFAULT_MODEL_NAME].target, timeout=60) as own:
        assert_same(client.embed(texts), own.embed(texts))
        assert client.info()["name"] == DEFAULT_MODEL_NAME
        assert client.info("distilbert")["pipeline"]["default_prompt_name"] == "query"


def test_the_async_client_takes_a_model_too(together, alone, texts):
    import asyncio

    async def run():
        async with AsyncClient(together.target, timeout=60, model="bert") as client:
            return (await client.embed(texts), await client.embed(texts, model="distilbert"),
                    [info["name"] for info in await client.list_models()])

    bert, distilbert, names = asyncio.run(run())
    for got, name in ((bert, "bert"), (distilbert, "distilbert")):
        with Client(alone[name].target, timeout=60) as own:
            assert_same(got, own.embed(texts))
    assert names == list(NAMES)


def post(server, path, body):
    request = urllib.request.Request(server.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, path):
    try:
        with urllib.request.urlopen(server.base + path, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("name", NAMES)
def test_http_serves_the_model_a_request_names(together, alone, texts, name):
    with Client(alone[name].target, timeout=60) as own:
        status, body = post(together, "/v1/embeddings", {"input": texts, "model": name})
        assert status == 200 and body["model"] == name
        np.testing.assert_allclose(np.array([row["embedding"] for row in body["data"]],
                                            dtype=np.float32), own.embed(texts),
                                   rtol=0, atol=EXACT)
        status, body = post(together, "/embed", {"inputs": texts, "model": name,
                                                 "truncate": True, "dimensions": 8})
        assert status == 200
        np.testing.assert_allclose(np.array(body, dtype=np.float32),
                                   own.embed(texts, normalize=True, dimensions=8),
                                   rtol=0, atol=EXACT)
        status, body = post(together, "/tokenize", {"inputs": texts[:3], "model": name})
        assert status == 200
        assert [[token["id"] for token in text] for text in body] == \
            [[token["id"] for token in text] for text in own.tokenize(texts[:3])]
        status, body = get(together, f"/info?model={name}")
        assert status == 200 and json.loads(body)["pipeline"] == own.info()["pipeline"]
        status, body = get(together, f"/tokenizer.json?model={name}")
        assert status == 200 and json.loads(body) == json.loads(
            own._stub.GetTokenizer(pb.TokenizerRequest()).tokenizer_json)


def test_an_unknown_model_is_not_found_naming_the_served_ones(together):
    listed = ", ".join(NAMES)
    with Client(together.target, timeout=60) as client:
        stub = pb_grpc.EmbedderStub(client._channel)
        calls = {
            "Embed": lambda: client.embed(["x"], model="nope"),
            "Tokenize": lambda: client.tokenize(["x"], model="nope"),
            "Info": lambda: client.info("nope"),
            "GetTokenizer": lambda: stub.GetTokenizer(pb.TokenizerRequest(model="nope")),
        }
        for rpc, call in calls.items():
            code, message = outcome(call)
            assert code == grpc.StatusCode.NOT_FOUND and listed in message and "'nope'" in \
                message, (rpc, message)
        # a stream's message gets its error and the stream goes on
        responses = list(stub.EmbedStream(iter([
            pb.EmbedRequest(request_id="0", texts=["x"], model="nope"),
            pb.EmbedRequest(request_id="1", texts=["x"], model="bert")])))
        assert responses[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert listed in responses[0].error.message and not responses[1].HasField("error")
    for path, body in [("/v1/embeddings", {"input": "x", "model": "nope"}),
                       ("/embed", {"inputs": "x", "model": "nope"}),
                       ("/tokenize", {"inputs": "x", "model": "nope"})]:
        status, error = post(together, path, body)
        assert status == 404 and error["error"]["code"] == "model_not_found", (path, error)
        assert listed in error["error"]["message"]
    for path in ("/info?model=nope", "/v1/models/nope", "/tokenizer.json?model=nope",
                 "/health?model=nope"):
        status, body = get(together, path)
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found", path


def test_list_models_and_v1_models(together, engines):
    with Client(together.target, timeout=60) as client:
        models = client.list_models()
    assert [model["name"] for model in models] == list(NAMES)
    assert [model["model"] for model in models] == [engine.model_name for engine in engines]
    assert all(model["weight_bytes"] == engine.weight_bytes > 0
               for model, engine in zip(models, engines))
    assert models[1]["pipeline"]["pooling"] == ["cls"]
    status, body = get(together, "/v1/models")
    assert status == 200
    listed = json.loads(body)
    assert listed["object"] == "list" and [entry["id"] for entry in listed["data"]] == list(NAMES)
    assert all(entry["object"] == "model" for entry in listed["data"])
    status, body = get(together, "/v1/models/distilbert")
    assert status == 200 and json.loads(body)["id"] == "distilbert"
    from openai import OpenAI

    openai = OpenAI(base_url=together.base + "/v1", api_key="none", max_retries=0)
    assert [model.id for model in openai.models.list()] == list(NAMES)


def test_metrics_carry_the_model(together):
    registry = together.batcher.metrics.registry

    def requests(model, code="OK"):
        return registry.get_sample_value("bertstream_requests_total",
                                         {"rpc": "Embed", "code": code, "model": model}) or 0

    before = {name: requests(name) for name in NAMES}
    unknown_before = requests("", "NOT_FOUND")
    with Client(together.target, timeout=60) as client:
        client.embed(["one"], model="bert")
        client.embed(["one"], model="bert")
        client.embed(["one"], model="distilbert")
        with pytest.raises(grpc.RpcError):
            client.embed(["one"], model="not-served-" * 20)
    assert {name: requests(name) - before[name] for name in NAMES} == \
        {DEFAULT_MODEL_NAME: 0, "bert": 2, "distilbert": 1}
    # a name that is not served is no label: any string could be one
    assert requests("", "NOT_FOUND") - unknown_before == 1
    labels = {sample.labels.get("model") for family in registry.collect()
              for sample in family.samples}
    assert labels <= {None, "", *NAMES}
    assert registry.get_sample_value("bertstream_forward_real_tokens_total",
                                     {"model": "distilbert"}) > 0


class FailingEngine:
    """A served model whose forward passes fail once `failing` is set."""

    def __init__(self, engine, name):
        self._engine, self.name, self.failing = engine, name, False

    def __getattr__(self, attribute):
        return getattr(self._engine, attribute)

    def forward(self, ids):
        if self.failing:
            raise RuntimeError("injected failure")
        return self._engine.forward(ids)


def test_health_per_model_and_for_the_whole_server(engines):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    broken = FailingEngine(engines[1], "breaks")
    server = ServerThread([engines[0], broken], Limits(**TEST_LIMITS))
    SERVING = health_pb2.HealthCheckResponse.SERVING
    try:
        with Client(server.target, timeout=60) as client:
            health = health_pb2_grpc.HealthStub(client._channel)

            def status(service):
                return health.Check(health_pb2.HealthCheckRequest(service=service)).status

            assert [status(name) for name in ("", DEFAULT_MODEL_NAME, "breaks")] == [SERVING] * 3
            assert outcome(lambda: status("nope"))[0] == grpc.StatusCode.NOT_FOUND
            broken.failing = True
            for _ in range(6):
                with pytest.raises(grpc.RpcError):
                    client.embed(["x"], model="breaks")
            deadline = time.monotonic() + 10
            while status("breaks") == SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status("breaks") != SERVING and status("") != SERVING
            assert status(DEFAULT_MODEL_NAME) == SERVING
            assert client.embed(["the other model still answers"]).shape == (1, 384)
    finally:
        server.stop()


def test_serve_takes_names_and_a_model_that_cannot_start_stops_it(engines, tmp_path):
    """`--model NAME=PATH` and `--model PATH` (named by its folder), the first the default; a
    model that fails to load stops the whole start, naming it."""
    bert, distilbert = (engine.model_name for engine in engines[1:])
    process, target = serve_process("--model", f"first={distilbert}", "--model", bert)
    try:
        with Client(target, timeout=60) as client:
            assert [m["name"] for m in client.list_models()] == ["first", "bert"]
            assert client.info()["name"] == "first"
    finally:
        process.kill()
        process.wait()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with tempfile.NamedTemporaryFile("r", suffix=".log") as output:
        failed = ServerProcess(["serve", "--port", "0", "--device", TEST_DEVICE, "--model", bert,
                                "--model", f"second={broken}"], output.name)
        assert failed.wait(timeout=120) != 0
        said = output.read()
    assert "model second" in said, said
    with pytest.raises(ValueError, match="two models have one name: bert, bert"):
        ServerThread([engines[1], engines[1]], Limits(**TEST_LIMITS))


def test_the_embed_command_and_the_ray_stage_take_a_model(together, alone, texts, tmp_path,
                                                         capsys):
    """`bertstream embed --model`, and its --resume refuses another model (one run's rows, never
    two models'); the Ray stage's actor with model= (called here without Ray: the option's path
    is the actor's own)."""
    import pyarrow as pa

    from bertstream.client.cli import main
    from bertstream.client.ray import _Embedder

    lines = [text for text in texts if "\n" not in text]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    args = ["embed", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.npy"), "--server",
            together.target, "--no-progress"]
    assert main([*args, "--model", "distilbert"]) == 0
    with Client(alone["distilbert"].target, timeout=60) as own:
        want = own.embed(lines)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=0, atol=EXACT)
    capsys.readouterr()
    assert main([*args, "--model", "bert", "--resume"]) == 2  # the record names distilbert
    assert "the server's model" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=0, atol=EXACT)

    actor = _Embedder(together.target, "text", "embedding", message_size=4, window=2,
                      token=None, tls={}, message_timeout=60, tokenize_locally=False,
                      give_up_after=1, options={"model": "distilbert", "priority": "bulk"})
    table = actor(pa.table({"text": lines}))
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)
