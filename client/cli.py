"""`bertstream embed INPUT -o OUTPUT`: a corpus through one or more servers, resumably."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import grpc

from .core import COMBINES, DTYPES, POOLINGS, PRIORITIES, QUANTIZED, EmbedStreamError
from . import run_record
from .corpus_io import (InputError, committed_rows, count_texts, input_format,
                        open_writer, read_texts)
from .sync import Client


def embed_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="embed a corpus into .npy or .parquet",
        description="Embed every text of INPUT through bertstream server(s) into OUTPUT, one "
                    "row per text, in input order.")
    p.add_argument("input", help="text file (one text per line), .jsonl, .parquet, or - (stdin)")
    p.add_argument("-o", "--output", required=True, help=".npy (float32) or .parquet (id, embedding)")
    p.add_argument("--server", nargs="+", default=["127.0.0.1:50051"], metavar="HOST:PORT",
                   help="one or more replicas (work spreads over all), or a dns:/// target")
    p.add_argument("--input-format", choices=("text", "jsonl", "parquet"),
                   help="default: from the file name (.jsonl/.ndjson, .parquet, else text)")
    p.add_argument("--field", default="text", help="JSON Lines field / Parquet column (default text)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: skip the rows OUTPUT already holds")
    p.add_argument("--model", default=None,
                   help="which of the server's models (default: the server's default model)")
    p.add_argument("--pooling", default=None,
                   choices=[name for name in POOLINGS if name not in (None, "none")],
                   help="a raw pooling (default: the model's own pipeline: its pooling, Dense, "
                        "Normalize and default prompt)")
    p.add_argument("--layers", type=int, nargs="+", default=[-1])
    p.add_argument("--layer-combine", choices=list(COMBINES), default="concat")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise each vector, or not (default: the model's choice with its "
                        "own pipeline, off with --pooling)")
    p.add_argument("--prompt-name", help="one of the model's prompts, prepended to every text")
    p.add_argument("--prompt", help="free-text prompt prepended to every text")
    p.add_argument("--dimensions", type=int, default=None,
                   help="keep the first N values of each vector (renormalized if normalized)")
    p.add_argument("--dtype", choices=[d for d in DTYPES if d not in QUANTIZED],
                   default="float32",
                   help="wire precision (output is float32 either way)")
    p.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="fail on texts over the model's length instead of cutting them")
    p.add_argument("--priority", choices=[p for p in PRIORITIES if p], default="bulk",
                   help="the server's lane: bulk (default) fills what interactive calls leave")
    p.add_argument("--sparse", action="store_true",
                   help="SPLADE vectors from a sparse model, into .parquet (id, indices, values)")
    p.add_argument("--top-k", type=int, default=None,
                   help="--sparse: keep each vector's K largest values (default: the model's "
                        "max_active_dims, else every non-zero value)")
    p.add_argument("--tokenize-locally", action="store_true",
                   help="tokenize here, with the server's own tokenizer, and send token ids "
                        "(the same vectors; the tokenizing on this machine's cores)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per message")
    p.add_argument("--window", type=int, default=64, help="messages in flight")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds a message may wait for its answer before the run stops "
                        "(resumable; default 300)")
    p.add_argument("--token", help="bearer token (or set BERTSTREAM_TOKEN)")
    p.add_argument("--tls-ca", help="CA to trust (PEM): connect with TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", help="client key (PEM), for mutual TLS")
    p.add_argument("--commit-rows", type=int, default=8192,
                   help=".parquet: rows per committed part (what an interruption can cost)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_embed)


def run_embed(args) -> int:
    """Exit status: 0 done, 1 server or output trouble, 2 bad input (or a --resume that is not
    the same run), 130 interrupted."""
    started = time.perf_counter()
    token = args.token or os.environ.get("BERTSTREAM_TOKEN")
    fmt = input_format(args.input, args.input_format)
    writer = None
    try:
        options = _options(args)
    except ValueError as exc:
        return _fail(str(exc), 2)
    try:
        total = count_texts(args.input, fmt)
        tokens = 0
        with Client(args.server if len(args.server) > 1 else args.server[0], token=token,
                    tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                    tokenize_locally=args.tokenize_locally, model=args.model) as client:
            first, texts = run_record.with_identity(read_texts(args.input, fmt, args.field))
            record = run_record.describe(args.input, fmt, args.field, first, options,
                                         run_record.model_of(client.info()))
            done = committed_rows(args.output) if args.resume else 0
            if done:  # checked before the output is touched
                texts = _same_run(args, record, texts, done, total)
            writer = open_writer(args.output, args.resume, args.commit_rows, args.sparse)
            run_record.write(args.output, record)
            stream = client.stream_sparse if args.sparse else client.stream
            calls = {key: value for key, value in options.items() if key != "sparse"}
            with _progress(args.progress, total, done) as bar:
                for vectors in stream(texts, args.batch_size, args.window,
                                      message_timeout=args.timeout, priority=args.priority,
                                      **calls):
                    writer.append(vectors)
                    tokens += client.last_usage.tokens
                    if bar is not None:
                        bar.update(len(vectors))
                        bar.set_postfix_str(
                            f"{tokens / (time.perf_counter() - started):,.0f} tokens/s",
                            refresh=False)
        writer.close()
        seconds = time.perf_counter() - started
        embedded = writer.rows - done
        print(f"embedded {embedded:,} texts ({tokens:,} tokens) in {seconds:.1f} s: "
              f"{embedded / seconds:,.0f} texts/s, {tokens / seconds:,.0f} tokens/s -> "
              f"{args.output} ({writer.rows:,} rows)", file=sys.stderr)
        return 0
    except InputError as exc:
        return _fail(f"input: {exc}", 2)
    except NotTheSameRun as exc:
        return _fail(f"--resume: {exc}; {args.output} is left as it was", 2)
    except KeyboardInterrupt:
        _commit(writer)
        return _fail(f"interrupted with {writer.rows if writer else 0:,} rows written; "
                     f"run again with --resume to continue", 130)
    except (grpc.RpcError, EmbedStreamError) as exc:
        _commit(writer)
        code = exc.code() if isinstance(exc, grpc.RpcError) else exc.code
        details = exc.details() if isinstance(exc, grpc.RpcError) else exc.message
        hint = " (is it running?)" if code == grpc.StatusCode.UNAVAILABLE else ""
        return _fail(f"server {' '.join(args.server)}: {code.name}: {details}{hint}; "
                     f"{writer.rows if writer else 0:,} rows written, --resume continues", 1)
    except OSError as exc:
        return _fail(f"{exc}", 1)


# What --sparse leaves out: a sparse vector has no pooling, layers, prompt or wire dtype to choose.
DENSE_ONLY = {"pooling": None, "layers": [-1], "layer_combine": "concat", "normalize": None,
              "prompt_name": None, "prompt": None, "dimensions": None, "dtype": "float32",
              "tokenize_locally": False}


def _options(args) -> dict:
    """The options that decide the rows (kept in the run record); ValueError for a dense option
    given with --sparse."""
    if not args.sparse:
        if args.top_k is not None:
            raise ValueError("--top-k applies to --sparse only")
        return {key: getattr(args, key) for key in DENSE_ONLY if key != "tokenize_locally"} \
            | {"truncate": args.truncate}
    given = [key for key, default in DENSE_ONLY.items() if getattr(args, key) != default]
    if given:
        raise ValueError(", ".join(f"--{key.replace('_', '-')}" for key in given)
                         + " does not apply to --sparse")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    return {"sparse": True, "top_k": args.top_k, "truncate": args.truncate}


class NotTheSameRun(Exception):
    """A --resume whose input, options or model differ from those that wrote the output."""


def _same_run(args, record: dict, texts, done: int, total: int | None):
    """The texts after the `done` committed rows, once the output's record says this is the run
    that wrote them; else NotTheSameRun, naming what differs."""
    saved = run_record.read(args.output)
    if saved is None:
        raise NotTheSameRun(f"{args.output} holds {done:,} rows but no record of the run that "
                            f"wrote them ({run_record.record_path(args.output).name}); run "
                            f"without --resume to start over")
    changed = run_record.differences(saved, record)
    if changed:
        raise NotTheSameRun(f"not the run that wrote {args.output}: " + "; ".join(changed))
    if total is not None and done > total:
        raise NotTheSameRun(f"{args.output} holds {done:,} rows, more than the {total:,} texts "
                            f"of {args.input}")
    skipped = sum(1 for _ in itertools.islice(texts, done))
    if skipped < done:  # standard input, which cannot be counted ahead
        raise NotTheSameRun(f"{args.output} holds {done:,} rows, more than the {skipped:,} "
                            f"texts of {args.input}")
    return texts


def _commit(writer) -> None:
    if writer is not None:
        writer.flush()


def _fail(message: str, status: int) -> int:
    print(f"bertstream embed: {message}", file=sys.stderr)
    return status


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int | None, done: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit=" texts", unit_scale=True, dynamic_ncols=True,
                file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertstream")
    embed_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
