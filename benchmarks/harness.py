"""What the benchmarks share: the machine line, free ports, per-thread CPU of a process, the corpus.

Run benchmarks from the repository root as modules (`python -m benchmarks.host_path`): the
root is then on the import path, and nothing edits sys.path.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from tests.corpus import stdlib_paragraphs  # noqa: F401  (the reference corpus, shared with tests)

TICK = os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """The CPU model and the flags that decide bfloat16 speed (compare only within one run)."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(wanted) or 'no AVX-512/AMX'})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """Thread id -> (its name, its CPU seconds so far), to the nanosecond where the kernel keeps
    schedstat (the clock ticks of stat are 10 ms: 3 µs a text over 3,000 texts)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            try:
                used = int((task / "schedstat").read_text().split()[0]) / 1e9
            except (FileNotFoundError, IndexError, ValueError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / TICK
            out[task.name] = (name, used)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def process_memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)
