"""The HTTP application: state on `app.state`, the routers, the body limit, and OpenAI-shaped errors.

Routes live on FastAPI routers (routes_files.py, routes_jobs.py, routes_models.py, routes_ops.py);
every router but /health's declares the API key check (deps.require_key) as its first dependency,
and a JSON body is read by a dependency declared after it (requests.body), so a request without the
key is refused before a byte of its body is read. Every answer is JSON with finite numbers only
(errors.FiniteJSONResponse). Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`:

    400  an InputError (a value flashzo refuses), a parameter of a job's method/hyperparameters/metadata
    401  no or wrong key          404  unknown id, model or route          409  wrong state
    413  a body over its limit (--max-upload-mb for uploads, 8 MiB for the others)
    422  a body that is not the request's shape (not JSON, unknown or missing fields)
    429  too many uploads at once, or too many jobs waiting (Retry-After: 1)
    500  a bug: logged with its traceback; the request fails alone and the connection stays usable
    503  the data directory is full: nothing was changed (Retry-After: 1)
"""

from __future__ import annotations

import logging
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import MultipartParseError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flashzo.errors import InputError

from . import routes_files, routes_jobs, routes_models, routes_ops
from .deps import Settings
from .errors import BodyTooLarge, FiniteJSONResponse, ServeError, error_response
from .metrics import Metrics
from .requests import InvalidBody, describe
from .scheduler import Scheduler
from .store import Store, is_disk_full, now
from .upload import UploadSlots

log = logging.getLogger("flashzo.serve")
MAX_JSON_BYTES = 8 << 20  # any request body but an upload


class BodyLimit:
    """ASGI middleware: a request body over its limit raises BodyTooLarge when the route reads past the
    limit (or at its first read, when Content-Length already says so). Nothing is buffered here, and
    nothing is read before the route asks for it (after the key check)."""

    def __init__(self, app, upload_bytes: int):
        self.app, self.upload_bytes = app, upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_bytes if scope["path"] == "/v1/files" else MAX_JSON_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0

        async def limited():
            nonlocal size
            if size > limit:
                raise BodyTooLarge(limit)
            msg = await receive()
            if msg["type"] == "http.request":
                size += len(msg.get("body", b"")) if not declared.isdigit() else 0
                if size > limit:
                    raise BodyTooLarge(limit)
            return msg

        return await self.app(scope, limited, send)


class CatchAll:
    """ASGI middleware inside Starlette's ServerErrorMiddleware: an exception no handler took becomes a
    503 (a full disk) or a logged 500, sent as a normal response, so the connection stays open."""

    def __init__(self, app, store: Store):
        self.app, self.store = app, store

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, tracking)
        except ClientDisconnect:
            return  # the client left mid-body (an upload cut short): no one to answer
        except Exception as e:
            if started:  # too late for an error answer: the connection is closed by the server
                raise
            if is_disk_full(e):
                self.store.disk.full(e)
                response = error_response(503, f"The server's disk is full ({e}): nothing was changed; retry "
                                          "once space is freed", code="disk_full")
            else:
                log.error("%s %s failed:\n%s", scope["method"], scope["path"], traceback.format_exc())
                response = error_response(500, f"Internal error ({type(e).__name__}); the server goes on",
                                          code="server_error")
            await response(scope, receive, send)


def create_app(data_dir: str, models: dict, *, api_key: str | None = None, max_upload_bytes: int = 64 << 20,
               max_running: int = 16, max_jobs_per_forward: int = 8, batch_invariant: bool = True,
               max_concurrent_uploads: int = 4, max_queued_jobs: int = 64, completions_per_step: int = 2,
               hold_admission: bool = False) -> FastAPI:
    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty: give a non-empty key, or none (loopback only)")
    for name, value in (("max_concurrent_uploads", max_concurrent_uploads), ("max_queued_jobs", max_queued_jobs),
                        ("completions_per_step", completions_per_step), ("max_running", max_running),
                        ("max_jobs_per_forward", max_jobs_per_forward)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    store = Store(data_dir)
    metrics = Metrics(store)
    scheduler = Scheduler(store, models, metrics, max_running=max_running, max_jobs_per_forward=max_jobs_per_forward,
                          calls_per_step=completions_per_step, hold=hold_admission)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()  # the running jobs' checkpoints are written here
            store.close()

    app = FastAPI(title="flashzo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=FiniteJSONResponse)
    app.state.settings = Settings(api_key, max_upload_bytes, max_queued_jobs, batch_invariant, now())
    app.state.store, app.state.scheduler, app.state.metrics, app.state.models = store, scheduler, metrics, models
    app.state.uploads = UploadSlots(max_concurrent_uploads)
    app.add_middleware(BodyLimit, upload_bytes=max_upload_bytes)
    app.add_middleware(CatchAll, store=store)  # added last: the outermost of the two
    for r in (routes_ops.public, routes_ops.router, routes_files.router, routes_jobs.router, routes_models.router):
        app.include_router(r)
    _handle_errors(app)
    return app


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return error_response(e.status, str(e), param=e.param, code=e.code)

    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):
        return error_response(400, str(e), param=getattr(e, "param", None),
                              code=getattr(e, "code", None) or "invalid_request")

    @app.exception_handler(InvalidBody)
    async def _invalid_body(request, e: InvalidBody):
        status, message, param, code = describe(e.errors, e.params)
        return error_response(status, message, param=param, code=code)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request, e: RequestValidationError):
        status, message, param, code = describe([{**er, "loc": [x for x in er.get("loc", ())
                                                                if x not in ("body", "query", "path")]}
                                                 for er in e.errors()], ())
        return error_response(status, message, param=param, code=code)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        return error_response(413, str(e), code="request_too_large", headers={"Connection": "close"})

    @app.exception_handler(MultipartParseError)
    async def _bad_form(request, e: MultipartParseError):
        return error_response(400, f"the upload is not a valid multipart/form-data body: {e}", code="invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = f"Unknown route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, msg, code="not_found" if e.status_code == 404 else None)
