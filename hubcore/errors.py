"""Error types and the vendor-shaped error bodies the hub answers with.

SDKs and Claude Code render errors well only when they look like the vendor's
own, so every refusal is built here in the Anthropic or OpenAI shape.
"""
from __future__ import annotations

import orjson

from hubcore._meter_errors import MeterError

__all__ = [
    "ANTHROPIC",
    "OPENAI",
    "ConfigError",
    "HubError",
    "MeterError",
    "error_body",
]

ANTHROPIC = "anthropic"
OPENAI = "openai"

# Anthropic error type for each status the hub produces itself (PROTOCOL.md).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    417: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# OpenAI's `type` values; `code` carries the finer reason.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def _anthropic_type(status: int, final: bool) -> str:
    error_type = _ANTHROPIC_TYPES.get(status, "api_error")
    return "api_error" if final and error_type == "overloaded_error" else error_type


class ConfigError(Exception):
    """A configuration problem; the message names the file and the field."""


class HubError(Exception):
    """A request the hub answers itself, with a status and a vendor-shaped body.

    `retry_after` (seconds) becomes a `retry-after` header.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.retry_after = retry_after

    def body(self, flavour: str) -> bytes:
        # Only a 429 (rate or concurrency) passes with time; every other
        # refusal of the hub's is final (see answers.refusal_headers).
        return error_body(flavour, self.status, self.message, self.error_type, self.code, final=self.status != 429)


def error_body(
    flavour: str,
    status: int,
    message: str,
    error_type: str | None = None,
    code: str | None = None,
    *,
    final: bool = False,
) -> bytes:
    """The JSON error body a client of `flavour` ("anthropic"/"openai") expects.

    `final`: retrying cannot help (the response says `x-should-retry:
    false`). A final 503 is an Anthropic `api_error`, never an
    `overloaded_error`: Claude Code retries any error whose body names
    overload, whatever the headers say, and would wait out a hub that has
    no key to give it."""
    if flavour == OPENAI:
        return orjson.dumps(
            {
                "error": {
                    "message": message,
                    "type": error_type or _OPENAI_TYPES.get(status, "server_error"),
                    "param": None,
                    "code": code,
                }
            }
        )
    return orjson.dumps(
        {
            "type": "error",
            "error": {
                "type": error_type or _anthropic_type(status, final),
                "message": message,
            },
        }
    )
