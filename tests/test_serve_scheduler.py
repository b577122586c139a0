"""The scheduler's guarantees, checked by their mechanism (never by how fast a thread runs): training
keeps its share between completions, files and prompts are never read on the scheduler thread,
/health answers while the scheduler and the thread pool are busy, one parsed copy of a file serves
every job, nothing is written after "Job cancelled", a full disk pauses jobs (logged once, cancel a
503) until space returns, keep_best and eval_batch_size do what `flashzo train` does."""

from __future__ import annotations

import errno
import io
import logging
import os
import sqlite3
import tarfile
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from serve_harness import InProcess, Live, create, one_thread, tiny_checkpoint, upload, wait_for, wait_job, write_data

import flashzo.serve.scheduler as scheduler_module
from flashzo.cli import main
from flashzo.engine import LoRAAdapter, load_model
from flashzo.engine.mezo import MeZOTrainer
from flashzo.serve.metrics import Metrics
from flashzo.serve.scheduler import Scheduler
from flashzo.serve.store import DiskFull, Store

openai = pytest.importorskip("openai")
BASE = dict(steps=6, batch_size=4, lr=2e-2, eps=1e-2, lora_r=2)
SCHEDULER_THREAD = "flashzo-scheduler"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-scheduler"))


@pytest.fixture
def train(tmp_path):
    return write_data(tmp_path / "train.jsonl", 16)



# --------------------------------------------------------------------------------------------------
# Training's share, the scheduler thread's work, /health


def test_training_takes_a_step_after_at_most_n_completions(tmp_path):
    """Seven completion calls wait while a job can step: the scheduler alternates, at most
    calls_per_step (2, the default) calls between two training steps."""
    store = Store(str(tmp_path))
    sched = Scheduler(store, {}, Metrics(store))
    order, inside, gate = [], threading.Event(), threading.Event()
    job = SimpleNamespace(id="j", key=("m",), step=0, cancelled=False, ended=False, records=[], steppable=True)

    def step(jobs):  # a job that never ends; a run of steps is recorded once
        if not order or order[-1] != "step":
            order.append("step")
        time.sleep(0.001)

    sched._step_group = step
    sched.running = {"j": job}
    sched.start()
    blocker = threading.Thread(target=sched.call, args=(lambda: inside.set() or gate.wait(),))
    blocker.start()
    wait_for(inside.is_set, "the scheduler held in a call")
    waiting = [threading.Thread(target=sched.call, args=(lambda i=i: order.append(f"call{i}"),)) for i in range(7)]
    for t in waiting:
        t.start()
    wait_for(lambda: len(sched._calls) == 7, "seven calls queued")
    gate.set()
    for t in waiting + [blocker]:
        t.join(60)
    job.steppable, job.cancelled = False, True  # it leaves
    sched.stop()
    store.close()
    last = max(i for i, x in enumerate(order) if x.startswith("call"))
    assert sum(x.startswith("call") for x in order) == 7
    run, longest = 0, 0
    for x in order[:last + 1]:
        run = run + 1 if x.startswith("call") else 0
        longest = max(longest, run)
    assert longest <= 2, order


def test_files_and_prompts_are_never_read_on_the_scheduler_thread(tmp_path, ckpt, train):
    """Validation of a job's file, its reading again after a restart, and a completion's tokenization and
    rendering: the tokenizer records which thread calls it."""
    data = tmp_path / "data"
    threads = []

    def recording(served):
        tok = served.tokenizer

        class Recording:
            def __call__(self, *a, **kw):
                threads.append(threading.current_thread().name)
                return tok(*a, **kw)

            def __getattr__(self, name):
                return getattr(tok, name)

            def decode(self, *a, **kw):
                threads.append(threading.current_thread().name)
                return tok.decode(*a, **kw)

        served.tokenizer = Recording()

    with InProcess(data, ckpt) as s:
        recording(s.models["tiny"])
        c = s.client()
        job = create(c, upload(c, train), **dict(BASE, steps=100000)).id
        wait_job(c, job, until=lambda j: j.status == "running")
        out = c.completions.create(model="tiny", prompt="w20 w31 w44", max_tokens=2, echo=True, logprobs=1)
        assert out.choices[0].text.startswith("w20 w31 w44")
    with InProcess(data, ckpt) as s:  # a restart: the running job's file is read again
        recording(s.models["tiny"])
        c = s.client()
        wait_job(c, job, until=lambda j: any(e.message.startswith("Resumed") for e in
                                             c.fine_tuning.jobs.list_events(job, limit=50)))
        c.fine_tuning.jobs.cancel(job)
    assert threads and SCHEDULER_THREAD not in threads, sorted(set(threads))
    assert any(t.startswith("flashzo-load") for t in threads)


def test_health_answers_while_the_scheduler_and_the_thread_pool_are_busy(tmp_path, ckpt):
    """The scheduler is held in a call and 50 completions wait for it (more than the HTTP thread pool's
    40 threads): /health and the listings still answer."""
    with InProcess(tmp_path / "data", ckpt, key=None) as s, Live(s.app) as live:
        gate = threading.Event()
        blocker = threading.Thread(target=s.app.state.scheduler.call, args=(gate.wait,))
        blocker.start()
        results = []

        def complete(i):
            r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": [5, 6 + i % 20],
                                                                "max_tokens": 1}, timeout=120)
            results.append(r.status_code)

        waiting = [threading.Thread(target=complete, args=(i,)) for i in range(50)]
        for t in waiting:
            t.start()
        wait_for(lambda: len(s.app.state.scheduler._calls) >= 40, "completions waiting for the scheduler")
        try:
            assert httpx.get(live.url + "/health", timeout=30).json()["status"] == "ok"
            assert httpx.get(live.url + "/v1/fine_tuning/jobs", timeout=30).status_code == 200
        finally:
            gate.set()
        for t in waiting:
            t.join(120)
        blocker.join(60)
        assert results == [200] * 50


# --------------------------------------------------------------------------------------------------
# One parsed copy of a file


def test_a_file_is_parsed_once_for_every_job_on_it(tmp_path, ckpt, train, monkeypatch):
    import flashzo.serve.loader as loader_module

    reads = []
    real = loader_module.read_dataset
    monkeypatch.setattr(loader_module, "read_dataset", lambda path, *a, **kw: reads.append(path) or real(path, *a,
                                                                                                        **kw))
    other = write_data(tmp_path / "other.jsonl", 12, seed=3)
    with InProcess(tmp_path / "data", ckpt, hold_admission=True) as s:
        c = s.client()
        fid, fid2 = upload(c, train), upload(c, other)
        ids = [create(c, fid, **dict(BASE, seed=k)).id for k in range(4)] + [create(c, fid2, **BASE).id]
        sched = s.app.state.scheduler
        wait_for(lambda: sched.status()["ready_jobs"] == 5, "five jobs validated")
        data = [sched.loader._ready[i][0] for i in ids]
        assert all(d is data[0] for d in data[:4]) and data[4] is not data[0]
        assert len(reads) == 2  # one read per file, not per job
        sched.hold(False)
        wait_for(lambda: len(sched.running) == 5, "the five jobs started")
        assert all(sched.running[i].train is data[0] for i in ids[:4])
        for i in ids:
            c.fine_tuning.jobs.cancel(i)


# --------------------------------------------------------------------------------------------------
# Cancel


def test_nothing_is_written_after_job_cancelled(tmp_path, ckpt, train, monkeypatch):
    """The cancel lands while the last step's forward runs (a step that is due to checkpoint and to end the
    job): neither its checkpoint, its adapter nor a result is written, and "Job cancelled" is the last event."""
    real = scheduler_module.score_together
    holder = {}

    def score(trainers, batches):
        out = real(trainers, batches)
        if trainers[0].step_count == 1:  # the forward of the last step (2 steps)
            holder["cancelled"] = holder["client"].fine_tuning.jobs.cancel(holder["job"]).status
        return out

    monkeypatch.setattr(scheduler_module, "score_together", score)
    with InProcess(tmp_path / "data", ckpt) as s:
        c = holder["client"] = s.client()
        job = holder["job"] = create(c, upload(c, train), **dict(BASE, steps=2, save_every=2)).id
        done = wait_job(c, job)
        assert done.status == "cancelled" and holder["cancelled"] == "cancelled"
        wait_for(lambda: job not in s.app.state.scheduler.running, "the job dropped")
        events = [e.message for e in c.fine_tuning.jobs.list_events(job, limit=100)]
        assert events[0] == "Job cancelled", events
        assert not any(m.startswith("Checkpoint saved") for m in events)
        assert c.fine_tuning.jobs.checkpoints.list(job).data == []
        job_dir = s.app.state.store.job_dir(job)
        assert not os.path.exists(job_dir) or os.listdir(job_dir) == [], os.listdir(job_dir)


# --------------------------------------------------------------------------------------------------
# A full disk


def test_sqlite_full_is_disk_full(tmp_path):
    """The store turns SQLite's own "database or disk is full" (here: max_page_count reached) into DiskFull,
    and works again once the database may grow."""
    store = Store(str(tmp_path))
    with store._lock:
        store._db.execute(f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(DiskFull):
        for _ in range(1000):
            store.add_event("ftjob-x", "x" * 1000)
    assert store.disk.is_full
    with store._lock:
        store._db.execute("PRAGMA max_page_count = 1073741823")
    store.add_event("ftjob-x", "after")
    assert not store.disk.is_full
    store.close()


def test_a_full_disk_pauses_jobs_logs_once_and_they_finish_when_space_returns(tmp_path, ckpt, train, monkeypatch,
                                                                              caplog):
    """At step 3 the disk fills: first the database refuses every write (as SQLite does: "database or disk
    is full"), then, the database writable again, checkpoints fail with ENOSPC. The job stops stepping and
    keeps its state; it is never started again; one warning per outage and no traceback are logged;
    cancel, delete and create answer 503 and change nothing. With space back the job finishes with the
    adapter of a run that never saw a full disk."""
    caplog.set_level(logging.INFO, logger="flashzo.serve")
    real_score, real_save, real_start = scheduler_module.score_together, MeZOTrainer.save, Scheduler._start
    db_full, files_full = threading.Event(), threading.Event()
    writes, saves, starts = [], [], []

    def score(trainers, batches):
        if trainers[0].step_count == 3 and not starts[1:]:
            starts.append("filled")
            db_full.set()
            files_full.set()
        return real_score(trainers, batches)

    def save(self, path):
        if files_full.is_set():
            saves.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(self, path)

    def start(self, row, *rest):
        starts.append(row["id"])
        return real_start(self, row, *rest)

    monkeypatch.setattr(scheduler_module, "score_together", score)
    monkeypatch.setattr(MeZOTrainer, "save", save)
    monkeypatch.setattr(Scheduler, "_start", start)
    monkeypatch.setattr(scheduler_module, "DISK_RETRY_S", 0.1, raising=False)
    hps = dict(BASE, steps=8, save_every=2, seed=4)
    with one_thread(), InProcess(tmp_path / "data", ckpt) as s:
        store = s.app.state.store
        store._db = FullDatabase(store._db, db_full, writes)
        c = s.client()
        fid, spare = upload(c, train), upload(c, train)
        job = create(c, fid, **hps).id
        wait_for(lambda: len(writes) >= 4, "the step's record tried again and again")
        paused = c.fine_tuning.jobs.retrieve(job)
        assert paused.status == "running" and paused.flashzo["step"] == 3
        for method, path, body in (("POST", f"/v1/fine_tuning/jobs/{job}/cancel", None),
                                   ("DELETE", f"/v1/files/{spare}", None),
                                   ("POST", "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": fid})):
            r = s.http.request(method, path, json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "disk_full", (path, r.text)
        assert [j.id for j in c.fine_tuning.jobs.list().data] == [job] and c.files.retrieve(spare).id == spare
        db_full.clear()  # the database may grow again; files still cannot be written
        wait_for(lambda: len(saves) >= 4, "the checkpoint at step 4 tried again and again")
        assert c.fine_tuning.jobs.retrieve(job).flashzo["step"] == 4
        files_full.clear()
        done = wait_job(c, job)
        assert done.status == "succeeded", done.error
        assert starts == [job, "filled"]  # started once, never again
        ours = adapter_of(c, done, tmp_path, ckpt)
        again = wait_job(c, create(c, fid, **hps).id)  # the same job on a disk that does not fill
        assert torch.equal(ours.buffer, adapter_of(c, again, tmp_path, ckpt).buffer)
    records = [r for r in caplog.records if r.name == "flashzo.serve"]
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
    messages = [r.getMessage() for r in records]
    assert sum("is full" in m for m in messages) == 2, messages  # once per outage
    assert sum("takes writes again" in m for m in messages) == 2, messages


class FullDatabase:
    """A store's SQLite connection that, while `full` is set, refuses every write as SQLite does when
    its disk is full (the same exception and message); everything else goes to the connection."""

    def __init__(self, db, full: threading.Event, writes: list):
        self._db, self._full, self._writes = db, full, writes

    def _check(self, sql: str) -> None:
        if self._full.is_set() and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            self._writes.append(sql)
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def adapter_of(client, job, tmp_path, ckpt, index=1):
    data = client.files.content(job.result_files[index]).read()
    out = tmp_path / f"{job.id}-{index}"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    return LoRAAdapter.from_pretrained(str(out / "adapter"), load_model(ckpt).config)


# --------------------------------------------------------------------------------------------------
# keep_best, eval_batch_size


def test_keep_best_and_eval_batch_size_are_flashzo_trains(tmp_path, ckpt, train, monkeypatch):
    """keep_best "loss": the job's third result file is the best evaluation's adapter, bit for bit the
    best/ of `flashzo train --keep-best loss`; every evaluation runs in eval_batch_size batches."""
    valid = write_data(tmp_path / "valid.jsonl", 9, seed=7)
    sizes = []
    real = MeZOTrainer.evaluate
    monkeypatch.setattr(MeZOTrainer, "evaluate", lambda self, ex, *, batch_size=32: sizes.append(batch_size)
                        or real(self, ex, batch_size=batch_size))
    hps = dict(BASE, steps=8, eval_every=2, eval_batch_size=3, keep_best="loss", lr=5e-2, seed=2)
    with one_thread(), InProcess(tmp_path / "data", ckpt) as s:
        c = s.client()
        job = wait_job(c, create(c, upload(c, train), upload(c, valid), **hps).id)
        assert job.status == "succeeded", job.error
        assert len(job.result_files) == 3 and c.files.retrieve(job.result_files[2]).filename == "best_adapter.tar.gz"
        best = adapter_of(c, job, tmp_path, ckpt, index=2)
        events = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert sizes == [3] * 5  # steps 0, 2, 4, 6 and the end
    assert any(m.startswith("Best validation loss so far") for m in events)
    out = tmp_path / "solo"
    args = ["train", "--model", ckpt, "--train", train, "--eval", valid, "--out", str(out), "--no-progress",
            "--batch-invariant"]
    for k, v in hps.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    with one_thread():
        assert main(args) == 0
    solo = LoRAAdapter.from_pretrained(str(out / "best"), load_model(ckpt).config)
    assert torch.equal(best.buffer, solo.buffer)
    assert not torch.equal(best.buffer, LoRAAdapter.init(solo.config, load_model(ckpt).config).buffer)
