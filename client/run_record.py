"""What produced an output's committed rows, kept beside it (OUTPUT.run.json), so that a `--resume`
continues the same run or refuses, saying what changed.

A resumed run trusted whatever the output held: resumed with another input file, other options
or against another model, it exited 0 with rows of two runs mixed. The record names the input
(its path, size, format and field, and a hash of its first texts), the embedding options and,
from the server's Info, the model, its precision, its length limit and its default pipeline. It
is written (atomically) before the first row is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

HASHED_TEXTS = 1000  # the input's first texts, hashed: its identity beside path and size


def record_path(output: str) -> Path:
    return Path(output + ".run.json")


def texts_hash(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little") + data)  # lengths: no two lists collide
    return digest.hexdigest()


def with_identity(texts: Iterator[str]) -> tuple[dict, Iterator[str]]:
    """The first HASHED_TEXTS texts' count and hash, and the texts again, all of them (standard
    input included: the first ones are kept, not read twice)."""
    first = list(itertools.islice(texts, HASHED_TEXTS))
    return {"texts": len(first), "sha256": texts_hash(first)}, itertools.chain(first, texts)


def model_of(info: dict) -> dict:
    """What of the server's Info decides the vectors: the model, its precision, its length
    limit and its default pipeline."""
    return {key: info[key] for key in ("model", "dtype", "max_input_tokens", "hidden_size",
                                       "pipeline", "tokenizing_sha256")}


def describe(input_path: str, fmt: str, field: str, first: dict, options: dict,
             model: dict) -> dict:
    source = {"path": input_path if input_path == "-" else str(Path(input_path).resolve()),
              "size": None if input_path == "-" else os.path.getsize(input_path),
              "format": fmt, "field": field if fmt != "text" else None, "first": first}
    return json.loads(json.dumps({"input": source, "options": options, "model": model}))  # as read


def write(output: str, record: dict) -> None:
    path = record_path(output)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as file:
        json.dump(record, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read(output: str) -> dict | None:
    try:
        with open(record_path(output)) as file:
            return json.load(file)
    except FileNotFoundError:
        return None


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between the run that wrote the rows and this one, in words."""
    found = []
    was, now_input = saved.get("input", {}), now["input"]
    for key, name in (("path", "input"), ("format", "input format"), ("field", "field"),
                      ("size", "input size (bytes)")):
        if was.get(key) != now_input[key]:
            found.append(f"{name}: {was.get(key)!r} then, {now_input[key]!r} now")
    if was.get("first") != now_input["first"]:
        found.append(f"the input's first {now_input['first']['texts']:,} texts differ from "
                     f"those of the run that wrote the rows")
    was_model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    for key, value in now["model"].items():
        if was_model.get(key) != value:
            found.append(f"the server's {key}: {was_model.get(key)!r} then, {value!r} now"
                         if key != "pipeline" else "the server's default pipeline differs")
    for key in sorted(set(saved.get("options", {})) | set(now["options"])):
        before, after = saved.get("options", {}).get(key), now["options"].get(key)
        if before != after:
            found.append(f"--{key.replace('_', '-')}: {before!r} then, {after!r} now")
    return found
