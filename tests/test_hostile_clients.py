"""What one client can do with many requests, streams or connections, against a real
`bertstream serve` process with the default limits: streams that never read summed over one
connection, slow HTTP clients under the usual descriptor limit, an HTTP/2 rapid-reset flood.
Each of these held the server before (figures in SECURITY.md); HOSTILE_REPORT gets today's."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import socket
import statistics
import time

import grpc
import pytest

from bertstream.client import Client
from bertstream.proto import embedder_pb2 as pb
from tests.conftest import free_port, serve_process, serve_processes
from tests.raw_h2 import RawConnection, rapid_reset
from tests.test_hostile import GB, HOSTILE_REPORT, peak_rss


def small_calls(target: str, seconds: float, pause: float = 0.2,
                client: Client | None = None) -> tuple[list, list]:
    """An unrelated caller's 8-text Embed calls for `seconds` (on its own connection, or on
    `client`'s): (latencies of the OK ones, codes)."""
    latencies, codes = [], []
    with contextlib.nullcontext(client) if client else Client(target, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.embed(["a small request from someone else"] * 8)
                latencies.append(time.perf_counter() - started)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
            time.sleep(pause)
    return latencies, codes


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)] if len(values) > 1 else values[0]


def test_streams_that_never_read_are_bounded_per_connection():
    """One raw HTTP/2 connection that advertises a receive window of 0 (and answers pings) opens
    25 EmbedStreams, each sending two token-level requests of 22 texts x 256 tokens, all 7
    layers (a 60 MB answer each, under the 64 MiB limit): 3 GB of answers that are never read.
    Before, RSS rose to 6.8-7.2 GB and stayed. Now the connection's streams stop being read at
    its share (128 MiB), the server stays within +1 GB, and once the connection has held its
    share without reading for stall_timeout_s it is cut: its streams end with RESOURCE_EXHAUSTED
    saying why, and so does its next call (trailers, which flow control does not hold back);
    others are served."""
    process, target = serve_process("--log-level", "WARNING", "--stall-timeout", "2")
    try:
        with Client(target, timeout=60) as client:
            client.embed(["warm up a normal request"] * 64)
        baseline = peak_rss(process.pid)
        connection = RawConnection(target, window=0)
        request = pb.EmbedRequest(texts=[" ".join(["word"] * 300)] * 22,
                                  pooling=pb.POOLING_NONE, layers=list(range(7)))
        for stream in range(25):
            stream_id = connection.headers("EmbedStream")
            for message in range(2):
                request.request_id = f"{stream}-{message}"
                connection.send(stream_id, request)
        # The server computes what the share lets it read, then waits; stall_timeout_s after
        # the connection held its share, the cut: its streams end, saying why. The peak is a
        # high-water mark (VmHWM), so reading it after the cut sees the whole run.
        deadline = time.monotonic() + 40
        while not connection.ended and time.monotonic() < deadline:
            connection.pump(0.5)
        grown = peak_rss(process.pid) - baseline
        HOSTILE_REPORT["25 never-reading streams on one connection"] = f"+{grown / 2**20:,.0f} MB"
        assert grown <= GB, f"peak RSS grew by {grown / 2**20:,.0f} MB"
        cut = list(connection.ended.values())
        assert cut and all(end.get("grpc-status") == "8" and "without reading" in
                           end.get("grpc-message", "") for end in cut), cut
        refused = connection.headers("Embed")  # the cut connection's next call
        connection.send(refused, pb.EmbedRequest(texts=["x"]), end_stream=True)
        deadline = time.monotonic() + 10
        while refused not in connection.ended and time.monotonic() < deadline:
            connection.pump(0.5)
        assert connection.ended.get(refused, {}).get("grpc-status") == "8", connection.ended
        assert "without reading" in connection.ended[refused].get("grpc-message", "")
        with Client(target, timeout=30) as client:
            assert client.embed(["someone else"]).shape == (1, 384)
        connection.close()
    finally:
        process.kill()
        process.wait()


def test_slow_http_clients_leave_grpc_answering():
    """1,100 HTTP connections under `ulimit -n 1024`: 800 that never send a byte, 200 that send
    one header byte a second, 100 that send one body byte a second. Before, they all stayed
    open, filled the descriptor table, gRPC calls got DEADLINE_EXCEEDED and the log grew by
    58 MB of accept() tracebacks in 26 s. Now connections past the cap (half the descriptors
    free at start) get 503 at once, the others 408 after http_read_timeout_s (3 s here); gRPC
    answers every call within 1 s meanwhile and the log stays under 1 MB."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2400:
        pytest.fail(f"this test opens 1,100 sockets: raise the hard descriptor limit ({hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    http_port = free_port()
    log_path = f"/tmp/bertstream-slow-http-{os.getpid()}.log"
    sockets = []
    # The read timeout at 3 s instead of 10: the same bound, reached sooner.
    process, target = serve_process("--log-level", "WARNING", "--http-port", str(http_port),
                                    "--http-read-timeout", "3", output=log_path,
                                    max_open_files=1024)
    caller = Client(target, timeout=30)  # connected before the flood, as a service's would be
    try:
        small_calls(target, 0.01, client=caller)
        head = (b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        for kind in ["silent"] * 300 + ["header"] * 200 + ["body"] * 100 + ["silent"] * 500:
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=5)
            sock.setblocking(False)
            sockets.append((kind, sock, [0]))
        latencies, codes = [], []
        deadline = time.monotonic() + 6  # past the read timeout
        while time.monotonic() < deadline:
            for kind, sock, sent in sockets:
                try:
                    if kind == "header" and sent[0] < len(head):
                        sent[0] += sock.send(head[sent[0]:sent[0] + 1])
                    elif kind == "body":
                        sent[0] += sock.send(head if not sent[0] else b" ")
                except OSError:  # closed by the server
                    pass
            more, more_codes = small_calls(target, 0.01, pause=0, client=caller)
            latencies += more
            codes += more_codes
            time.sleep(0.5)
        closed = 0
        for _, sock, _ in sockets:
            try:
                sock.recv(64)  # an answer (408 or 503), or b"": closed
                closed += 1
            except BlockingIOError:  # open, and nothing said
                pass
            except OSError:
                closed += 1
        log_bytes = os.path.getsize(log_path)
        HOSTILE_REPORT["1,100 slow HTTP connections"] = (
            f"gRPC max {max(latencies) * 1000:,.0f} ms, log {log_bytes:,} bytes")
        assert codes and set(codes) == {"OK"}, codes
        assert max(latencies) < 1.0, latencies
        assert closed == len(sockets), f"{len(sockets) - closed} connections still open"
        assert log_bytes < 2**20
    finally:
        caller.close()
        for _, sock, _ in sockets:
            sock.close()
        process.kill()
        process.wait()
        os.unlink(log_path)


def _flood(target: str, results) -> None:
    results.put(rapid_reset(target, pb.EmbedRequest(texts=["a text to embed"] * 8), 3))


def test_a_rapid_reset_flood_does_not_disturb_other_callers():
    """One connection sends HEADERS, an 8-text Embed and RST_STREAM as fast as it can (14,500 to
    40,000 times in 3 s), while an unrelated caller calls on its own channel. Before, that
    caller got CANCELLED on 11 of 36 calls. Now every call is OK and none waits a second. Its
    latency is reported beside its latency while the same flood hits another server process on
    this machine: on 2 cores the flood's own CPU slows everyone, and grpc.aio still runs Python
    for every call it opens; the ratio swings between 1.4x and 3.5x from run to run, so it is a
    figure (SECURITY.md), not an assertion."""
    (victim, target), (other, other_target) = serve_processes(2, "--log-level", "WARNING")
    try:
        small_calls(target, 1)  # warm
        p99s = {}
        for name, flooded in (("another server", other_target), ("this server", target)):
            results = multiprocessing.get_context("spawn").Queue()
            flooder = multiprocessing.get_context("spawn").Process(
                target=_flood, args=(flooded, results))
            flooder.start()
            time.sleep(0.5)
            latencies, codes = small_calls(target, 2.5)
            flooder.join(timeout=30)
            flood = results.get(timeout=10)
            assert flood["sent"] > 10_000, flood  # a flood even on a slow day (14,500 seen)
            assert set(codes) == {"OK"}, (name, codes)
            p99s[name] = p99(latencies)
        HOSTILE_REPORT["rapid reset"] = (
            f"p99 {p99s['this server'] * 1000:,.0f} ms (flood elsewhere: "
            f"{p99s['another server'] * 1000:,.0f} ms), median of the flood "
            f"{statistics.median(latencies) * 1000:,.0f} ms")
        assert p99s["this server"] < 1.0, p99s
    finally:
        for process in (victim, other):
            process.kill()
            process.wait()
