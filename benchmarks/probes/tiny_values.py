"""Probe: requests made of millions of tiny values, each against a `bertstream serve` of its own
(default limits, HTTP on): the server's peak RSS growth and the time to its answer.

    python benchmarks/probes/tiny_values.py

Over gRPC, Embed and Tokenize of 15 million two-character texts (60 MB); over HTTP,
/v1/embeddings bodies of 10 million such texts, 30 million numbers and 20 million empty arrays
(the bodies of tests/test_hostile.py). First, what protobuf alone takes to parse the gRPC bytes.
"""
import resource
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import free_port, serve_process  # noqa: E402
from tests.test_hostile import HTTP_BODIES, peak_rss, post_raw  # noqa: E402

from bertstream.client import Client  # noqa: E402
from bertstream.proto import embedder_pb2 as pb  # noqa: E402

GRPC_BODIES = {"Embed": b"\x12\x02ab" * 15_000_000, "Tokenize": b"\x0a\x02ab" * 15_000_000}

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
request = pb.EmbedRequest.FromString(GRPC_BODIES["Embed"])
print(f"protobuf's parse of the 60 MB Embed request alone: "
      f"+{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024:,.0f} MB "
      f"({len(request.texts):,} texts)", flush=True)
del request

for what, body in [*GRPC_BODIES.items(), *HTTP_BODIES.items()]:
    http_port = free_port()
    process, target = serve_process("--log-level", "WARNING", "--http-port", str(http_port))
    try:
        with Client(target, timeout=120) as client:
            client.embed(["warm up a normal request"] * 64)
        baseline, started = peak_rss(process.pid), time.perf_counter()
        if what in GRPC_BODIES:
            with grpc.insecure_channel(target) as channel:
                try:
                    channel.unary_unary(f"/bertstream.v1.Embedder/{what}")(body, timeout=300)
                    answer = "answered"
                except grpc.RpcError as error:
                    answer = f"{error.code().name}: {error.details()[:60]}"
        else:
            status, text = post_raw(f"http://127.0.0.1:{http_port}/v1/embeddings", body)
            answer = f"{status}: {text[22:82].decode(errors='replace')}"
        print(f"{what} ({len(body) / 1e6:.0f} MB): {answer} after "
              f"{time.perf_counter() - started:.1f} s; peak RSS "
              f"+{(peak_rss(process.pid) - baseline) / 2**20:,.0f} MB", flush=True)
    finally:
        process.kill()
        process.wait()
