"""The service's refusals: InputErrors that carry OpenAI's error fields and an HTTP status.

Every refusal of user input inside flashzo is an `InputError` (src/flashzo/errors.py); the service
answers one as `{"error": {"message", "type", "param", "code"}}` with status 400, and a
`ServeError` (an InputError) with its own status: 401 no or wrong key, 404 unknown id, 409 wrong
state, 413 too large.
"""

from __future__ import annotations

from flashzo.errors import InputError

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         500: "server_error", 503: "server_error"}


class ServeError(InputError):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def not_found(what: str, ident: str, *, param: str | None = None, code: str | None = None) -> ServeError:
    code = code or f"{what.replace(' ', '_')}_not_found"
    return ServeError(404, f"No such {what}: {ident!r}", param=param, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
