"""The training loop behind `flashzo train` and `flashzo demo`: steps, progress, evals, checkpoints.

The mini-batch of step t is a pure function of (seed, t), so a run resumed from a checkpoint sees
exactly the batches it would have seen, and continues bit-identically on the same device.

Under torch.distributed (MeZOConfig.parallel) every rank runs fit() on the same data: steps, evals and
checkpoints are collective, and only the main rank (`is_main`) logs, shows progress and writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Sequence

import torch

from flashzo.engine.example import Example
from flashzo.engine.mezo import MeZOTrainer
from flashzo.errors import InputError

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"


def batches(examples: Sequence[Example], batch_size: int, *, seed: int = 0, epoch: int = 0) -> list[list[Example]]:
    """One epoch of shuffled mini-batches (deterministic in seed and epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    return [[examples[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def batch_for_step(examples: Sequence[Example], batch_size: int, step: int, seed: int) -> list[Example]:
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, k = divmod(step, per_epoch)
    return batches(examples, batch_size, seed=seed, epoch=epoch)[k]


def fit(trainer: MeZOTrainer, train: Sequence[Example], eval_set: Sequence[Example] | None, *, steps: int,
        batch_size: int, out_dir: str, eval_every: int = 0, save_every: int = 0, progress: bool = True,
        log: Callable[[str], None] = print, is_main: bool = True, metrics_extra: dict | None = None) -> dict:
    """Train until `steps` steps are done (counting steps already in a resumed trainer)."""
    is_main = is_main and trainer.is_main
    if not is_main:
        log = _quiet
    if steps < 0 or batch_size < 1:
        raise InputError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if not train:
        raise InputError("the training set is empty")
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.json")
    history = {"step": [], "loss": [], "lr": [], "eval": []}
    if trainer.step_count and os.path.isfile(metrics_path):  # resumed: keep the curve so far
        with open(metrics_path) as f:
            old = json.load(f).get("history", history)
        keep = [i for i, s in enumerate(old.get("step", [])) if s < trainer.step_count]
        history = {k: [old[k][i] for i in keep] for k in ("step", "loss", "lr")}
        history["eval"] = [e for e in old.get("eval", []) if e["step"] <= trainer.step_count]

    def run_eval():
        if eval_set:
            res = trainer.evaluate(eval_set)
            history["eval"].append({"step": trainer.step_count, **res})
            return res
        return None

    first = None
    if eval_set and (not history["eval"] or history["eval"][-1]["step"] != trainer.step_count):
        first = run_eval()
        if first is not None:
            log(f"eval at step {trainer.step_count}: " + _fmt(first))
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=trainer.step_count, desc="MeZO", unit="step", dynamic_ncols=True)
    t0, start_step = time.perf_counter(), trainer.step_count
    running = None
    try:
        while trainer.step_count < steps:
            t = trainer.step_count
            res = trainer.step(batch_for_step(train, batch_size, t, trainer.config.seed))
            if not res.skipped:
                running = res.loss if running is None else 0.9 * running + 0.1 * res.loss
            history["step"].append(t)
            history["loss"].append(res.loss)
            history["lr"].append(res.lr)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}" if running is not None else "nan",
                                skipped=trainer.counters.nonfinite_total)
            done = trainer.step_count
            if eval_every and done % eval_every == 0 and done < steps:
                r = run_eval()
                if r is not None:
                    (bar.write if bar is not None else log)(f"eval at step {done}: " + _fmt(r))
            if save_every and done % save_every == 0 and (is_main or trainer.exchange is not None):
                trainer.save(os.path.join(out_dir, CHECKPOINT_DIR))  # collective under torch.distributed
                if is_main:
                    _write_metrics(metrics_path, history, trainer, metrics_extra)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    final = run_eval()
    if final is not None:
        log(f"eval at step {trainer.step_count}: " + _fmt(final))
    summary = {"steps_run": trainer.step_count - start_step, "seconds": elapsed,
               "steps_per_second": (trainer.step_count - start_step) / elapsed if elapsed > 0 else None,
               "nonfinite_steps": trainer.counters.nonfinite_total, "eval_before": first, "eval_after": final}
    if trainer.exchange is not None:
        summary["world_size"] = trainer.exchange.world
        summary["parallel"] = trainer.config.parallel
        summary["traffic"] = trainer.exchange.traffic.per_step()
    if is_main or trainer.exchange is not None:
        trainer.save(os.path.join(out_dir, CHECKPOINT_DIR))  # collective under torch.distributed
    if is_main:
        trainer.adapter.save_pretrained(os.path.join(out_dir, ADAPTER_DIR))
        _write_metrics(metrics_path, history, trainer, {**(metrics_extra or {}), **summary})
        plot_history(history, os.path.join(out_dir, "curve.png"))
    return {"history": history, **summary}


def _quiet(_msg: str) -> None:
    pass


def _fmt(res: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())


def _write_metrics(path: str, history: dict, trainer: MeZOTrainer, extra: dict | None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"history": history, "state": trainer.state_dict(), **(extra or {})}, f, indent=1)
    os.replace(tmp, path)


def plot_history(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, loss = history["step"], history["loss"]
    ax[0].plot(steps, loss, lw=0.6, alpha=0.4, label="step loss")
    if loss:
        k = max(1, len(loss) // 25)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax[0].plot(steps, smooth, lw=1.8, label=f"mean of {k}")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss (mean of +eps/-eps)")
    ax[0].legend()
    ev = history["eval"]
    if ev:
        key = "accuracy" if "accuracy" in ev[0] else "loss"
        ax[1].plot([e["step"] for e in ev], [e[key] for e in ev], marker="o")
        ax[1].set_ylabel(f"held-out {key}")
        if key == "accuracy":
            ax[1].set_ylim(0, 1)
            ax[1].axhline(0.5, color="gray", ls="--", lw=0.8, label="chance (2 classes)")
            ax[1].legend()
    ax[1].set_xlabel("step")
    fig.suptitle("flashzo MeZO training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
