"""Security, limits, overload, cancellation, shutdown and injected faults, against real servers."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from bertstream.client import Client, decode_tensor
from bertstream.proto import embedder_pb2 as pb
from bertstream.proto import embedder_pb2_grpc as pb_grpc
from bertstream.server.limits import Limits
from bertstream.server.security import Security
from tests.conftest import TEST_LIMITS, ServerThread, serve_process

# ---------------------------------------------------------------- certificates made here


def _certificate(subject: str, key, issuer_name=None, issuer_key=None, ca=False, server=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    names = ("ca", "server", "client", "stranger")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in names}
    ca = _certificate("bertstream test CA", keys["ca"], ca=True)
    certs = {"ca": ca,
             "server": _certificate("localhost", keys["server"], ca.subject, keys["ca"],
                                    server=True),
             "client": _certificate("a client", keys["client"], ca.subject, keys["ca"]),
             "stranger": _certificate("a stranger", keys["stranger"])}  # self-signed
    paths = {}
    for name, cert in certs.items():
        paths[f"{name}.crt"] = folder / f"{name}.crt"
        paths[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}.key"] = folder / f"{name}.key"
        paths[f"{name}.key"].write_bytes(keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return {name: str(path) for name, path in paths.items()}


def _server(engine, **limits_and_start):
    limits = {**TEST_LIMITS, **{k: v for k, v in limits_and_start.items() if k in
                                Limits.__dataclass_fields__}}
    start = {k: v for k, v in limits_and_start.items() if k not in Limits.__dataclass_fields__}
    return ServerThread(engine, Limits(**limits), **start)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ---------------------------------------------------------------- TLS, mTLS, tokens

def test_tls_and_token_auth(engine, pki):
    security = Security(auth_tokens=(b"s3cret-token", b"second-token"), tls_cert=pki["server.crt"],
                        tls_key=pki["server.key"])
    server = _server(engine, security=security)
    try:
        with Client(server.target, token="s3cret-token", tls_ca=pki["ca.crt"], timeout=30) as c:
            assert c.embed(["over TLS"]).shape == (1, 384)
        with Client(server.target, token="second-token", tls_ca=pki["ca.crt"], timeout=30) as c:
            assert len(list(c.stream(["a", "b", "c"], batch_size=1))) == 3
        for token in (None, "wrong", "s3cret-toke", "s3cret-token-and-more"):
            with Client(server.target, token=token, tls_ca=pki["ca.crt"], timeout=30) as c:
                assert _code(lambda: c.embed(["x"])) == grpc.StatusCode.UNAUTHENTICATED
                assert _code(lambda: list(c.stream(["x"]))) == grpc.StatusCode.UNAUTHENTICATED
                assert _code(lambda: c.info()) == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for probes (the default), without a token.
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from bertstream.client import make_channel
        with make_channel(server.target, tls_ca=pki["ca.crt"]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A plaintext client cannot talk to a TLS server.
        with Client(server.target, token="s3cret-token", timeout=10) as c:
            assert _code(lambda: c.embed(["x"])) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_health_can_require_the_token(engine):
    server = _server(engine, security=Security(auth_tokens=(b"t",), health_open=False))
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert _code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10,
                               metadata=(("authorization", "Bearer t"),))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_http_front_end_takes_the_same_tls_and_tokens(engine, pki):
    import json
    import ssl
    import urllib.error
    import urllib.request

    security = Security(auth_tokens=(b"s3cret-token",), tls_cert=pki["server.crt"],
                        tls_key=pki["server.key"], tls_client_ca=pki["ca.crt"])
    server = _server(engine, security=security, http_port=0)
    url = f"https://127.0.0.1:{server.running.http_port}/v1/embeddings"

    def post(token, cert=True):
        context = ssl.create_default_context(cafile=pki["ca.crt"])
        if cert:
            context.load_cert_chain(pki["client.crt"], pki["client.key"])
        request = urllib.request.Request(url, data=json.dumps({"input": ["x"]}).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    try:
        assert post("s3cret-token") == 200
        assert post("wrong") == 401
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            post("s3cret-token", cert=False)  # mutual TLS: no client certificate, no session
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to TLS
            urllib.request.urlopen(url.replace("https", "http"), timeout=10)
    finally:
        server.stop()


def test_mutual_tls_refuses_a_client_without_certificate(engine, pki):
    security = Security(tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                        tls_client_ca=pki["ca.crt"])
    server = _server(engine, security=security)
    try:
        with Client(server.target, tls_ca=pki["ca.crt"], tls_cert=pki["client.crt"],
                    tls_key=pki["client.key"], timeout=30) as c:
            assert c.embed(["mutual"]).shape == (1, 384)
        with Client(server.target, tls_ca=pki["ca.crt"], timeout=10) as c:
            assert _code(lambda: c.embed(["x"])) == grpc.StatusCode.UNAVAILABLE
        # A certificate that the client CA did not sign is refused too.
        with Client(server.target, tls_ca=pki["ca.crt"], tls_cert=pki["stranger.crt"],
                    tls_key=pki["stranger.key"], timeout=10) as c:
            assert _code(lambda: c.embed(["x"])) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


# ---------------------------------------------------------------- overload and limits

def test_overload_rejects_surplus_unary_and_completes_accepted(engine, corpus):
    server = _server(engine, max_queue_texts=8)
    texts = [list(corpus[i * 4:(i + 1) * 4]) for i in range(40)]
    try:
        with Client(server.target, timeout=120) as client:
            expected = [client.embed(t) for t in texts]  # one at a time: always admitted

            def call(i):
                try:
                    return i, client.embed(texts[i])
                except grpc.RpcError as error:
                    return i, error

            with ThreadPoolExecutor(max_workers=40) as pool:
                results = list(pool.map(call, range(40)))
        rejected = [r for _, r in results if isinstance(r, grpc.RpcError)]
        accepted = [(i, r) for i, r in results if not isinstance(r, grpc.RpcError)]
        assert rejected and accepted
        for error in rejected:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_texts" in error.details()
        FAULT_REPORT["accepted requests lost"] += sum(
            1 for i, vectors in accepted if not np.allclose(vectors, expected[i], atol=1e-4))
        for i, vectors in accepted:
            np.testing.assert_allclose(vectors, expected[i], atol=1e-4)
        # Streams wait for room instead of failing.
        with Client(server.target, timeout=120) as client:
            parts = list(client.stream([t for chunk in texts for t in chunk], batch_size=4,
                                       window=40))
        np.testing.assert_allclose(np.concatenate(parts), np.concatenate(expected), atol=1e-4)
    finally:
        server.stop()


def test_message_size_limit_names_it(engine):
    server = _server(engine, max_message_bytes=10_000)
    try:
        with Client(server.target, timeout=30) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.embed(["x" * 20_000])
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in info.value.details()
            assert client.embed(["small is fine"]).shape == (1, 384)
    finally:
        server.stop()


# ---------------------------------------------------------------- cancellation

def queue_gauge(server) -> float:
    return server.batcher.metrics.registry.get_sample_value("bertstream_queue_texts")


def forwarded_texts(server) -> float:
    return server.batcher.metrics.registry.get_sample_value(
        "bertstream_batch_size_sum", {"model": server.batcher.engine.name})


def stream_messages(server, code: str) -> float:
    return server.batcher.metrics.registry.get_sample_value(
        "bertstream_requests_total", {"rpc": "EmbedStream", "code": code,
                                      "model": server.batcher.engine.name}) or 0.0


def test_cancelled_stream_empties_the_queue(server, corpus):
    texts = [corpus[i % len(corpus)] for i in range(10_000)]
    with Client(server.target, timeout=300) as client:
        stream = client.stream(iter(texts), batch_size=100, window=50)
        next(stream)
        deadline = time.time() + 60
        while server.admission.queued < 2000 and time.time() < deadline:
            time.sleep(0.01)
        # Read before the cancel: the server drops cancelled texts within a fraction of a
        # second, which a busy machine can spend between close() and the next line.
        queued_at_cancel = server.admission.queued
        stream.close()  # cancels the call with ~50 messages still in flight
    computed_at_cancel = forwarded_texts(server)
    deadline = time.time() + 60
    while (queue_gauge(server) or server.admission.queued) and time.time() < deadline:
        time.sleep(0.1)
    assert queue_gauge(server) == 0 and server.admission.queued == 0
    time.sleep(1)  # a batch that had started still finishes; then nothing more
    computed_after = forwarded_texts(server) - computed_at_cancel
    # Thousands of texts were queued when the caller went; none was computed, beyond the
    # batches already running on the two forward workers (2048 tokens each at most).
    assert queued_at_cancel >= 1500
    assert computed_after <= 2 * 2048 // 8, (queued_at_cancel, computed_after)
    with Client(server.target, timeout=30) as client:
        assert client.embed(["the server still answers"]).shape == (1, 384)


def test_expired_deadline_drops_queued_work(server, corpus):
    texts = list(corpus[:400])
    with Client(server.target, timeout=0.05) as client:
        assert _code(lambda: client.embed(texts)) == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 60
    while queue_gauge(server) and time.time() < deadline:
        time.sleep(0.1)
    assert queue_gauge(server) == 0


# ---------------------------------------------------------------- injected forward failures

class FaultyEngine:
    """The real engine, but a forward pass over more than `max_rows` texts raises (like running
    out of memory), and so does any batch holding the token of `poison`."""

    def __init__(self, engine, max_rows: int, poison: str):
        self._engine = engine
        self.max_rows = max_rows
        self.poison_id = engine.tokenizer.convert_tokens_to_ids(poison)
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward(self, ids):
        self.calls.append(len(ids))
        if len(ids) > self.max_rows:
            FAULT_REPORT["forward failures injected"] += 1
            raise RuntimeError(f"out of memory (injected): {len(ids)} rows")
        if any(self.poison_id in row for row in ids):
            FAULT_REPORT["forward failures injected"] += 1
            raise RuntimeError("injected failure on a poisoned text")
        return self._engine.forward(ids)


def test_forward_failures_split_and_retry_then_fail_only_the_bad_item(engine, client, corpus):
    faulty = FaultyEngine(engine, max_rows=3, poison="poison")
    server = _server(faulty)
    texts = [f"text number {i} of ten, alike, so that they go as one pass" for i in range(10)]
    try:
        registry = server.batcher.metrics.registry

        def counted():  # passes and padded tokens, by the metrics
            return [registry.get_sample_value(name, {"model": engine.name}) or 0 for name in
                    ("bertstream_batch_size_count", "bertstream_forward_padded_tokens_total")]

        with Client(server.target, timeout=60) as c:
            faulty.calls.clear()
            before = counted()
            np.testing.assert_allclose(c.embed(texts), client.embed(texts), atol=1e-4)
            assert max(faulty.calls) == 10 and faulty.calls.count(10) == 1  # failed, then halves
            # What ran is counted, each half that ran; not the batch that failed.
            longest = max(len(ids) for ids in engine.tokenize(texts).ids)
            ran = [rows for rows in faulty.calls if rows <= faulty.max_rows]
            assert [now - old for now, old in zip(counted(), before)] == \
                [len(ran), sum(ran) * longest]
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.EmbedderStub(channel)
                requests = [pb.EmbedRequest(request_id="good-1", texts=["fine", "also fine"]),
                            pb.EmbedRequest(request_id="bad", texts=["ok", "a poison pill"]),
                            pb.EmbedRequest(request_id="good-2", texts=["still fine"])]
                responses = list(stub.EmbedStream(iter(requests), timeout=60))
            assert [r.request_id for r in responses] == ["good-1", "bad", "good-2"]
            assert responses[1].error.code == grpc.StatusCode.INTERNAL.value[0]
            assert "texts[1]" in responses[1].error.message
            assert "injected failure" in responses[1].error.message
            np.testing.assert_allclose(decode_tensor(responses[2].embeddings),
                                       client.embed(["still fine"]), atol=1e-4)
            assert c.embed(["the server lives on"]).shape == (1, 384)
    finally:
        server.stop()


class BrokenEngine:
    """The real engine, whose forward pass fails while `broken` is set."""

    def __init__(self, engine):
        self._engine, self.broken = engine, False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward(self, ids):
        if self.broken:
            raise RuntimeError("the device is gone (injected)")
        return self._engine.forward(ids)


def test_health_goes_not_serving_while_the_engine_keeps_failing(engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    broken = BrokenEngine(engine)
    server = _server(broken)

    def status():
        with grpc.insecure_channel(server.target) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="bertstream.v1.Embedder"), timeout=10).status

    def settles_at(expected):
        deadline = time.time() + 10
        while status() != expected and time.time() < deadline:
            time.sleep(0.1)
        return status() == expected

    try:
        assert settles_at(health_pb2.HealthCheckResponse.SERVING)
        broken.broken = True
        with Client(server.target, timeout=30) as client:
            for _ in range(6):
                assert _code(lambda: client.embed(["x"])) == grpc.StatusCode.INTERNAL
            assert settles_at(health_pb2.HealthCheckResponse.NOT_SERVING)
            broken.broken = False  # the device came back: the next success restores it
            assert client.embed(["x"]).shape == (1, 384)
        assert settles_at(health_pb2.HealthCheckResponse.SERVING)
    finally:
        server.stop()


# ---------------------------------------------------------------- fuzz

any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "\x00", "\u202e", "a" * 3000, " " * 50, "\t\n\r"])
requests = st.builds(
    pb.EmbedRequest,
    request_id=st.text(max_size=10),
    texts=st.one_of(st.lists(any_text, max_size=8), st.lists(any_text, min_size=480, max_size=520),
                    st.builds(lambda n: ["w"] * n, st.integers(0, 10_000))),
    pooling=st.integers(-3, 10), layers=st.lists(st.integers(-10, 10), max_size=12),
    layer_combine=st.integers(-1, 4), normalize=st.none() | st.booleans(),
    dtype=st.integers(-1, 7), truncate=st.booleans(),
    prompt_name=st.sampled_from(["", "query", "x"]), prompt=st.none() | any_text,
    dimensions=st.integers(-5, 3000))
# The shared server's limits are far above what a fuzzed request can reach by load (queue,
# message size): the only clear answer to a bad request is INVALID_ARGUMENT.
FUZZ_CODES = {grpc.StatusCode.INVALID_ARGUMENT}
CLEAR_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
VALUE_BYTES = {pb.DTYPE_UNSPECIFIED: 4, pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2,
               pb.DTYPE_BFLOAT16: 2}
# Figures for SECURITY.md, printed at the end of a run (conftest.pytest_terminal_summary).
FAULT_REPORT = {"fuzzed requests": 0, "fuzzed raw payloads": 0, "forward failures injected": 0,
                "accepted requests lost": 0}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests)
@example(request=pb.EmbedRequest(texts=[""] * 500, pooling=pb.POOLING_LAST_TOKEN, layers=[0] * 6,
                                 truncate=False))  # a 4.6 MB answer (found by this test)
def test_fuzzed_requests_get_a_result_or_a_clear_status(server, request):
    FAULT_REPORT["fuzzed requests"] += 1
    # Answers as large as the server allows (max_response_bytes): 500 texts of 6 layers are
    # 4.6 MB, over the 4 MiB a gRPC client receives by default.
    with grpc.insecure_channel(server.target,
                               options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        try:
            response = stub.Embed(request, timeout=120)
        except grpc.RpcError as error:
            assert error.code() in FUZZ_CODES, (error.code(), error.details())
            assert error.details()
        else:
            tensor = response.embeddings
            rows, width = tensor.shape
            assert rows == (sum(response.lengths) if response.lengths else len(request.texts))
            if request.dimensions:
                assert width == request.dimensions
            if tensor.dtype == pb.DTYPE_INT8:
                assert len(tensor.data) == rows * width and len(tensor.scales) == rows
            elif tensor.dtype == pb.DTYPE_BINARY:
                assert len(tensor.data) == rows * -(-width // 8)
            else:
                assert len(tensor.data) == rows * width * VALUE_BYTES[tensor.dtype]
        assert stub.Embed(pb.EmbedRequest(texts=["normal"]), timeout=60).embeddings.shape == [1, 384]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=300) | st.just(b"\x12\x03\xff\xfe\xfd"))  # invalid UTF-8 text
def test_malformed_bytes_get_a_status_and_the_server_lives_on(server, payload):
    FAULT_REPORT["fuzzed raw payloads"] += 1
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/bertstream.v1.Embedder/Embed")  # bytes in, bytes out
        try:
            reply = pb.EmbedResponse.FromString(raw(payload, timeout=60))
            assert reply.embeddings.data
        except grpc.RpcError as error:
            assert error.code() in CLEAR_CODES, (error.code(), error.details())
            assert error.details()
        stub = pb_grpc.EmbedderStub(channel)
        assert stub.Embed(pb.EmbedRequest(texts=["normal"]), timeout=60).embeddings.shape == [1, 384]


# ---------------------------------------------------------------- shutdown

def test_stream_in_flight_at_sigterm_receives_every_response(corpus):
    process, target = serve_process("--grace", "60", "--log-level", "WARNING")
    texts = list(corpus[:600])
    try:
        with Client(target, timeout=60) as client:
            received = []
            for i, part in enumerate(client.stream(texts, batch_size=20, window=30)):
                received.append(part)
                if i == 0:
                    process.send_signal(signal.SIGTERM)
        FAULT_REPORT["accepted requests lost"] += len(texts) // 20 - len(received)
        assert sum(len(p) for p in received) == len(texts)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()


def test_malformed_message_after_good_ones_answers_them_then_ends_the_stream(server, corpus):
    """Three good 200-text messages, then at once a malformed one: the three are answered, then
    the stream ends with INVALID_ARGUMENT, and the server's handler for it has ended."""
    streams_open = lambda: server.batcher.metrics.registry.get_sample_value(  # noqa: E731
        "bertstream_streams_open")
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.stream_stream("/bertstream.v1.Embedder/EmbedStream")
        good = [pb.EmbedRequest(request_id=str(i), texts=list(corpus[i * 200:(i + 1) * 200]))
                .SerializeToString() for i in range(3)]
        replies = raw(iter(good + [b"\x12\x03\xff\xfe\xfd"]), timeout=120)
        answered = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in replies:
                answered.append(pb.EmbedResponse.FromString(reply))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [r.request_id for r in answered] == ["0", "1", "2"]
        assert all(r.embeddings.shape == [200, 384] for r in answered)
    deadline = time.time() + 10
    while streams_open() and time.time() < deadline:
        time.sleep(0.05)
    assert streams_open() == 0


def test_malformed_message_in_a_stream_ends_it_with_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.stream_stream("/bertstream.v1.Embedder/EmbedStream")
        good = pb.EmbedRequest(request_id="a", texts=["fine"]).SerializeToString()
        replies = raw(iter([good, b"\x12\x03\xff\xfe\xfd"]), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(replies)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf request" in info.value.details()


def test_a_failed_pass_is_freed_before_its_halves_run(engine):
    """A pass that runs out of memory is retried in halves; what it held (its activations, in
    the frames of its traceback) must be gone by then, or on a GPU the halves run out too."""
    import gc
    import weakref

    import torch

    class Leaky:
        def __init__(self, engine):
            self._engine, self.held, self.alive_at_halves = engine, [], []

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def forward(self, ids):
            if len(ids) > 2:
                activations = torch.empty(len(ids), 1000)  # what the failed pass allocated
                self.held.append(weakref.ref(activations))
                raise RuntimeError("out of memory (injected)")
            gc.collect()  # only what is still referenced survives this
            self.alive_at_halves.append(any(ref() is not None for ref in self.held))
            return self._engine.forward(ids)

    leaky = Leaky(engine)
    server = _server(leaky)
    try:
        with Client(server.target, timeout=60) as c:
            assert c.embed([f"text {i} of eight, alike" for i in range(8)]).shape == (8, 384)
        assert leaky.held and leaky.alive_at_halves and not any(leaky.alive_at_halves)
    finally:
        server.stop()
