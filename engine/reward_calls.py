"""Calling a reward on many generations: built-ins in this process, a user's reward in a worker process
that a time limit can stop, and every failure as a problem naming the example and the copy.

    caller = RewardCaller(reward, name="my_rewards:score", time_limit_s=10)
    values, problems = caller(calls, where)      calls: (prompt, completion, reference) triples
                                                 where: (example, copy) of each call

A value is a finite real number (an int, a float, a bool, a numpy scalar ...). A call that raises,
returns anything else, or runs past the time limit gives a RewardProblem instead of a value; the
trainer then skips its step as it skips a non-finite loss (engine/mezo.py).

Isolation. A Python thread cannot be stopped, so a user's reward runs in a worker process
(engine/reward_worker.py: the standard library only, started once per caller and again after a
stop); the parent sends a batch of calls and reads each result as it comes, waiting at most
`time_limit_s` for each. A call past the limit: the worker is killed (by its process id), the
problem names the call, and the next batch starts a fresh worker. The reward travels by pickle, so
it must be importable by name in the worker (a module-level function or a picklable object of a
module); `isolation="inline"` calls it in this process instead, with no time limit. The built-ins
(engine/rewards.py) always run inline: they are ours and linear in their input's length.
bench/bench_reward_calls.py measures what the worker costs per call.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from flashzo.kernels.errors import InputError

from .rewards import REWARDS

ISOLATION = ("process", "inline")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward_worker.py")
START_TIMEOUT_S = 60.0  # the worker's start: the interpreter and the import of the reward's module


@dataclass(frozen=True)
class RewardProblem:
    """A reward call that gave no value: which example (its index in the batch), which copy (None: an
    evaluation), what went wrong ("raised", "timed out", "not a number", "not finite", "worker died")
    and the detail."""

    example: int
    copy: int | None
    kind: str
    detail: str

    def __str__(self) -> str:
        where = f"example {self.example}" + (f", copy {self.copy}" if self.copy is not None else "")
        return f"{where}: the reward {self.kind}: {self.detail}"


class RewardError(RuntimeError):
    """A reward failed where no step can be skipped (an evaluation); `problems` lists every failed call."""

    def __init__(self, message: str, problems: Sequence[RewardProblem] = ()):
        super().__init__(message)
        self.problems = list(problems)


def reward_name(reward) -> str:
    """How a run records its reward: a built-in's name, "module:function", or a callable's module:qualname."""
    if isinstance(reward, str):
        return reward
    module = getattr(reward, "__module__", None) or type(reward).__module__
    qual = getattr(reward, "__qualname__", None) or type(reward).__qualname__
    return f"{module}:{qual}"


def resolve_reward(reward) -> Callable:
    """The callable a reward names: a built-in, "module:function" (imported here), or a callable itself."""
    if callable(reward):
        return reward
    if not isinstance(reward, str):
        raise InputError(f"reward must be a built-in name ({', '.join(REWARDS)}), 'module:function' or a callable, "
                         f"got {type(reward).__name__}")
    if reward in REWARDS:
        return REWARDS[reward]
    module, sep, attr = reward.partition(":")
    if not sep or not module or not attr:
        raise InputError(f"reward {reward!r} is neither a built-in ({', '.join(REWARDS)}) nor 'module:function'")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any error importing a user's module is reported as one line
        raise InputError(f"reward {reward!r}: module {module!r} does not import ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"reward {reward!r}: {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"reward {reward!r} is a {type(obj).__name__}, not a callable")
    return obj


def value_problem(value) -> tuple[str, str] | None:
    """(kind, detail) of what a reward returned that is not a finite real number; None for a good value."""
    if not isinstance(value, numbers.Real):
        return "not a number", f"a {type(value).__name__} ({repr(value)[:60]})"
    try:
        x = float(value)
    except Exception as e:  # noqa: BLE001
        return "not a number", f"a {type(value).__name__} whose float() raised {type(e).__name__}"
    return None if math.isfinite(x) else ("not finite", repr(x))


class RewardCaller:
    """One reward, called on batches of (prompt, completion, reference), inline or in a worker process."""

    def __init__(self, reward, *, time_limit_s: float = 10.0, isolation: str = "process"):
        self.fn = resolve_reward(reward)
        self.name = reward_name(reward)
        self.builtin = isinstance(reward, str) and reward in REWARDS or any(self.fn is f for f in REWARDS.values())
        self.time_limit_s = float(time_limit_s)
        if isolation not in ISOLATION:
            raise InputError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
        self.inline = self.builtin or isolation == "inline"
        self._worker: _Worker | None = None
        self._blob = b""
        if not self.inline:
            if getattr(self.fn, "__module__", None) == "__main__":
                raise InputError(f"reward {self.name} is defined in __main__, which the reward worker process "
                                 "cannot import: put it in a module of its own (or use isolation='inline', with no "
                                 "time limit)")
            try:
                self._blob = pickle.dumps(self.fn)
            except Exception as e:  # noqa: BLE001 - lambdas, closures, objects holding a lock ...
                raise InputError(f"reward {self.name} cannot be sent to the reward worker process ({type(e).__name__}: "
                                 f"{e}): make it a module-level function (or use isolation='inline', with no time "
                                 "limit)") from None

    def __call__(self, calls: Sequence[tuple], where: Sequence[tuple[int, int | None]]
                 ) -> tuple[list[float | None], list[RewardProblem]]:
        """The reward of every call (None where it failed) and the problems, each with its (example, copy)."""
        if self.inline:
            results = [_inline(self.fn, args) for args in calls]
        else:
            results = self._in_worker(calls)
        values, problems = [], []
        for (example, copy), res in zip(where, results):
            if res[0] == "ok" and (bad := value_problem(res[1])) is not None:
                res = bad
            if res[0] == "ok":
                values.append(float(res[1]))
            else:
                values.append(None)
                if res[0] != "not run":
                    problems.append(RewardProblem(example, copy, res[0], res[1]))
        return values, problems

    def probe(self, args: tuple, what: str) -> None:
        """Call the reward once before any work; refuse it (InputError naming it) if that call fails."""
        values, problems = self([args], [(0, None)])
        if problems:
            raise InputError(f"reward {self.name}, called on {what}: {problems[0].kind}: {problems[0].detail}")

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _in_worker(self, calls: Sequence[tuple]) -> list[tuple]:
        if self._worker is None or not self._worker.alive():
            self._worker = _Worker(self._blob, self.name)
        results = self._worker.run(calls, self.time_limit_s)
        if len(results) < len(calls) or results[-1][0] in ("timed out", "worker died"):
            self.close()  # a stopped or dead worker: the next batch starts a fresh one
        return results + [("not run", "")] * (len(calls) - len(results))


def _inline(fn: Callable, args: tuple) -> tuple:
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - reported with the example and the copy, as the worker reports it
        frames = traceback.extract_tb(e.__traceback__)
        where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
        return ("raised", f"{type(e).__name__}: {e}{where}")


class _Worker:
    """engine/reward_worker.py in a process of its own: started here, stopped here, by its process id."""

    def __init__(self, blob: bytes, name: str):
        self.proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self.results: queue.Queue = queue.Queue()
        threading.Thread(target=_read, args=(self.proc.stdout, self.results), daemon=True).start()
        try:
            self._send(("init", list(sys.path), blob))
            msg = self.results.get(timeout=START_TIMEOUT_S)
        except (OSError, queue.Empty):
            msg = ("init_error", f"the worker did not start within {START_TIMEOUT_S:g} s")
        if msg[0] != "ready":
            self.stop()
            detail = msg[1] if msg[0] == "init_error" else f"exited with status {self.proc.returncode}"
            raise InputError(f"reward {name} could not be loaded in the reward worker process: {detail}")

    def _send(self, msg: Any) -> None:
        pickle.dump(msg, self.proc.stdin)
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, calls: Sequence[tuple], limit_s: float) -> list[tuple]:
        """The results of the calls in order; it ends early with ("timed out" | "worker died", detail)."""
        try:
            self._send(("call", list(calls)))
        except (OSError, pickle.PicklingError) as e:
            return [("worker died", f"the call could not be sent to the reward worker ({type(e).__name__}: {e})")]
        out = []
        for _ in calls:
            try:
                msg = self.results.get(timeout=limit_s)
            except queue.Empty:
                self.stop()
                out.append(("timed out", f"no result within the time limit of {limit_s:g} s; its worker process "
                                         "was stopped"))
                break
            if msg is None:  # EOF: the worker exited (os._exit, a crash, killed from outside)
                self.proc.wait()
                out.append(("worker died", f"the reward worker process exited with status {self.proc.returncode}"))
                break
            out.append(msg)
        return out

    def stop(self) -> None:
        self._finalizer()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    try:
        proc.stdin.close()
    except OSError:  # a broken pipe
        pass


def _read(stream, results: queue.Queue) -> None:
    """The worker's messages, one pickle each, into `results`; None at the end of the stream."""
    try:
        while True:
            results.put(pickle.load(stream))
    except (EOFError, OSError, pickle.UnpicklingError, ValueError):
        results.put(None)
    finally:
        stream.close()
