"""Probe: A/B two versions of the server code in one run (servers alive together, measured
alternately), so a change is judged against the machine's noise.

    python benchmarks/probes/ab_servers.py REF_A REF_B [--dtype bfloat16] [--rounds 5]

REF is a git revision, or WORKTREE for the files as they are. Each side is the installed bertstream
package with server/ and client/ Python files taken from REF (the kernels and stubs as installed).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.conftest import free_port  # noqa: E402
from tests.corpus import stdlib_paragraphs  # noqa: E402

import bertstream.server  # noqa: E402
from bertstream.client import Client  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("refs", nargs=2)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--texts", type=int, default=1000)
parser.add_argument("--flags", default="", help="extra serve flags for both")
parser.add_argument("--env-a", action="append", default=[], help="KEY=VALUE for side A only")
parser.add_argument("--env-b", action="append", default=[], help="KEY=VALUE for side B only")
args = parser.parse_args()


def package_tree(ref: str, where: Path) -> Path:
    installed = Path(bertstream.server.__file__).parents[1]
    target = where / "bertstream"
    shutil.copytree(installed, target, ignore=shutil.ignore_patterns("__pycache__"))
    for package in ("server", "client"):
        for source in (ROOT / package).glob("*.py"):
            name = f"{package}/{source.name}"
            text = source.read_text() if ref == "WORKTREE" else subprocess.run(
                ["git", "show", f"{ref}:{name}"], cwd=ROOT, capture_output=True, text=True,
                check=True).stdout
            (target / name).write_text(text)
    return where


base = Path("/tmp/bertstream-ab")
shutil.rmtree(base, ignore_errors=True)
servers = {}
for side, ref, env in zip("AB", args.refs, (args.env_a, args.env_b)):
    path = package_tree(ref, base / side)
    port = free_port()
    servers[side] = (subprocess.Popen(
        [sys.executable, "-m", "bertstream.server.cli", "serve", "--port", str(port), "--dtype",
         args.dtype, "--log-level", "WARNING", *args.flags.split()],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(path),
             **dict(pair.split("=", 1) for pair in env)}, cwd=base),
        f"127.0.0.1:{port}")
texts = list(stdlib_paragraphs()[:args.texts])
short = "The quick brown fox jumps over the lazy dog."
results = {side: {"texts/s": [], "unary p50 ms": []} for side in servers}
try:
    for side, (_, target) in servers.items():
        deadline = time.time() + 180
        while True:
            try:
                with Client(target, timeout=5) as client:
                    client.embed([short])
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
    for _ in range(args.rounds):
        for side, (_, target) in servers.items():
            with Client(target, timeout=600) as client:
                start = time.perf_counter()
                done = sum(len(part) for part in client.stream(texts))
                results[side]["texts/s"].append(done / (time.perf_counter() - start))
                times = []
                for _ in range(100):
                    start = time.perf_counter()
                    client.embed([short])
                    times.append(time.perf_counter() - start)
                results[side]["unary p50 ms"].append(statistics.median(times) * 1e3)
finally:
    for process, _ in servers.values():
        process.terminate()
        process.wait()
print(f"A = {args.refs[0]} {args.env_a}, B = {args.refs[1]} {args.env_b}, {args.dtype}, {args.rounds} rounds alternating\n")
print("| measure | A (median) | B (median) | B/A per round (median) |\n|---|---:|---:|---:|")
for measure in ("texts/s", "unary p50 ms"):
    a, b = results["A"][measure], results["B"][measure]
    ratios = [y / x for x, y in zip(a, b)]
    print(f"| {measure} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
          f"{statistics.median(ratios):.3f} |")
