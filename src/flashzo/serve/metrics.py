"""The service's Prometheus metrics (`GET /metrics`, prometheus_client's text format).

Tokens are counted in token-layers divided by the model's layers ("token-equivalents"), so that the
trunk fork below the lowest adapted layer counts as the work it saves (docs/design.md, "Sharing"):

    requested   every job's signed copies, every sequence of its batch computed on its own
    computed    what the shared forward computed (BatchStats.token_layers / layers)
    hit rate    1 - computed / requested: the KV work that prompt, prefix, fork and candidate sharing saved
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .store import ACTIVE, TERMINAL

STATUSES = ACTIVE + TERMINAL


class _JobStatus:
    """Jobs by status, read from the database at every scrape (the database is the truth)."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        g = GaugeMetricFamily("flashzo_jobs", "Fine-tuning jobs by status", labels=["status"])
        counts = self.store.status_counts()
        for s in STATUSES:
            g.add_metric([s], counts.get(s, 0))
        yield g


class Metrics:
    def __init__(self, store):
        r = self.registry = CollectorRegistry()
        r.register(_JobStatus(store))
        self.job_steps = Counter("flashzo_job_steps", "MeZO steps applied, summed over jobs", ["model"], registry=r)
        self.scheduler_steps = Counter("flashzo_scheduler_steps", "Shared forwards the scheduler ran (each steps "
                                       "every job of one group)", ["model"], registry=r)
        self.jobs_per_forward = Histogram("flashzo_jobs_per_forward", "Jobs whose signed copies shared one forward",
                                          ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.step_seconds = Histogram("flashzo_scheduler_step_seconds", "Wall time of one scheduler step (the "
                                      "shared forward and every job's update)", ["model"],
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                      registry=r)
        self.tokens_requested = Counter("flashzo_tokens_requested", "Token-equivalents the steps' copies ask for, "
                                        "nothing shared", ["model"], registry=r)
        self.tokens_computed = Counter("flashzo_tokens_computed", "Token-equivalents the shared forwards computed",
                                       ["model"], registry=r)
        self.last_requested = Gauge("flashzo_step_tokens_requested", "Token-equivalents requested by the last "
                                    "scheduler step", ["model"], registry=r)
        self.last_computed = Gauge("flashzo_step_tokens_computed", "Token-equivalents computed by the last "
                                   "scheduler step", ["model"], registry=r)
        self.hit_rate = Gauge("flashzo_kv_hit_rate", "1 - computed / requested of the last scheduler step", ["model"],
                              registry=r)
        self.job_loss = Gauge("flashzo_job_loss", "Training loss (mean of +eps and -eps) of a running job's last "
                              "step", ["job"], registry=r)
        self.job_step = Gauge("flashzo_job_step", "Steps a running job has done", ["job"], registry=r)
        self.completions = Counter("flashzo_completions", "Completion requests served", ["model"], registry=r)
        self.completion_tokens = Counter("flashzo_completion_tokens", "Tokens generated for completions", ["model"],
                                         registry=r)
        self.completion_seconds = Histogram("flashzo_completion_seconds", "Engine time of one completion request",
                                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                     5, 10), registry=r)

    def step(self, model: str, jobs: int, seconds: float, requested: float, computed: float) -> None:
        self.scheduler_steps.labels(model).inc()
        self.jobs_per_forward.labels(model).observe(jobs)
        self.step_seconds.labels(model).observe(seconds)
        self.tokens_requested.labels(model).inc(requested)
        self.tokens_computed.labels(model).inc(computed)
        self.last_requested.labels(model).set(requested)
        self.last_computed.labels(model).set(computed)
        self.hit_rate.labels(model).set(1.0 - computed / requested if requested else 0.0)

    def job_ended(self, job_id: str) -> None:
        for g in (self.job_loss, self.job_step):
            try:
                g.remove(job_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
