"""Shared fixtures: a real bertstream server on a free localhost port, and reference models."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import tempfile
import threading
import time

import pytest

from tests.launcher import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The device the tests serve on: cpu here and in CI; `make gpu-check` runs the suite with cuda.
TEST_DEVICE = os.environ.get("BERTSTREAM_TEST_DEVICE", "cpu")

# Small limits so that the limit paths are cheap to reach.
TEST_LIMITS = dict(max_texts_per_request=500, max_chars_per_text=20_000, max_batch_tokens=2048,
                   stream_window=64)


class ServerThread:
    """A server with its own event loop on a background thread."""

    def __init__(self, engine, limits, **start_options):
        from bertstream.server.app import start_server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(
            start_server(engine, limits, "127.0.0.1", 0, **start_options),
            self.loop).result(timeout=120)
        self.port, self.batcher = self.running.port, self.running.batcher
        self.admission = self.running.admission
        self.target = f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 5):
        asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@contextlib.contextmanager
def served_models(engine, *folders):
    """A server (gRPC, HTTP at .base, a Client at .client) of the default model's engine and
    one engine per model folder, for the tests of other model kinds."""
    from bertstream.client import Client
    from bertstream.server.engine import Engine
    from bertstream.server.limits import Limits

    engines = [engine] + [Engine(str(folder), device=TEST_DEVICE, dtype="float32")
                          for folder in folders]
    server = ServerThread(engines, Limits(**TEST_LIMITS), http_port=0)
    server.base = f"http://127.0.0.1:{server.running.http_port}"
    server.client = Client(server.target, timeout=60)
    try:
        yield server
    finally:
        server.client.close()
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(*args: str, **options):
    """`bertstream serve` on a free port (see serve_processes); returns once it answers Info."""
    return serve_processes(1, *args, **options)[0]


def serve_processes(count: int, *args: str, each=None, output: str | None = None,
                    max_open_files: int | None = None) -> list[tuple[ServerProcess, str]]:
    """`count` servers of `bertstream serve ARGS` started together, each on a free port, as
    children of the preloaded fork server (tests/launcher.py); each[i]: more arguments for the
    i-th; output: a file for their logs; max_open_files: their descriptor limit. Returns
    (process, target) pairs once every one answers Info."""
    import grpc

    from bertstream.client import Client

    # float32 unless a test asks otherwise: tests compare with float32 references, and on a GPU
    # the server's default is float16.
    precision = () if "--dtype" in args else ("--dtype", "float32")

    def launch(number: int, log: str) -> tuple[ServerProcess, str]:
        port = free_port()
        argv = ["serve", "--port", str(port), "--device", TEST_DEVICE, *precision, *args,
                *(each[number] if each else ())]
        return ServerProcess(argv, log, max_open_files), f"127.0.0.1:{port}"

    started, logs = [], []
    for number in range(count):
        # Logs to a file of its own unless asked otherwise: a server that fails to start says why.
        if output is None:
            descriptor, log = tempfile.mkstemp(prefix="bertstream-serve-", suffix=".log")
            os.close(descriptor)
        logs.append(output or log)
        started.append(launch(number, logs[-1]))
    deadline = time.time() + 180
    for number, log in enumerate(logs):
        moves = 0
        while True:
            process, target = started[number]
            # Short: a port that listens without answering (taken by something else) holds a
            # probe for its whole timeout, while a server still starting refuses at once.
            with Client(target, timeout=1) as probe:
                try:
                    probe.info()
                    break
                except grpc.RpcError:
                    pass
            if process.poll() is not None or time.time() > deadline:
                with open(log, errors="replace") as lines:
                    said = lines.read()[-3000:]
                # free_port()'s port was taken before the server bound it (another server's,
                # or a connection's own port: seen once in a full run): again, on another
                # (only with a log of its own, where that is all the failure said).
                if process.poll() is not None and "Address already in use" in said \
                        and output is None and moves < 3:
                    moves += 1
                    started[number] = launch(number, log)
                    continue
                for other, _ in started:
                    other.kill()
                raise RuntimeError(f"bertstream serve {' '.join(args)} did not start; "
                                   f"it said:\n{said}")
            time.sleep(0.1)
    return started


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, corpus):
    """Tiny random encoders of every test architecture, saved as sentence-transformers folders
    (tests/tiny_models.py), built once for every module that serves them."""
    from tests.tiny_models import PIPELINES, build

    root = tmp_path_factory.mktemp("models")
    return {name: build(name, root, corpus) for name in sorted(PIPELINES)}


@pytest.fixture(scope="session")
def fleet_model(tmp_path_factory):
    """all-MiniLM-L6-v2 cut to its first layer (its tokenizer, width, pooling and normalizing
    kept), saved by sentence-transformers: for the tests whose point is not the model's work (the
    corpus client and its replicas, the HTTP front-end against gRPC, a big JSON answer), where
    what is checked is a server's answer against another front-end's or server's of the same
    model, and the six layers' forward passes were most of their time."""
    from sentence_transformers import SentenceTransformer

    from bertstream.server.engine import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu")
    encoder = model[0].auto_model
    encoder.encoder.layer = encoder.encoder.layer[:1]
    encoder.config.num_hidden_layers = 1
    folder = tmp_path_factory.mktemp("fleet-model")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="session")
def fleet_engine(fleet_model):
    """An Engine of fleet_model, served as "one-layer"."""
    from bertstream.server.engine import Engine

    return Engine(str(fleet_model), device=TEST_DEVICE, dtype="float32", name="one-layer")


@pytest.fixture(scope="session")
def engine():
    from bertstream.server.engine import Engine

    return Engine(device=TEST_DEVICE, dtype="float32")


@pytest.fixture(scope="session")
def server(engine):
    from bertstream.server.limits import Limits

    running = ServerThread(engine, Limits(**TEST_LIMITS))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server):
    from bertstream.client import Client

    with Client(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def reference():
    """The default model loaded directly with transformers: the reference for every semantics."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bertstream.server.engine import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()

    @functools.lru_cache(maxsize=256)  # many tests ask for the same texts: one pass each
    def hidden_states(text: str, max_length: int = 256):
        """All layers' hidden states of one text, alone (no padding): list of (tokens, hidden),
        read-only (they are shared between tests)."""
        encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            out = model(**encoded, output_hidden_states=True)
        layers = [layer[0].numpy() for layer in out.hidden_states]
        for layer in layers:
            layer.flags.writeable = False
        return tuple(layers)

    return hidden_states


@pytest.fixture(scope="session")
def corpus():
    from tests.corpus import stdlib_paragraphs

    return stdlib_paragraphs()


def pytest_terminal_summary(terminalreporter):
    """The fault and hostile-input figures SECURITY.md quotes, when those tests ran."""
    import sys

    for name, report in (("tests.test_hardening", "FAULT_REPORT"),
                         ("tests.test_hostile", "HOSTILE_REPORT")):
        figures = getattr(sys.modules.get(name), report, None)
        if figures and any(figures.values()):
            terminalreporter.write_line(
                f"{report.split('_')[0].lower()} report: "
                + ", ".join(f"{k} {v}" for k, v in figures.items()))
