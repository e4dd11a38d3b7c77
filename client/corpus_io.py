"""Reading corpora and writing embeddings incrementally, resumably, for `bertstream embed`.

Writers commit rows in order and can say how many rows a previous, interrupted run committed, so a
resumed run skips exactly those inputs: no row twice, none missing.
"""

from __future__ import annotations

import ast
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np


class InputError(Exception):
    """The input cannot be read as asked; the message says where and why."""


# ---------------------------------------------------------------------- input

def input_format(path: str, declared: str | None) -> str:
    if declared:
        return declared
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _require(path: str) -> None:
    if path != "-" and not os.path.isfile(path):
        raise InputError(f"{path}: no such file")


def count_texts(path: str, fmt: str) -> int | None:
    """How many texts the input holds (for the progress bar); None for standard input."""
    _require(path)
    if path == "-":
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as file:  # lines end at \n only, as read_texts reads them
        return sum(1 for line in file if fmt == "text" or line.strip())


def read_texts(path: str, fmt: str, field: str = "text") -> Iterator[str]:
    """Texts one at a time: a line of a text file, `field` of a JSON Lines record, or the
    `field` column of a Parquet file. "-" reads standard input (text or JSON Lines)."""
    _require(path)
    if fmt == "parquet":
        yield from _parquet_texts(path, field)
        return
    # Lines end at \n only (a \r\n ending loses its \r too); a bare \r inside a line is part of
    # the text, so reading and counting (count_texts) always agree on the rows.
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n") if path == "-" \
        else open(path, encoding="utf-8", newline="\n")
    try:
        for number, line in enumerate(stream, 1):
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line
            if fmt == "text":
                yield line
            elif line.strip():
                yield _json_field(path, number, line, field)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    finally:
        if path == "-":
            stream.detach()  # leave sys.stdin itself open
        else:
            stream.close()


def _json_field(path: str, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise InputError(f"{path}:{number}: no field {field!r} (use --field)")
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f"{path}:{number}: field {field!r} is not a string")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # JSON can spell a lone surrogate (\ud800)
            raise InputError(f"{path}:{number}: field {field!r} holds a lone surrogate "
                             f"(U+{ord(text[exc.start]):04X}), which is no text") from None
    return text


def _parquet_texts(path: str, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a Parquet file ({exc})") from None
    if column not in file.schema_arrow.names:
        raise InputError(f"{path}: no column {column!r} (columns: {file.schema_arrow.names}; "
                         f"use --field)")
    for batch in file.iter_batches(columns=[column]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise InputError(f"{path}: column {column!r} holds a non-string value {text!r}")
            yield text


# ---------------------------------------------------------------------- output

def committed_rows(path: str) -> int:
    """The rows an output holds committed, read without changing it (0 if there is none)."""
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        if os.path.exists(path):
            return pq.ParquetFile(path).metadata.num_rows
        parts = Path(path + ".parts")
        return sum(pq.ParquetFile(part).metadata.num_rows
                   for part in sorted(parts.glob("part-*.parquet"))) if parts.exists() else 0
    if not os.path.exists(path) or os.path.getsize(path) < NpyWriter.HEADER_BYTES:
        return 0
    return NpyWriter.committed(path)[0]


def open_writer(path: str, resume: bool, commit_rows: int = 8192, sparse: bool = False):
    """A writer of the output's kind; sparse: SPLADE vectors, which only Parquet holds."""
    if Path(path).suffix.lower() == ".parquet":
        return ParquetWriter(path, resume, commit_rows, sparse)
    if sparse:
        raise InputError(f"{path}: sparse vectors are written to .parquet (indices and values "
                         f"columns), not {Path(path).suffix or 'a file without a suffix'}")
    if Path(path).suffix.lower() == ".npy":
        return NpyWriter(path, resume)
    raise InputError(f"{path}: output must end in .npy or .parquet")


def _sync(file) -> None:
    """Flush to the disk: only then may a row count as committed (an OS crash keeps it)."""
    file.flush()
    os.fsync(file.fileno())


def _sync_directory(path: Path) -> None:
    """Make a rename in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class NpyWriter:
    """A float32 .npy grown row by row. Rows are written and synced, then the header is rewritten
    with the new count and synced: the file is always a valid array of the rows committed so
    far. On resume, bytes past them (a write cut short) are dropped, a file holding fewer
    complete rows than its header claims (an OS crash) counts only those, and a file a run left
    before its first commit (empty, or with no rows) is started over."""

    HEADER_BYTES = 128  # fixed, so the header can be rewritten in place as the row count grows

    def __init__(self, path: str, resume: bool):
        self.path = path
        self.rows, self.width = 0, None
        # Shorter than a header: a run stopped before its first commit; start over.
        if resume and os.path.exists(path) and os.path.getsize(path) >= self.HEADER_BYTES:
            self.rows, self.width = self.committed(path)
            if not self.rows:
                self.width = None  # nothing committed: the first batch sets the width
            self._file = open(path, "r+b")
            self._file.truncate(self.HEADER_BYTES + self.rows * (self.width or 0) * 4)
            self._file.seek(0, os.SEEK_END)
        else:
            self._file = open(path, "wb")

    @classmethod
    def committed(cls, path: str) -> tuple[int, int]:
        """(rows, width) the file at `path` holds committed; read only."""
        with open(path, "rb") as file:
            preamble = file.read(10)
            if preamble[:6] != b"\x93NUMPY":
                raise InputError(f"{path}: not a .npy file; cannot resume into it")
            header = ast.literal_eval(file.read(int.from_bytes(preamble[8:10], "little"))
                                      .decode("latin1"))
        if header.get("descr") != "<f4" or len(header.get("shape", ())) != 2:
            raise InputError(f"{path}: not a 2-d float32 array; cannot resume into it")
        rows, width = header["shape"]
        present = (os.path.getsize(path) - cls.HEADER_BYTES) // (4 * width) if width else 0
        return min(rows, max(present, 0)), width

    def _write_header(self) -> None:
        header = repr({"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.width)})
        header = header.ljust(self.HEADER_BYTES - 10 - 1) + "\n"
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                         + header.encode("latin1"))
        self._file.seek(0, os.SEEK_END)

    def append(self, vectors: np.ndarray) -> None:
        if self.width is None:
            self.width = vectors.shape[1]
            self._write_header()
        elif vectors.shape[1] != self.width:
            raise InputError(f"{self.path}: holds vectors of width {self.width}, these are "
                             f"{vectors.shape[1]} wide (other options than the first run?)")
        self._file.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        _sync(self._file)  # the rows are on disk before the header counts them
        self.rows += len(vectors)
        self._write_header()  # commit: only now do the rows count
        _sync(self._file)

    def flush(self) -> None:
        """Every appended row is committed already."""

    def close(self) -> None:
        if self.width is None:  # nothing embedded: still leave a valid (empty) array
            self.width = 0
            self._write_header()
            _sync(self._file)
        self._file.close()


class ParquetWriter:
    """Parquet with columns id (row number, int64) and embedding (list of float32); for sparse
    vectors, id, indices (list of int32, ascending vocabulary ids) and values (list of float32).

    Rows are committed as complete part files in OUTPUT.parts/ (written whole, then renamed), so
    an interrupted run leaves only complete parts; close() joins them into OUTPUT."""

    def __init__(self, path: str, resume: bool, commit_rows: int = 8192, sparse: bool = False):
        import pyarrow.parquet as pq

        self.path = path
        self.commit_rows, self.sparse = commit_rows, sparse
        self.parts = Path(path + ".parts")
        self._pending: list = []  # dense: float32 arrays; sparse: (indices, values) per row
        self._pending_rows = 0
        if not resume:  # a new run: nothing of an earlier one may be counted as committed
            for old in self.parts.glob("*") if self.parts.exists() else ():
                old.unlink()
            Path(path).unlink(missing_ok=True)
        self.parts.mkdir(exist_ok=True)
        if resume and os.path.exists(path):
            # A finished file holds every part: parts still here are ones a crash in close()
            # left after writing it. Continue from the file alone, as part 0.
            for stale in self._part_files():
                stale.unlink()
            os.replace(path, self.parts / self._part_name(0))
            _sync_directory(self.parts)
        self.rows = sum(pq.ParquetFile(part).metadata.num_rows for part in self._part_files())

    @staticmethod
    def _part_name(first_row: int) -> str:
        return f"part-{first_row:015d}.parquet"

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def append(self, vectors) -> None:
        """A float32 (rows, width) array; sparse: a list of (indices, values), one per row."""
        if self.sparse:
            self._pending.extend(vectors)
        else:
            self._pending.append(np.asarray(vectors, dtype=np.float32))
        self._pending_rows += len(vectors)
        if self._pending_rows >= self.commit_rows:
            self.flush()

    def flush(self) -> None:
        """Commit the rows appended so far as a part file."""
        import pyarrow.parquet as pq

        if not self._pending:
            return
        table = self._table(self._pending)
        self._pending, self._pending_rows = [], 0
        temporary = self.parts / (self._part_name(self.rows) + ".tmp")
        with open(temporary, "wb") as file:
            pq.write_table(table, file)
            _sync(file)
        os.replace(temporary, self.parts / self._part_name(self.rows))
        _sync_directory(self.parts)  # committed: the part is whole on disk under its name
        self.rows += table.num_rows

    def _table(self, pending: list):
        import pyarrow as pa

        if self.sparse:
            lengths = np.array([len(indices) for indices, _ in pending], dtype=np.int32)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            columns = {
                "indices": pa.ListArray.from_arrays(offsets, pa.array(
                    np.concatenate([i for i, _ in pending]).astype(np.int32), pa.int32())),
                "values": pa.ListArray.from_arrays(offsets, pa.array(
                    np.concatenate([v for _, v in pending]).astype(np.float32), pa.float32())),
            }
            rows = len(pending)
        else:
            vectors = np.concatenate(pending)
            columns = {"embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1)), vectors.shape[1])}
            rows = len(vectors)
        return pa.table({"id": pa.array(np.arange(self.rows, self.rows + rows), pa.int64()),
                         **columns})

    def close(self) -> None:
        import pyarrow.parquet as pq

        self.flush()
        parts = self._part_files()
        if parts:
            schema = pq.ParquetFile(parts[0]).schema_arrow
            with open(self.path + ".tmp", "wb") as file:
                with pq.ParquetWriter(file, schema) as out:
                    for part in parts:
                        out.write_table(pq.read_table(part))
                _sync(file)
            os.replace(self.path + ".tmp", self.path)
            _sync_directory(Path(self.path).resolve().parent)
        for part in parts:
            part.unlink()
        self.parts.rmdir()
