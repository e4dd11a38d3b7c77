"""Who may call, for every front-end: bearer tokens (read from a file, checked in constant
time) and the TLS files. The transports apply them (service.py for gRPC, http.py for HTTP)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Security:
    auth_tokens: tuple[bytes, ...] = ()  # empty: no authentication
    health_open: bool = True  # health checks need no token (for probes)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS


def read_tokens(path: str) -> list[bytes]:
    """One token per line; blank lines and lines starting with # are ignored."""
    lines = Path(path).read_text().splitlines()
    tokens = [line.strip().encode() for line in lines
              if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ValueError(f"--auth-token-file {path}: no token in it")
    return tokens


def bearer_allowed(tokens: list[bytes], authorization: str | bytes) -> bool:
    """Whether an `authorization` header value ("Bearer <token>") holds one of the tokens; the
    same check for every front-end."""
    value = authorization.encode() if isinstance(authorization, str) else authorization
    presented = value[7:].strip() if value[:7].lower() == b"bearer " else b""
    matched = False
    for token in tokens:  # no early exit: constant work whatever matches
        matched |= hmac.compare_digest(presented, token)
    return matched
