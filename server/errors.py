"""The one error type of the core, and its one mapping to gRPC status codes (in service.py)."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID = "invalid"          # the request is wrong: the caller must change it
    TOO_LARGE = "too_large"      # the request is over a size limit: the caller must send less
    OVERLOADED = "overloaded"    # a limit on load was hit: try again later
    NOT_FOUND = "not_found"      # the request names a model this server does not serve
    UNSUPPORTED = "unsupported"  # the model does not do what the request asks (its kind's tasks)
    STALE = "stale"              # made for what the server served before: fetch it again
    INTERNAL = "internal"        # the server failed on a valid request


class EmbedError(Exception):
    """A failure to report to the caller; the message names what was wrong."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> "EmbedError":
        return cls(ErrorKind.INVALID, message)

    @classmethod
    def too_large(cls, message: str) -> "EmbedError":
        return cls(ErrorKind.TOO_LARGE, message)

    @classmethod
    def not_found(cls, message: str) -> "EmbedError":
        return cls(ErrorKind.NOT_FOUND, message)

    @classmethod
    def unsupported(cls, message: str) -> "EmbedError":
        return cls(ErrorKind.UNSUPPORTED, message)

    @classmethod
    def overloaded(cls, message: str) -> "EmbedError":
        return cls(ErrorKind.OVERLOADED, message)
