"""The overhead of the Ray Data stage, in one run: `bertstream embed` (one process, one client)
against `bertstream.client.ray.embed` with 2 actors, on the same two server replicas and the same
corpus paragraphs, Parquet in and Parquet out.

    python -m benchmarks.bench_ray [--texts 5000] [--rounds 3] [--threads 1]

Each round runs both, back to back; times run from the command to the output on disk: the CLI's
process start and the Ray job's actor start are in, `ray.init()` (once per cluster) is not. The
table gives texts/s as the median over rounds (range in brackets) and the ratio to the CLI as the
median of per-round ratios. On a 2-core machine both share the cores with the servers, so the point
is the overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.bench_throughput import BATCH_TOKENS, Server, cpu, timed
from benchmarks.harness import stdlib_paragraphs

SHARDS = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of each replica")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from bertstream.client.ray import embed

    texts = list(stdlib_paragraphs()[:args.texts])
    work = Path(tempfile.mkdtemp(prefix="bench_ray"))
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts})
    pq.write_table(table, work / "corpus.parquet")
    (work / "shards").mkdir()
    per = -(-len(texts) // SHARDS)
    for shard in range(SHARDS):
        pq.write_table(table.slice(shard * per, per), work / "shards" / f"part-{shard:03}.parquet")

    print(f"{cpu()}; {len(texts)} corpus paragraphs, all-MiniLM-L6-v2, float32, two replicas "
          f"with --threads {args.threads}, {args.rounds} rounds\n")
    servers = [Server("float32", "cpu", BATCH_TOKENS["cpu"], flags=("--threads", str(args.threads)))
               for _ in range(2)]
    targets = [server.target for server in servers]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def cli():
        out = work / "cli.parquet"
        out.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "bertstream.server.cli", "embed",
                        str(work / "corpus.parquet"), "--field", "text", "-o", str(out),
                        "--server", *targets, "--no-progress"], check=True)

    def ray_job():
        out = work / "ray"
        shutil.rmtree(out, ignore_errors=True)
        dataset = ray.data.read_parquet(str(work / "shards"), override_num_blocks=SHARDS)
        embed(dataset, targets).write_parquet(str(out))

    runs = {"bertstream embed (one process)": cli, "Ray Data, 2 actors": ray_job}
    seconds = {name: [] for name in runs}
    try:
        for _ in range(args.rounds):
            for name, run in runs.items():
                seconds[name].append(timed(run))
        assert pq.read_table(work / "ray").num_rows == len(texts)
        assert pq.read_table(work / "cli.parquet").num_rows == len(texts)
    finally:
        for server in servers:
            server.stop()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    base = seconds["bertstream embed (one process)"]
    print("| what | texts/s | this / bertstream embed |")
    print("| --- | ---: | ---: |")
    for name, values in seconds.items():
        rates = [len(texts) / s for s in values]
        ratios = [b / s for b, s in zip(base, values)]
        print(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
