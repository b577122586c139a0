"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Request

from . import jobs as J
from .deps import file_or_404, job_or_404, limit_of, require_key
from .errors import ServeError
from .requests import JobCreate, body
from .store import new_id

router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/v1/fine_tuning/jobs")
def create_job(request: Request, req: Annotated[JobCreate, Depends(body(JobCreate))]):
    st = request.app.state
    served = st.models.get(req.model)
    if served is None:
        raise ServeError(404, f"model {req.model!r} is not served here (models: {', '.join(sorted(st.models))})",
                         param="model", code="model_not_found")
    for param in ("training_file", "validation_file"):
        fid = getattr(req, param)
        if fid is None:
            continue
        row = file_or_404(st.store, fid, param=param)
        if row["purpose"] != "fine-tune":
            raise ServeError(400, f"{param} {fid} has purpose {row['purpose']!r}, not 'fine-tune'", param=param,
                             code=f"invalid_{param}")
    if req.integrations:
        raise ServeError(400, "integrations are not supported", param="integrations")
    J.check_suffix(req.suffix)
    options, n_epochs = J.run_options(req.method, req.hyperparameters, req.seed, served.model,
                                      batch_invariant=st.settings.batch_invariant,
                                      has_validation=req.validation_file is not None)
    spec = {"training_file": req.training_file, "validation_file": req.validation_file, "suffix": req.suffix,
            "metadata": req.metadata, "n_epochs": n_epochs}
    job_id = new_id("ftjob")
    events = [f"Created fine-tuning job: {job_id}", "Validating training file: " + req.training_file
              + (f" and validation file: {req.validation_file}" if req.validation_file else "")]
    row = st.store.add_job(job_id, req.model, spec, options, events, most_waiting=st.settings.max_queued_jobs)
    if row is None:
        raise ServeError(429, f"{st.settings.max_queued_jobs} jobs are already waiting (validating_files or queued) "
                         "on this server; retry when some have started", code="too_many_jobs")
    st.scheduler.validate(job_id)
    return J.job_object(row)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: Optional[str] = None, limit: int = 20):
    limit = limit_of(limit)
    rows = request.app.state.store.list_jobs(after=after, limit=limit + 1)
    return {"object": "list", "data": [J.job_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(request: Request, job_id: str):
    return J.job_object(job_or_404(request.app.state.store, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str):
    st = request.app.state
    job_or_404(st.store, job_id)
    if not st.scheduler.cancel(job_id):
        row = st.store.get_job(job_id)
        raise ServeError(409, f"job {job_id} is {row['status']}: only a validating_files, queued or running job "
                         "can be cancelled", param="fine_tuning_job_id", code="job_not_cancellable")
    return J.job_object(st.store.get_job(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def job_events(request: Request, job_id: str, after: Optional[str] = None, limit: int = 20):
    store = request.app.state.store
    job_or_404(store, job_id)
    limit = limit_of(limit)
    rows = store.list_events(job_id, after=after, limit=limit + 1)
    return {"object": "list", "data": [J.event_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(request: Request, job_id: str, after: Optional[str] = None, limit: int = 10):
    store = request.app.state.store
    job = job_or_404(store, job_id)
    limit = limit_of(limit)
    rows = store.list_checkpoints(job_id, after=after, limit=limit + 1)
    data = [J.checkpoint_object(r, job) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
