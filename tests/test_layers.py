"""The structure as a contract: the layers of the server, the server apart from the client, the
front-ends apart from each other (import-linter, configured in pyproject.toml), and the blocking
and asyncio clients offering the same calls with the same options."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bertstream.client import AsyncClient, Client

ROOT = Path(__file__).parents[1]


def test_the_import_contracts_hold(tmp_path):
    """lint-imports over the working tree's files laid out as installed (bertstream.server, ...:
    the in-place install maps the folders by a finder that import-graph tools do not follow)."""
    import bertstream.proto

    tree = tmp_path / "bertstream"
    for name, folder in (("server", ROOT / "server"), ("client", ROOT / "client"),
                         ("ext", ROOT / "ext"), ("proto", Path(bertstream.proto.__file__).parent)):
        shutil.copytree(folder, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.so",
                                                                           "*.c", "*.html"))
    (tree / "__init__.py").write_text("")
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")),
                           str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


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
