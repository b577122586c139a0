"""The service's state: an embedded SQLite database (WAL mode) in --data-dir, and the files beside it.

    DATA_DIR/flashzo.db          files, jobs, events, checkpoints index, per-step metrics
    DATA_DIR/files/<file id>     uploaded and result files, named by id (never the client's name)
    DATA_DIR/jobs/<job id>/      a job's checkpoint/ (MeZOTrainer.save: atomic), best/, adapter/

Every SQL statement of the service is here. Every write is one transaction that either happened or
did not: a kill -9 at any moment leaves the database as it was after its last commit (WAL,
synchronous=NORMAL: durable against a process that dies; an OS crash can lose the last commits,
never corrupt the database). A file is written under a temporary name and renamed before its row
is committed, so a row never names a missing or partial file. State changes are conditional
updates (`UPDATE ... WHERE status IN (...)`) made in one transaction with their event, so a cancel
and a job's end racing each other leave exactly one of them recorded, and an event is never
without its change.

JSON columns hold finite numbers only: a NaN or infinity (a diverged loss) is written as null. Rows
an older flashzo wrote with `NaN` / `Infinity` still read (as floats; the HTTP layer writes them as
null). A write that fails because the disk (or the database) is full raises `DiskFull`: the caller
keeps what it meant to write and tries again later (serve/scheduler.py).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from typing import Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, purpose TEXT NOT NULL,
    filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    model TEXT NOT NULL, status TEXT NOT NULL, spec TEXT NOT NULL, options TEXT NOT NULL,
    fine_tuned_model TEXT, started_at INTEGER, finished_at INTEGER, trained_tokens INTEGER,
    error TEXT, result_files TEXT NOT NULL DEFAULT '[]', step INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL,
    data TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    step INTEGER NOT NULL, created_at INTEGER NOT NULL, metrics TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (job_id, step));
"""

ACTIVE = ("validating_files", "queued", "running")
WAITING = ("validating_files", "queued")  # what --max-queued-jobs counts
TERMINAL = ("succeeded", "failed", "cancelled")
JSON_COLUMNS = ("spec", "options", "error", "result_files")
log = logging.getLogger("flashzo.serve")


class DiskFull(OSError):
    """A write failed because the data directory's disk (or the database) is full."""


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is a write failing for lack of space: ENOSPC / EDQUOT, SQLite's SQLITE_FULL, or
    safetensors' StorageFull (it raises its own error type with the OS error in the message)."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, sqlite3.OperationalError) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "database or disk is full" in text


class DiskWatch:
    """Whether the data directory was last found full. The first refused write logs one warning (and
    one again at most every LOG_EVERY_S while it stays full); the first write that works after that
    logs that space is back. Any thread may report."""

    LOG_EVERY_S = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self.full_since: float | None = None
        self._logged_at = -math.inf

    @property
    def is_full(self) -> bool:
        return self.full_since is not None

    def full(self, e: BaseException) -> None:
        with self._lock:
            t = time.monotonic()
            if self.full_since is None:
                self.full_since = t
            if t - self._logged_at >= self.LOG_EVERY_S:
                self._logged_at = t
                log.warning("the data directory is full (%s): jobs are paused, their state kept in memory, "
                            "and writes are retried until space is freed", e)

    def ok(self) -> None:
        with self._lock:
            if self.full_since is None:
                return
            log.warning("the data directory takes writes again (full for %.0f s): jobs continue",
                        time.monotonic() - self.full_since)
            self.full_since, self._logged_at = None, -math.inf


def finite(value):
    """`value` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def dumps(value) -> str:
    return json.dumps(finite(value), allow_nan=False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Store:
    """The database and the file tree under one data directory; safe to use from several threads
    (one connection, its statements serialized by a lock)."""

    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)
        self.files_dir = os.path.join(self.data_dir, "files")
        self.jobs_dir = os.path.join(self.data_dir, "jobs")
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.jobs_dir, exist_ok=True)
        self._lock = threading.RLock()
        self.disk = DiskWatch()
        self._db = sqlite3.connect(os.path.join(self.data_dir, "flashzo.db"), check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for name in os.listdir(self.files_dir):  # uploads a crash interrupted before their row existed
            if name.endswith(".part"):
                os.unlink(os.path.join(self.files_dir, name))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Low level ------------------------------------------------------------------------------------
    def _run(self, sql: str, args: Iterable = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(args))
            except sqlite3.OperationalError as e:
                if is_disk_full(e):
                    self.disk.full(e)
                    raise DiskFull(errno.ENOSPC, f"the database cannot grow: {e}") from e
                raise

    def _all(self, sql: str, args: Iterable = ()) -> list[dict]:
        with self._lock:
            return [self._row(r) for r in self._run(sql, args).fetchall()]

    def _one(self, sql: str, args: Iterable = ()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    @staticmethod
    def _row(r: sqlite3.Row) -> dict:
        d = dict(r)
        for k in JSON_COLUMNS + ("data", "metrics", "row"):
            if k in d and isinstance(d[k], str):
                d[k] = json.loads(d[k])
        return d

    def transaction(self) -> _Transaction:
        """`with store.transaction() as tx:` statements (tx.run) that commit together or not at all."""
        return _Transaction(self)

    @staticmethod
    def _event(tx: _Transaction, job_id: str, message: str, *, level: str = "info", type: str = "message",
               data: dict | None = None) -> None:
        tx.run("INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (new_id("ftevent"), job_id, now(), level, type, message, dumps(data) if data is not None else None))

    @staticmethod
    def _status_is(tx: _Transaction, job_id: str, statuses: Iterable[str]) -> bool:
        row = tx.run("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row[0] in tuple(statuses)

    def _update(self, tx: _Transaction, job_id: str, only_if: Iterable[str] | None, fields: dict) -> bool:
        cols = ", ".join(f"{k} = ?" for k in fields)
        args = [dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        sql = f"UPDATE jobs SET {cols} WHERE id = ?"
        args.append(job_id)
        if only_if is not None:
            only_if = list(only_if)
            sql += f" AND status IN ({', '.join('?' * len(only_if))})"
            args.extend(only_if)
        return tx.run(sql, args).rowcount > 0

    # Files ----------------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> str:
        return os.path.join(self.files_dir, file_id)

    def new_file_path(self, file_id: str) -> str:
        """Where an upload is written before add_file renames it into place."""
        return self.file_path(file_id) + ".part"

    def add_file(self, file_id: str, purpose: str, filename: str, written: str) -> dict:
        """Register the finished file `written` (renamed to its id's path first) and return its row."""
        path = self.file_path(file_id)
        os.replace(written, path)
        try:
            with self.transaction() as tx:
                tx.run("INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                       (file_id, purpose, filename, os.path.getsize(path), now()))
        except BaseException:
            os.unlink(path)  # no row names it: nothing refers to it
            raise
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    def list_files(self, *, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   order: str = "desc") -> list[dict]:
        where, args = [], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            cmp = "<" if order == "desc" else ">"
            where.append(f"seq {cmp} (SELECT seq FROM files WHERE id = ?)")
            args.append(after)
        sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
        return self._all(sql, args + [limit])

    def delete_file(self, file_id: str) -> bool:
        with self.transaction() as tx:
            deleted = tx.run("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if deleted:
            try:
                os.unlink(self.file_path(file_id))
            except FileNotFoundError:
                pass
        return deleted

    # Jobs -----------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, job_id)

    def add_job(self, job_id: str, model: str, spec: dict, options: dict, events: list[str], *,
                most_waiting: int | None = None) -> dict | None:
        """A new job (validating_files) and its first events; None, and no job, when `most_waiting` jobs
        are already waiting (validating_files or queued)."""
        with self.transaction() as tx:
            if most_waiting is not None:
                waiting = tx.run(f"SELECT COUNT(*) FROM jobs WHERE status IN ({', '.join('?' * len(WAITING))})",
                                 WAITING).fetchone()[0]
                if waiting >= most_waiting:
                    return None
            tx.run("INSERT INTO jobs (id, created_at, model, status, spec, options) VALUES (?, ?, ?, ?, ?, ?)",
                   (job_id, now(), model, "validating_files", dumps(spec), dumps(options)))
            for message in events:
                self._event(tx, job_id, message)
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def list_jobs(self, *, after: str | None = None, limit: int = 10000, status: Iterable[str] | None = None,
                  oldest_first: bool = False) -> list[dict]:
        where, args = [], []
        if after:
            where.append("seq < (SELECT seq FROM jobs WHERE id = ?)")
            args.append(after)
        if status is not None:
            status = list(status)
            where.append(f"status IN ({', '.join('?' * len(status))})")
            args.extend(status)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY seq {'ASC' if oldest_first else 'DESC'} LIMIT ?"
        return self._all(sql, args + [limit])

    def count_jobs(self, statuses: Iterable[str]) -> int:
        statuses = list(statuses)
        row = self._one(f"SELECT COUNT(*) AS n FROM jobs WHERE status IN ({', '.join('?' * len(statuses))})",
                        statuses)
        return row["n"]

    def job_by_model(self, fine_tuned_model: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'", (fine_tuned_model,))

    def update_job(self, job_id: str, *, only_if: Iterable[str] | None = None, **fields) -> bool:
        """Set `fields` on a job (JSON columns encoded); with only_if, only while its status is one of those."""
        if not fields:
            return False
        with self.transaction() as tx:
            return self._update(tx, job_id, only_if, fields)

    def change_job(self, job_id: str, *, only_if: Iterable[str], events: Iterable[tuple[str, dict]] = (),
                   **fields) -> bool:
        """A state change and its events in one transaction, only while the job's status is one of
        `only_if`; events are (message, add_event's keyword arguments)."""
        with self.transaction() as tx:
            if not self._update(tx, job_id, only_if, fields):
                return False
            for message, kw in events:
                self._event(tx, job_id, message, **kw)
            return True

    def cancel_job(self, job_id: str) -> bool:
        return self.change_job(job_id, only_if=ACTIVE, events=[("Job cancelled", {})], status="cancelled",
                               finished_at=now())

    def fail_job(self, job_id: str, error: dict, *, only_if: Iterable[str]) -> bool:
        return self.change_job(job_id, only_if=only_if, events=[(f"Job failed: {error['message']}",
                                                                 {"level": "error"})],
                               status="failed", error=error, finished_at=now())

    def status_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def files_in_use(self, file_id: str) -> list[str]:
        """Ids of jobs not yet ended whose training or validation file is `file_id`."""
        jobs = self.list_jobs(status=ACTIVE)
        return [j["id"] for j in jobs if file_id in (j["spec"].get("training_file"), j["spec"].get("validation_file"))]

    # A running job's records (each call one transaction, written only while the job runs) ----------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        with self.transaction() as tx:
            self._event(tx, job_id, message, level=level, type=type, data=data)

    def record_step(self, job_id: str, row: dict, *, step: int, events: Iterable[tuple[str, dict]] = ()) -> bool:
        """A step's metrics row (a step redone after a restart replaces its row), the job's step, events."""
        with self.transaction() as tx:
            if not self._status_is(tx, job_id, ["running"]):
                return False
            tx.run("INSERT OR REPLACE INTO metrics (job_id, step, row) VALUES (?, ?, ?)",
                   (job_id, row["step"], dumps(row)))
            tx.run("UPDATE jobs SET step = ? WHERE id = ?", (step, job_id))
            for message, kw in events:
                self._event(tx, job_id, message, **kw)
            return True

    def record_eval(self, job_id: str, step: int, values: dict, empty_row: dict, event: tuple[str, dict]) -> bool:
        """An evaluation's values merged into the metrics row of `step` (or `empty_row`), and its event."""
        with self.transaction() as tx:
            if not self._status_is(tx, job_id, ["running"]):
                return False
            got = tx.run("SELECT row FROM metrics WHERE job_id = ? AND step = ?", (job_id, step)).fetchone()
            row = json.loads(got[0]) if got is not None else dict(empty_row)
            tx.run("INSERT OR REPLACE INTO metrics (job_id, step, row) VALUES (?, ?, ?)",
                   (job_id, step, dumps({**row, **values})))
            self._event(tx, job_id, event[0], **event[1])
            return True

    def has_eval(self, job_id: str) -> bool:
        """Whether an evaluation of the job is on record (fit's `history["eval"]`)."""
        return any(r.get("valid_loss") is not None or r.get("valid_mean_token_accuracy") is not None
                   for r in self.metrics(job_id))

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, event: tuple[str, dict]) -> bool:
        with self.transaction() as tx:
            if not self._status_is(tx, job_id, ["running"]):
                return False
            tx.run("INSERT INTO checkpoints (id, job_id, step, created_at, metrics) VALUES (?, ?, ?, ?, ?)",
                   (new_id("ftckpt"), job_id, step, now(), dumps(metrics)))
            self._event(tx, job_id, event[0], **event[1])
            return True

    def succeed_job(self, job_id: str, files: list[tuple[str, str, str]], *, fine_tuned_model: str,
                    trained_tokens: int, step: int, events: list[str]) -> bool:
        """The job's result files `(id, written path, name)` renamed into place and registered, and the job
        succeeded, in one transaction; False (nothing changed) when the job no longer runs."""
        with self.transaction() as tx:
            if not self._status_is(tx, job_id, ["running"]):
                return False
            for fid, written, name in files:
                tx.run("INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                       (fid, "fine-tune-results", name, os.path.getsize(written), now()))
            tx.run("UPDATE jobs SET status = 'succeeded', finished_at = ?, fine_tuned_model = ?, trained_tokens = ?, "
                   "result_files = ?, step = ? WHERE id = ?",
                   (now(), fine_tuned_model, trained_tokens, dumps([f[0] for f in files]), step, job_id))
            for message in events:
                self._event(tx, job_id, message)
            for fid, written, _ in files:  # last: a failure above leaves no file under an id
                os.replace(written, self.file_path(fid))
            return True

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first; `after`: an event id, the list continues with older events."""
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if after:
            sql += " AND seq < (SELECT seq FROM events WHERE id = ?)"
            args.append(after)
        return self._all(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])

    def list_checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> list[dict]:
        sql, args = "SELECT * FROM checkpoints WHERE job_id = ?", [job_id]
        if after:
            sql += " AND seq < (SELECT seq FROM checkpoints WHERE id = ?)"
            args.append(after)
        return self._all(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])

    def metrics(self, job_id: str) -> list[dict]:
        return [r["row"] for r in self._all("SELECT row FROM metrics WHERE job_id = ? ORDER BY step", (job_id,))]


class _Transaction:
    """`with store.transaction() as tx:` several statements that commit together (or not at all)."""

    def __init__(self, store: Store):
        self.store = store

    def run(self, sql: str, args: Iterable = ()) -> sqlite3.Cursor:
        return self.store._run(sql, args)

    def __enter__(self) -> _Transaction:
        self.store._lock.acquire()
        try:
            self.store._run("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                try:
                    self.store._run("COMMIT")
                    self.store.disk.ok()
                    return False
                except BaseException:
                    self._rollback()
                    raise
            self._rollback()
        finally:
            self.store._lock.release()
        return False

    def _rollback(self) -> None:
        if self.store._db.in_transaction:
            self.store._db.execute("ROLLBACK")
