"""The HTTP API: OpenAI's files, fine-tuning jobs, models and completions routes, /metrics and /health.

Routes are plain functions (FastAPI runs them in its thread pool); every one that touches a model
hands its work to the scheduler thread (scheduler.py: Scheduler.call), which runs it between two
training steps. Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`:
a ServeError with its status, any other InputError 400, a malformed body 422, a bug 500 (logged;
the server goes on).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
import traceback
from contextlib import asynccontextmanager
from typing import Annotated, Optional

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashzo.errors import InputError

from . import jobs as J
from .completions import CompletionRequest, complete
from .errors import ServeError, error_body, not_found
from .metrics import Metrics
from .scheduler import ADAPTER_DIR, Scheduler
from .store import ACTIVE, Store, new_id, now

log = logging.getLogger("flashzo.serve")
FILE_PURPOSES = ("fine-tune",)
MAX_JSON_BYTES = 8 << 20  # any request body but an upload


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: Optional[str] = None
    seed: Optional[int] = None
    suffix: Optional[str] = None
    method: Optional[dict] = None
    hyperparameters: Optional[dict] = None
    integrations: Optional[list] = None
    metadata: Optional[dict[str, str]] = None


class BodyLimit:
    """Refuse a request body over its limit with 413 before any of it is parsed (ASGI middleware)."""

    def __init__(self, app, upload_bytes: int):
        self.app, self.upload_bytes = app, upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.upload_bytes if scope["path"] == "/v1/files" else MAX_JSON_BYTES
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > limit:
            return await self._refuse(send, limit)
        body, more = [], True
        size = 0
        while more:  # read it all here (bounded by the limit), then replay it to the app
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(send, limit)
            body.append(chunk)
            more = msg.get("more_body", False)
        data = b"".join(body)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, limit: int):
        body = json.dumps(error_body(413, f"Request body is larger than this server's limit of {limit} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _check_jsonl(path: str, max_errors: int = 5) -> int:
    """Lines of an uploaded JSONL file; InputError naming the first bad lines (JSON syntax only: the
    examples are checked against the model when a job uses the file)."""
    bad, n = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n += 1
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.append(f"line {i}: not valid JSON ({e.msg} at column {e.colno})")
                else:
                    if not isinstance(rec, dict):
                        bad.append(f"line {i}: expected a JSON object, got {type(rec).__name__}")
                if len(bad) >= max_errors:
                    break
    except UnicodeDecodeError as e:
        raise InputError(f"file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if bad:
        raise InputError("file is not JSONL (one JSON object per line): " + "; ".join(bad))
    if not n:
        raise InputError("file has no records")
    return n


def create_app(data_dir: str, models: dict, *, api_key: str | None = None, max_upload_bytes: int = 64 << 20,
               max_running: int = 16, max_jobs_per_forward: int = 8, batch_invariant: bool = True) -> FastAPI:
    store = Store(data_dir)
    metrics = Metrics(store)
    scheduler = Scheduler(store, models, metrics, max_running=max_running, max_jobs_per_forward=max_jobs_per_forward)
    started = now()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()  # the running jobs' checkpoints are written here
            store.close()

    app = FastAPI(title="flashzo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.scheduler, app.state.metrics = store, scheduler, metrics
    app.add_middleware(BodyLimit, upload_bytes=max_upload_bytes)

    # Errors -----------------------------------------------------------------------------------------
    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return JSONResponse(error_body(e.status, str(e), param=e.param, code=e.code), status_code=e.status)

    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):
        return JSONResponse(error_body(400, str(e), param=getattr(e, "param", None),
                                       code=getattr(e, "code", None) or "invalid_request"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "form")]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                        for er in errs[:5])
        return JSONResponse(error_body(422, f"Invalid request: {msg}", param=".".join(loc) or None,
                                       code="invalid_body"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = f"Unknown route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(e.status_code, msg, code="not_found" if e.status_code == 404 else None),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return JSONResponse(error_body(500, f"Internal error ({type(e).__name__}); the server goes on",
                                       code="server_error"), status_code=500)

    def auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ServeError(401, "Missing API key: send the header Authorization: Bearer KEY", code="invalid_api_key")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), api_key.encode()):
            raise ServeError(401, "Incorrect API key provided", code="invalid_api_key")

    guarded = [Depends(auth)]

    def limit_of(limit: int) -> int:
        if not 1 <= limit <= 100:
            raise ServeError(400, f"limit must be in 1..100, got {limit}", param="limit")
        return limit

    def job_or_404(job_id: str) -> dict:
        row = store.get_job(job_id)
        if row is None:
            raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id", code="job_not_found")
        return row

    def file_or_404(file_id: str, param: str = "file_id") -> dict:
        row = store.get_file(file_id)
        if row is None:
            raise not_found("file", file_id, param=param, code="file_not_found")
        return row

    # Health and metrics -----------------------------------------------------------------------------
    @app.get("/health")
    def health():
        return {"status": "ok", "models": sorted(models), "running_jobs": len(scheduler.running)}

    @app.get("/metrics", dependencies=guarded)
    def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Files ------------------------------------------------------------------------------------------
    @app.post("/v1/files", dependencies=guarded)
    def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
        if purpose not in FILE_PURPOSES:
            raise ServeError(400, f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}",
                             param="purpose", code="invalid_purpose")
        file_id = new_id("file")
        tmp = store.new_file_path(file_id)
        try:
            with open(tmp, "wb") as out:
                while chunk := file.file.read(1 << 20):
                    out.write(chunk)
            try:
                _check_jsonl(tmp)
            except InputError as e:
                raise ServeError(400, f"{file.filename}: {e}", param="file", code="invalid_file") from None
            name = os.path.basename(file.filename or "upload.jsonl")[:255]
            row = store.add_file(file_id, purpose, name, tmp)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return J.file_object(row)

    @app.get("/v1/files", dependencies=guarded)
    def list_files(purpose: Optional[str] = None, limit: int = Query(10000), after: Optional[str] = None,
                   order: str = "desc"):
        if order not in ("asc", "desc"):
            raise ServeError(400, f"order must be asc or desc, got {order!r}", param="order")
        if not 1 <= limit <= 10000:
            raise ServeError(400, f"limit must be in 1..10000, got {limit}", param="limit")
        rows = store.list_files(purpose=purpose, after=after, limit=limit + 1, order=order)
        return {"object": "list", "data": [J.file_object(r) for r in rows[:limit]], "has_more": len(rows) > limit,
                "first_id": rows[0]["id"] if rows else None, "last_id": rows[:limit][-1]["id"] if rows else None}

    @app.get("/v1/files/{file_id}", dependencies=guarded)
    def get_file(file_id: str):
        return J.file_object(file_or_404(file_id))

    @app.get("/v1/files/{file_id}/content", dependencies=guarded)
    def file_content(file_id: str):
        row = file_or_404(file_id)
        media = "application/gzip" if row["filename"].endswith(".tar.gz") else "application/octet-stream"
        return FileResponse(store.file_path(file_id), media_type=media, filename=row["filename"])

    @app.delete("/v1/files/{file_id}", dependencies=guarded)
    def delete_file(file_id: str):
        file_or_404(file_id)
        users = store.files_in_use(file_id)
        if users:
            raise ServeError(409, f"file {file_id} is the data of {', '.join(users)}, which has not ended; cancel it "
                             "or wait for it to end", param="file_id", code="file_in_use")
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # Fine-tuning jobs -------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs", dependencies=guarded)
    def create_job(req: JobCreate):
        served = models.get(req.model)
        if served is None:
            raise ServeError(404, f"model {req.model!r} is not served here (models: {', '.join(sorted(models))})",
                             param="model", code="model_not_found")
        for param in ("training_file", "validation_file"):
            fid = getattr(req, param)
            if fid is None:
                continue
            row = file_or_404(fid, param=param)
            if row["purpose"] != "fine-tune":
                raise ServeError(400, f"{param} {fid} has purpose {row['purpose']!r}, not 'fine-tune'", param=param,
                                 code=f"invalid_{param}")
        if req.integrations:
            raise ServeError(400, "integrations are not supported", param="integrations")
        J.check_suffix(req.suffix)
        options, n_epochs = J.run_options(req.method, req.hyperparameters, req.seed, served.model,
                                         batch_invariant=batch_invariant)
        spec = {"training_file": req.training_file, "validation_file": req.validation_file, "suffix": req.suffix,
                "metadata": req.metadata, "n_epochs": n_epochs}
        job_id = new_id("ftjob")
        row = store.add_job(job_id, req.model, spec, options)
        store.add_event(job_id, f"Created fine-tuning job: {job_id}")
        store.add_event(job_id, "Validating training file: " + req.training_file
                        + (f" and validation file: {req.validation_file}" if req.validation_file else ""))
        scheduler.validate(job_id)
        return J.job_object(row)

    @app.get("/v1/fine_tuning/jobs", dependencies=guarded)
    def list_jobs(after: Optional[str] = None, limit: int = 20):
        limit = limit_of(limit)
        rows = store.list_jobs(after=after, limit=limit + 1)
        return {"object": "list", "data": [J.job_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=guarded)
    def get_job(job_id: str):
        return J.job_object(job_or_404(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=guarded)
    def cancel_job(job_id: str):
        row = job_or_404(job_id)
        if not store.update_job(job_id, only_if=ACTIVE, status="cancelled", finished_at=now()):
            row = store.get_job(job_id)
            raise ServeError(409, f"job {job_id} is {row['status']}: only a validating_files, queued or running job "
                             "can be cancelled", param="fine_tuning_job_id", code="job_not_cancellable")
        store.add_event(job_id, "Job cancelled")
        scheduler.cancel(job_id)
        row = store.get_job(job_id)
        return J.job_object(row)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=guarded)
    def job_events(job_id: str, after: Optional[str] = None, limit: int = 20):
        job_or_404(job_id)
        limit = limit_of(limit)
        rows = store.list_events(job_id, after=after, limit=limit + 1)
        return {"object": "list", "data": [J.event_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=guarded)
    def job_checkpoints(job_id: str, after: Optional[str] = None, limit: int = 10):
        job = job_or_404(job_id)
        limit = limit_of(limit)
        rows = store.list_checkpoints(job_id, after=after, limit=limit + 1)
        data = [J.checkpoint_object(r, job) for r in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    # Models and completions -------------------------------------------------------------------------
    def model_objects() -> list[dict]:
        out = [{"id": name, "object": "model", "created": started, "owned_by": "flashzo"} for name in sorted(models)]
        for row in store.list_jobs(status=["succeeded"], oldest_first=True):
            out.append({"id": row["fine_tuned_model"], "object": "model", "created": row["finished_at"],
                        "owned_by": "flashzo", "parent": row["model"]})
        return out

    @app.get("/v1/models", dependencies=guarded)
    def list_models():
        return {"object": "list", "data": model_objects()}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    def get_model(model_id: str):
        for m in model_objects():
            if m["id"] == model_id:
                return m
        raise ServeError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")

    def resolve(name: str):
        """(served base model, the fine-tuned job's (id, adapter dir) or None)."""
        if name in models:
            return models[name], None
        row = store.job_by_model(name) if name.startswith("ft:") else None
        if row is None or row["model"] not in models:
            raise ServeError(404, f"model {name!r} does not exist (base models: {', '.join(sorted(models))}; "
                             "fine-tuned: GET /v1/models)", param="model", code="model_not_found")
        return models[row["model"]], (row["id"], os.path.join(store.job_dir(row["id"]), ADAPTER_DIR))

    @app.post("/v1/completions", dependencies=guarded)
    def completions(req: CompletionRequest):
        served, tuned = resolve(req.model)
        t0 = time.perf_counter()

        def run():
            adapter = served.adapter(*tuned) if tuned is not None else None
            return complete(served, adapter, req, req.model)

        out = scheduler.call(run)
        metrics.completions.labels(served.name).inc()
        metrics.completion_tokens.labels(served.name).inc(out["usage"]["completion_tokens"])
        metrics.completion_seconds.observe(time.perf_counter() - t0)
        return out

    return app
