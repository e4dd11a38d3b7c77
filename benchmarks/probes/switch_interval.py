"""Probe: two servers differing only in sys.setswitchinterval, measured alternately (bfloat16).

    python benchmarks/probes/switch_interval.py
"""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import free_port  # noqa: E402
from tests.corpus import stdlib_paragraphs  # noqa: E402

from bertstream.client import Client  # noqa: E402

texts = list(stdlib_paragraphs()[:1000])
short = "The quick brown fox jumps over the lazy dog."
servers = {}
for name, interval in (("5 ms (default)", 0.005), ("0.5 ms", 0.0005)):
    port = free_port()
    code = (f"import sys; sys.setswitchinterval({interval}); from bertstream.server.cli import "
            f"main; sys.exit(main(['serve', '--port', '{port}', '--dtype', 'bfloat16', "
            f"'--log-level', 'WARNING']))")
    servers[name] = (subprocess.Popen([sys.executable, "-c", code],
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"}),
                     f"127.0.0.1:{port}")
time.sleep(25)
results = {name: ([], []) for name in servers}
try:
    for _ in range(3):
        for name, (_, target) in servers.items():
            with Client(target, timeout=300) as client:
                client.embed([short])
                start = time.perf_counter()
                done = sum(len(part) for part in client.stream(texts))
                results[name][0].append(done / (time.perf_counter() - start))
                latencies = []
                for _ in range(60):
                    start = time.perf_counter()
                    client.embed([short])
                    latencies.append(time.perf_counter() - start)
                results[name][1].append(statistics.median(latencies) * 1e3)
    for name, (rates, p50s) in results.items():
        print(f"{name}: texts/s {[round(r) for r in rates]}, p50 ms {[round(p, 2) for p in p50s]}")
finally:
    for process, _ in servers.values():
        process.terminate()
