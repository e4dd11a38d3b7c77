"""Probe: A/B two versions of the server code in one run (servers alive together, measured
alternately), so a change is judged against the machine's noise.

    python -m benchmarks.probes.ab_servers REF_A REF_B [--dtype bfloat16] [--rounds 5]

REF is a git revision, or WORKTREE for the files as they are. Each side is a bertstream package
with server/ and client/ Python files taken from REF (the kernels and stubs as built here).
"""
import argparse
import shutil
import statistics
import subprocess
from pathlib import Path

from benchmarks.bench_throughput import (BATCH_TOKENS, Server, concurrent_streams,
                                         stream_all, timed, unary_latency)
from benchmarks.harness import stdlib_paragraphs

ROOT = Path(__file__).resolve().parents[2]


parser = argparse.ArgumentParser()
parser.add_argument("refs", nargs=2)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--texts", type=int, default=1000)
parser.add_argument("--streams", type=int, default=1, help="the texts split over this many "
                    "concurrent streams (as the throughput benchmark's row 3)")
parser.add_argument("--flags", default="", help="extra serve flags for both")
parser.add_argument("--env-a", action="append", default=[], help="KEY=VALUE for side A only")
parser.add_argument("--env-b", action="append", default=[], help="KEY=VALUE for side B only")
args = parser.parse_args()


def package_tree(ref: str, where: Path) -> Path:
    """A `bertstream` package under `where`: server/ and client/ as at REF, the kernels and the
    stubs as built here."""
    import bertstream.ext
    import bertstream.proto

    target = where / "bertstream"
    target.mkdir(parents=True)
    (target / "__init__.py").write_text("")
    for name, built in (("ext", bertstream.ext), ("proto", bertstream.proto)):
        shutil.copytree(Path(built.__file__).parent, target / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.pyx", "*.html"))
    for package in ("server", "client"):
        (target / package).mkdir()
        if ref == "WORKTREE":
            names = [source.name for source in (ROOT / package).glob("*.py")]
        else:
            names = [name.split("/")[-1] for name in subprocess.run(
                ["git", "ls-tree", "--name-only", f"{ref}:{package}/"], cwd=ROOT,
                capture_output=True, text=True, check=True).stdout.split() if name.endswith(".py")]
        for name in names:
            text = (ROOT / package / name).read_text() if ref == "WORKTREE" else subprocess.run(
                ["git", "show", f"{ref}:{package}/{name}"], cwd=ROOT, capture_output=True,
                text=True, check=True).stdout
            (target / package / name).write_text(text)
    return where


base = Path("/tmp/bertstream-ab")
shutil.rmtree(base, ignore_errors=True)
servers = {}
texts = list(stdlib_paragraphs()[:args.texts])
short = "The quick brown fox jumps over the lazy dog."
results = {side: {"texts/s": [], "unary p50 ms": []} for side in "AB"}
try:
    for side, ref, env in zip("AB", args.refs, (args.env_a, args.env_b)):
        servers[side] = Server(args.dtype, "cpu", BATCH_TOKENS["cpu"], flags=args.flags.split(),
                               env={"PYTHONPATH": str(package_tree(ref, base / side)),
                                    **dict(pair.split("=", 1) for pair in env)})
    for _ in range(args.rounds):
        for side, server in servers.items():
            seconds = (timed(lambda: stream_all(server.target, texts)) if args.streams == 1
                       else concurrent_streams(server.target, texts, args.streams))
            results[side]["texts/s"].append(len(texts) / seconds)
            results[side]["unary p50 ms"].append(unary_latency(server.target, short) * 1e3)
finally:
    for server in servers.values():
        server.stop()
print(f"A = {args.refs[0]} {args.env_a}, B = {args.refs[1]} {args.env_b}, {args.dtype}, "
      f"{args.texts} texts in {args.streams} stream(s), {args.rounds} rounds alternating\n")
print("| measure | A (median) | B (median) | B/A per round (median) |\n|---|---:|---:|---:|")
for measure in ("texts/s", "unary p50 ms"):
    a, b = results["A"][measure], results["B"][measure]
    ratios = [y / x for x, y in zip(a, b)]
    print(f"| {measure} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
          f"{statistics.median(ratios):.3f} |")
