"""Probe: what a big HTTP answer costs the event loop to encode (p50 of 3 runs each).

    python benchmarks/probes/json_answer.py [--rows 10000] [--width 384]

An OpenAI /v1/embeddings answer of `rows` float32 vectors, encoded as the HTTP front-end did
before (tolist, then one json.dumps), with one orjson call, and as it does now (orjson, a piece
of JSON_PIECE_VALUES values at a time: the longest piece is how long the loop is held at once).
Then the largest gRPC Tokenize answer (10,000 texts of 256 tokens): building its messages (on a
tokenizer thread now) and serializing it (gRPC does that on the loop).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_throughput import cpu  # noqa: E402

from bertstream.proto import embedder_pb2 as pb  # noqa: E402
from bertstream.server.http import row_pieces  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int, default=10_000)
parser.add_argument("--width", type=int, default=384)
args = parser.parse_args()
vectors = np.random.default_rng(0).standard_normal((args.rows, args.width)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)


def items(first, rows):
    return [{"object": "embedding", "index": first + i, "embedding": row}
            for i, row in enumerate(rows)]


def with_json():
    return json.dumps({"object": "list", "data": items(0, vectors.tolist())},
                      separators=(",", ":")).encode()


def with_orjson():
    return orjson.dumps({"object": "list", "data": items(0, vectors)},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def in_pieces():
    longest, pieces = 0.0, []
    generated = row_pieces(vectors, items)
    while True:
        started = time.perf_counter()
        piece = next(generated, None)
        longest = max(longest, time.perf_counter() - started)
        if piece is None:
            return longest, pieces
        pieces.append(piece)


def p50(fn):
    times, result = [], None
    for _ in range(3):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


print(cpu())
plain, encoded = p50(with_json)
fast, _ = p50(with_orjson)
pieced, (longest, pieces) = p50(in_pieces)
decoded = np.array([item["embedding"] for item in json.loads(b"[" + b",".join(pieces) + b"]")],
                   dtype=np.float32)
assert np.array_equal(decoded, vectors)  # shortest float32 form: exact
print(f"{args.rows:,} vectors of {args.width}: json {plain:.3f} s ({len(encoded) / 1e6:.0f} MB); "
      f"orjson whole {fast:.3f} s; orjson in {len(pieces)} pieces {pieced:.3f} s, the longest "
      f"{longest * 1e3:.1f} ms ({sum(map(len, pieces)) / 1e6:.0f} MB)")

started = time.perf_counter()
response = pb.TokenizeResponse()
for _ in range(10_000):
    tokens = response.texts.add(truncated=True).tokens
    for j in range(256):
        tokens.add(id=2773, text="word", start=5 * j, end=5 * j + 4)
built = time.perf_counter() - started
started = time.perf_counter()
size = len(response.SerializeToString())
print(f"Tokenize of 10,000 x 256 tokens: building {built:.2f} s, serializing "
      f"{time.perf_counter() - started:.2f} s ({size / 1e6:.0f} MB)")
