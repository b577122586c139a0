"""/health, /metrics and /admin/admission.

/health needs no key and touches neither the scheduler's queue nor the thread pool (an async route
reading a few counters): it answers while the scheduler is busy and the pool is full.

/admin/admission holds or releases the start of jobs (`{"hold": true}`): held, queued jobs and jobs
resumed after a restart wait (their files are still read) and running jobs go on; released, every
job ready at that moment starts in the same admission, so they share forwards from their first step.
`flashzo serve --hold-admission` starts held. `{"step_budget": n}` lets the scheduler take at most n
more training steps (a step is one shared forward), after which training waits with every job's
state in memory while completions are still served; `{"step_budget": null}` lifts it (as a restart
does). For operators (draining a server, pausing training) and for the tests that need jobs to
start together and stop at a known step.
"""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from .deps import require_key
from .requests import body

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_key)])


class AdmissionChange(BaseModel):
    """`hold`: hold (true) or release (false) job starts; `step_budget`: at most that many more training
    steps, then training waits (null: no limit). A field left out is left as it is."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hold: Optional[bool] = None
    step_budget: Optional[Annotated[int, Field(ge=0)]] = None


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
    scheduler = request.app.state.scheduler
    if "step_budget" in change.model_fields_set:
        scheduler.limit_steps(change.step_budget)
    if change.hold is not None:
        scheduler.hold(change.hold)
    return scheduler.status()
