"""`bertstream serve`: the command line of the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

log = logging.getLogger("bertstream")

# Measured (BENCHMARKS.md): on the CPU, small batches keep activations in cache; 1024 tokens was
# the fastest budget for float32 and bfloat16 alike. A GPU wants big batches.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 32768}


def serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve embeddings over gRPC")
    p.add_argument("--model", default=None,
                   help="a local model folder or a hub name (default: the packaged all-MiniLM-L6-v2, "
                        "loaded with no network)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="forward-pass precision (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 = any free)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one forward pass, rows x longest (default 1024 on CPU, "
                        "32768 on GPU)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max input tokens per text (default: the model's)")
    p.add_argument("--max-texts-per-request", type=int, default=10_000)
    p.add_argument("--max-chars-per-text", type=int, default=100_000)
    p.add_argument("--max-message-bytes", type=int, default=64 * 2**20)
    p.add_argument("--stream-window", type=int, default=64,
                   help="stream messages read ahead of their responses (per stream)")
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: cores)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds calls in flight get to finish at shutdown")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run_serve)


async def serve(args) -> None:
    from bertstream.server.engine import Engine
    from bertstream.server.service import Limits, start_server

    engine = Engine(args.model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                    threads=args.threads)
    limits = Limits(
        max_texts_per_request=args.max_texts_per_request,
        max_chars_per_text=args.max_chars_per_text,
        max_batch_tokens=args.max_batch_tokens or DEFAULT_BATCH_TOKENS[engine.device.type],
        max_message_bytes=args.max_message_bytes,
        stream_window=args.stream_window,
    )
    server, port, batcher = await start_server(engine, limits, args.host, args.port)
    log.info("serving model=%s device=%s dtype=%s address=%s:%d max_length=%d "
             "max_batch_tokens=%d", engine.model_name, engine.device, engine.dtype, args.host,
             port, engine.max_length, limits.max_batch_tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping: calls in flight get %.1f s", args.grace)
        await server.stop(args.grace)
        batcher.close()
        log.info("stopped")


def run_serve(args) -> int:
    asyncio.run(serve(args))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertstream", description="BERT embeddings over gRPC")
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
