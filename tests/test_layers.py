"""The structure as a contract: the layers of the server, the server apart from the client, the
front-ends apart from each other (import-linter, configured in pyproject.toml), and the blocking
and asyncio clients offering the same calls with the same options."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

from bertstream.client import AsyncClient, Client

ROOT = Path(__file__).parents[1]


def test_the_import_contracts_hold():
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter), "--config", str(ROOT / "pyproject.toml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "kept" in done.stdout, done.stdout


def _public_calls(cls) -> dict:
    return {name: member for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")}


def test_the_blocking_and_asyncio_clients_take_the_same_options():
    """AsyncClient.stream had lost message_timeout: the two clients drift unless a test holds
    them together."""
    blocking, asynchronous = _public_calls(Client), _public_calls(AsyncClient)
    assert set(blocking) == set(asynchronous)
    for name in sorted(blocking):
        ours, theirs = (inspect.signature(calls[name]).parameters
                        for calls in (blocking, asynchronous))
        assert [(p.name, p.kind, p.default) for p in ours.values()] == \
               [(p.name, p.kind, p.default) for p in theirs.values()], name
    assert [(p.name, p.default) for p in inspect.signature(Client).parameters.values()] == \
           [(p.name, p.default) for p in inspect.signature(AsyncClient).parameters.values()]
