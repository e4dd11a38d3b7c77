"""Operations: Prometheus metrics, usage figures, logs, and the `bertstream serve` command."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bertstream.client import Client
from bertstream.server.engine import DEFAULT_MODEL_NAME as MODEL
from bertstream.server.limits import BATCH_TOKENS_BY_DEVICE
from tests.conftest import TEST_DEVICE, free_port


@pytest.fixture(scope="module")
def metrics_url(server):
    http = server.batcher.metrics.serve_http(0)
    yield f"http://127.0.0.1:{http.server_port}/metrics"
    http.shutdown()


def scrape(url: str) -> dict[tuple, float]:
    """Every sample as {(name, sorted label items): value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_settled(url: str) -> dict[tuple, float]:
    """A scrape once the server is idle: nothing queued and no counter moving, so work left in
    flight by an earlier test (on the shared server) is not counted as this test's."""
    previous = scrape(url)
    for _ in range(100):
        time.sleep(0.05)
        current = scrape(url)
        if current == previous and value(current, "bertstream_queue_texts") == 0:
            return current
        previous = current
    raise AssertionError("the server did not settle")


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_calls(client, metrics_url):
    before = scrape_settled(metrics_url)
    texts = ["one text", "two texts here", "and a third"]
    for _ in range(3):
        client.embed(texts)
    list(client.stream(texts * 4, batch_size=4))  # 3 stream messages of 4 texts
    after = scrape(metrics_url)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("bertstream_requests_total", rpc="Embed", code="OK", model=MODEL) == 3
    assert delta("bertstream_texts_total", rpc="Embed", code="OK", model=MODEL) == 9
    assert delta("bertstream_requests_total", rpc="EmbedStream", code="OK", model=MODEL) == 3
    assert delta("bertstream_texts_total", rpc="EmbedStream", code="OK", model=MODEL) == 12
    assert delta("bertstream_request_latency_seconds_count", rpc="Embed", model=MODEL) == 3
    tokens = sum(len(t) for t in client.tokenize(texts))
    assert delta("bertstream_tokens_total", model=MODEL) == 3 * tokens + 4 * tokens
    assert delta("bertstream_batch_size_sum", model=MODEL) == 21  # every text went through one forward pass
    assert delta("bertstream_batch_size_count", model=MODEL) >= 4
    assert delta("bertstream_forward_seconds_count", model=MODEL) == delta("bertstream_batch_size_count", model=MODEL)
    # one observation per forward pass: its longest-waiting text's wait
    assert delta("bertstream_queue_wait_seconds_count") == \
        delta("bertstream_batch_size_count", model=MODEL)
    assert value(after, "bertstream_queue_texts") == 0  # all done, nothing waiting
    served = client.info()
    info = value(after, "bertstream_model_info", model=MODEL, path=served["model"],
                 device=TEST_DEVICE, dtype="float32", max_length="256",
                 weight_bytes=str(served["weight_bytes"]))
    assert info == 1


def test_failing_request_moves_error_counter(client, metrics_url):
    before = scrape_settled(metrics_url)
    with pytest.raises(grpc.RpcError):
        client.embed(["x"], layers=(12,))
    after = scrape(metrics_url)
    key = dict(rpc="Embed", code="INVALID_ARGUMENT", model=MODEL)
    assert value(after, "bertstream_requests_total", **key) - \
        value(before, "bertstream_requests_total", **key) == 1


def test_usage_is_plausible(client, corpus):
    texts = list(corpus[:40])
    client.embed(texts)
    usage = client.last_usage
    assert usage.tokens == sum(len(t) for t in client.tokenize(texts))
    assert usage.truncated_items == 0
    assert 0 <= usage.queue_ns < 60e9 and 0 < usage.compute_ns < 60e9


def test_json_log_lines_carry_fields():
    from bertstream.server.cli import LogFormatter

    record = logging.LogRecord("bertstream", logging.INFO, __file__, 1, "serving", None, None)
    record.fields = {"model": "m", "port": 5}
    line = json.loads(LogFormatter(as_json=True).format(record))
    assert line["message"] == "serving" and line["model"] == "m" and line["port"] == 5
    text = LogFormatter(as_json=False).format(record)
    assert text.endswith("serving model=m port=5")


def test_serve_command_logs_serves_and_stops():
    """`bertstream serve` as a user runs it: JSON start line, metrics endpoint, SIGTERM stop. It
    listens on every address (--host 0.0.0.0); its metrics, with no TLS or auth, on loopback."""
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bertstream.server.cli", "serve", "--port", str(port),
         "--host", "0.0.0.0", "--metrics-port", str(metrics_port), "--log-format", "json",
         "--device", TEST_DEVICE],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = process.stderr.readline()
            if line.startswith("{"):
                lines.append(json.loads(line))
                if lines[-1]["message"] == "serving":
                    break
        start = lines[-1]
        assert start["message"] == "serving" and start["device"] == TEST_DEVICE
        assert start["address"] == f"0.0.0.0:{port}"
        assert start["max_batch_tokens"] == BATCH_TOKENS_BY_DEVICE[TEST_DEVICE.split(":")[0]]
        assert start["metrics"] == f"127.0.0.1:{metrics_port}"
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{metrics_port}"],
                                   capture_output=True, text=True).stdout.split()
        if listening:  # where `ss` exists: the metrics socket is bound to loopback only
            assert listening[3] == f"127.0.0.1:{metrics_port}", listening
        assert start["dtype"] == "float32" and "max_texts_per_request" in start
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            assert client.embed(["hello"]).shape == (1, 384)
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(samples, "bertstream_requests_total", rpc="Embed", code="OK",
                         model=MODEL) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        rest = [json.loads(line) for line in process.stderr.read().splitlines()
                if line.startswith("{")]
        assert [line["message"] for line in rest][-2:] == ["stopping", "stopped"]
    finally:
        process.kill()
        process.wait()


def test_a_test_server_whose_port_was_taken_starts_on_another(monkeypatch):
    """The suite's own launcher: a port free_port() gave out can be taken before the server
    binds it (seen once in a full run); the server is started again on another port."""
    import socket

    from tests import conftest

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    fresh = conftest.free_port
    monkeypatch.setattr(conftest, "free_port", lambda: next(ports, None) or fresh())
    try:
        process, target = conftest.serve_process("--log-level", "WARNING")
        try:
            assert target != f"127.0.0.1:{taken.getsockname()[1]}"
            with Client(target, timeout=30) as client:
                assert client.embed(["moved"]).shape == (1, 384)
        finally:
            process.kill()
            process.wait()
    finally:
        taken.close()
