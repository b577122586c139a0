"""/health, /metrics and /admin/admission.

/health needs no key and touches neither the scheduler's queue nor the thread pool (an async route
reading a few counters): it answers while the scheduler is busy and the pool is full.

/admin/admission holds or releases the start of jobs (`{"hold": true}`): held, queued jobs and jobs
resumed after a restart wait (their files are still read) and running jobs go on; released, every
job ready at that moment starts in the same admission, so they share forwards from their first step.
`flashzo serve --hold-admission` starts held. For operators (draining a server) and for the tests
that need jobs to start together.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from .deps import require_key
from .requests import body

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_key)])


class AdmissionChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    hold: bool


@public.get("/health")
async def health(request: Request):
    st = request.app.state
    return {"status": "ok", "models": sorted(st.models), "running_jobs": len(st.scheduler.running)}


@router.get("/metrics")
def prometheus(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/admission")
def admission(request: Request):
    return request.app.state.scheduler.status()


@router.post("/admin/admission")
def change_admission(request: Request, change: Annotated[AdmissionChange, Depends(body(AdmissionChange))]):
    request.app.state.scheduler.hold(change.hold)
    return request.app.state.scheduler.status()
