"""/v1/models and /v1/completions.

A completion is async: its checks and tokenization (and loading a fine-tuned adapter) run on a
thread of the pool, its forwards on the scheduler thread (awaited without holding a pool thread),
its rendering on the pool again. So however many completions wait for the scheduler, the thread
pool stays free for the other routes.
"""

from __future__ import annotations

import os
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from .completions import forward, prepare, render
from .deps import require_key
from .errors import ServeError
from .requests import CompletionRequest, body
from .scheduler import ADAPTER_DIR

router = APIRouter(dependencies=[Depends(require_key)])


def model_objects(st) -> list[dict]:
    started = st.settings.started
    out = [{"id": name, "object": "model", "created": started, "owned_by": "flashzo"} for name in sorted(st.models)]
    for row in st.store.list_jobs(status=["succeeded"], oldest_first=True):
        out.append({"id": row["fine_tuned_model"], "object": "model", "created": row["finished_at"],
                    "owned_by": "flashzo", "parent": row["model"]})
    return out


@router.get("/v1/models")
def list_models(request: Request):
    return {"object": "list", "data": model_objects(request.app.state)}


@router.get("/v1/models/{model_id:path}")
def get_model(request: Request, model_id: str):
    for m in model_objects(request.app.state):
        if m["id"] == model_id:
            return m
    raise ServeError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")


def resolve(st, name: str):
    """(served base model, the fine-tuned job's (id, adapter dir) or None)."""
    if name in st.models:
        return st.models[name], None
    row = st.store.job_by_model(name) if name.startswith("ft:") else None
    if row is None or row["model"] not in st.models:
        raise ServeError(404, f"model {name!r} does not exist (base models: {', '.join(sorted(st.models))}; "
                         "fine-tuned: GET /v1/models)", param="model", code="model_not_found")
    return st.models[row["model"]], (row["id"], os.path.join(st.store.job_dir(row["id"]), ADAPTER_DIR))


@router.post("/v1/completions")
async def completions(request: Request, req: Annotated[CompletionRequest, Depends(body(CompletionRequest))]):
    st = request.app.state

    def prepared():
        served, tuned = resolve(st, req.model)
        return served, prepare(served, served.adapter(*tuned) if tuned is not None else None, req)

    served, p = await run_in_threadpool(prepared)
    seconds = []

    def run():
        t0 = time.perf_counter()
        try:
            return forward(served, p)
        finally:
            seconds.append(time.perf_counter() - t0)

    scored, gens = await st.scheduler.run(run)
    out = await run_in_threadpool(render, served, p, scored, gens, req.model)
    st.metrics.completions.labels(served.name).inc()
    st.metrics.completion_tokens.labels(served.name).inc(out["usage"]["completion_tokens"])
    st.metrics.completion_seconds.observe(seconds[0])
    return out
