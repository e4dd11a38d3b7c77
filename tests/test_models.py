"""Every encoder as its authors configured it: a default Embed equals SentenceTransformer(folder).encode.

Four tiny random-weight architectures (tests/tiny_models.py: BERT, RoBERTa, DistilBERT, MPNet, each
with a different sentence-transformers pipeline) and the packaged all-MiniLM-L6-v2, each served
over real gRPC, compared with sentence-transformers itself in float32.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import grpc
import numpy as np
import pytest

from bertstream.client import Client
from tests.conftest import TEST_DEVICE, ServerThread
from tests.launcher import ServerProcess
from tests.tiny_models import MAX_SEQ_LENGTH, PIPELINES, PROMPTS

ATOL = 1e-5  # float32 agrees to ~1e-7 here; 1e-5 still catches a wrong step or token
ARCHITECTURES = sorted(PIPELINES)


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders


@pytest.fixture(scope="module")
def probe_texts(corpus):
    """Corpus paragraphs, one character, a text far over the max length, non-Latin scripts."""
    longest = max(corpus, key=len)
    assert len(longest) > 20 * MAX_SEQ_LENGTH
    return list(corpus[:40]) + ["a", longest, "日本語の文章を埋め込む。", "Привет, мир!",
                                "مرحبا بالعالم", "  leading and trailing spaces  ",
                                "CAPITALS and MiXeD Case"]


class Served:
    """One model folder: its server, a client, and sentence-transformers on the same folder."""

    def __init__(self, folder):
        from sentence_transformers import SentenceTransformer

        from bertstream.server.engine import Engine
        from bertstream.server.limits import Limits

        self.engine = Engine(str(folder) if folder else None, device=TEST_DEVICE,
                             dtype="float32")
        self.server = ServerThread(self.engine, Limits())
        self.client = Client(self.server.target, timeout=120)
        self.st = SentenceTransformer(str(folder) if folder else self.engine.model_name,
                                      device="cpu")

    def close(self):
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module", params=ARCHITECTURES + ["all-MiniLM-L6-v2"])
def served(request, folders):
    name = request.param
    model = Served(folders.get(name))
    model.name = name
    yield model
    model.close()


def test_default_embed_equals_sentence_transformers(served, probe_texts):
    got = served.client.embed(probe_texts)
    expected = served.st.encode(probe_texts, batch_size=16, convert_to_numpy=True)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert served.client.last_usage.truncated_items >= 1  # the long text was cut


def test_free_text_prompt_equals_sentence_transformers(served, probe_texts):
    got = served.client.embed(probe_texts, prompt="query: ")
    expected = served.st.encode(probe_texts, prompt="query: ", batch_size=16,
                                convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # The prompt changes the vectors (else this test could not tell it was applied).
    assert np.abs(got - served.client.embed(probe_texts, prompt="")).max() > 1e-3


def test_dimensions_equal_truncate_dim_then_normalize(served, probe_texts):
    width = served.st.get_embedding_dimension()
    k = width // 2
    got = served.client.embed(probe_texts, dimensions=k)
    expected = served.st.encode(probe_texts, truncate_dim=k, batch_size=16, convert_to_numpy=True)
    if served.engine.pipeline.normalizes:  # the model normalizes: so does its cut vector
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert got.shape == (len(probe_texts), k)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_dimensions_over_the_width_are_refused(served):
    width = served.st.get_embedding_dimension()
    with pytest.raises(grpc.RpcError) as info:
        served.client.embed(["x"], dimensions=width + 1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"dimensions = {width + 1}" in info.value.details()


def test_info_reports_the_pipeline(served):
    pipeline = served.client.info()["pipeline"]
    spec = PIPELINES.get(served.name, dict(pooling="mean", dense=None, normalize=True))
    modes = (spec["pooling"],) if isinstance(spec["pooling"], str) else spec["pooling"]
    names = {"mean_sqrt_len_tokens": "mean_sqrt_len"}
    assert pipeline["source"] == "sentence-transformers"
    assert pipeline["pooling"] == [names.get(m, m) for m in modes]
    assert pipeline["normalize"] is spec["normalize"]
    assert pipeline["dimensions"] == served.st.get_embedding_dimension()
    assert [d["out_features"] for d in pipeline["dense"]] == \
        ([spec["dense"]["out"]] if spec["dense"] else [])
    assert pipeline["include_prompt"] is spec.get("include_prompt", True)
    assert pipeline["default_prompt_name"] == spec.get("default_prompt", "")


def test_normalize_false_drops_the_models_normalize(served, probe_texts):
    """normalize=False with the model's pipeline: every module but Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    modules = [m for m in served.st if not isinstance(m, Normalize)]
    unnormalized = SentenceTransformer(modules=modules, device="cpu", prompts=served.st.prompts,
                                       default_prompt_name=served.st.default_prompt_name)
    got = served.client.embed(probe_texts[:8], normalize=False)
    np.testing.assert_allclose(got, unnormalized.encode(probe_texts[:8], convert_to_numpy=True),
                               rtol=0, atol=ATOL)


def test_explicit_pooling_is_raw_and_skips_dense(served, probe_texts):
    """An explicit pooling: the raw masked mean of the last layer, the model's Dense and its
    default prompt not applied, not normalized."""
    import torch

    transformer = served.st[0]
    texts = probe_texts[:8]
    got = served.client.embed(texts, pooling="mean")
    rows = []
    for text in texts:
        features = transformer.preprocess([text])
        with torch.inference_mode():
            tokens = transformer(features)["token_embeddings"][0]
        rows.append(tokens.mean(0).numpy())
    assert got.shape == (len(texts), served.engine.hidden_size)
    np.testing.assert_allclose(got, np.stack(rows), rtol=0, atol=ATOL)


# ---------------------------------------------------------------- prompts by name

@pytest.fixture(scope="module")
def distilbert(folders):
    """The model with prompts, a default prompt and include_prompt false."""
    model = Served(folders["distilbert"])
    yield model
    model.close()


def test_prompt_names_and_the_default_prompt(distilbert, probe_texts):
    client, st = distilbert.client, distilbert.st
    texts = probe_texts[:12]
    for name in PROMPTS:
        np.testing.assert_allclose(client.embed(texts, prompt_name=name),
                                   st.encode(texts, prompt_name=name, convert_to_numpy=True),
                                   rtol=0, atol=ATOL)
    # The default prompt ("query") applies when none is named; an empty prompt turns it off.
    np.testing.assert_allclose(client.embed(texts), client.embed(texts, prompt_name="query"),
                               rtol=0, atol=0)
    np.testing.assert_allclose(client.embed(texts, prompt=""),
                               st.encode(texts, prompt="", convert_to_numpy=True),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("options, message", [
    (dict(prompt_name="nope"), "prompt_name: 'nope' is not one of this model's prompts"),
    (dict(prompt_name="query", prompt="x: "), "send one or the other, not both"),
    (dict(prompt="word " * MAX_SEQ_LENGTH), "leave no room for the text"),
    (dict(prompt="word " * 100_000), "500,000 characters leave no room"),
    (dict(layers=[1]), "name a pooling to use other layers"),
    (dict(pooling="mean", layers=[-1] * 4), "over the 3 hidden states"),
])
def test_bad_prompt_and_pipeline_options_are_refused(distilbert, options, message):
    with pytest.raises(grpc.RpcError) as info:
        distilbert.client.embed(["text"], **options)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_unknown_prompt_lists_the_valid_names(distilbert):
    with pytest.raises(grpc.RpcError) as info:
        distilbert.client.embed(["text"], prompt_name="nope")
    assert all(repr(name) in info.value.details() for name in PROMPTS)


def test_lower_casing_follows_the_model(folders):
    """RoBERTa's tokenizer is cased; its sentence_bert_config.json says do_lower_case."""
    model = Served(folders["roberta"])
    try:
        np.testing.assert_allclose(model.client.embed(["CAPITALS and MiXeD Case"]),
                                   model.client.embed(["capitals and mixed case"]), rtol=0, atol=0)
    finally:
        model.close()


def test_embed_command_takes_the_model_options(distilbert, probe_texts, tmp_path):
    from bertstream.client.cli import main

    texts = [t for t in probe_texts if "\n" not in t][:30]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    status = main(["embed", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.npy"),
                   "--server", distilbert.server.target, "--prompt-name", "passage",
                   "--dimensions", "16", "--no-progress"])
    assert status == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               distilbert.client.embed(texts, prompt_name="passage",
                                                       dimensions=16), rtol=0, atol=ATOL)


def test_stream_and_async_client_take_the_model_options(distilbert, probe_texts):
    import asyncio

    from bertstream.client import AsyncClient

    texts = probe_texts[:20]
    expected = distilbert.client.embed(texts, prompt_name="passage", dimensions=16)
    streamed = np.concatenate(list(distilbert.client.stream(
        texts, batch_size=7, prompt_name="passage", dimensions=16)))
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=1e-6)  # other batches: float noise

    async def run():
        async with AsyncClient(distilbert.server.target) as client:
            return await client.embed(texts, prompt_name="passage", dimensions=16)
    np.testing.assert_allclose(asyncio.run(run()), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- folders without ST files, and refusals

def test_plain_transformers_folder_gets_masked_mean(folders, probe_texts):
    """The encoder's own folder (no modules.json): unnormalized masked mean, and Info says so."""
    model = Served(folders["bert"].parent / "hf")
    try:
        assert model.client.info()["pipeline"]["source"] == "default"
        np.testing.assert_array_equal(model.client.embed(probe_texts[:8]),
                                      model.client.embed(probe_texts[:8], pooling="mean"))
    finally:
        model.close()


def _serve_fails(*args: str) -> str:
    """`bertstream serve` that must fail at start: its one-line reason on standard error."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as output:
        process = ServerProcess(["serve", "--port", "0", "--device", TEST_DEVICE, *args],
                                output.name)
        assert process.wait(timeout=120) != 0
        return output.read()


def test_an_unimplemented_module_stops_the_server_by_name(folders, tmp_path):
    folder = tmp_path / "with-layernorm"
    shutil.copytree(folders["bert"], folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm",
                       "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    stderr = _serve_fails("--model", str(folder))
    assert "'sentence_transformers.models.LayerNorm'" in stderr
    assert "does not implement" in stderr


def test_max_length_over_the_position_embeddings_is_refused_at_start(folders):
    # RoBERTa numbers positions from padding_idx + 1: 64 usable of its 66 embeddings.
    stderr = _serve_fails("--model", str(folders["roberta"]), "--max-length", "65")
    assert "--max-length 65 is outside 2..64" in stderr


def test_hub_id_finds_its_sentence_transformers_files_in_the_cache(folders, tmp_path,
                                                                   monkeypatch):
    """A hub id served from the local cache (no network) gets its pipeline, not masked mean."""
    from huggingface_hub import constants

    repo = tmp_path / "models--tiny--bert-cls"
    shutil.copytree(folders["bert"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    from bertstream.server.engine import Engine

    engine = Engine("tiny/bert-cls", device="cpu")
    assert engine.pipeline.pooling == ("cls",) and engine.pipeline.normalizes


def test_a_module_path_that_leaves_the_folder_is_refused(folders, tmp_path):
    """modules.json paths with ../ were followed outside the model folder."""
    folder = tmp_path / "escaping"
    shutil.copytree(folders["bert"], folder)
    shutil.copytree(folder / "1_Pooling", tmp_path / "outside")
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["path"] = "../outside"
    (folder / "modules.json").write_text(json.dumps(modules))
    stderr = _serve_fails("--model", str(folder))
    assert "module path '../outside' leaves the model folder" in stderr


def test_a_config_too_big_for_memory_is_refused_before_loading(folders, tmp_path):
    """num_hidden_layers: 100000 loaded for minutes, past 2 GB and climbing, with no error."""
    folder = tmp_path / "huge"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=100_000, hidden_size=4096, intermediate_size=16384,
                  num_attention_heads=64)
    (folder / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    stderr = _serve_fails("--model", str(folder))
    assert "num_hidden_layers 100000" in stderr and "GiB of weights, more than" in stderr
    assert time.monotonic() - started < 60


def test_added_token_ids_past_the_vocabulary_are_refused(folders, tmp_path):
    """A tokenizer whose added ids run past the embeddings started without complaint."""
    folder = tmp_path / "overflowing"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": config["vocab_size"] + 5, "content": "[FAR]",
                                      "single_word": False, "lstrip": False, "rstrip": False,
                                      "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    stderr = _serve_fails("--model", str(folder))
    assert "'[FAR]'" in stderr
    assert f"past the model's vocabulary (vocab_size {config['vocab_size']})" in stderr


def test_tokenize_locally_equals_server_tokenized(served, probe_texts):
    """Client(tokenize_locally=True) sends token ids from the server's own tokenizer: every
    option's vectors equal the server-tokenized ones (the long text cut, prompts by name, as
    free text and by default, prompt tokens left out of pooling where the model says so,
    token-level output, a stream), and usage counts the same tokens and cut texts."""
    from bertstream.client.core import build_request

    options = [{}, {"prompt": "query: "}, {"pooling": "mean", "normalize": True},
               {"dimensions": 8}]
    if served.engine.pipeline.prompts:
        options.append({"prompt_name": sorted(served.engine.pipeline.prompts)[-1]})
    with Client(served.server.target, timeout=120, tokenize_locally=True) as local:
        request = local._prepared(build_request(probe_texts[:3]))
        assert not request.texts and len(request.token_lengths) == 3  # ids, not texts
        longest = max(probe_texts, key=len)  # sent cut to one over the max, not whole
        assert local._prepared(build_request([longest])).token_lengths[0] == \
            served.engine.max_length + 1
        for option in options:
            got = local.embed(probe_texts, **option)
            expected = served.client.embed(probe_texts, **option)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=str(option))
            ours, theirs = local.last_usage, served.client.last_usage
            assert (ours.tokens, ours.truncated_items) == (theirs.tokens, theirs.truncated_items)
        assert served.client.last_usage.truncated_items >= 1
        for got, expected in zip(local.embed_tokens(probe_texts, prompt="query: "),
                                 served.client.embed_tokens(probe_texts, prompt="query: ")):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        streamed = np.concatenate(list(local.stream(probe_texts, batch_size=8, window=2)))
        np.testing.assert_allclose(streamed, served.client.embed(probe_texts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ARCHITECTURES + ["all-MiniLM-L6-v2"])
def test_bert_layers_compute_real_tokens_only_and_keep_every_hidden_state(folders, name):
    """server/unpadded.py: within the engine's real_tokens (as Engine.forward calls the model),
    a padded batch's every hidden state equals the model's own forward pass on its real tokens
    (1e-5: a matrix product's rounding depends on its row count, up to a few 1e-6 at MiniLM's
    width), and the padding is not computed (zero); other architectures' layers are left as
    they are, and so is every call made without real_tokens (another caller's own mask)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bertstream.server import unpadded
    from bertstream.server.engine import default_model_path, load_encoder

    folder = str(folders.get(name) or default_model_path())
    ours, attention = load_encoder(folder, local=True, dtype=torch.float32)
    kept = {} if attention == "default" else {"attn_implementation": attention}
    theirs = AutoModel.from_pretrained(folder, dtype=torch.float32, **kept)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["a", "a somewhat longer text, to pad the others", "two words",
             "Paris is the capital of France, and its largest city by far.", "日本語の文章",
             "The quick brown fox jumps over the lazy dog " * 3, "ok", "Привет, мир!"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        with unpadded.real_tokens(real.numpy(), torch.device("cpu")):
            got = ours(**batch, output_hidden_states=True).hidden_states
        want = theirs(**batch, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for layer, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a[real], b[real], atol=1e-5, rtol=0), layer
    unpadded_layers = name in ("bert", "roberta", "all-MiniLM-L6-v2")
    assert unpadded.installed(ours) == unpadded_layers
    assert bool((got[-1][~real] == 0).all()) == unpadded_layers
    # Without real_tokens, or within them for another shape, a layer runs as it was: a causal
    # mask (not padding) gives the stock output.
    rows, longest = real.shape
    causal = torch.tril(torch.ones(longest, longest, dtype=torch.bool))
    masked = {**batch, "attention_mask": causal[None, None].expand(rows, 1, longest, longest)
              & real[:, None, None, :]}
    with torch.inference_mode():
        want = theirs(**masked).last_hidden_state
        alone = ours(**masked).last_hidden_state
        with unpadded.real_tokens(np.array([[1, 0, 0], [1, 1, 0]], bool), torch.device("cpu")):
            other = ours(**masked).last_hidden_state
    for got in (alone, other):
        assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)


def test_the_engine_s_forward_pass_skips_the_padding(engine):
    """Engine.forward tells the layers its batch's real tokens: a padded batch's padding is not
    computed (zero in the last layer), and each text's normalized vector is what it is alone
    (1e-6)."""
    import numpy as np

    texts = ["short", "a much longer text than the other one, to pad it well beyond a few percent"]
    ids = engine.tokenize(texts).ids
    hidden, lengths = engine.forward(ids)
    last = hidden[-1].float().cpu().numpy()
    assert lengths[0] < lengths[1] and not last[0, lengths[0]:].any()
    options = engine.options()  # the model's own pipeline: normalized vectors
    together = engine.pool(hidden, lengths, np.arange(2), options)
    for row, text in enumerate(texts):
        hidden, lengths = engine.forward(engine.tokenize([text]).ids)
        alone = engine.pool(hidden, lengths, np.arange(1), options)[0]
        np.testing.assert_allclose(together[row], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_half_precision_passes_are_float32_within_their_precision(engine, corpus, dtype,
                                                                  tolerance):
    """--dtype float16 (a GPU's default) and bfloat16: the model's own normalized vectors of
    corpus texts, padded and unpadded layers and pooling from half-precision hidden states,
    against float32's (here 2.7e-4 and 2.2e-3 apart at most, on the CPU)."""
    from bertstream.server.engine import Engine

    half = Engine(device=TEST_DEVICE, dtype=dtype)
    texts = list(corpus[:32])
    vectors = {}
    for model in (engine, half):
        hidden, lengths = model.forward(model.tokenize(texts).ids)
        vectors[model] = model.pool(hidden, lengths, np.arange(len(texts)), model.options())
    assert vectors[half].dtype == np.float32
    np.testing.assert_allclose(vectors[half], vectors[engine], rtol=0, atol=tolerance)
