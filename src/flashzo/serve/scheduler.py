"""The scheduler: one thread owns the models; running jobs advance together, completions run between steps.

Every running job on one base model whose forward can be shared (the same eps, adapter structure and
LoRA scaling: engine/mezo.py, score_together) is in one group. A scheduler step takes one group,
builds one forward holding every job's signed copies (the kernel's multi-adapter segments), then
applies each job's update; groups take turns round-robin, and a group larger than
--max-jobs-per-forward steps its least advanced jobs first, so no job starves. Between two steps the
completions queued at the first are served (CausalLM's KV pool and the decode pool are used by this
thread only).

A job's trajectory is `flashzo train`'s: the trainer is MeZOTrainer(model, opts.lora_config(),
opts.mezo_config()), the batch of step t is src/flashzo/loop.py's batch_for_step, evaluations and
checkpoints fall where fit() puts them. A job alone in its group runs exactly fit()'s forward (a
bit-identical adapter on a CPU); beside others, its rows are rounded as part of a bigger GEMM
(README, "flashzo serve").

A job's failure fails only that job: its update is applied on its own, and a shared forward that
raises is retried one job at a time to find the job at fault.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import tarfile
import threading
import time
import traceback

from flashzo.data import MAX_ERRORS, DataError, read_dataset
from flashzo.engine.mezo import MeZOTrainer, NonFiniteLossError, score_together
from flashzo.errors import InputError
from flashzo.loop import CHECKPOINT_DIR, batch_for_step
from flashzo.run import RunOptions

from . import jobs as J
from .store import Store, new_id, now

log = logging.getLogger("flashzo.serve")
ADAPTER_DIR = "adapter"
CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy", "lr",
               "loss_plus", "loss_minus", "projected_grad", "skipped", "tokens")


class RunningJob:
    def __init__(self, row: dict, served, trainer: MeZOTrainer, opts: RunOptions, train, held_out, job_dir: str):
        self.id, self.served, self.trainer, self.opts = row["id"], served, trainer, opts
        self.train, self.held_out, self.dir = train, held_out, job_dir
        self.suffix = row["spec"].get("suffix")
        self.cancelled = False
        self.saved_step = trainer.step_count if trainer.step_count else -1  # the step of its last checkpoint
        tr = trainer
        self.key = (served.name, tr.config.eps, tr.adapter.structure(), tr.adapter.config.scaling, tr.config.sharing,
                    tr.config.batch_invariant)

    @property
    def step(self) -> int:
        return self.trainer.step_count


def _sequence_tokens(examples) -> int:
    return sum(len(toks) for ex in examples for toks, _ in ex.sequences())


class Scheduler:
    def __init__(self, store: Store, models: dict, metrics, *, max_running: int = 16, max_jobs_per_forward: int = 8):
        self.store, self.models, self.metrics = store, models, metrics
        self.max_running, self.max_jobs_per_forward = max_running, max_jobs_per_forward
        self.running: dict[str, RunningJob] = {}
        self._calls: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._admit_due = True
        self._turn = 0
        self._datasets: dict[str, tuple] = {}  # validated data, kept for admission
        self._validator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashzo-validate")
        self._thread = threading.Thread(target=self._loop, name="flashzo-scheduler", daemon=True)

    # Control, from any thread ---------------------------------------------------------------------
    def start(self) -> None:
        for row in self.store.list_jobs(status=["validating_files"], oldest_first=True):
            self.validate(row["id"])
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step, checkpoint every running job, stop."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join()
        self._validator.shutdown(wait=True, cancel_futures=True)

    def notify(self) -> None:
        with self._wake:
            self._admit_due = True
            self._wake.notify_all()

    def call(self, fn, timeout: float = 600.0):
        """Run fn() on the scheduler thread between two steps; its result (or its exception)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            self._calls.append((fn, fut))
            self._wake.notify_all()
        return fut.result(timeout)

    def cancel(self, job_id: str) -> None:
        job = self.running.get(job_id)
        if job is not None:
            job.cancelled = True
        self._datasets.pop(job_id, None)
        self.notify()

    def validate(self, job_id: str) -> None:
        self._validator.submit(self._guarded, self._validate, job_id)

    # Validation (its own thread) ------------------------------------------------------------------
    @staticmethod
    def _guarded(fn, *args):
        try:
            fn(*args)
        except Exception:  # a bug: logged, the server goes on
            log.error("unexpected error in %s:\n%s", fn.__name__, traceback.format_exc())

    def _read(self, served, file_id: str, template: str | None, param: str):
        """The examples of a stored file; InputError with OpenAI's (message, param, code) fields."""
        from .errors import ServeError

        row = self.store.get_file(file_id)
        if row is None:
            raise ServeError(400, f"{param} {file_id} no longer exists", param=param, code=f"invalid_{param}")
        try:
            with served.tokenizer_lock:
                ds = read_dataset(self.store.file_path(file_id), served.tokenizer, template=template,
                                  limits=served.model.limits)
        except DataError as e:
            name = f"{file_id} ({row['filename']})"
            lines = [f"{name} line {line}: {msg}" if line else f"{name}: {msg}" for line, msg in e.problems]
            more = "\n... (the first problems only)" if len(e.problems) >= MAX_ERRORS else ""
            raise ServeError(400, f"{param} {file_id} has problems:\n" + "\n".join(lines) + more, param=param,
                             code=f"invalid_{param}") from None
        except InputError as e:
            msg = str(e).replace(self.store.file_path(file_id), f"{file_id} ({row['filename']})")
            raise ServeError(400, f"{param}: {msg}", param=param, code=f"invalid_{param}") from None
        return ds.examples

    def _validate(self, job_id: str) -> None:
        row = self.store.get_job(job_id)
        if row is None or row["status"] != "validating_files":
            return
        spec, opts = row["spec"], row["options"]
        served = self.models.get(row["model"])
        try:
            if served is None:
                raise InputError(f"model {row['model']!r} is not served any more (restart with --model "
                                 f"{row['model']}=PATH)")
            train = self._read(served, spec["training_file"], opts["template"], "training_file")
            held_out = self._read(served, spec["validation_file"], opts["template"], "validation_file") \
                if spec.get("validation_file") else None
            opts = J.with_epochs(opts, spec.get("n_epochs"), len(train))
        except InputError as e:
            self._fail_row(job_id, e, only_if=["validating_files"])
            return
        spec = dict(spec, num_examples=len(train))
        self._datasets[job_id] = (train, held_out)
        if self.store.update_job(job_id, only_if=["validating_files"], status="queued", spec=spec, options=opts):
            self.store.add_event(job_id, f"Files validated: {len(train)} training examples"
                                 + (f", {len(held_out)} validation examples" if held_out else ""))
            self.store.add_event(job_id, "Job queued")
            self.notify()
        else:
            self._datasets.pop(job_id, None)

    def _fail_row(self, job_id: str, e: Exception, *, only_if, code: str | None = None) -> None:
        error = {"code": code or getattr(e, "code", None) or "training_failed", "message": str(e),
                 "param": getattr(e, "param", None)}
        if self.store.update_job(job_id, only_if=only_if, status="failed", error=error, finished_at=now()):
            self.store.add_event(job_id, f"Job failed: {e}", level="error")

    # The loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    break
                idle = not self.running and not self._calls and not self._admit_due
                if idle:
                    self._wake.wait(1.0)
                    self._admit_due = True  # a periodic look at the queue, whatever woke us
                pending = len(self._calls)
            try:
                self._serve_calls(pending)
                self._drop_cancelled()
                if self._admit_due:
                    self._admit_due = False
                    self._admit()
                group = self._next_group()
                if group:
                    self._step_group(group)
            except Exception:  # a bug: logged, the loop goes on
                log.error("scheduler error:\n%s", traceback.format_exc())
                time.sleep(0.1)
        self._shutdown()

    def _serve_calls(self, n: int) -> None:
        for _ in range(n):  # only those queued before this turn: training is never starved
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
            if not job.cancelled:
                try:
                    self._checkpoint(job, why="server shutdown")
                except Exception:
                    log.error("checkpoint of %s at shutdown failed:\n%s", job.id, traceback.format_exc())

    # Admission ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        for row in self.store.list_jobs(status=["running"], oldest_first=True):  # after a restart
            if row["id"] not in self.running:
                self._start(row)
        while len(self.running) < self.max_running:
            rows = self.store.list_jobs(status=["queued"], oldest_first=True, limit=1)
            if not rows:
                return
            self._start(rows[0])

    def _start(self, row: dict) -> None:
        job_id = row["id"]
        served = self.models.get(row["model"])
        try:
            if served is None:
                raise InputError(f"model {row['model']!r} is not served any more (restart with --model "
                                 f"{row['model']}=PATH)")
            opts = RunOptions.from_dict(row["options"])
            data = self._datasets.pop(job_id, None)
            if data is None:  # a restart: read the stored files again
                spec = row["spec"]
                train = self._read(served, spec["training_file"], opts.template, "training_file")
                held_out = self._read(served, spec["validation_file"], opts.template, "validation_file") \
                    if spec.get("validation_file") else None
                data = (train, held_out)
            job_dir = self.store.job_dir(job_id)
            ckpt = os.path.join(job_dir, CHECKPOINT_DIR)
            resumed = os.path.isdir(ckpt) or os.path.isdir(ckpt + ".old")
            if resumed:
                trainer = MeZOTrainer.resume(ckpt, served.model)
            else:
                trainer = MeZOTrainer(served.model, opts.lora_config(), opts.mezo_config())
        except Exception as e:
            self._fail_row(job_id, e, only_if=["queued", "running"])
            return
        if not self.store.update_job(job_id, only_if=["queued", "running"], status="running",
                                     started_at=row["started_at"] or now(), step=trainer.step_count):
            return
        job = RunningJob(row, served, trainer, opts, data[0], data[1], job_dir)
        self.running[job_id] = job
        if resumed:
            self.store.add_event(job_id, f"Resumed from the checkpoint at step {trainer.step_count}",
                                 data={"step": trainer.step_count})
        else:
            self.store.add_event(job_id, "Fine-tuning job started")
        if job.held_out and trainer.step_count == 0:
            self._evaluate(job)
        if job.step >= opts.steps:
            self._finish(job)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.running.values() if j.cancelled]:
            del self.running[job.id]
            self.metrics.job_ended(job.id)

    # Stepping -------------------------------------------------------------------------------------
    def _next_group(self) -> list[RunningJob]:
        groups: dict[tuple, list[RunningJob]] = {}
        for job in self.running.values():
            if not job.cancelled:
                groups.setdefault(job.key, []).append(job)
        if not groups:
            return []
        keys = sorted(groups, key=repr)
        jobs = groups[keys[self._turn % len(keys)]]
        self._turn += 1
        jobs.sort(key=lambda j: j.step)  # the least advanced first
        return jobs[:self.max_jobs_per_forward]

    def _step_group(self, jobs: list[RunningJob]) -> None:
        batches = [batch_for_step(j.train, j.opts.batch_size, j.step, j.trainer.config.seed) for j in jobs]
        t0 = time.perf_counter()
        try:
            scored = score_together([j.trainer for j in jobs], batches)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            for j in jobs:  # find the job at fault: each alone
                if not j.cancelled and j.id in self.running:
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

    def _after_step(self, job: RunningJob, batch, res, correct, n) -> None:
        acc = sum(correct) / (len(correct) * n) if batch[0].is_classification else None
        row = {"step": job.step, "train_loss": res.loss, "train_accuracy": acc, "valid_loss": None,
               "valid_mean_token_accuracy": None, "lr": res.lr, "loss_plus": res.loss_plus[0] if
               len(res.loss_plus) == 1 else res.loss_plus, "loss_minus": res.loss_minus[0] if
               len(res.loss_minus) == 1 else res.loss_minus, "projected_grad": res.projected_grads[0] if
               len(res.projected_grads) == 1 else res.projected_grads, "skipped": res.skipped,
               "tokens": _sequence_tokens(batch)}
        self.metrics.job_steps.labels(job.served.name).inc()
        self.metrics.job_loss.labels(job.id).set(res.loss)
        self.metrics.job_step.labels(job.id).set(job.step)
        done, opts = job.step, job.opts
        if opts.eval_every and done % opts.eval_every == 0 and done < opts.steps and job.held_out:
            row.update(self._evaluate(job, record=False))
        self.store.put_metrics(job.id, [row])
        self.store.update_job(job.id, only_if=["running"], step=done)
        if opts.save_every and done % opts.save_every == 0:
            self._checkpoint(job)
        if done >= opts.steps:
            self._finish(job)

    def _evaluate(self, job: RunningJob, *, record: bool = True) -> dict:
        res = job.trainer.evaluate(job.held_out)
        out = {"valid_loss": res["loss"], "valid_mean_token_accuracy": res.get("accuracy")}
        msg = f"Step {job.step}: validation loss {res['loss']:.6g}"
        if "accuracy" in res:
            msg += f", accuracy {res['accuracy']:.4g}"
        self.store.add_event(job.id, msg, type="metrics", data={"step": job.step, **out})
        if record:
            rows = {r["step"]: r for r in self.store.metrics(job.id)}
            row = rows.get(job.step, {c: None for c in CSV_COLUMNS} | {"step": job.step})
            self.store.put_metrics(job.id, [{**row, **out}])
        return out

    def _checkpoint(self, job: RunningJob, why: str | None = None) -> None:
        if job.saved_step == job.step:
            return
        job.trainer.save(os.path.join(job.dir, CHECKPOINT_DIR))
        job.saved_step = job.step
        rows = self.store.metrics(job.id)
        last = rows[-1] if rows else {}
        metrics = {"step": job.step, "train_loss": last.get("train_loss"), "train_mean_token_accuracy":
                   last.get("train_accuracy"), "valid_loss": last.get("valid_loss"),
                   "valid_mean_token_accuracy": last.get("valid_mean_token_accuracy")}
        self.store.add_checkpoint(job.id, job.step, metrics)
        self.store.add_event(job.id, f"Checkpoint saved at step {job.step}" + (f" ({why})" if why else ""),
                             data={"step": job.step})

    def _fail(self, job: RunningJob, e: Exception, code: str | None = None) -> None:
        if not isinstance(e, (InputError, NonFiniteLossError)):
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        self.running.pop(job.id, None)
        self.metrics.job_ended(job.id)
        self._fail_row(job.id, e, only_if=["running"], code=code)

    def _finish(self, job: RunningJob) -> None:
        """fit()'s end: the last evaluation, the checkpoint, the adapter; then the result files, and
        the job succeeded, in one transaction."""
        if job.held_out:
            self._evaluate(job)
        self._checkpoint(job)
        served = job.served
        adapter_dir = os.path.join(job.dir, ADAPTER_DIR)
        job.trainer.adapter.save_pretrained(adapter_dir, base_model_name_or_path=served.path)
        rows = self.store.metrics(job.id)
        csv_id, tar_id = new_id("file"), new_id("file")
        csv_tmp, tar_tmp = self.store.new_file_path(csv_id), self.store.new_file_path(tar_id)
        _write_csv(csv_tmp, rows)
        with tarfile.open(tar_tmp, "w:gz") as tar:
            tar.add(adapter_dir, arcname="adapter")
        name = J.fine_tuned_name(served.name, job.suffix, job.id)
        tokens = sum(r.get("tokens") or 0 for r in rows)
        self.running.pop(job.id, None)
        self.metrics.job_ended(job.id)
        done = False
        with self.store.transaction() as db:
            status = db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()[0]
            if status == "running":
                for fid, tmp, fname in ((csv_id, csv_tmp, "step_metrics.csv"), (tar_id, tar_tmp, "adapter.tar.gz")):
                    os.replace(tmp, self.store.file_path(fid))
                    db.execute("INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                               (fid, "fine-tune-results", fname, os.path.getsize(self.store.file_path(fid)), now()))
                db.execute("UPDATE jobs SET status = 'succeeded', finished_at = ?, fine_tuned_model = ?, "
                           "trained_tokens = ?, result_files = ?, step = ? WHERE id = ?",
                           (now(), name, tokens, json.dumps([csv_id, tar_id]), job.step, job.id))
                done = True
        if done:
            self.store.add_event(job.id, f"New fine-tuned model created: {name}")
            self.store.add_event(job.id, "The job has successfully completed")
        else:
            for tmp in (csv_tmp, tar_tmp):
                if os.path.exists(tmp):
                    os.unlink(tmp)


def _write_csv(path: str, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in CSV_COLUMNS])

