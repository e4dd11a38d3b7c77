"""Who may call: bearer-token authentication and TLS / mutual-TLS server credentials."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def read_tokens(path: str) -> list[bytes]:
    """One token per line; blank lines and lines starting with # are ignored."""
    lines = Path(path).read_text().splitlines()
    tokens = [line.strip().encode() for line in lines
              if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ValueError(f"--auth-token-file {path}: no token in it")
    return tokens


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata matching one of the tokens.

    Tokens are compared in constant time (hmac.compare_digest), every token checked, so the time
    taken says nothing about how much of a guess was right. Health checks may stay open so that
    probes need no secret.
    """

    def __init__(self, tokens: list[bytes], health_open: bool = True):
        self._tokens = tokens
        self._health_open = health_open

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (authorization metadata)")

        async def refuse_stream(request_iterator, context):
            await refuse(None, context)
            yield  # pragma: no cover - makes this an async generator

        self._refusals = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse_stream),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse_stream),
        }

    def _allowed(self, metadata) -> bool:
        return bearer_allowed(self._tokens, next(
            (value for key, value in metadata or () if key == "authorization"), b""))

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self._health_open and method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        if self._allowed(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC say UNIMPLEMENTED
            return None
        return self._refusals[(handler.request_streaming, handler.response_streaming)]


def bearer_allowed(tokens: list[bytes], authorization: str | bytes) -> bool:
    """Whether an `authorization` header value ("Bearer <token>") holds one of the tokens; the
    same check for every front-end."""
    value = authorization.encode() if isinstance(authorization, str) else authorization
    presented = value[7:].strip() if value[:7].lower() == b"bearer " else b""
    matched = False
    for token in tokens:  # no early exit: constant work whatever matches
        matched |= hmac.compare_digest(presented, token)
    return matched


def server_credentials(cert: str, key: str, client_ca: str | None = None):
    """TLS with the server's certificate and key; with client_ca, mutual TLS: a client must show
    a certificate signed by that CA or the handshake fails."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
