"""`bertstream serve`: the command line of the server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from importlib.metadata import entry_points

from .limits import BATCH_TOKENS_BY_DEVICE, COMPUTE_DTYPES, DTYPE_BY_DEVICE, Limits

log = logging.getLogger("bertstream")

def serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve embeddings over gRPC")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                   help="a local model folder or a hub name, served as NAME (default: the "
                        "folder's name); repeat it to serve several models in one process, "
                        "sharing one queue and the forward workers; the first is the default "
                        "(default: the packaged all-MiniLM-L6-v2, loaded with no network)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help=f"forward-pass precision (default: {DTYPE_BY_DEVICE['cpu']} on CPU, "
                        f"{DTYPE_BY_DEVICE['cuda']} on GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 = any free)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one forward pass, rows x longest (default "
                        f"{BATCH_TOKENS_BY_DEVICE['cpu']} on CPU, {BATCH_TOKENS_BY_DEVICE['cuda']} "
                        "on GPU)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max input tokens per text (default: the model's)")
    p.add_argument("--max-texts-per-request", type=int, default=Limits.max_texts_per_request)
    p.add_argument("--max-chars-per-text", type=int, default=Limits.max_chars_per_text)
    p.add_argument("--max-message-bytes", type=int, default=Limits.max_message_bytes)
    p.add_argument("--stream-window", type=int, default=Limits.stream_window,
                   help="stream messages read ahead of their responses (per stream)")
    p.add_argument("--max-queue-texts", type=int, default=Limits.max_queue_texts,
                   help="texts admitted and waiting for a forward pass, per lane (interactive, "
                        "bulk); beyond it Embed gets RESOURCE_EXHAUSTED and stream messages wait "
                        "their turn")
    p.add_argument("--max-response-bytes", type=int, default=Limits.max_response_bytes,
                   help="largest response tensor; bigger requests are refused before any compute "
                        f"(default {Limits.max_response_bytes // 2**20} MiB)")
    p.add_argument("--max-held-bytes", type=int, default=Limits.max_held_bytes,
                   help="requests read ahead and answers not yet taken, all clients together "
                        f"(default {Limits.max_held_bytes // 2**20} MiB)")
    p.add_argument("--max-connection-held-bytes", type=int,
                   default=Limits.max_connection_held_bytes,
                   help="the same, one connection's share: past it its streams stop being read "
                        f"(default {Limits.max_connection_held_bytes // 2**20} MiB)")
    p.add_argument("--stall-timeout", type=float, default=Limits.stall_timeout_s,
                   help="a connection that holds its share without taking an answer this many "
                        f"seconds is cut, its calls cancelled (default {Limits.stall_timeout_s:g})")
    p.add_argument("--max-concurrent-streams", type=int, default=Limits.max_concurrent_streams,
                   help="gRPC calls open at once on one connection (default "
                        f"{Limits.max_concurrent_streams})")
    p.add_argument("--http-read-timeout", type=float, default=Limits.http_read_timeout_s,
                   help="seconds an HTTP request's headers and body may take to arrive, from the "
                        f"connection's start or its previous answer (default "
                        f"{Limits.http_read_timeout_s:g}); then 408")
    p.add_argument("--max-http-connections", type=int, default=Limits.max_http_connections,
                   help="HTTP connections open at once; more get 503 (default: half the file "
                        "descriptors free at start, the rest kept for gRPC)")
    p.add_argument("--bulk-share", type=float, default=Limits.bulk_share,
                   help="while both lanes have work, at least this share of forward passes goes "
                        "to bulk requests; interactive ones get the rest, first (default "
                        f"{Limits.bulk_share:g})")
    p.add_argument("--tls-cert", help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to: "
                                           "mutual TLS, clients without one are refused")
    p.add_argument("--auth-token-file",
                   help="file of bearer tokens, one per line: calls must send "
                        "'authorization: Bearer <token>' or get UNAUTHENTICATED")
    p.add_argument("--auth-health", choices=("open", "closed"), default="open",
                   help="with --auth-token-file: may health checks come without a token "
                        "(default open, for probes)")
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: cores)")
    p.add_argument("--forward-workers", type=int, default=None,
                   help="forward passes run side by side, sharing the threads (default: one per "
                        "thread on CPU, 2 on GPU)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds calls in flight get to finish at shutdown")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve HTTP on this port (same host, TLS, tokens and limits): "
                        "OpenAI-compatible /v1/embeddings, text-embeddings-inference-compatible "
                        "/embed, /tokenize, /info, /health, /metrics, docs at /docs (default: off)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port, at /metrics (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics endpoint (default 127.0.0.1: it has neither TLS "
                        "nor auth, so it is not exposed with --host unless asked)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line, for log shippers")
    p.set_defaults(func=run_serve)


class LogFormatter(logging.Formatter):
    """Text or JSON lines; structured fields passed as `extra={"fields": {...}}` appear as
    key=value pairs (text) or as keys of the object (JSON)."""

    def __init__(self, as_json: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        if not self.as_json:
            return super().format(record) + "".join(f" {k}={v}" for k, v in fields.items())
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **fields}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


async def serve(args) -> None:
    from .engine import Engine
    from .security import read_tokens
    from .app import start_server
    from .security import Security

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    security = Security(
        auth_tokens=tuple(read_tokens(args.auth_token_file)) if args.auth_token_file else (),
        health_open=args.auth_health == "open", tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca)
    engines = []
    for name, path in model_arguments(args.model):
        try:
            engines.append(Engine(path, device=args.device, dtype=args.dtype,
                                  max_length=args.max_length, threads=args.threads,
                                  forward_workers=args.forward_workers, name=name))
        except (OSError, ValueError) as exc:
            raise ValueError(f"model {name or path}: {exc}") from None
    engine = engines[0]
    limits = Limits(
        max_texts_per_request=args.max_texts_per_request,
        max_chars_per_text=args.max_chars_per_text,
        max_batch_tokens=args.max_batch_tokens or BATCH_TOKENS_BY_DEVICE[engine.device.type],
        max_message_bytes=args.max_message_bytes,
        stream_window=args.stream_window,
        max_queue_texts=args.max_queue_texts,
        max_response_bytes=args.max_response_bytes,
        max_held_bytes=args.max_held_bytes,
        max_connection_held_bytes=args.max_connection_held_bytes,
        stall_timeout_s=args.stall_timeout,
        max_concurrent_streams=args.max_concurrent_streams,
        http_read_timeout_s=args.http_read_timeout,
        max_http_connections=args.max_http_connections,
        bulk_share=args.bulk_share,
    )
    running = await start_server(engines, limits, args.host, args.port, security,
                                 http_port=args.http_port,
                                 http_metrics=args.metrics_port is not None)
    port = running.port
    metrics_http = None
    if args.metrics_port is not None:
        metrics_http = running.batcher.metrics.serve_http(args.metrics_port, args.metrics_host)
    for model in engines:
        log.info("model", extra={"fields": {
            "name": model.name, "path": model.model_name, "kind": model.kind,
            "tasks": ",".join(model.tasks), "max_length": model.max_length,
            "attention": model.attention,
            "pipeline": describe_pipeline(model) if "embed" in model.tasks else "none",
            "weights_mib": round(model.weight_bytes / 2**20, 1)}})
    log.info("serving", extra={"fields": {
        "models": ",".join(model.name for model in engines), "default_model": engine.name,
        "weights_mib": round(sum(model.weight_bytes for model in engines) / 2**20, 1),
        "device": str(engine.device), "dtype": engine.dtype,
        "address": f"{args.host}:{port}",
        "threads": engine.threads, "forward_workers": engine.forward_workers,
        "forward_flops": engine.FLOPS_FORMULA,
        "tls": "mutual" if args.tls_client_ca else bool(args.tls_cert),
        "auth": f"{len(security.auth_tokens)} token(s), health {args.auth_health}"
        if security.auth_tokens else "off",
        "metrics": f"{args.metrics_host}:{args.metrics_port}" if metrics_http else "off",
        "http": f"{args.host}:{running.http_port}" if running.http else "off",
        **vars(limits)}})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping", extra={"fields": {"grace_s": args.grace}})
        await running.stop(args.grace)
        if metrics_http:
            metrics_http.shutdown()
        log.info("stopped", extra={"fields": {"address": f"{args.host}:{port}"}})


def model_arguments(values: list[str] | None) -> list[tuple[str | None, str | None]]:
    """--model values as (name, path): NAME=PATH, or PATH named by its folder (None: by the
    engine). No --model: the packaged default."""
    if not values:
        return [(None, None)]
    models = []
    for value in values:
        name, equals, path = value.partition("=")
        if not equals or "/" in name or not name:  # a path (that may hold '=' further on)
            name, path = None, value
        models.append((name, path))
    return models


def describe_pipeline(engine) -> str:
    """The default pipeline in one line, e.g. 'sentence-transformers: cls -> Dense 768->256
    (Tanh) -> normalize, width 256, prompts query, passage (default query)'."""
    pipeline = engine.pipeline
    parts = ["+".join(pipeline.pooling) + (" (prompt left out)" if not pipeline.include_prompt
                                           else "")]
    for step in pipeline.steps:
        parts.append(f"Dense {step.in_features}->{step.out_features} "
                     f"({step.activation_name.rsplit('.', 1)[-1]})"
                     if hasattr(step, "weight") else "normalize")
    line = f"{pipeline.source}: {' -> '.join(parts)}, width {engine.output_width}"
    if pipeline.prompts:
        line += f", prompts {', '.join(sorted(pipeline.prompts))}"
        if pipeline.default_prompt_name:
            line += f" (default {pipeline.default_prompt_name})"
    return line


def run_serve(args) -> int:
    asyncio.run(serve(args))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertstream", description="BERT embeddings over gRPC")
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve_parser(subparsers)
    # Other commands come from the packages that declare them (pyproject's entry points: the
    # client's `embed`), so the server imports no client code.
    for command in entry_points(group="bertstream.commands"):
        command.load()(subparsers)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(as_json=getattr(args, "log_format", "text") == "json"))
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(), handlers=[handler])
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
