"""Hostile input against a real `bertstream serve` process with the default limits: the largest legal
requests, huge texts, a caller that never reads, floods, starvation, cancellation storms.

What must hold: no request within the default limits raises the server's peak RSS by more than
1 GB; requests over a limit are refused before any compute, by a status that names the limit; one
caller's huge messages delay another caller's small request by a batch or so, not by the backlog;
every accepted message is answered or gets a status. HOSTILE_REPORT holds the figures SECURITY.md
quotes (printed at the end of the run by conftest.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from bertstream.client import Client
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.limits import Limits
from tests.conftest import ServerThread, free_port, serve_process, serve_processes

GB = 2**30
HOSTILE_REPORT: dict[str, str] = {}


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.fixture(scope="module")
def served(fleet_model):
    """A server process with every limit at its default, HTTP on too; the baseline peak RSS after
    traffic. Its default model is all-MiniLM-L6-v2; beside it, "one-layer", the same cut to its
    first layer (conftest's fleet_model), for the tests whose point is not the model's work."""
    from bertstream.server.engine import default_model_path

    http_port = free_port()
    process, target = serve_process("--log-level", "WARNING", "--http-port", str(http_port),
                                    "--model", default_model_path(),
                                    "--model", f"one-layer={fleet_model}")
    with Client(target, timeout=120) as client:
        client.embed(["warm up a normal request"] * 64)
    yield SimpleNamespace(process=process, target=target, baseline=peak_rss(process.pid),
                          http=f"http://127.0.0.1:{http_port}")
    process.kill()
    process.wait()


def until_idle(pid: int, quiet: float = 0.5, most: float = 30.0) -> None:
    """Wait until the process has used (almost) no CPU for `quiet` seconds: it has done all it
    could and now waits (on a client that does not read, say); at most `most` seconds."""
    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    deadline, last = time.monotonic() + most, cpu()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu()
        if now - last < 0.1 * quiet:
            return
        last = now


def check_memory(served, what: str) -> None:
    grown = peak_rss(served.process.pid) - served.baseline
    HOSTILE_REPORT[what] = f"+{grown / 2**20:,.0f} MB"
    assert grown <= GB, f"{what}: peak RSS grew by {grown / 2**20:,.0f} MB"


def while_a_small_caller_calls(target: str, action, pause: float = 0.05):
    """action()'s result, and the latencies of the one-text Embed calls another caller made
    meanwhile (`pause` seconds apart)."""
    latencies, done = [], threading.Event()

    def small_caller():
        with Client(target, timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.embed(["a small request from someone else"])
                latencies.append(time.perf_counter() - started)
                time.sleep(pause)

    with ThreadPoolExecutor(1) as pool:
        small = pool.submit(small_caller)
        try:
            result = action()
        finally:
            done.set()
        small.result()
    return result, latencies


def post_json(url: str, body) -> tuple[int, bytes]:
    return post_raw(url, json.dumps(body).encode())


def post_raw(url: str, data: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_largest_legal_amplification(served):
    """Every hidden state, mean and max: 5,376 values per text, 1,500 texts, 32 MB out."""
    with Client(served.target, timeout=300) as client:
        vectors = client.embed(["a"] * 1500, pooling="mean_max", layers=list(range(7)))
        assert vectors.shape == (1500, 7 * 384 * 2)
        with pytest.raises(grpc.RpcError) as info:  # 300 layers: refused, nothing computed
            client.embed(["a"] * 2000, pooling="mean", layers=[-1] * 300)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the 7 hidden states" in info.value.details()
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:  # 10,000 texts of it: over the response limit
            client.embed(["a"] * 10_000, pooling="mean_max", layers=list(range(7)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_response_bytes" in info.value.details()
        assert time.perf_counter() - started < 5  # refused before any compute
    check_memory(served, "amplification (1,500 texts x 7 layers x mean_max)")


def test_token_level_output_is_bounded_before_compute(served):
    long_text = "word " * 300  # 256 tokens after truncation
    with Client(served.target, timeout=300) as client:
        tokens = client.embed_tokens([long_text] * 150)  # 150 x 256 x 384 floats: 59 MB
        assert sum(len(t) for t in tokens) == 150 * 256
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            client.embed_tokens([long_text] * 2000)  # 787 MB of token vectors
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_response_bytes" in info.value.details() and "tokens" in info.value.details()
        assert time.perf_counter() - started < 5
    check_memory(served, "token-level output near the limit")


def test_huge_texts_do_not_starve_a_small_caller(served):
    """A stream sends 150 texts of 100,000 characters (15 MB, within the limits); meanwhile
    another caller's one-text requests are each answered within a couple of batches, not after
    the whole backlog (about 6 s of compute here)."""
    huge = ("lorem ipsum dolor sit amet " * 3704)[:100_000]
    with Client(served.target, timeout=600) as client:
        parts, latencies = while_a_small_caller_calls(
            served.target, lambda: list(client.stream(iter([huge] * 150), batch_size=150)))
    assert [len(p) for p in parts] == [150]
    assert client.last_usage.truncated_items == 150
    HOSTILE_REPORT["small request during 150 huge texts"] = (
        f"p50 {np.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"({len(latencies)} requests)")
    assert len(latencies) >= 5 and max(latencies) < 3.0, latencies
    check_memory(served, "150 texts of 100,000 characters")


def test_texts_without_spaces_are_cut_before_tokenizing(served):
    """100 texts of 100,000 Japanese characters (30 MB, within the limits): no whitespace to
    cut them at, so each was tokenized whole, 100,000 tokens and their overflow pieces (200 of
    them: 27 s and +2.7 GB in-process). Now each is cut at a word the tokenizer sees (one CJK character
    each), so the kept tokens are the same: each vector equals the one of its first 3,000
    characters (256 tokens either way), and another caller is answered meanwhile."""
    text = ("日本語の文章を埋め込む。" * 8334)[:100_000]
    with Client(served.target, timeout=120) as client:
        vectors, latencies = while_a_small_caller_calls(
            served.target, lambda: client.embed([text] * 100))
        assert client.last_usage.truncated_items == 100
        np.testing.assert_allclose(vectors, np.repeat(client.embed([text[:3000]]), 100, 0),
                                   rtol=0, atol=1e-6)
    HOSTILE_REPORT["small request during 100 texts of 100,000 CJK characters"] = (
        f"max {max(latencies) * 1000:.0f} ms ({len(latencies)} requests)")
    assert max(latencies) < 3.0, latencies
    check_memory(served, "100 texts of 100,000 CJK characters")


def test_a_word_that_cannot_be_cut_is_tokenized_alone(tiny_folders):
    """A byte-level BPE (RoBERTa's) sees a run of CJK letters without punctuation as one word:
    no cut point. 12 such texts of 100,000 characters were tokenized together and held +300 MB
    (+1.3 GB for 50); each is now tokenized alone and only its kept tokens stay. Measured in a
    process of its own (its peak RSS reset first), for embedding input and pair sides."""
    import subprocess
    import sys

    script = f"""
from bertstream.server.engine import Engine
engine = Engine({str(tiny_folders["roberta"])!r}, device="cpu", dtype="float32")
text = "日本語" * 33_334

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))

with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak (VmHWM) starts again from what is resident now
before = kib("VmRSS:")
ids = engine.tokenize([text] * 12).ids
sides = engine._side_ids([text] * 12, engine.max_length + 1)
assert {{len(row) for row in ids}} == {{engine.max_length}}, [len(row) for row in ids]
assert {{len(row) for row in sides}} == {{engine.max_length + 1}}
print((kib("VmHWM:") - before) * 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.split()[-1])
    HOSTILE_REPORT["12 uncuttable texts of 100,000 characters, tokenized"] = \
        f"+{grown / 2**20:,.0f} MB"
    assert grown < 200 * 2**20, f"peak RSS grew by {grown / 2**20:,.0f} MB"


@pytest.mark.parametrize("text", [
    "日本語の文章を埋め込む。" * 500,                  # CJK: a word a character
    "中文句子" * 300 + " then words " * 300,             # CJK, then whitespace past the limit
    ("abc" * 400 + "日本") * 5,                          # one long word up to the limit
], ids=["japanese", "chinese-then-words", "one-long-word"])
def test_a_cut_keeps_the_tokens_of_the_whole_text(engine, text):
    """The tokens kept from a text cut before tokenizing are those the tokenizer keeps from the
    whole text: as embedding input, and as either side of a cross-encoder pair."""
    from bertstream.server import engine as engine_module

    limit = engine.max_length * engine_module.CUT_CHARS_PER_TOKEN
    assert len(text) > limit
    whole = engine._truncating.encode(text).ids
    assert engine.tokenize([text]).ids[0].tolist() == whole
    side = engine._full.encode(text, add_special_tokens=False).ids[:engine.max_length + 1]
    assert engine._side_ids([text], engine.max_length + 1)[0].tolist() == side


def test_a_caller_that_never_reads_holds_bounded_memory(served):
    """64 messages whose answers are 32 MB each (2 GB in all), sent at once, answers never read:
    the stream's read-ahead stops at its byte budget."""
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        request = pb.EmbedRequest(texts=["a"] * 1500, pooling=pb.POOLING_MEAN_MAX,
                                  layers=list(range(7)))
        call = stub.EmbedStream(iter([request] * 64), timeout=300)
        time.sleep(1)
        until_idle(served.process.pid)  # it computes what its budget lets it read, then waits
        check_memory(served, "a stream of 2 GB of answers, never read")
        call.cancel()
    with Client(served.target, timeout=60) as client:
        assert client.embed(["still serving"]).shape == (1, 384)


HTTP_BODIES = {  # 50-60 MB each
    "HTTP strings": b'{"input":[' + b'"ab",' * 10_000_000 + b'"ab"]}',
    "HTTP numbers": b'{"input":[' + b"0," * 30_000_000 + b"0]}",
    "HTTP arrays": b'{"input":[' + b"[]," * 20_000_000 + b"[]]}",
}


TINY_VALUE_METHODS = ["Embed", "Tokenize", *HTTP_BODIES]


@pytest.fixture(scope="module")
def servers_of_their_own():
    """A fresh server (HTTP on) for each of TINY_VALUE_METHODS, all started together."""
    http_ports = [free_port() for _ in TINY_VALUE_METHODS]
    started = serve_processes(len(TINY_VALUE_METHODS), "--log-level", "WARNING",
                              each=[("--http-port", str(port)) for port in http_ports])
    yield {method: (process, target, port) for method, (process, target), port
           in zip(TINY_VALUE_METHODS, started, http_ports)}
    for process, _ in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize("method", TINY_VALUE_METHODS)
def test_millions_of_tiny_values_are_counted_before_they_are_copied(method,
                                                                    servers_of_their_own):
    """50-60 MB of two-character texts is 10-15 million texts, over max_texts_per_request:
    refused, having been counted where they lie (gRPC: in the request; HTTP: in the raw body,
    as are a body's other values). Copied into Python strings first, they took 1.7 GB (gRPC)
    and 1.0 GB (HTTP); parsed, 30 million numbers took 7 GB and 20 million empty arrays 4.6 GB
    (pydantic's error for each, per member of its union). (A server of its own: what the tests
    above left in its heap would add to the peak; gRPC's parse of the message alone takes
    ~600 MB.)"""
    process, target, http_port = servers_of_their_own[method]
    try:
        with Client(target, timeout=120) as client:
            client.embed(["warm up a normal request"] * 64)
        served = SimpleNamespace(process=process, baseline=peak_rss(process.pid))
        if method in HTTP_BODIES:
            status, body = post_raw(f"http://127.0.0.1:{http_port}/v1/embeddings",
                                    HTTP_BODIES[method])
            assert status == 413 and b"JSON" in body, body  # counted before the parse
        else:
            texts_field = {"Embed": b"\x12", "Tokenize": b"\x0a"}[method]  # field 2 and 1
            with grpc.insecure_channel(target) as channel:
                raw = channel.unary_unary(f"/bertstream.v1.Embedder/{method}")  # bytes in, out
                with pytest.raises(grpc.RpcError) as info:
                    raw((texts_field + b"\x02ab") * 15_000_000, timeout=120)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "15000000 texts" in info.value.details()
            assert "max_texts_per_request" in info.value.details()
        check_memory(served, f"millions of tiny values to {method}")
    finally:
        process.kill()
        process.wait()


def test_the_largest_tokenize_request_neither_stalls_nor_swells_the_server(served):
    """Tokenize of 10,000 texts of 256 tokens (a 15 MB request): 2.56 million tokens, answered
    over gRPC (43 MB), while another caller's one-text calls go on. Over HTTP the same answer is
    167 MB of JSON: refused past max_response_bytes. Both had been built whole on the event loop:
    the other caller waited 7-8 s, and the server's peak grew by over 1 GB."""
    texts = ["word " * 300] * 10_000
    with grpc.insecure_channel(served.target, options=[
            ("grpc.max_receive_message_length", 256 * 2**20)]) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        answer, latencies = while_a_small_caller_calls(
            served.target, lambda: stub.Tokenize(pb.TokenizeRequest(texts=texts), timeout=300))
    assert len(answer.texts) == 10_000 and {len(t.tokens) for t in answer.texts} == {256}
    assert answer.texts[-1].tokens[1].text == "word" and answer.texts[-1].truncated
    del answer
    HOSTILE_REPORT["small request during the largest Tokenize"] = (
        f"max {max(latencies) * 1000:.0f} ms ({len(latencies)} requests)")
    assert len(latencies) >= 5 and max(latencies) < 1.5, latencies
    (status, body), latencies = while_a_small_caller_calls(
        served.target, lambda: post_json(served.http + "/tokenize", {"inputs": texts}))
    assert status == 413 and b"max_response_bytes" in body, (status, body[:200])
    assert max(latencies) < 1.5, latencies
    check_memory(served, "the largest Tokenize (2.56 million tokens), gRPC and HTTP")


def test_a_json_answer_of_10000_vectors_does_not_stall_other_callers(served):
    """POST /v1/embeddings of 10,000 texts: 47 MB of JSON, encoded a piece at a time while the
    event loop serves the others. One json.dumps of it held the loop 3 s. (Of the one-layer
    model: the answer is as large, and its forward passes, which are not what is tested, cost
    a sixth.)"""
    (status, body), latencies = while_a_small_caller_calls(
        served.target, lambda: post_json(served.http + "/v1/embeddings",
                                         {"input": [f"text {i}" for i in range(10_000)],
                                          "model": "one-layer"}))
    assert status == 200
    data = json.loads(body)["data"]
    assert [item["index"] for item in data] == list(range(10_000))
    with Client(served.target, timeout=60) as client:
        np.testing.assert_allclose(np.array([data[0]["embedding"], data[-1]["embedding"]],
                                            dtype=np.float32),
                                   client.embed(["text 0", "text 9999"], model="one-layer"),
                                   rtol=0, atol=1e-5)
    HOSTILE_REPORT["small request during a 10,000-vector JSON answer"] = (
        f"max {max(latencies) * 1000:.0f} ms ({len(latencies)} requests)")
    assert len(latencies) >= 5 and max(latencies) < 1.5, latencies
    check_memory(served, "a 10,000-vector JSON answer")


# ---------------------------------------------------------------- admission, in-process


def _server(engine, **limits):
    from tests.conftest import TEST_LIMITS

    return ServerThread(engine, Limits(**{**TEST_LIMITS, **limits}))


def test_a_message_over_the_queue_limit_is_not_starved_by_unary_load(engine):
    """A 2,500-text stream message with room for 2,000: admitted once the pool empties, ahead of
    the unary calls that came after it (they get RESOURCE_EXHAUSTED meanwhile)."""
    server = _server(engine, max_queue_texts=2000, max_texts_per_request=3000)
    stop = threading.Event()
    outcomes = {"ok": 0, "exhausted": 0}

    def unary_load():
        with Client(server.target, timeout=60) as client:
            while not stop.is_set():
                try:
                    client.embed([f"short text {i}" for i in range(50)])
                    outcomes["ok"] += 1
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    outcomes["exhausted"] += 1

    try:
        with ThreadPoolExecutor(4) as pool:
            loads = [pool.submit(unary_load) for _ in range(4)]
            time.sleep(1)
            started = time.perf_counter()
            with Client(server.target, timeout=40) as client:
                parts = list(client.stream([f"text number {i}" for i in range(2500)],
                                           batch_size=2500))
            waited = time.perf_counter() - started
            stop.set()
            for load in loads:
                load.result()
        assert parts[0].shape == (2500, 384)
        assert outcomes["ok"] > 0
        HOSTILE_REPORT["2,500-text message, room for 2,000, under unary load"] = f"{waited:.1f} s"
    finally:
        stop.set()
        server.stop()


def test_a_cancellation_storm_gives_all_room_back(engine, corpus):
    """Four streams with their windows in flight go away together, once the first of them has
    its first answer (the others wait behind it: a long first message waits its turn): their
    queued texts are dropped, not computed, and every bit of queue room comes back."""
    server = _server(engine, max_queue_texts=20_000)
    texts = [corpus[i % len(corpus)] for i in range(2000)]
    registry = server.batcher.metrics.registry

    def sample(name, **labels):
        return registry.get_sample_value(name, labels) or 0.0

    clients = [Client(server.target, timeout=60) for _ in range(4)]
    answered = threading.Event()

    def until_cut(client):
        try:
            next(client.stream(iter(texts), batch_size=40, window=60))
            answered.set()
        except (grpc.RpcError, ValueError):  # its channel closed before its first answer
            pass

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            running = [pool.submit(until_cut, client) for client in clients]
            assert answered.wait(60)
            admission = server.admission
            queued_at_cancel = admission.queued
            computed_at_cancel = sample("bertstream_batch_size_sum", model=engine.name)
            for client in clients:  # closing the channel cancels its stream
                client.close()
            for stream in running:
                stream.result()
        deadline = time.time() + 60
        while (admission.queued or admission.waiting) and time.time() < deadline:
            time.sleep(0.1)
        assert admission.queued == 0 and admission.waiting == 0
        time.sleep(1)  # batches that had started finish
        computed_after = sample("bertstream_batch_size_sum", model=engine.name) - \
            computed_at_cancel
        HOSTILE_REPORT["cancellation storm"] = (
            f"{queued_at_cancel:,} texts queued when {len(clients)} streams went, "
            f"{computed_after:,.0f} computed after")
        assert queued_at_cancel >= 2000  # the storm leaves work behind ...
        # ... and none of it was computed, beyond the batches already running (2 workers).
        assert computed_after <= 2 * 2048 // 8, (queued_at_cancel, computed_after)
        with Client(server.target, timeout=60) as client:
            assert client.embed(["the server still answers"]).shape == (1, 384)
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_a_bulk_flood_neither_refuses_nor_holds_up_interactive_calls(engine, corpus):
    """A bulk stream of 2,400 texts with room for 800 in each lane, while two interactive
    callers embed 20 texts at a time, 50 ms apart, for as long as it runs: before lanes they
    shared the room and got RESOURCE_EXHAUSTED once the stream filled it. Now every interactive
    call is served, each waits at most for batches already running, and bulk still gets its
    share of the forward passes (it finishes under the interactive load, every row there)."""
    server = _server(engine, max_queue_texts=800)
    registry = server.batcher.metrics.registry
    texts = sorted(corpus, key=len)[:2400]  # short ones: the bound is on texts, not tokens
    stop, latencies, failures = threading.Event(), [], []

    def interactive():
        with Client(server.target, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    client.embed([f"an interactive query {i}" for i in range(20)])
                    latencies.append(time.perf_counter() - started)
                except grpc.RpcError as error:
                    failures.append(error.code().name)
                time.sleep(0.05)

    try:
        with ThreadPoolExecutor(2) as pool:
            callers = [pool.submit(interactive) for _ in range(2)]
            with Client(server.target, timeout=120) as client:
                parts = list(client.stream(texts, batch_size=100, window=64, priority="bulk"))
            stop.set()
            for caller in callers:
                caller.result()
        assert sum(len(part) for part in parts) == 2400
        with Client(server.target, timeout=60) as client:
            np.testing.assert_allclose(parts[-1][-3:], client.embed(texts[-3:]), rtol=0,
                                       atol=1e-5)
        batches = {lane: registry.get_sample_value("bertstream_lane_batches_total",
                                                   {"lane": lane}) for lane in ("bulk",
                                                                                "interactive")}
        HOSTILE_REPORT["interactive calls during a bulk flood"] = (
            f"p50 {np.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
            f"({len(latencies)} calls, {len(failures)} refused); batches {batches}")
        assert not failures, failures
        assert len(latencies) >= 10 and max(latencies) < 1.5, latencies
        deadline = time.time() + 10  # every bit of each lane's room came back
        while any(a.queued for a in server.running.admissions.values()) and \
                time.time() < deadline:
            time.sleep(0.05)
        assert {lane: a.queued for lane, a in server.running.admissions.items()} == \
            {"interactive": 0, "bulk": 0}
        assert batches["bulk"] > 0 and batches["interactive"] > 0
    finally:
        stop.set()
        server.stop()


def test_an_unknown_priority_is_refused(server):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(texts=["x"], priority=7))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority: unknown enum value 7" in info.value.details()
