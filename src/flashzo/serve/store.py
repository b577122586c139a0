"""The service's state: an embedded SQLite database (WAL mode) in --data-dir, and the files beside it.

    DATA_DIR/flashzo.db          files, jobs, events, checkpoints index, per-step metrics
    DATA_DIR/files/<file id>     uploaded and result files, named by id (never the client's name)
    DATA_DIR/jobs/<job id>/      a job's checkpoint/ (MeZOTrainer.save: atomic), adapter/, results

Every write is one transaction that either happened or did not: a kill -9 at any moment leaves the
database as it was after its last commit (WAL, synchronous=NORMAL: durable against a process that
dies; an OS crash can lose the last commits, never corrupt the database). A file is written under a
temporary name and renamed before its row is committed, so a row never names a missing or partial
file. State changes are conditional updates (`UPDATE ... WHERE status IN (...)`), so a cancel and a
job's end racing each other leave exactly one of them recorded.
"""

from __future__ import annotations

import json
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
TERMINAL = ("succeeded", "failed", "cancelled")
JSON_COLUMNS = ("spec", "options", "error", "result_files")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Store:
    """The database and the file tree under one data directory; safe to use from several threads."""

    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)
        self.files_dir = os.path.join(self.data_dir, "files")
        self.jobs_dir = os.path.join(self.data_dir, "jobs")
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.jobs_dir, exist_ok=True)
        self._lock = threading.RLock()
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
    def _all(self, sql: str, args: Iterable = ()) -> list[dict]:
        with self._lock:
            return [self._row(r) for r in self._db.execute(sql, tuple(args)).fetchall()]

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

    def transaction(self):
        return _Transaction(self)

    # Files ----------------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> str:
        return os.path.join(self.files_dir, file_id)

    def new_file_path(self, file_id: str) -> str:
        """Where an upload is written before add_file renames it into place."""
        return self.file_path(file_id) + ".part"

    def add_file(self, file_id: str, purpose: str, filename: str, written: str) -> dict:
        """Register the finished file `written` (renamed to its id's path first) and return its row."""
        os.replace(written, self.file_path(file_id))
        with self._lock:
            self._db.execute("INSERT INTO files (id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                             (file_id, purpose, filename, os.path.getsize(self.file_path(file_id)), now()))
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
        with self._lock:
            deleted = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if deleted:
            try:
                os.unlink(self.file_path(file_id))
            except FileNotFoundError:
                pass
        return deleted

    # Jobs -----------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, job_id)

    def add_job(self, job_id: str, model: str, spec: dict, options: dict) -> dict:
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, created_at, model, status, spec, options) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (job_id, now(), model, "validating_files", json.dumps(spec), json.dumps(options)))
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

    def job_by_model(self, fine_tuned_model: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'", (fine_tuned_model,))

    def update_job(self, job_id: str, *, only_if: Iterable[str] | None = None, **fields) -> bool:
        """Set `fields` on a job (JSON columns encoded); with only_if, only while its status is one of those."""
        if not fields:
            return False
        cols = ", ".join(f"{k} = ?" for k in fields)
        args = [json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        sql = f"UPDATE jobs SET {cols} WHERE id = ?"
        args.append(job_id)
        if only_if is not None:
            only_if = list(only_if)
            sql += f" AND status IN ({', '.join('?' * len(only_if))})"
            args.extend(only_if)
        with self._lock:
            return self._db.execute(sql, args).rowcount > 0

    def status_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def files_in_use(self, file_id: str) -> list[str]:
        """Ids of jobs not yet ended whose training or validation file is `file_id`."""
        jobs = self.list_jobs(status=ACTIVE)
        return [j["id"] for j in jobs if file_id in (j["spec"].get("training_file"), j["spec"].get("validation_file"))]

    # Events, checkpoints, metrics -----------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO events (id, job_id, created_at, level, type, message, data) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (new_id("ftevent"), job_id, now(), level, type, message,
                              json.dumps(data) if data is not None else None))

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first; `after`: an event id, the list continues with older events."""
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if after:
            sql += " AND seq < (SELECT seq FROM events WHERE id = ?)"
            args.append(after)
        return self._all(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])

    def add_checkpoint(self, job_id: str, step: int, metrics: dict) -> None:
        with self._lock:
            self._db.execute("INSERT INTO checkpoints (id, job_id, step, created_at, metrics) VALUES (?, ?, ?, ?, ?)",
                             (new_id("ftckpt"), job_id, step, now(), json.dumps(metrics)))

    def list_checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> list[dict]:
        sql, args = "SELECT * FROM checkpoints WHERE job_id = ?", [job_id]
        if after:
            sql += " AND seq < (SELECT seq FROM checkpoints WHERE id = ?)"
            args.append(after)
        return self._all(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])

    def put_metrics(self, job_id: str, rows: list[dict]) -> None:
        """One row per step (a step redone after a restart replaces its row)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO metrics (job_id, step, row) VALUES (?, ?, ?)",
                                     [(job_id, r["step"], json.dumps(r)) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def metrics(self, job_id: str) -> list[dict]:
        return [r["row"] for r in self._all("SELECT row FROM metrics WHERE job_id = ? ORDER BY step", (job_id,))]


class _Transaction:
    """`with store.transaction() as db:` several statements that commit together (or not at all)."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        self.store._db.execute("BEGIN IMMEDIATE")
        return self.store._db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.store._lock.release()
        return False
