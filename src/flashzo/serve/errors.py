"""The service's refusals and its JSON: InputErrors that carry OpenAI's error fields and an HTTP status,
and the one JSON response class every answer goes through.

Every refusal of user input inside flashzo is an `InputError` (src/flashzo/errors.py); the service
answers one as `{"error": {"message", "type", "param", "code"}}` with status 400, and a
`ServeError` (an InputError) with its own status: 401 no or wrong key, 404 unknown id, 409 wrong
state, 413 too large, 429 too many uploads or waiting jobs (with Retry-After), 503 the disk is full.

JSON has no NaN or infinity: `FiniteJSONResponse` writes such a number (a diverged loss, a row an
older flashzo stored) as null, so no answer can fail to serialize.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from flashzo.errors import InputError

from .store import finite

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait (the openai client honours it)


class ServeError(InputError):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class BodyTooLarge(Exception):
    """A request body went over its limit while it was being read (serve/app.py: BodyLimit)."""

    def __init__(self, limit: int):
        super().__init__(f"Request body is larger than this server's limit of {limit} bytes")
        self.limit = limit


def not_found(what: str, ident: str, *, param: str | None = None, code: str | None = None) -> ServeError:
    code = code or f"{what.replace(' ', '_')}_not_found"
    return ServeError(404, f"No such {what}: {ident!r}", param=param, code=code)


def disk_full(e: BaseException | None = None) -> ServeError:
    why = f" ({e})" if e is not None else ""
    return ServeError(503, f"The server's disk is full{why}: nothing was changed; retry once space is freed",
                      code="disk_full")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


class FiniteJSONResponse(JSONResponse):
    """JSON with every NaN or infinite number written as null."""

    def render(self, content) -> bytes:
        # ASCII with \u escapes: a lone surrogate (which UTF-8 cannot encode) in a message still renders
        return json.dumps(finite(content), allow_nan=False, separators=(",", ":")).encode()


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> FiniteJSONResponse:
    if status in (429, 503):
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return FiniteJSONResponse(error_body(status, message, param=param, code=code), status_code=status,
                              headers=headers)
