"""The training loop behind `flashzo train` and `flashzo demo`: steps, progress, evals, checkpoints, logs.

The mini-batch of step t is a pure function of (seed, t), so a run resumed from a checkpoint sees
exactly the batches it would have seen, and continues bit-identically on the same device. When a
run evaluates, checkpoints and ends is `RunSchedule`, which `flashzo serve`'s jobs follow too.

What a run writes to its out dir:

    log.jsonl      one line per step, written as it is trained: step, loss, loss_plus, loss_minus,
                   projected_grads, lr, tokens, skipped, seconds (the step's), time (Unix time); a
                   reward run (MeZOConfig.reward) also reward, rewards_plus, rewards_minus, signal and
                   generated (its curve is the mean reward, and its evals the held-out mean reward)
    metrics.json   the loss curve, one entry per evaluated step, eval_before / eval_after, the state
    checkpoint/    the resumable checkpoint, every save_every steps and at the end (atomic)
    best/          with keep_best: the checkpoint of the best eval so far (also a PEFT adapter)
    adapter/       the adapter in PEFT format, at the end
    curve.png      the loss and eval curves, at the end

metrics.json is written just before each checkpoint, so it never lags the checkpoint a run resumes
from; on resume, the log lines and curve points past the checkpoint's step are dropped (those steps
run again) and nothing is evaluated at the resume point.

SIGINT and SIGTERM, from fit's first line on, stop a run after the current step or eval (a second
signal abandons a step); the run is then saved as at the end, without the final eval, and fit
returns with `interrupted` set (a run stopped before its first step is saved at that step). A
NonFiniteLossError saves the run the same way before it propagates. Every file is replaced
atomically (a checkpoint by MeZOTrainer.save, the others by a rename), and a full disk is a
WriteError naming the file (src/flashzo/outputs.py); the last checkpoint is then intact.

Under torch.distributed (MeZOConfig.parallel) every rank runs fit() on the same data: steps, evals,
checkpoints and the decision to stop are collective, and only the main rank (`is_main`) logs, shows
progress and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Callable, Sequence

import torch

from flashzo.engine.example import Example
from flashzo.engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from flashzo.engine.mezo import STATE_FILE, MeZOTrainer, NonFiniteLossError
from flashzo.errors import InputError
from flashzo.outputs import remove, signals_deferred, writing

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
BEST_DIR = "best"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CURVE_FILE = "curve.png"
RUN_FILES = (LOG_FILE, METRICS_FILE, CHECKPOINT_DIR, BEST_DIR, ADAPTER_DIR, CURVE_FILE)
MAX_LOGGED_PROBLEMS = 3  # a skipped reward step's log line names its first failed reward calls
REPLACED_DIR = ".replaced-run"  # where --overwrite keeps the run it replaces until the new one is saved
# What a run writes inside its folders (a checkpoint: the adapter, its state; the adapter's temporary files)
_RUN_DIR_FILES = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_FILE, f".{ADAPTER_WEIGHTS}.tmp", f".{ADAPTER_CONFIG}.tmp"}


def batches(examples: Sequence[Example], batch_size: int, *, seed: int = 0, epoch: int = 0) -> list[list[Example]]:
    """One epoch of shuffled mini-batches (deterministic in seed and epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    return [[examples[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def batch_for_step(examples: Sequence[Example], batch_size: int, step: int, seed: int) -> list[Example]:
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, k = divmod(step, per_epoch)
    return batches(examples, batch_size, seed=seed, epoch=epoch)[k]


@dataclasses.dataclass(frozen=True)
class RunSchedule:
    """When a run evaluates, checkpoints and ends: the one schedule of `fit` and of a `flashzo serve`
    job (serve/scheduler.py).

    A run of `steps` steps with an eval set (`evaluates`) is evaluated before its first step (resumed:
    when no evaluation is on record), after every `eval_every`-th step but the last, and at the end;
    it is checkpointed after every `save_every`-th step and at the end. 0 turns eval_every or
    save_every off.
    """

    steps: int
    eval_every: int = 0
    save_every: int = 0
    evaluates: bool = False

    def eval_first(self, start: int, evaluated: bool) -> bool:
        """Evaluate before the first step of a run starting (or resuming) at step `start`?"""
        return self.evaluates and (start == 0 or not evaluated)

    def finished(self, step: int) -> bool:
        return step >= self.steps

    def eval_after(self, done: int) -> bool:
        """Evaluate after step `done` (1-based: the steps done)? Not after the last: the end evaluates."""
        return self.evaluates and self.eval_every > 0 and done % self.eval_every == 0 and done < self.steps

    def save_after(self, done: int) -> bool:
        return self.save_every > 0 and done % self.save_every == 0

    def eval_at_end(self, step: int) -> bool:
        return self.evaluates and self.finished(step)


# --------------------------------------------------------------------------------------------------
# The out dir
# --------------------------------------------------------------------------------------------------

def run_files(out_dir: str) -> list[str]:
    """The files and folders of a run in `out_dir` (with a save's leftovers, `checkpoint.old` ...)."""
    if not os.path.isdir(out_dir):
        return []
    names = set(os.listdir(out_dir))
    found = []
    for name in RUN_FILES:
        found += [n for n in (name, name + ".old", name + ".tmp") if n in names]
    return [os.path.join(out_dir, n) for n in found]


def describe_run(out_dir: str) -> str | None:
    """None if `out_dir` holds no run; else a few words about the one it holds."""
    files = run_files(out_dir)
    if not files:
        return None
    for ck in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        try:
            with open(os.path.join(out_dir, ck, STATE_FILE)) as f:
                step = json.load(f)["step"]
            return f"a run with a checkpoint at step {step}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "the files of a run without a checkpoint (" + ", ".join(os.path.basename(f) for f in files) + ")"


def clear_run(out_dir: str) -> None:
    """Remove the run in `out_dir` (only the files a run writes; anything else stays)."""
    for path in run_files(out_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def foreign_files(out_dir: str) -> list[str]:
    """Files in the run's folders (checkpoint/, best/, adapter/ and their .old / .tmp) that a run does not
    write there: saving replaces those folders, so a run refuses to start while any is there."""
    found = []
    for path in run_files(out_dir):
        if os.path.isdir(path) and not os.path.islink(path):
            found += [os.path.join(path, n) for n in sorted(os.listdir(path)) if n not in _RUN_DIR_FILES]
    return found


def set_aside_run(out_dir: str) -> str | None:
    """Move the run in `out_dir` into `out_dir/.replaced-run` (one rename per file, not interrupted by
    SIGINT / SIGTERM) and return that folder; None: no run there. The caller deletes it once the new
    run is saved. One left by an earlier launch is deleted first."""
    files = run_files(out_dir)
    if not files:
        return None
    aside = os.path.join(out_dir, REPLACED_DIR)
    remove(aside)
    with signals_deferred():
        os.mkdir(aside)
        for path in files:
            os.rename(path, os.path.join(aside, os.path.basename(path)))
    return aside


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

def fit(trainer: MeZOTrainer, train: Sequence[Example], eval_set: Sequence[Example] | None, *, steps: int,
        batch_size: int, out_dir: str, eval_every: int = 0, save_every: int = 0, progress: bool = True,
        log: Callable[[str], None] = print, is_main: bool = True, metrics_extra: dict | None = None,
        eval_batch_size: int = 32, keep_best: str | None = None, handle_signals: bool = True) -> dict:
    """Train until `steps` steps are done (counting steps already in a resumed trainer).

    keep_best: "loss" or "accuracy": keep the checkpoint of the best eval in OUT/best (ties keep the
    earlier). handle_signals: stop on SIGINT / SIGTERM and save (when fit runs in the main thread).
    Returns the summary (also in metrics.json) with the curve as "history".
    """
    is_main = is_main and trainer.is_main
    if not is_main:
        log = _quiet
    writes = is_main or trainer.exchange is not None  # trainer.save is collective under torch.distributed
    _check_fit_args(trainer, train, eval_set, steps, batch_size, eval_batch_size, keep_best)
    stop = _Stop(can_abandon=trainer.exchange is None) if handle_signals else _Stop(enabled=False)
    # from here on a signal stops the run after the current step (or eval), which is then saved
    with stop:
        start = trainer.step_count
        paths = _Paths(out_dir)
        if is_main:
            with writing(out_dir):
                os.makedirs(out_dir, exist_ok=True)
        history, eval_before = _previous_history(paths.metrics, start) if start else (_empty_history(), None)
        step_log = _StepLog(paths.log, start) if is_main else None
        schedule = RunSchedule(steps, eval_every, save_every, evaluates=bool(eval_set))
        rewarded = trainer.config.reward is not None

        def run_eval() -> dict:
            res = trainer.evaluate(eval_set, batch_size=eval_batch_size)
            res = {k: v for k, v in res.items() if k != "generations"}  # a reward run's texts: not in the curve
            step = trainer.step_count
            history["eval"] = [e for e in history["eval"] if e["step"] != step] + [{"step": step, **res}]
            if keep_best:
                consider_best(trainer, res, keep_best, paths.best if writes else None)
            return res

        if schedule.eval_first(start, evaluated=bool(history["eval"])):
            first = run_eval()
            log(f"eval at step {trainer.step_count}: " + _fmt(first))
            if start == 0:
                eval_before = first
        bar = None
        if progress and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="ES" if rewarded and trainer.config.reward.estimator == "es"
                       else "MeZO", unit="step", dynamic_ncols=True)
        say = bar.write if bar is not None else log
        t0 = time.perf_counter()
        running, error = None, None
        try:
            while not schedule.finished(trainer.step_count) and not _agreed(trainer, stop):
                t = trainer.step_count
                snapshot = (trainer.adapter.buffer.clone(), dataclasses.replace(trainer.counters)) \
                    if stop.can_abandon else None
                t_step = time.perf_counter()
                stop.in_step = True
                try:
                    res = trainer.step(batch_for_step(train, batch_size, t, trainer.config.seed))
                finally:
                    stop.in_step = False
                if step_log is not None:
                    step_log.write(res, time.perf_counter() - t_step)
                value = res.reward if rewarded else res.loss
                if not res.skipped:
                    running = value if running is None else 0.9 * running + 0.1 * value
                history["step"].append(t)
                history["loss"].append(res.loss)
                history["lr"].append(res.lr)
                if rewarded:
                    history.setdefault("reward", []).append(res.reward)
                if bar is not None:
                    bar.update(1)
                    shown = f"{running:.4f}" if running is not None else "nan"
                    bar.set_postfix(**({"reward": shown} if rewarded else {"loss": shown}),
                                    skipped=trainer.counters.nonfinite_total)
                done = trainer.step_count
                if schedule.eval_after(done):
                    say(f"eval at step {done}: " + _fmt(run_eval()))
                if schedule.save_after(done) and writes:
                    if is_main:
                        _write_metrics(paths.metrics, history, trainer, metrics_extra, eval_before)
                    _save(trainer, paths.checkpoint)
        except _Abandoned:
            buffer, counters = snapshot
            trainer.adapter.buffer.copy_(buffer)
            trainer.counters = counters
        except NonFiniteLossError as e:
            error = e
        finally:
            if bar is not None:
                bar.close()
            if step_log is not None:
                step_log.close()
        elapsed = time.perf_counter() - t0
        final = None
        if error is None and schedule.eval_at_end(trainer.step_count):  # a stopped run is saved without it
            final = run_eval()
            log(f"eval at step {trainer.step_count}: " + _fmt(final))
        ran = trainer.step_count - start
        summary = {"steps_run": ran, "step": trainer.step_count, "steps": steps, "seconds": elapsed,
                   "steps_per_second": ran / elapsed if elapsed > 0 else None,
                   "nonfinite_steps": trainer.counters.nonfinite_total, "eval_before": eval_before,
                   "eval_after": final}
        if keep_best and trainer.run_info and trainer.run_info.get("best"):
            summary["best"] = trainer.run_info["best"]
        if stop.signum is not None:
            summary["interrupted"] = signal.Signals(stop.signum).name
            summary["signal"] = int(stop.signum)
        if error is not None:
            summary["error"] = str(error)
        if trainer.exchange is not None:
            summary["world_size"] = trainer.exchange.world
            summary["parallel"] = trainer.config.parallel
            summary["traffic"] = trainer.exchange.traffic.per_step()
        if is_main:
            _write_metrics(paths.metrics, history, trainer, {**(metrics_extra or {}), **summary}, eval_before)
        if writes:
            _save(trainer, paths.checkpoint)
        if is_main:
            with writing(paths.adapter):
                trainer.adapter.save_pretrained(paths.adapter)
            plot_history(history, paths.curve)
    if error is not None:
        raise error
    return {"history": history, **summary}


def _check_fit_args(trainer, train, eval_set, steps, batch_size, eval_batch_size, keep_best) -> None:
    for name, value, lo in (("steps", steps, 0), ("batch_size", batch_size, 1),
                            ("eval_batch_size", eval_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    if steps < trainer.step_count:
        raise InputError(f"steps {steps} is below the trainer's step {trainer.step_count}")
    if not train:
        raise InputError("the training set is empty")
    if keep_best is not None:
        if keep_best not in ("loss", "accuracy", "reward"):
            raise InputError(f"keep_best must be 'loss', 'accuracy' or 'reward', got {keep_best!r}")
        if not eval_set:
            raise InputError("keep_best needs an eval set")
        if (keep_best == "reward") != (trainer.config.reward is not None):
            raise InputError("keep_best 'reward' is for a reward run, whose evals have no loss or accuracy" if
                             trainer.config.reward is not None else "keep_best 'reward' needs a reward run")
        if keep_best == "reward":
            return
        if keep_best == "accuracy" and not eval_set[0].is_classification:
            raise InputError("keep_best 'accuracy' needs classification eval data (LM evals have a loss)")


class _Paths:
    def __init__(self, out_dir: str):
        join = lambda name: os.path.join(out_dir, name)
        self.log, self.metrics, self.curve = join(LOG_FILE), join(METRICS_FILE), join(CURVE_FILE)
        self.checkpoint, self.adapter, self.best = join(CHECKPOINT_DIR), join(ADAPTER_DIR), join(BEST_DIR)


def consider_best(trainer: MeZOTrainer, res: dict, metric: str, path: str | None) -> bool:
    """Whether `res` is the trainer's best eval by `metric` (ties keep the earlier): then it is recorded
    in trainer.run_info["best"] and, given a `path`, the trainer is saved there."""
    value = res[metric]
    best = (trainer.run_info or {}).get("best")
    if best is not None and best.get("metric") == metric:
        if not (value < best["value"] if metric == "loss" else value > best["value"]):
            return False
    trainer.run_info = {**(trainer.run_info or {}),
                        "best": {"step": trainer.step_count, "metric": metric, "value": value}}
    if path is not None:
        _save(trainer, path)
    return True


def _save(trainer: MeZOTrainer, path: str) -> None:
    """trainer.save (atomic: the checkpoint there before stays whole if it fails); a full disk is a WriteError."""
    with writing(path):
        trainer.save(path)


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------

class _Abandoned(BaseException):
    """A second signal during a step: the step is abandoned (fit restores the state from before it)."""


class _Stop:
    """SIGINT / SIGTERM while fit runs: remember the first, stop after the current step; a second one
    during a step abandons it (single process only: under torch.distributed the ranks must agree)."""

    def __init__(self, *, can_abandon: bool = False, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.can_abandon = can_abandon and self.enabled
        self.signum: int | None = None
        self.count = 0
        self.in_step = False
        self._old: dict = {}

    def __enter__(self) -> _Stop:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # `nohup`, a background job: keep ignoring it
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        name = signal.Signals(signum).name
        if self.count == 1:
            more = "; again to abandon the step" if self.can_abandon else ""
            _say(f"\n{name}: stopping after this step, then saving the run{more}\n")
        elif self.in_step and self.can_abandon:
            self.in_step = False
            _say(f"\n{name}: abandoning the step, then saving the run\n")
            raise _Abandoned()


def _say(text: str) -> None:
    try:  # a handler may interrupt a write to stderr: os.write does not re-enter Python's buffered stream
        os.write(2, text.encode())
    except OSError:
        pass


def _agreed(trainer: MeZOTrainer, stop: _Stop) -> bool:
    """Whether to stop now: this process had a signal, or (under torch.distributed) any rank had one."""
    ex = trainer.exchange
    if ex is None:
        return stop.signum is not None
    rows = ex.gather([float(stop.signum or 0)], kind="control", what=f"step {trainer.step_count}: stop signals")
    signum = int(rows[:, 0].max())
    if signum and stop.signum is None:
        stop.signum = signum
    return bool(signum)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def _empty_history() -> dict:
    return {"step": [], "loss": [], "lr": [], "eval": []}


def _previous_history(path: str, start: int) -> tuple[dict, dict | None]:
    """(the curve up to step `start`, eval_before) from a resumed run's metrics.json."""
    if not os.path.isfile(path):
        return _empty_history(), None
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        hist = old["history"]
        steps = hist["step"]
        keep = [i for i, s in enumerate(steps) if s < start]
        history = {k: [hist[k][i] for i in keep] for k in ("step", "loss", "lr", "reward") if k in hist}
        history["eval"] = [e for e in hist["eval"] if e["step"] <= start]
        before = old.get("eval_before")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InputError(f"{path}: cannot be read as a run's metrics (truncated or edited?): {type(e).__name__}: "
                         f"{e}; move it away to resume without the curve so far") from None
    return history, before if isinstance(before, dict) else None


class _StepLog:
    """OUT/log.jsonl: one line per step, flushed as it is written; lines from `start` on are dropped first."""

    def __init__(self, path: str, start: int):
        kept = []
        if start and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] < start:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
        self.path = path
        with writing(path):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
            self._f = open(path, "a")

    def write(self, res, seconds: float) -> None:
        rec = {"step": res.step, "loss": res.loss, "loss_plus": res.loss_plus, "loss_minus": res.loss_minus,
               "projected_grads": res.projected_grads, "lr": res.lr, "tokens": res.tokens, "skipped": res.skipped,
               "seconds": round(seconds, 6), "time": round(time.time(), 3)}
        if res.reward is not None or res.rewards_plus:  # a reward run
            rec.update(reward=res.reward, rewards_plus=res.rewards_plus, rewards_minus=res.rewards_minus,
                       signal=res.signal, generated=res.generated)
            if res.reward_problems:
                rec["reward_problems"] = [f"example {p.example}, copy {p.copy}: {p.kind}: {p.detail}"
                                          for p in res.reward_problems[:MAX_LOGGED_PROBLEMS]]
        with writing(self.path):  # a line cut short by a full disk is dropped on resume, as after a kill
            self._f.write(json.dumps(_finite(rec)) + "\n")
            self._f.flush()

    def close(self) -> None:
        with writing(self.path):
            self._f.close()


def _finite(value):
    """JSON has no NaN or infinity: such floats are written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _quiet(_msg: str) -> None:
    pass


def _fmt(res: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                     if k != "generations")


def _write_metrics(path: str, history: dict, trainer: MeZOTrainer, extra: dict | None,
                   eval_before: dict | None) -> None:
    tmp = path + ".tmp"
    with writing(path):
        try:
            with open(tmp, "w") as f:
                json.dump({"history": history, "state": trainer.state_dict(), "eval_before": eval_before,
                           **(extra or {})}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def plot_history(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    rewarded = "reward" in history
    steps, loss = history["step"], history["reward" if rewarded else "loss"]
    # a skipped step's value is NaN (None once read back from JSON): not plotted
    loss = [math.nan if v is None else v for v in loss]
    ax[0].plot(steps, loss, lw=0.6, alpha=0.4, label="step reward" if rewarded else "step loss")
    if loss:
        k = max(1, len(loss) // 25)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax[0].plot(steps, smooth, lw=1.8, label=f"mean of {k}")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training reward (mean over the 2q copies)" if rewarded else "training loss (mean of +eps/-eps)")
    ax[0].legend()
    ev = history["eval"]
    if ev:
        key = "reward" if "reward" in ev[0] else "accuracy" if "accuracy" in ev[0] else "loss"
        ax[1].plot([e["step"] for e in ev], [e[key] for e in ev], marker="o")
        ax[1].set_ylabel(f"held-out {key}")
        if key == "reward" and all(0 <= e["reward"] <= 1 for e in ev):
            ax[1].set_ylim(0, 1)
        if key == "accuracy":
            ax[1].set_ylim(0, 1)
            ax[1].axhline(0.5, color="gray", ls="--", lw=0.8, label="chance (2 classes)")
            ax[1].legend()
    ax[1].set_xlabel("step")
    fig.suptitle("flashzo training on a reward of generated text" if rewarded else "flashzo MeZO training")
    fig.tight_layout()
    tmp = path + ".tmp"
    with writing(path):
        try:
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        finally:
            plt.close(fig)
