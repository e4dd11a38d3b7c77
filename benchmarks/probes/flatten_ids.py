"""Probe: the tokenizer's output (a list of ids per text) into the server's flat int32 buffer.

    python -m benchmarks.probes.flatten_ids

64 corpus paragraphs (a message), the packaged model's tokenizer: reading the encodings' ids
(lists of Python ints, the tokenizer's own cost), then numpy converting each list (what the
server did until TokenRows), numpy over one chained iterator, and ext.flatten_ids (one C loop).
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from benchmarks.harness import machine, stdlib_paragraphs


def microseconds(work, repeat: int = 2000) -> float:
    work()
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) / repeat * 1e6


def main() -> None:
    from bertstream import ext
    from bertstream.server.engine import Engine

    tokenizer = Engine(device="cpu")._truncating
    encodings = tokenizer.encode_batch_fast(list(stdlib_paragraphs()[:64]))
    tokens = sum(len(encoding.ids) for encoding in encodings)

    def chained():
        lists = [encoding.ids for encoding in encodings]
        return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=tokens)

    print(f"{machine()}; 64 paragraphs, {tokens:,} tokens; µs per message")
    for name, work in (
            ("the encodings' ids alone (lists)", lambda: [e.ids for e in encodings]),
            ("an int32 array per text", lambda: [np.array(e.ids, dtype=np.int32)
                                                 for e in encodings]),
            ("np.fromiter over the chained lists", chained),
            ("ext.flatten_ids", lambda: ext.flatten_ids([e.ids for e in encodings]))):
        print(f"{name}: {microseconds(work):.0f} µs")


if __name__ == "__main__":
    main()
