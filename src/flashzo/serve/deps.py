"""What the routes share: the server's settings and state (on `app.state`), the API key check (a
dependency every router but /health's declares), and the lookups that answer 404.

    app.state.settings   Settings: the key, limits and defaults create_app was given
    app.state.store      store.Store: the database and files
    app.state.scheduler  scheduler.Scheduler: the models' thread (and its loader)
    app.state.metrics    metrics.Metrics
    app.state.models     {name: served.ServedModel}
    app.state.uploads    upload.UploadSlots: the bound on uploads read at once
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from .errors import ServeError, not_found
from .store import Store


@dataclass(frozen=True)
class Settings:
    api_key: str | None
    max_upload_bytes: int
    max_queued_jobs: int
    batch_invariant: bool
    started: int  # Unix time: the base models' `created`


def require_key(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer KEY` (no key configured: everyone passes).
    Declared before any body dependency, so a request without the key is refused before its body is read."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise ServeError(401, "Missing API key: send the header Authorization: Bearer KEY", code="invalid_api_key")
    if not hmac.compare_digest(header[len("Bearer "):].encode(), key.encode()):
        raise ServeError(401, "Incorrect API key provided", code="invalid_api_key")


def limit_of(limit: int, most: int = 100) -> int:
    if not 1 <= limit <= most:
        raise ServeError(400, f"limit must be in 1..{most}, got {limit}", param="limit")
    return limit


def job_or_404(store: Store, job_id: str) -> dict:
    row = store.get_job(job_id)
    if row is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id", code="job_not_found")
    return row


def file_or_404(store: Store, file_id: str, param: str = "file_id") -> dict:
    row = store.get_file(file_id)
    if row is None:
        raise not_found("file", file_id, param=param, code="file_not_found")
    return row
