"""Test servers as children of a fork server that has torch and transformers imported.

`bertstream serve` spends 3-4 s of its start importing torch and transformers; the suite starts
a couple of dozen servers, several at a time on two cores (three took 10 s, five 15 s). Forked
from a process that has imported them once, a server answers within 1.5 s. Each child runs the
command line's own main() with its arguments: what differs from `python -m bertstream.server.cli`
is only that those modules were imported before the fork. (test_operations still starts the
command as a user types it.)
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import subprocess
import sys

# Imported once, in the fork server: what takes a server's start its seconds. Nothing here
# starts a thread or touches a device (a fork after either is unsafe); grpc is left to the child.
PRELOAD = ["numpy", "torch", "tokenizers", "transformers", "transformers.models.bert.modeling_bert"]
_context = None


def _serve(argv: list[str], output: str | None, max_open_files: int | None) -> None:
    fd = os.open(output or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    if max_open_files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))
    # The tokenizer's own threads, as in a server a user starts (the variable unset): the suite
    # turns them off for itself (conftest: the pytest process forks after tokenizing), not for
    # the servers it tests. Unset, the tokenizers library still turns them off in a child forked
    # after they ran; the fork server never tokenizes.
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    from bertstream.server.cli import main

    sys.exit(main(argv))


class ServerProcess:
    """A started server, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, argv: list[str], output: str | None = None,
                 max_open_files: int | None = None):
        global _context
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        # daemon: a server a test leaked is killed when the suite ends, not waited for
        self._process = _context.Process(target=_serve, args=(argv, output, max_open_files),
                                         daemon=True)
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("bertstream serve", timeout)
        return self._process.exitcode

    def send_signal(self, number: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
