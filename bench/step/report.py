"""The step benchmark's outputs: the markdown table, the plot, the CSV's columns, and merging a run's
cells into the results already recorded for the device (bench/results/step_<device>.json)."""

from __future__ import annotations

import math
import os

import harness

from .workloads import GPU_MODELS, WORKLOADS

CSV_FIELDS = (
    "model", "workload", "dtype", "examples", "batch_tokens", "baseline_padded_tokens", "flashzo_rows",
    "baseline_ms", "flashzo_ms", "floor_ms", "speedup", "step_over_floor",
    *(f"{side}_p{p}_ms" for side in ("baseline", "flashzo", "floor") for p in (20, 50, 80)),
    "flashzo_examples_per_s", "baseline_examples_per_s", "flashzo_tokens_per_s", "baseline_tokens_per_s",
    "baseline_gflop", "flashzo_gflop", "floor_gflop", "baseline_tflops", "flashzo_tflops", "baseline_mfu",
    "flashzo_mfu", "baseline_peak_mib", "flashzo_peak_mib", "infer_peak_mib", "baseline_step_mib",
    "flashzo_step_mib", "infer_step_mib", "flashzo_over_infer_peak", "baseline_over_flashzo_peak",
    "loss_baseline", "loss_flashzo", "invariant_ms", "invariant_p20_ms", "invariant_p50_ms", "invariant_p80_ms",
    "invariant_over_flashzo", "reps", "warmup", "device", "commit", "load_average", "date",
)


def _fmt(x, spec=".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _mem(r: dict, side: str) -> str:
    if r.get(f"{side}_peak_mib") is None:
        return "-"
    return f"{r[f'{side}_peak_mib']:.0f} ({r[f'{side}_step_mib']:.0f})"


def _ms(r: dict, side: str) -> str:
    """p50 [p20, p80] of the side's step time."""
    p20, p80 = r.get(f"{side}_p20_ms"), r.get(f"{side}_p80_ms")
    return f"{r[f'{side}_ms']:.1f} [{_fmt(p20)}, {_fmt(p80)}]"


def _rate(r: dict, side: str, gpu: bool) -> str:
    if not gpu:
        return f"{1e3 * r[f'{side}_tflops']:.1f}"
    mfu = r.get(f"{side}_mfu")
    return f"{r[f'{side}_tflops']:.1f} ({_fmt(None if mfu is None else 100 * mfu)}%)"


def markdown(results: dict) -> str:
    rows = results["rows"]
    runs = {r["run"]: r for r in rows}
    m = results["meta"]
    gpu = m["device_type"] == "cuda"
    rate = "TFLOP/s (MFU) baseline / flashzo" if gpu else "GFLOP/s baseline / flashzo"
    lines = [
        f"# MeZO step: flashzo vs the MeZO reference step ({m['device']})",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, triton {m['triton']}, "
        f"Python {m['python']}. Random weights of each preset's shape; LoRA r=8, alpha=16 on q_proj, v_proj; "
        "1 perturbation per step; 16 examples per batch; identical weights, adapter, batch, lr and eps on "
        "both sides. **baseline**: transformers OPT + PEFT running the official MeZO step "
        "(bench/mezo_baseline.py). **floor**: flashzo's two plain inference forwards of the batch. "
        "Times: ms per step over interleaved reps after warm-up, the median and [20th, 80th percentile]. "
        "tokens: the batch's tokens (every prompt + candidate/target sequence, unpadded) / the baseline's "
        "padded tokens per forward / the rows flashzo's one forward computes for both signs. Memory: peak MiB "
        "in a fresh process per side, weights included, the step's own part (above the loaded model) in "
        "parentheses; infer = one flashzo inference forward; step/infer = flashzo's peak over infer's.",
        "",
        f"| model | workload | dtype | tokens | baseline ms | flashzo ms | speedup | floor ms | step/floor "
        f"| flashzo ex/s | flashzo tok/s | GFLOP baseline / flashzo | {rate} | baseline peak | flashzo peak "
        "| infer peak | step/infer | loss diff | load avg | commit |",
        "|" + "---|" * 20,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['dtype']} "
            f"| {r['batch_tokens']} / {r['baseline_padded_tokens']} / {r['flashzo_rows']} | {_ms(r, 'baseline')} "
            f"| {_ms(r, 'flashzo')} | **{r['speedup']:.2f}x** | {_ms(r, 'floor')} | {r['step_over_floor']:.2f} "
            f"| {r['flashzo_examples_per_s']:.2f} | {r['flashzo_tokens_per_s']:.0f} "
            f"| {r['baseline_gflop']:.0f} / {r['flashzo_gflop']:.0f} "
            f"| {_rate(r, 'baseline', gpu)} / {_rate(r, 'flashzo', gpu)} | {_mem(r, 'baseline')} "
            f"| {_mem(r, 'flashzo')} | {_mem(r, 'infer')} | {_fmt(r.get('flashzo_over_infer_peak'), '.2f')} "
            f"| {abs(r['loss_baseline'] - r['loss_flashzo']):.1e} | {r['load_average'][0]:.2f} | {r['commit']} |")
    measured = [r for r in rows if r.get("invariant_ms") is not None]
    if measured:
        lines += ["", "## The batch-invariant mode's cost (`--batch-invariant`)", "",
                  "flashzo's step again with batch-invariant numerics (engine/invariant.py), timed interleaved with "
                  "the sides above in the same reps.", "",
                  "| model | workload | dtype | flashzo ms | batch-invariant ms | ratio | commit |", "|" + "---|" * 7]
        lines += [f"| {r['model']} | {r['workload']} | {r['dtype']} | {_ms(r, 'flashzo')} | {_ms(r, 'invariant')} "
                  f"| **{r['invariant_over_flashzo']:.2f}x** | {r['commit']} |" for r in measured]
    lines += ["", "loss diff: |baseline loss - flashzo loss| at the starting weights (sign 0), the check that both "
              "sides compute the same task.", "", "Runs (start time, commit, 1/5/15-min load average at start; "
              f"{m.get('cores', '?')} cores): " + "; ".join(
                  f"{v['date']} {v['commit']} {v['load_average']} reps {v['reps']}+{v['warmup']} warm-up"
                  for v in runs.values())]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"{r['model']}\n{r['workload']}" for r in rows]
    have_mem = any(r.get("flashzo_peak_mib") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if have_mem else 1, figsize=(max(5, 1.2 * len(rows)) * (2 if have_mem else 1), 4.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.27
    for k, (side, color) in enumerate((("baseline", "tab:gray"), ("flashzo", "tab:blue"), ("floor", "tab:green"))):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        mid = [r[f"{side}_ms"] for r in rows]
        lo = [r[f"{side}_ms"] - (r.get(f"{side}_p20_ms") or r[f"{side}_ms"]) for r in rows]
        hi = [(r.get(f"{side}_p80_ms") or r[f"{side}_ms"]) - r[f"{side}_ms"] for r in rows]
        ax.bar(xs, mid, width, yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8},
               label={"floor": "floor (2 inference fwd)"}.get(side, side), color=color)
    for i, r in enumerate(rows):
        top = max(r.get(f"{side}_p80_ms") or r[f"{side}_ms"] for side in ("baseline", "flashzo", "floor"))
        ax.annotate(f"{r['speedup']:.1f}x", (i, top * 1.05), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per MeZO step, median and p20-p80 (log scale)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("step time (annotated: baseline / flashzo)", fontsize=9)
    if have_mem:
        ax = axes[0][1]
        for k, (side, color) in enumerate((("baseline", "tab:gray"), ("flashzo", "tab:blue"), ("infer", "tab:green"))):
            xs = [i + (k - 1) * width for i in range(len(rows))]
            peak = [r.get(f"{side}_peak_mib") or 0 for r in rows]
            step = [r.get(f"{side}_step_mib") or 0 for r in rows]
            ax.bar(xs, [p - q for p, q in zip(peak, step)], width, color=color, alpha=0.35)
            ax.bar(xs, step, width, bottom=[p - q for p, q in zip(peak, step)], color=color,
                   label={"infer": "1 inference fwd"}.get(side, side))
        ax.set_ylabel("peak MiB (pale: loaded, dark: the step)")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.legend(fontsize=8)
        ax.set_title("peak memory per side (fresh process each)", fontsize=9)
    m = results["meta"]
    fig.suptitle(f"flashzo vs MeZO reference step - {m['device']}, torch {m['torch']}, commit {m['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, stem: str) -> list[str]:
    """`stem`.{json,csv,md,png} through the harness's writer."""
    return harness.write_results(stem, results, markdown=markdown, plot=plot, csv_fields=CSV_FIELDS)


def merge(stem: str, new_rows: list[dict], meta: dict) -> dict:
    """Replace the cells this run measured in the results already at `stem`.json, keep the rest."""
    old = []
    if os.path.isfile(stem + ".json"):
        prev = harness.read_results(stem + ".json")
        if prev["meta"]["device"] == meta["device"]:
            old = prev["rows"]
    key = lambda r: (r["model"], r["workload"], r["dtype"])  # noqa: E731
    fresh = {key(r) for r in new_rows}
    rows = [r for r in old if key(r) not in fresh] + new_rows
    order = {m: i for i, m in enumerate(GPU_MODELS + ("opt-tiny", "llama-tiny"))}
    wl = {w: i for i, w in enumerate(WORKLOADS)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), wl.get(r["workload"], 99), r["dtype"]))
    return {"meta": meta, "rows": rows}
