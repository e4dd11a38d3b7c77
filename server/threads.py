"""Names the server's own threads carry in the operating system, so that `top -H`, py-spy and
benchmarks/host_path.py can tell the event loop, the tokenizer threads and the forward workers
apart (Python 3.11 names its threads for itself only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_PR_SET_NAME = 15
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread `name` (default: its Python name) in the OS, cut to 15 bytes."""
    name = (name or threading.current_thread().name).encode()[:15]
    try:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except AttributeError:  # no prctl (not Linux): names are a convenience only
        pass
