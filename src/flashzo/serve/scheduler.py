"""The scheduler: one thread owns the models; running jobs advance together, completions run between steps.

Running jobs whose forwards can be shared are in one group (`RunningJob.key`): the same served model,
eps, adapter structure, LoRA scaling, sharing mode and batch-invariant mode (engine/mezo.py,
score_together, refuses anything else). A scheduler step takes one group, builds one forward
holding every job's signed copies (the kernel's multi-adapter segments), then applies each job's
update; groups take turns round-robin, and a group larger than --max-jobs-per-forward steps its
least advanced jobs first, so no job starves. Completions are forwards queued by the HTTP threads
(`submit`); while jobs train, at most `calls_per_step` of them run between two training steps, so
training keeps its share however many completions wait. Nothing else runs here: reading and
checking files is the loader's thread (serve/loader.py), tokenizing and rendering a completion are
the HTTP threads'.

A job's trajectory is `flashzo train`'s: the trainer is MeZOTrainer(model, opts.lora_config(),
opts.mezo_config()), the batch of step t is src/flashzo/loop.py's batch_for_step, and when it
evaluates, checkpoints and ends is loop.py's RunSchedule, the one fit() follows. A job alone in its
group runs exactly fit()'s forward (a bit-identical adapter on a CPU). Beside others, in the
batch-invariant mode (the server's default) its adapter is still the same bits; out of it
(--no-batch-invariant, or a job's "batch_invariant": false) its rows are rounded as part of a bigger
forward, and the adapter drifts from the solo run by fp32 rounding (docs/serve.md, "Beside other jobs").

What a step leaves to write (its metrics row, an evaluation, a checkpoint, the result files) is
queued on the job as records and written in order under the job's lock. A record the full disk
refuses stays queued: the job stops stepping (its state stays in memory, nothing is lost or redone)
and the records are retried every DISK_RETRY_S until they go through; the disk's state is logged
once each way (store.py: DiskWatch). A job whose every step was skipped (non-finite) has failed.

Locks: `_lock` guards `running` (changed only by this thread), the hold and the step budget; a job's
`lock` guards its records and `cancelled`: `cancel` (an HTTP thread) records the cancellation under
it, so a job's checkpoints, adapter and result files are either all written before "Job cancelled"
or not at all.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
import traceback

from flashzo.engine.mezo import MeZOTrainer, NonFiniteLossError, score_together
from flashzo.errors import InputError
from flashzo.loop import BEST_DIR, CHECKPOINT_DIR, RunSchedule, batch_for_step, consider_best
from flashzo.run import RunOptions

from . import jobs as J
from .loader import Loader, reward_config
from .results import CSV_COLUMNS, ResultFiles, write_csv, write_tar
from .store import DiskFull, Store, is_disk_full, now

log = logging.getLogger("flashzo.serve")
ADAPTER_DIR = "adapter"
DISK_RETRY_S = 2.0  # how often records the full disk refused are tried again
IDLE_WAIT_S = 1.0  # an idle scheduler looks at the queue this often, whatever wakes it


class RunningJob:
    def __init__(self, row: dict, served, trainer: MeZOTrainer, opts: RunOptions, data: tuple, job_dir: str):
        self.id, self.served, self.trainer, self.opts = row["id"], served, trainer, opts
        self.train, self.held_out = data
        self.dir = job_dir
        self.suffix = row["spec"].get("suffix")
        self.schedule = RunSchedule(opts.steps, opts.eval_every, opts.save_every, evaluates=bool(self.held_out))
        self.lock = threading.Lock()  # its records, and `cancelled`
        self.cancelled = False
        self.ended = False  # its end (failed or succeeded) is queued or recorded: no more steps
        self.records: collections.deque = collections.deque()  # what is still to be written, in order
        self.saved_step = trainer.step_count if trainer.step_count else -1  # the step of its last checkpoint
        self.last_row: dict = {}
        tr = trainer
        self.key = (served.name, tr.config.eps, tr.adapter.structure(), tr.adapter.config.scaling, tr.config.sharing,
                    tr.config.batch_invariant)
        self.rewarded = tr.config.reward is not None
        if self.rewarded:  # a reward job decodes its copies in a step of its own (score_together scores losses)
            self.key = ("reward", self.id)

    @property
    def step(self) -> int:
        return self.trainer.step_count

    @property
    def steppable(self) -> bool:
        return not (self.cancelled or self.ended or self.records)


def _sequence_tokens(examples) -> int:
    return sum(len(ex.prompt) if not hasattr(ex, "sequences") else sum(len(toks) for toks, _ in ex.sequences())
               for ex in examples)


def _locked_decode(served):
    """The served tokenizer's decode, under its lock (the HTTP threads share the tokenizer)."""
    def decode(ids):
        with served.tokenizer_lock:
            return served.tokenizer.decode(ids)
    return decode


class Scheduler:
    def __init__(self, store: Store, models: dict, metrics, *, max_running: int = 16, max_jobs_per_forward: int = 8,
                 calls_per_step: int = 2, hold: bool = False):
        self.store, self.models, self.metrics = store, models, metrics
        self.max_running, self.max_jobs_per_forward = max_running, max_jobs_per_forward
        self.calls_per_step = calls_per_step
        self.running: dict[str, RunningJob] = {}
        self._lock = threading.Lock()
        self._held = hold
        self._budget: int | None = None  # training steps still allowed (None: no limit); guarded by _lock
        self._calls: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._admit_due = True
        self._turn = 0
        self._disk_retry_at = 0.0
        self._abandoned: set[str] = set()  # jobs whose failure could not be recorded: never restarted here
        self.loader = Loader(store, models, on_ready=self.notify, on_disk_full=store.disk.full)
        self._thread = threading.Thread(target=self._loop, name="flashzo-scheduler", daemon=True)

    # Control, from any thread ---------------------------------------------------------------------
    def start(self) -> None:
        for row in self.store.list_jobs(status=["validating_files"], oldest_first=True):
            self.loader.validate(row["id"])
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step, checkpoint every running job, stop."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.loader.close()

    def notify(self) -> None:
        with self._wake:
            self._admit_due = True
            self._wake.notify_all()

    def submit(self, fn) -> concurrent.futures.Future:
        """Queue fn() to run on the scheduler thread between two steps; its future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            self._calls.append((fn, fut))
            self._wake.notify_all()
        return fut

    def call(self, fn, timeout: float = 600.0):
        return self.submit(fn).result(timeout)

    async def run(self, fn):
        """fn() on the scheduler thread, awaited without holding a thread of the HTTP thread pool."""
        return await asyncio.wrap_future(self.submit(fn))

    def validate(self, job_id: str) -> None:
        self.loader.validate(job_id)

    def hold(self, held: bool) -> None:
        """Hold (or release) the start of queued and resumed jobs; running jobs go on."""
        with self._lock:
            self._held = held
        self.notify()

    def limit_steps(self, budget: int | None) -> None:
        """Take at most `budget` more training steps (scheduler steps), then wait with every job's state
        in memory; None: no limit. Completions are served meanwhile."""
        with self._lock:
            self._budget = budget
        self.notify()

    def _may_train(self) -> bool:
        with self._lock:
            return self._budget is None or self._budget > 0

    def status(self) -> dict:
        with self._lock:
            running, held, budget = len(self.running), self._held, self._budget
        with self._wake:
            calls = len(self._calls)
        return {"held": held, "step_budget": budget, "running_jobs": running, "ready_jobs": self.loader.ready(),
                "loading_jobs": self.loader.busy(), "queued_calls": calls, "disk_full": self.store.disk.is_full}

    def cancel(self, job_id: str) -> bool:
        """Record the job cancelled if it has not ended (False otherwise). A running job's records stop
        here: none is written after "Job cancelled"."""
        with self._lock:
            job = self.running.get(job_id)
            if job is None:  # not running: the start of a job takes _lock too, so it cannot begin meanwhile
                done = self.store.cancel_job(job_id)
                self.loader.drop(job_id)
        if job is not None:
            with job.lock:
                done = self.store.cancel_job(job_id)
                if done:
                    job.cancelled = True
                    job.records.clear()
        if done:
            self.notify()
        return done

    # The loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    break
                if not (self._calls or self._admit_due or self._training()):
                    self._wake.wait(self._idle_wait())
                    self._admit_due = True  # a periodic look at the queue, whatever woke us
            try:
                self.turn()
            except Exception:  # a bug: logged, the loop goes on
                log.error("scheduler error:\n%s", traceback.format_exc())
                time.sleep(0.1)
        self._shutdown()

    def _idle_wait(self) -> float:
        if any(j.records for j in self.running.values()):
            return max(0.0, min(IDLE_WAIT_S, self._disk_retry_at - time.monotonic()))
        return IDLE_WAIT_S

    def turn(self) -> None:
        """One turn: retry what the full disk refused (when due), serve queued calls (at most
        calls_per_step while a job can step), admit jobs, take one training step."""
        self._retry_records()
        self._serve_calls(self.calls_per_step if self._training() else None)
        self._drop_ended()
        if self._admit_due:
            self._admit_due = False
            self._admit()
        group = self._next_group() if self._may_train() else []
        if group:
            with self._lock:
                if self._budget is not None:
                    self._budget -= 1
            self._step_group(group)

    def _training(self) -> bool:
        """Whether a job can take a step now."""
        return self._may_train() and any(j.steppable for j in self.running.values())

    def _serve_calls(self, most: int | None) -> None:
        with self._wake:
            n = len(self._calls) if most is None else min(most, len(self._calls))  # those queued before this turn
        for _ in range(n):
            with self._wake:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller, whose request fails alone
                    fut.set_exception(e)

    def _shutdown(self) -> None:
        with self._wake:
            calls, self._calls = list(self._calls), collections.deque()
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("the server is shutting down"))
        for job in list(self.running.values()):
            if job.cancelled or job.ended:
                continue
            try:
                self._queue_checkpoint(job, why="server shutdown")
                self._write(job)
            except Exception:
                log.error("checkpoint of %s at shutdown failed:\n%s", job.id, traceback.format_exc())

    # Records --------------------------------------------------------------------------------------
    def _write(self, job: RunningJob) -> bool:
        """Write the job's queued records in order; False when the disk is full (the rest stay queued).
        Another error propagates (the caller fails the job)."""
        with job.lock:
            if job.cancelled:
                job.records.clear()
                return False
            while job.records:
                try:
                    job.records[0]()
                except Exception as e:
                    if is_disk_full(e):
                        self.store.disk.full(e)
                        self._disk_retry_at = time.monotonic() + DISK_RETRY_S
                        return False
                    job.records.clear()
                    raise
                job.records.popleft()
        return True

    def _write_or_fail(self, job: RunningJob) -> None:
        try:
            self._write(job)
        except Exception as e:
            self._fail(job, e)

    def _retry_records(self) -> None:
        if time.monotonic() < self._disk_retry_at:
            return
        waiting = [j for j in self.running.values() if j.records]
        for job in waiting:
            self._write_or_fail(job)
        if self.store.disk.is_full or waiting:
            self._disk_retry_at = time.monotonic() + DISK_RETRY_S
            self.loader.retry_waiting()
            self._admit_due = True

    def _fail(self, job: RunningJob, e: Exception, code: str | None = None) -> None:
        """The job failed: its error is its last record (written when the disk allows)."""
        if not isinstance(e, (InputError, NonFiniteLossError)):
            log.error("job %s failed:\n%s", job.id, "".join(traceback.format_exception(e)))
        error = {"code": code or getattr(e, "code", None) or "training_failed", "message": str(e),
                 "param": getattr(e, "param", None)}
        job.ended = True
        job.records.append(lambda: self.store.fail_job(job.id, error, only_if=["running"]))
        try:
            self._write(job)
        except Exception:  # the failure itself cannot be recorded: logged; not started again by this process
            log.error("recording the failure of %s failed:\n%s", job.id, traceback.format_exc())
            self._abandoned.add(job.id)
            with job.lock:
                job.records.clear()

    def _drop_ended(self) -> None:
        for job in [j for j in self.running.values() if j.cancelled or (j.ended and not j.records)]:
            with self._lock:
                del self.running[job.id]
            self.metrics.job_ended(job.id)

    # Admission ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start jobs in order (those running before a restart, then the queued, oldest first) while there
        is room; a job whose files are still being read holds back the ones after it. Held: only read."""
        if any(j.records for j in self.running.values()):
            return  # the disk is full: no new work until the records are written
        resumed = [r for r in self.store.list_jobs(status=["running"], oldest_first=True)
                   if r["id"] not in self.running and r["id"] not in self._abandoned]
        room = self.max_running - len(self.running) - len(resumed)
        queued = self.store.list_jobs(status=["queued"], oldest_first=True, limit=room) if room > 0 else []
        rows = resumed + queued
        for row in rows:
            if not self.loader.has(row["id"]):
                self.loader.load(row["id"])
        with self._lock:
            held = self._held
        if held:
            return
        for row in rows:
            data = self.loader.take(row["id"])
            if data is None:
                return
            try:
                self._start(row, data)
            except DiskFull as e:
                self.loader.keep(row["id"], data)
                self.store.disk.full(e)
                self._disk_retry_at = time.monotonic() + DISK_RETRY_S
                return

    def _start(self, row: dict, data: tuple) -> None:
        job_id = row["id"]
        served = self.models.get(row["model"])
        try:
            if served is None:
                raise InputError(f"model {row['model']!r} is not served any more (restart with --model "
                                 f"{row['model']}=PATH)")
            opts = RunOptions.from_dict(row["options"])
            job_dir = self.store.job_dir(job_id)
            ckpt = os.path.join(job_dir, CHECKPOINT_DIR)
            resumed = os.path.isdir(ckpt) or os.path.isdir(ckpt + ".old")
            reward = reward_config(served, opts)
            decode = None
            if reward is not None:
                decode = _locked_decode(served)
            if resumed:
                trainer = MeZOTrainer.resume(ckpt, served.model, decode=decode)
            else:
                trainer = MeZOTrainer(served.model, opts.lora_config(), opts.mezo_config(stop_tokens=reward.stop_tokens
                                                                                         if reward else ()),
                                      decode=decode)
        except Exception as e:
            if not isinstance(e, InputError):
                log.error("starting %s failed:\n%s", job_id, traceback.format_exc())
            error = {"code": getattr(e, "code", None) or "training_failed", "message": str(e),
                     "param": getattr(e, "param", None)}
            self.store.fail_job(job_id, error, only_if=["queued", "running"])
            return
        step = trainer.step_count
        event = (f"Resumed from the checkpoint at step {step}", {"data": {"step": step}}) if resumed \
            else ("Fine-tuning job started", {})
        job = RunningJob(row, served, trainer, opts, data, job_dir)
        rows = self.store.metrics(job_id)
        job.last_row = rows[-1] if rows else {}
        with self._lock:  # cancel() looks for the job under this lock: it sees it running, or the row cancelled
            if not self.store.change_job(job_id, only_if=["queued", "running"], status="running",
                                         started_at=row["started_at"] or now(),
                                         step=step, events=[event]):
                return
            self.running[job_id] = job
        if job.schedule.eval_first(step, evaluated=self.store.has_eval(job_id)):
            self._queue_eval(job, row=None)
        if job.schedule.finished(step):
            self._queue_finish(job)
        self._write_or_fail(job)

    # Stepping -------------------------------------------------------------------------------------
    def _next_group(self) -> list[RunningJob]:
        groups: dict[tuple, list[RunningJob]] = {}
        for job in self.running.values():
            if job.steppable:
                groups.setdefault(job.key, []).append(job)
        if not groups:
            return []
        keys = sorted(groups, key=repr)
        jobs = groups[keys[self._turn % len(keys)]]
        self._turn += 1
        jobs.sort(key=lambda j: j.step)  # the least advanced first
        return jobs[:self.max_jobs_per_forward]

    def _step_group(self, jobs: list[RunningJob]) -> None:
        if jobs[0].rewarded:
            self._step_reward(jobs[0])
            return
        batches = [batch_for_step(j.train, j.opts.batch_size, j.step, j.trainer.config.seed) for j in jobs]
        t0 = time.perf_counter()
        try:
            scored = score_together([j.trainer for j in jobs], batches)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            for j in jobs:  # find the job at fault: each alone
                if j.steppable:
                    self._step_group([j])
            return
        model = jobs[0].served
        layers = model.model.config.num_hidden_layers
        requested = sum(2 * j.trainer.config.num_perturbations * _sequence_tokens(b) for j, b in zip(jobs, batches))
        computed = scored.stats.token_layers / layers
        results = []
        for j, b, losses, correct, n in zip(jobs, batches, scored.losses, scored.correct, scored.num_examples):
            try:
                res = j.trainer.apply(losses, tokens=scored.stats.num_tokens)
            except NonFiniteLossError as e:
                self._fail(j, e, code="non_finite_loss")
                continue
            except Exception as e:
                self._fail(j, e)
                continue
            results.append((j, b, res, correct, n))
        self.metrics.step(model.name, len(jobs), time.perf_counter() - t0, requested, computed)
        for j, b, res, correct, n in results:
            try:
                self._after_step(j, b, res, correct, n)
            except Exception as e:
                self._fail(j, e)

    def _step_reward(self, job: RunningJob) -> None:
        """A reward job's step (trainer.step: its copies decoded in one batched decode) and its bookkeeping."""
        batch = batch_for_step(job.train, job.opts.batch_size, job.step, job.trainer.config.seed)
        t0 = time.perf_counter()
        try:
            res = job.trainer.step(batch)
        except NonFiniteLossError as e:
            self._fail(job, e, code="non_finite_loss")
            return
        except Exception as e:
            self._fail(job, e)
            return
        self.metrics.step(job.served.name, 1, time.perf_counter() - t0, res.tokens, res.tokens)  # the decode's rows
        try:
            self._after_step(job, batch, res, None, None)
        except Exception as e:
            self._fail(job, e)

    def _after_step(self, job: RunningJob, batch, res, correct, n) -> None:
        """fit()'s bookkeeping after a step, as records: the metrics row, then what the schedule asks."""
        acc = sum(correct) / (len(correct) * n) if correct is not None and batch[0].is_classification else None
        one = lambda xs: xs[0] if len(xs) == 1 else xs
        done = job.step
        row = {"step": done, "train_loss": res.loss, "train_accuracy": acc, "valid_loss": None,
               "valid_mean_token_accuracy": None, "lr": res.lr, "loss_plus": one(res.loss_plus),
               "loss_minus": one(res.loss_minus), "projected_grad": one(res.projected_grads), "skipped": res.skipped,
               "tokens": _sequence_tokens(batch)}
        self.metrics.job_steps.labels(job.served.name).inc()
        self.metrics.job_loss.labels(job.id).set(res.loss)
        self.metrics.job_step.labels(job.id).set(done)
        if job.schedule.eval_after(done):
            self._queue_eval(job, row=row)
        else:
            job.last_row = row
            job.records.append(lambda: self.store.record_step(job.id, row, step=done))
        if job.schedule.save_after(done):
            self._queue_checkpoint(job)
        if job.schedule.finished(done):
            self._queue_finish(job)
        self._write_or_fail(job)

    def _queue_eval(self, job: RunningJob, *, row: dict | None) -> None:
        """Evaluate now; queue its records: into the step's `row` (then written with it), or merged into
        the stored row of the job's step; with keep_best, the best checkpoint."""
        res = job.trainer.evaluate(job.held_out, batch_size=job.opts.eval_batch_size)
        step = job.step
        if "reward" in res:  # a reward job: its loss is -reward, as its steps' train_loss
            res = {k: v for k, v in res.items() if k != "generations"}
            out = {"valid_loss": -res["reward"], "valid_mean_token_accuracy": None}
            msg = f"Step {step}: validation mean reward {res['reward']:.6g}"
        else:
            out = {"valid_loss": res["loss"], "valid_mean_token_accuracy": res.get("accuracy")}
            msg = f"Step {step}: validation loss {res['loss']:.6g}"
        if "accuracy" in res:
            msg += f", accuracy {res['accuracy']:.4g}"
        event = (msg, {"type": "metrics", "data": {"step": step, **out}})
        if row is not None:
            row = job.last_row = {**row, **out}
            job.records.append(lambda: self.store.record_step(job.id, row, step=step, events=[event]))
        else:
            job.last_row = {**{c: None for c in CSV_COLUMNS}, **job.last_row, "step": step, **out}
            empty = {c: None for c in CSV_COLUMNS} | {"step": step}
            job.records.append(lambda: self.store.record_eval(job.id, step, out, empty, event))
        metric = job.opts.keep_best
        if metric and consider_best(job.trainer, res, metric, None):
            path = os.path.join(job.dir, BEST_DIR)
            job.records.append(lambda: job.trainer.save(path))
            message = f"Best validation {metric} so far ({res[metric]:.6g}) at step {step}: kept"
            job.records.append(lambda: self.store.add_event(job.id, message, data={"step": step}))

    def _queue_checkpoint(self, job: RunningJob, why: str | None = None) -> None:
        step = job.step
        if job.saved_step == step:
            return
        job.saved_step = step

        def save():
            job.trainer.save(os.path.join(job.dir, CHECKPOINT_DIR))

        last = job.last_row
        metrics = {"step": step, "train_loss": last.get("train_loss"), "train_mean_token_accuracy":
                   last.get("train_accuracy"), "valid_loss": last.get("valid_loss"),
                   "valid_mean_token_accuracy": last.get("valid_mean_token_accuracy")}
        event = (f"Checkpoint saved at step {step}" + (f" ({why})" if why else ""), {"data": {"step": step}})
        job.records.append(save)
        job.records.append(lambda: self.store.add_checkpoint(job.id, step, metrics, event))

    def _queue_finish(self, job: RunningJob) -> None:
        """fit()'s end: the last evaluation, the checkpoint, the adapter; then the result files, and the job
        succeeded, in one transaction. A job whose every step was skipped has failed instead."""
        c = job.trainer.counters
        if job.step and c.nonfinite_total >= job.step:
            self._fail(job, NonFiniteLossError(
                f"every one of the {job.step} steps was skipped (a non-finite loss or update): the adapter is "
                "still its initial state. Lower lr, eps or lora_alpha, or check the data."), code="non_finite_loss")
            return
        if job.schedule.eval_at_end(job.step):
            self._queue_eval(job, row=None)
        self._queue_checkpoint(job)
        job.ended = True
        job.records.append(lambda: self._write_results(job))

    def _write_results(self, job: RunningJob) -> None:
        served = job.served
        adapter_dir = os.path.join(job.dir, ADAPTER_DIR)
        job.trainer.adapter.save_pretrained(adapter_dir, base_model_name_or_path=served.path)
        rows = self.store.metrics(job.id)
        name = J.fine_tuned_name(served.name, job.suffix, job.id)
        with ResultFiles(self.store) as files:
            write_csv(files.new("step_metrics.csv"), rows)
            write_tar(files.new("adapter.tar.gz"), adapter_dir, "adapter")
            best = os.path.join(job.dir, BEST_DIR)
            if job.opts.keep_best and os.path.isdir(best):
                write_tar(files.new("best_adapter.tar.gz"), best, "adapter")
            self.store.succeed_job(job.id, files.made, fine_tuned_model=name,
                                   trained_tokens=sum(r.get("tokens") or 0 for r in rows), step=job.step,
                                   events=[f"New fine-tuned model created: {name}",
                                           "The job has successfully completed"])
