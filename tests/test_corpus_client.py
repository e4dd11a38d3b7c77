"""Corpus-scale client: `bertstream embed`, resume, replicas, AsyncClient, the simpletransformers
drop-in.

What these check is the client's (every row once, in order, equal to the server's own answer;
resume; errors), not the model's: the server here serves conftest's fleet_model
(all-MiniLM-L6-v2 cut to one layer), a sixth of the forward passes. The drop-in, compared with
simpletransformers on all-MiniLM-L6-v2 itself, has a server of that.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bertstream.client import AsyncClient, Client, RepresentationModel
from bertstream.client.cli import main as embed_main
from tests.conftest import TEST_LIMITS, ServerThread, free_port, serve_processes


@pytest.fixture(scope="module")
def server(fleet_engine):
    from bertstream.server.limits import Limits

    running = ServerThread(fleet_engine, Limits(**TEST_LIMITS))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def minilm_server(engine):
    """A server of all-MiniLM-L6-v2 itself: for the drop-in, and for the runs a test interrupts
    (on the one-layer model they can end before the interruption lands)."""
    from bertstream.server.limits import Limits

    running = ServerThread(engine, Limits(**TEST_LIMITS))
    yield running
    running.stop()


def run_cli(*args) -> int:
    return embed_main(["embed", *map(str, args), "--no-progress"])


def read_output(path) -> np.ndarray:
    if str(path).endswith(".npy"):
        return np.load(path)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column("id").to_pylist() == list(range(table.num_rows))
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def texts(corpus):
    return list(corpus[:150]) + ["", "  leading spaces", "ünïcödé ✓"]


@pytest.fixture(scope="module")
def expected(client, texts):
    return client.embed(texts)


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("output", ["out.npy", "out.parquet"])
@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_every_input_and_output_format(server, tmp_path, texts, expected, fmt, output):
    if fmt == "text":
        source = tmp_path / "in.txt"
        source.write_text("\n".join(texts) + "\n", encoding="utf-8")
        extra = []
    elif fmt == "jsonl":
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)),
                          encoding="utf-8")
        extra = ["--field", "body"]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "in.parquet"
        pq.write_table(pa.table({"doc": texts}), source, row_group_size=40)
        extra = ["--field", "doc"]
    assert run_cli(source, "-o", tmp_path / output, "--server", server.target,
                   "--batch-size", 16, *extra) == 0
    np.testing.assert_allclose(read_output(tmp_path / output), expected, atol=1e-4)


def test_embed_command_tokenizes_locally_to_the_same_vectors(server, tmp_path, texts,
                                                            expected):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert run_cli(source, "-o", tmp_path / "local.npy", "--server", server.target,
                   "--tokenize-locally") == 0
    np.testing.assert_allclose(read_output(tmp_path / "local.npy"), expected, rtol=0, atol=1e-6)


def test_standard_input_and_options(server, tmp_path, texts, client):
    process = subprocess.run(
        [sys.executable, "-m", "bertstream.server.cli", "embed", "-", "-o", tmp_path / "s.npy",
         "--server", server.target, "--normalize", "--pooling", "max", "--layers", "0", "-1"],
        input="\n".join(texts[:20]), text=True, capture_output=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "embedded 20 texts" in process.stderr and "tokens/s" in process.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "s.npy"),
        client.embed(texts[:20], pooling="max", layers=(0, -1), normalize=True), atol=1e-4)


@pytest.mark.parametrize("setup, message, status", [
    (lambda d: (d / "missing.txt", []), "no such file", 2),
    (lambda d: ((d / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n') and d / "bad.jsonl",
                []), "bad.jsonl:2: not JSON", 2),
    (lambda d: ((d / "f.jsonl").write_text('{"other": "x"}\n') and d / "f.jsonl", []),
     "no field 'text'", 2),
    (lambda d: ((d / "x.txt").write_text("a\n") and d / "x.txt", ["-o", d / "out.csv"]),
     "must end in .npy or .parquet", 2),
    (lambda d: ((d / "y.txt").write_text("a\n") and d / "y.txt", ["--server", "127.0.0.1:1"]),
     "UNAVAILABLE", 1),
])
def test_errors_are_one_line_and_nonzero(server, tmp_path, setup, message, status, capsys):
    source, extra = setup(tmp_path)
    args = [source, "-o", tmp_path / "out.npy", *extra]
    if "--server" not in extra:
        args += ["--server", server.target]
    assert run_cli(*args) == status
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------- resume

RESUMED_TEXTS = 300


@pytest.fixture(scope="module")
def uninterrupted(minilm_server, tmp_path_factory, corpus):
    """An uninterrupted run's input and output, once for every interruption below."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    source = folder / "in.txt"
    source.write_text("\n".join(corpus[i % len(corpus)] for i in range(RESUMED_TEXTS)) + "\n",
                      encoding="utf-8")
    assert run_cli(source, "-o", folder / "whole.npy", "--server", minilm_server.target) == 0
    return source, read_output(folder / "whole.npy")


@pytest.mark.parametrize("output, stop", [("r.npy", signal.SIGKILL),
                                          ("r.parquet", signal.SIGKILL),
                                          ("r.npy", signal.SIGINT)])  # Ctrl-C
def test_resume_after_interruption_equals_uninterrupted_run(minilm_server, tmp_path,
                                                            uninterrupted, output, stop):
    source, whole = uninterrupted
    # Stop it once it has committed some rows, at a random moment after that. On a fast machine
    # the rest can be done before the stop lands (the last 200 rows in 0.1-0.3 s): a try that
    # stopped no run, or one whose rows were all committed, is made again, stopping sooner.
    for attempt in range(5):
        target = tmp_path / f"try{attempt}" / output
        target.parent.mkdir()
        process, err = run_and_stop(source, target, minilm_server.target, stop,
                                    random.uniform(0, 0.2) / 4 ** attempt)
        interrupted_at = committed_rows(target)
        if process.returncode != 0 and interrupted_at < RESUMED_TEXTS:
            break
    assert 0 < interrupted_at < RESUMED_TEXTS, "the stop did not interrupt the run"
    if stop == signal.SIGINT:
        assert process.returncode == 130, err
        assert "interrupted with" in err and "--resume" in err and "Traceback" not in err
    assert run_cli(source, "-o", target, "--server", minilm_server.target, "--resume") == 0
    resumed = read_output(target)
    assert resumed.shape == whole.shape == (RESUMED_TEXTS, 384)
    np.testing.assert_allclose(resumed, whole, atol=1e-4)


def run_and_stop(source, target, server_target, stop, delay: float):
    """`bertstream embed` of source into target, sent `stop` `delay` seconds after its first
    committed rows; its process and its stderr."""
    command = [sys.executable, "-m", "bertstream.server.cli", "embed", str(source), "-o",
               str(target), "--server", server_target, "--batch-size", "32", "--window",
               "4", "--no-progress"]
    if target.suffix == ".parquet":
        command += ["--commit-rows", "50"]  # small parts, so the kill lands between commits
    # SIGINT at its default in the child: a suite started in the background (`make test &`)
    # ignores it, and the child would inherit that and never see the Ctrl-C.
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while committed_rows(target) == 0 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    return process, err


def committed_rows(path) -> int:
    """Rows an interrupted run has committed, read without touching the output."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r").shape[0]
        except (OSError, ValueError, EOFError):  # not written yet
            return 0
    import pyarrow.parquet as pq

    parts = Path(str(path) + ".parts")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts.glob("part-*.parquet"))


@pytest.mark.parametrize("output", ["f.npy", "f.parquet"])
def test_a_run_that_failed_before_its_first_batch_resumes(server, tmp_path, texts, expected,
                                                          output):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    target = tmp_path / output
    assert run_cli(source, "-o", target, "--server", "127.0.0.1:1") == 1  # server down
    assert run_cli(source, "-o", target, "--server", server.target, "--resume") == 0
    np.testing.assert_allclose(read_output(target), expected, atol=1e-4)


def test_a_run_of_zero_rows_can_be_resumed_into(server, tmp_path, texts, expected):
    empty, full = tmp_path / "empty.txt", tmp_path / "in.txt"
    empty.write_text("", encoding="utf-8")
    full.write_text("\n".join(texts) + "\n", encoding="utf-8")
    target = tmp_path / "z.npy"
    assert run_cli(empty, "-o", target, "--server", server.target) == 0
    assert np.load(target).shape == (0, 0)
    assert run_cli(full, "-o", target, "--server", server.target, "--resume") == 0
    np.testing.assert_allclose(np.load(target), expected, atol=1e-4)


def test_npy_shorter_than_its_header_counts_only_complete_rows(tmp_path):
    """After an OS crash the header may count rows whose bytes never reached the disk: they are
    not committed (and never padded with zeros)."""
    from bertstream.client.corpus_io import NpyWriter

    path = tmp_path / "c.npy"
    writer = NpyWriter(str(path), resume=False)
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    writer.append(rows)
    writer.close()
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 4 * 4 - 3)  # the last row and a bit more lost
    resumed = NpyWriter(str(path), resume=True)
    assert resumed.rows == 8
    resumed.append(rows[8:])
    resumed.close()
    np.testing.assert_array_equal(np.load(path), rows)


def test_parquet_crash_inside_close_does_not_count_rows_twice(tmp_path):
    """close() wrote the whole file, then died before deleting its parts: resume must count the
    file's rows once."""
    from bertstream.client.corpus_io import ParquetWriter

    path = str(tmp_path / "p.parquet")
    writer = ParquetWriter(path, resume=False, commit_rows=2)
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    for i in range(0, 6, 2):
        writer.append(rows[i:i + 2])
    kept = {p.name: p.read_bytes() for p in writer._part_files()}
    writer.close()
    parts = Path(path + ".parts")
    parts.mkdir()
    for name, data in kept.items():  # as if the deletions after the final rename never ran
        if name != min(kept):
            (parts / name).write_bytes(data)
    resumed = ParquetWriter(path, resume=True, commit_rows=2)
    assert resumed.rows == 6
    resumed.close()
    np.testing.assert_array_equal(read_output(path), rows)


def test_a_bare_carriage_return_stays_inside_its_line(server, tmp_path, client):
    lines = ["first\rstill the first", "second", "third\r"]
    source = tmp_path / "cr.txt"
    source.write_bytes(("\n".join(lines) + "\r\n").encode())  # the last line ends in \r\n
    assert run_cli(source, "-o", tmp_path / "cr.npy", "--server", server.target) == 0
    got = np.load(tmp_path / "cr.npy")
    assert got.shape[0] == 3
    np.testing.assert_allclose(got, client.embed(["first\rstill the first", "second", "third"]),
                               atol=1e-4)


def test_resume_of_a_finished_file_adds_nothing(server, tmp_path, texts):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts[:40]) + "\n", encoding="utf-8")
    out = tmp_path / "o.npy"
    assert run_cli(source, "-o", out, "--server", server.target) == 0
    first = np.load(out)
    assert run_cli(source, "-o", out, "--server", server.target, "--resume") == 0
    np.testing.assert_array_equal(np.load(out), first)


def _untouched(paths) -> dict:
    return {path: path.read_bytes() for path in paths if path.exists()}


@pytest.mark.parametrize("output", ["m.npy", "m.parquet"])
@pytest.mark.parametrize("change, message", [
    ("other input", "input: "),
    ("--pooling cls", "--pooling: None then, 'cls' now"),
    ("--normalize", "--normalize: None then, True now"),
    ("input shrunk", "input size (bytes)"),
    ("first texts edited", "first 10 texts differ"),
    ("no record", "no record of the run"),
])
def test_a_resume_that_is_not_the_same_run_is_refused(server, tmp_path, texts, capsys,
                                                      monkeypatch, output, change, message):
    """Resumed with another input, other options or an input that changed, `--resume` once
    exited 0 with the rows of two runs mixed: now it exits 2 naming what differs, and leaves
    the output (and its record) as they were."""
    from bertstream.client import run_record

    monkeypatch.setattr(run_record, "HASHED_TEXTS", 10)
    source, other = tmp_path / "a.txt", tmp_path / "b.txt"
    source.write_text("\n".join(texts[:40]) + "\n", encoding="utf-8")
    other.write_text("\n".join(texts[40:80]) + "\n", encoding="utf-8")
    target = tmp_path / output
    assert run_cli(source, "-o", target, "--server", server.target, "--batch-size", 8) == 0
    extra = []
    if change == "other input":
        source = other
    elif change.startswith("--"):
        extra = change.split()
    elif change == "input shrunk":
        source.write_text("\n".join(texts[:20]) + "\n", encoding="utf-8")
    elif change == "first texts edited":
        first = texts[0]
        edited = first[::-1] if len(set(first)) > 1 else first + "x"  # the same size
        source.write_text("\n".join([edited[:len(first)]] + texts[1:40]) + "\n",
                          encoding="utf-8")
    else:
        run_record.record_path(str(target)).unlink()
    kept = _untouched([target, run_record.record_path(str(target))])
    capsys.readouterr()
    assert run_cli(source, "-o", target, "--server", server.target, "--resume", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "--resume" in err and len(err.splitlines()) == 1, err
    assert _untouched(kept) == kept


def test_a_resume_with_more_rows_than_its_input_is_refused(server, tmp_path, texts, capsys,
                                                           monkeypatch):
    """Standard input cannot be counted ahead: the committed rows are skipped first, and an
    input that ends before them is refused (once 3,000 rows resumed against 500 lines exited 0,
    "embedded 0 texts")."""
    import io

    from bertstream.client import run_record

    monkeypatch.setattr(run_record, "HASHED_TEXTS", 10)
    target = tmp_path / "s.npy"

    def from_stdin(lines, *extra):
        monkeypatch.setattr(sys, "stdin", type("Stdin", (), {
            "buffer": io.BytesIO(("\n".join(lines) + "\n").encode())})())
        return run_cli("-", "-o", target, "--server", server.target, *extra)

    assert from_stdin(texts[:40]) == 0
    kept = _untouched([target])
    capsys.readouterr()
    assert from_stdin(texts[:25], "--resume") == 2  # the same first texts, fewer of them
    err = capsys.readouterr().err
    assert "holds 40 rows, more than the 25 texts" in err, err
    assert _untouched(kept) == kept


def test_a_lone_surrogate_in_json_lines_is_an_input_error(server, tmp_path, capsys):
    source = tmp_path / "s.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "abc\\ud800"}\n', encoding="utf-8")
    assert run_cli(source, "-o", tmp_path / "o.npy", "--server", server.target) == 2
    err = capsys.readouterr().err.strip()
    assert "s.jsonl:2: field 'text' holds a lone surrogate" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- replicas

def _served(metrics_port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    return sum(s.value for family in text_string_to_metric_families(text.decode())
               for s in family.samples
               if s.name == "bertstream_texts_total" and s.labels.get("code") == "OK")


def test_three_replicas_share_work_and_survive_one_dying(tmp_path, corpus, fleet_model,
                                                          client):
    metrics_ports = [free_port() for _ in range(3)]
    replicas = [(process, target, metrics) for (process, target), metrics in zip(
        serve_processes(3, "--model", str(fleet_model), "--threads", "1", "--log-level",
                        "WARNING", each=[("--metrics-port", str(m)) for m in metrics_ports]),
        metrics_ports)]
    try:
        texts = [corpus[i % len(corpus)] for i in range(360)]  # 18 messages
        expected = client.embed(texts)  # the module's own server, of the same model
        results, killed_at = [], None
        with Client([target for _, target, _ in replicas], timeout=120) as spread:
            for i, part in enumerate(spread.stream(texts, batch_size=20, window=9)):
                results.append(part)
                # Once every replica has served (round robin reaches each as it connects),
                # kill one mid-job.
                if killed_at is None and all(_served(m) > 0 for _, _, m in replicas):
                    replicas[0][0].send_signal(signal.SIGKILL)
                    killed_at = i
        assert killed_at is not None and killed_at < 12, "not every replica received work"
        vectors = np.concatenate(results)
        assert vectors.shape == (360, 384)  # nothing lost, nothing duplicated
        # Rows are in input order, whichever replica computed them, before or after the kill.
        np.testing.assert_allclose(vectors, expected, atol=1e-4)  # every row, resent or not
    finally:
        for process, _, _ in replicas:
            process.kill()
            process.wait()


def test_a_replica_that_stops_answering_without_a_reset_is_left_behind(tmp_path, corpus,
                                                                       fleet_model, client):
    """SIGSTOP: the replica's sockets stay open and silent (as after a power cut or a network
    partition). Client keepalive notices within seconds and its messages go to the other."""
    replicas = serve_processes(2, "--model", str(fleet_model), "--threads", "1",
                               "--log-level", "WARNING")
    texts = list(corpus[:200])
    try:
        expected = client.embed(texts)  # the module's own server, of the same model
        results, stopped = [], None
        started = time.perf_counter()
        with Client([target for _, target in replicas], timeout=300) as spread:
            for i, part in enumerate(spread.stream(texts, batch_size=10, window=6)):
                results.append(part)
                if i == 2:
                    replicas[0][0].send_signal(signal.SIGSTOP)
                    stopped = time.perf_counter()
        assert stopped is not None
        np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-4)
        # Noticed within keepalive time + timeout (5-10 s here), not gRPC's default 60 s ping
        # timeout, nor the many minutes the OS takes to give up on a silent connection.
        assert time.perf_counter() - started < 40
    finally:
        for process, _ in replicas:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()


class StuckEngine:
    """The real engine, whose forward passes wait until `release` is set (a wedged server)."""

    def __init__(self, engine):
        self._engine, self.release = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward(self, ids):
        self.release.wait(60)
        return self._engine.forward(ids)


def test_embed_command_gives_up_on_a_server_that_never_answers(engine, tmp_path, texts, capsys):
    from bertstream.server.limits import Limits

    stuck = StuckEngine(engine)
    stuck.release.set()  # let the warm-up through
    server = ServerThread(stuck, Limits())
    stuck.release.clear()
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts[:20]) + "\n", encoding="utf-8")
    try:
        started = time.perf_counter()
        assert run_cli(source, "-o", tmp_path / "t.npy", "--server", server.target,
                       "--timeout", "2") == 1
        assert time.perf_counter() - started < 30
        err = capsys.readouterr().err
        assert "DEADLINE_EXCEEDED" in err and "no answer within 2" in err and "--resume" in err
    finally:
        stuck.release.set()
        server.stop()


# ---------------------------------------------------------------- asyncio client

def test_async_client_matches_blocking_client(server, client, texts):
    async def main():
        async with AsyncClient(server.target, timeout=120) as aclient:
            vectors = await aclient.embed(texts[:10], normalize=True)
            tokens = await aclient.embed_tokens(texts[:3])
            parts = [p async for p in aclient.stream(texts, batch_size=25, window=3)]

            async def agen():
                for t in texts[:30]:
                    yield t
            async_parts = [p async for p in aclient.stream(agen(), batch_size=7)]
            spread = [p async for p in aclient.stream(texts[:30], batch_size=7, spread=True)]
            info = await aclient.info()
            pieces = await aclient.tokenize(["hello world"])
            concat = await aclient.encode_sentences(texts[:4], combine_strategy="concat")
            return vectors, tokens, parts, async_parts, spread, info, pieces, concat

    vectors, tokens, parts, async_parts, spread, info, pieces, concat = asyncio.run(main())
    np.testing.assert_allclose(vectors, client.embed(texts[:10], normalize=True), atol=1e-5)
    for got, want in zip(tokens, client.embed_tokens(texts[:3])):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(parts), client.embed(texts), atol=1e-4)
    np.testing.assert_allclose(np.concatenate(async_parts), client.embed(texts[:30]), atol=1e-4)
    np.testing.assert_allclose(np.concatenate(spread), client.embed(texts[:30]), atol=1e-4)
    assert info == client.info() and pieces == client.tokenize(["hello world"])
    np.testing.assert_allclose(concat, client.encode_sentences(texts[:4], "concat"), atol=1e-5)


# ---------------------------------------------------------------- simpletransformers drop-in

SENTENCES = ["This is a sample sentence.", "Another sentence for embedding.",
             "The quick brown fox jumps over the lazy dog.", "Hi"]


@pytest.fixture(scope="module")
def simpletransformers_model():
    representation = pytest.importorskip("simpletransformers.language_representation")
    from bertstream.server.engine import default_model_path

    # do_lower_case set to match this uncased model (simpletransformers' default False would
    # override the tokenizer and feed [UNK] for capitalised words).
    return representation.RepresentationModel("bert", default_model_path(), use_cuda=False,
                                              args={"do_lower_case": True})


@pytest.fixture(scope="module")
def drop_in(minilm_server):
    return RepresentationModel("bert", "all-MiniLM-L6-v2", use_cuda=False,
                               target=minilm_server.target)


@pytest.mark.parametrize("strategy", [None, "mean", "concat", 0, -1, 2])
def test_drop_in_has_simpletransformers_shapes(simpletransformers_model, drop_in, strategy):
    theirs = simpletransformers_model.encode_sentences(SENTENCES, combine_strategy=strategy,
                                                       batch_size=32)
    ours = drop_in.encode_sentences(SENTENCES, combine_strategy=strategy, batch_size=32)
    assert ours.shape == theirs.shape and ours.dtype == np.float32


def test_drop_in_equals_simpletransformers_where_it_is_right(simpletransformers_model, drop_in):
    st = simpletransformers_model.encode_sentences
    np.testing.assert_allclose(drop_in.encode_sentences(SENTENCES, 0), st(SENTENCES, 0),
                               atol=1e-4)
    alone = np.concatenate([st([s], "mean", batch_size=1) for s in SENTENCES])
    ours = drop_in.encode_sentences(SENTENCES, "mean")
    np.testing.assert_allclose(ours, alone, atol=1e-4)
    # ... and masked where it is not: its batched mean averages [PAD] positions into "Hi".
    batched = st(SENTENCES, "mean", batch_size=4)
    short = SENTENCES.index("Hi")
    cos = batched[short] @ ours[short] / np.linalg.norm(batched[short]) / np.linalg.norm(ours[short])
    assert cos < 0.99
    np.testing.assert_allclose(batched[2], ours[2], atol=1e-4)  # the longest: no padding
    # index -1: theirs is a [PAD] position for every shorter text, ours each text's [SEP]
    tokens = drop_in.client.embed_tokens(SENTENCES)
    np.testing.assert_allclose(drop_in.encode_sentences(SENTENCES, -1),
                               np.stack([t[-1] for t in tokens]), atol=1e-5)


def test_drop_in_reads_target_from_environment(server, monkeypatch):
    monkeypatch.setenv("BERTSTREAM_TARGET", server.target)
    model = RepresentationModel("bert", "all-MiniLM-L6-v2")
    assert model.target == server.target
    assert model.encode_sentences(["x"], combine_strategy="mean").shape == (1, 384)
