"""Reading jobs' data files, off the scheduler thread: validation of new jobs and reloading after a restart.

One worker thread (`flashzo-load`) reads and checks a job's files against its model
(flashzo.data.read_dataset: `flashzo train`'s checks; its errors name the file and line) and keeps
the examples until the scheduler admits the job (`take`). A file is parsed once per (file, model,
template): every job that trains on it shares that one list of examples (a weak cache: the copy
lives as long as a job holds it). Tokenization takes the model's tokenizer lock one record at a
time, so a completion's prompt is tokenized between two records of a big file, never after it.

Any error while reading a file fails the job with its message (an InputError's, or the exception's
type and text for anything else, logged): a job never stays validating. A write the full disk
refuses is retried (`retry_waiting`) once the scheduler sees space again.

Shared state (`_ready`, `_cache`, `_busy`, `_waiting_for_disk`) is guarded by `_lock`; HTTP
threads, the worker and the scheduler thread all call in.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import traceback
import weakref

from flashzo.data import MAX_ERRORS, DataError, read_dataset
from flashzo.errors import InputError
from flashzo.run import RunOptions

from . import jobs as J
from .errors import ServeError
from .store import DiskFull, Store

log = logging.getLogger("flashzo.serve")


class Examples(list):
    """A file's examples (a list that a weak cache can refer to)."""


class _Locked:
    """A tokenizer whose every call takes `lock` (a fast tokenizer is not safe to share between threads)."""

    def __init__(self, tokenizer, lock: threading.Lock):
        self._tokenizer, self._lock = tokenizer, lock

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)


class Loader:
    def __init__(self, store: Store, models: dict, *, on_ready, on_disk_full):
        self.store, self.models = store, models
        self._on_ready, self._on_disk_full = on_ready, on_disk_full
        self._lock = threading.Lock()
        self._ready: dict[str, tuple] = {}  # job id -> (train, held_out) waiting for admission
        self._busy: set[str] = set()  # jobs submitted and not yet done
        self._waiting_for_disk: set[str] = set()  # validated, but their "queued" could not be written
        self._cache: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashzo-load")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # From any thread --------------------------------------------------------------------------------
    def validate(self, job_id: str) -> None:
        """Check a new (or, after a restart, still validating) job's files; queue it or fail it."""
        self._submit(job_id, self._validate)

    def load(self, job_id: str) -> None:
        """Read the files of a queued or running job whose examples are not in memory (a restart)."""
        with self._lock:
            if job_id in self._ready:
                return
        self._submit(job_id, self._reload)

    def take(self, job_id: str) -> tuple | None:
        """The job's (train, held_out) once loaded (then no longer kept here), else None."""
        with self._lock:
            return self._ready.pop(job_id, None)

    def keep(self, job_id: str, data: tuple) -> None:
        """Hold a taken job's examples again (its start could not be recorded)."""
        with self._lock:
            self._ready[job_id] = data

    def has(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._ready

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._ready.pop(job_id, None)
            self._waiting_for_disk.discard(job_id)

    def ready(self) -> int:
        """Jobs whose examples are in memory, waiting to start."""
        with self._lock:
            return len(self._ready)

    def busy(self) -> int:
        """Jobs whose files are being read or wait to be."""
        with self._lock:
            return len(self._busy)

    def retry_waiting(self) -> None:
        """Validate again the jobs whose result could not be written (the disk was full)."""
        with self._lock:
            ids, self._waiting_for_disk = sorted(self._waiting_for_disk), set()
        for job_id in ids:
            self.validate(job_id)

    def _submit(self, job_id: str, fn) -> None:
        with self._lock:
            if job_id in self._busy:
                return
            self._busy.add(job_id)
        try:
            self._pool.submit(self._run, fn, job_id)
        except RuntimeError:  # shutting down
            with self._lock:
                self._busy.discard(job_id)

    # The worker -------------------------------------------------------------------------------------
    def _run(self, fn, job_id: str) -> None:
        try:
            fn(job_id)
        except DiskFull as e:
            with self._lock:
                self._waiting_for_disk.add(job_id)
            self._on_disk_full(e)
        except Exception:  # a bug: logged, the server goes on
            log.error("unexpected error reading the files of %s:\n%s", job_id, traceback.format_exc())
        finally:
            with self._lock:
                self._busy.discard(job_id)
            self._on_ready()

    def _examples(self, served, file_id: str, template: str | None, param: str, reward=None) -> Examples:
        """The examples of a stored file (shared with every job that read it with this model and
        template, or this reward config: a reward job's RewardExamples); ServeError with OpenAI's
        (message, param, code) fields."""
        key = (file_id, served.name, template, reward)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        row = self.store.get_file(file_id)
        if row is None:
            raise ServeError(400, f"{param} {file_id} no longer exists", param=param, code=f"invalid_{param}")
        name, path = f"{file_id} ({row['filename']})", self.store.file_path(file_id)
        tokenizer = _Locked(served.tokenizer, served.tokenizer_lock) if served.tokenizer is not None else None
        try:
            ds = read_dataset(path, tokenizer, template=template, limits=served.model.limits, reward=reward)
        except DataError as e:
            lines = [f"{name} line {line}: {msg}" if line else f"{name}: {msg}" for line, msg in e.problems]
            more = "\n... (the first problems only)" if len(e.problems) >= MAX_ERRORS else ""
            raise ServeError(400, f"{param} {file_id} has problems:\n" + "\n".join(lines) + more, param=param,
                             code=f"invalid_{param}") from None
        except InputError as e:
            raise ServeError(400, f"{param}: {str(e).replace(path, name)}", param=param,
                             code=f"invalid_{param}") from None
        except (MemoryError, RecursionError, ValueError, TypeError, UnicodeError) as e:
            # what a reader may raise on input it does not refuse by name: the job fails with it
            raise ServeError(400, f"{param} {name} cannot be read: {type(e).__name__}: {str(e)[:300]}", param=param,
                             code=f"invalid_{param}") from None
        examples = Examples(ds.examples)
        with self._lock:
            self._cache[key] = examples
        return examples

    def _files(self, row: dict, template: str | None) -> tuple[Examples, Examples | None]:
        served = self.models.get(row["model"])
        if served is None:
            raise InputError(f"model {row['model']!r} is not served any more (restart with --model "
                             f"{row['model']}=PATH)")
        spec = row["spec"]
        reward = reward_config(served, RunOptions.from_dict(row["options"]))
        train = self._examples(served, spec["training_file"], template, "training_file", reward)
        held_out = self._examples(served, spec["validation_file"], template, "validation_file", reward) \
            if spec.get("validation_file") else None
        return train, held_out

    def _validate(self, job_id: str) -> None:
        row = self.store.get_job(job_id)
        if row is None or row["status"] != "validating_files":
            return
        spec, opts = row["spec"], row["options"]
        try:
            train, held_out = self._files(row, opts["template"])
            opts = J.with_epochs(opts, spec.get("n_epochs"), len(train))
            _check_keep_best(RunOptions.from_dict(opts), held_out)
        except DiskFull:
            raise
        except Exception as e:
            if not isinstance(e, InputError):
                log.error("validating %s failed:\n%s", job_id, traceback.format_exc())
            self._fail(job_id, e, only_if=["validating_files"])
            return
        counts = f"{len(train)} training examples" + (f", {len(held_out)} validation examples" if held_out else "")
        with self._lock:
            self._ready[job_id] = (train, held_out)
        try:
            queued = self.store.change_job(job_id, only_if=["validating_files"], status="queued",
                                           spec=dict(spec, num_examples=len(train)), options=opts,
                                           events=[(f"Files validated: {counts}", {}), ("Job queued", {})])
        except BaseException:
            self.drop(job_id)
            raise
        if not queued:  # cancelled meanwhile
            self.drop(job_id)

    def _reload(self, job_id: str) -> None:
        row = self.store.get_job(job_id)
        if row is None or row["status"] not in ("queued", "running"):
            return
        try:
            data = self._files(row, row["options"]["template"])
        except DiskFull:
            raise
        except Exception as e:
            if not isinstance(e, InputError):
                log.error("reading the files of %s failed:\n%s", job_id, traceback.format_exc())
            self._fail(job_id, e, only_if=["queued", "running"])
            return
        with self._lock:
            self._ready[job_id] = data

    def _fail(self, job_id: str, e: Exception, *, only_if) -> None:
        message = str(e) if isinstance(e, InputError) else f"internal error reading the files: {type(e).__name__}"
        error = {"code": getattr(e, "code", None) or "invalid_training_file", "message": message,
                 "param": getattr(e, "param", None) or "training_file"}
        self.store.fail_job(job_id, error, only_if=only_if)


def reward_config(served, opts: RunOptions):
    """A reward job's RewardConfig, its completions stopping at the served tokenizer's end-of-text token
    (and newlines with stop_newline); None for a loss job."""
    if opts.objective != "reward":
        return None
    from flashzo.data import stop_tokens

    with served.tokenizer_lock:
        stops = stop_tokens(served.tokenizer, newline=opts.stop_newline)
    return opts.reward_config(stops)


def _check_keep_best(opts: RunOptions, held_out) -> None:
    """keep_best "accuracy" needs classification data (flashzo.loop.fit's check)."""
    if opts.keep_best == "accuracy" and held_out and not held_out[0].is_classification:
        raise ServeError(400, "keep_best 'accuracy' needs classification validation data (LM evals have a loss)",
                         param="validation_file", code="invalid_validation_file")
