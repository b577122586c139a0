"""End-to-end MeZO step: flashzo against the MeZO reference step, on the same work.

Both sides get identical weights (one random OPT of a preset's shape; the Hugging Face model is
built from flashzo's tensors), the identical LoRA adapter (r=8, alpha=16, q_proj + v_proj, PEFT's
init), identical batches and hyperparameters (lr, eps, weight decay 0). Per (model, workload) cell:

  baseline   bench/mezo_baseline.py: transformers OPT + PEFT LoRA, MeZO's collation (every candidate
             its own sequence, left padding to a multiple of 8), in-place +eps/-2eps/+eps with
             torch.normal, full logits, then the update regenerating z: the official MeZO step
  flashzo    MeZOTrainer.step(examples): both signed passes in one ragged forward over the paged KV
             (prompts shared by their candidates), z regenerated in the kernels, the fused update
  floor      two plain inference forwards of the same batch in flashzo (sign 0, one copy each, the
             adapter applied unperturbed): what any MeZO implementation must at least compute

Timing: each rep runs the three in rotating order (interleaved), after `--warmup` untimed reps;
the median of `--reps` is reported (wall clock, the device synchronized before and after: a step
includes its host work - batch building, the loss read-back). examples/s = batch examples / step;
tokens/s = the batch's tokens (every prompt + candidate / target sequence, no padding, as the data
holds them) / step. FLOPs: what each side executes (matmuls, attention scores over the positions it
computes: the baseline's padded L x L per sequence, flashzo's page tables; the LM head over the
rows each side computes); on a GPU TFLOP/s and MFU against the device's dense bf16/fp16 peak.

Memory: every side in a fresh subprocess that builds only what that side needs (the baseline's
weights are its own copy there), runs `--memory-steps` steps, and reports
  GPU: torch.cuda.max_memory_allocated (absolute, weights included), and the peak above the
       allocation after loading;
  CPU: peak RSS (VmHWM, after `echo 5 > /proc/self/clear_refs` reset it following the load),
       absolute and above the RSS after loading. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536
       so freed buffers go back to the OS and RSS follows live memory (glibc would keep them).
--smoke measures memory in-process, for its first workload only (it checks the code path, not
the figures).
"infer" is flashzo running one plain inference forward (one copy, sign 0) of the batch.

    python bench/bench_step.py                          # this device's full sweep
    python bench/bench_step.py --models opt-125m --workloads sst2 --reps 7
    python bench/bench_step.py --smoke                  # seconds: opt-tiny, CI

Writes bench/results/step_<device>.{json,csv,png,md} (smoke: step_smoke.*); a later run replaces the
cells it measured and keeps the others.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from _meta import cpu_name, git_commit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mezo_baseline import MeZOBaseline, collate, hf_from_flashzo, mezo_loss  # noqa: E402

from flashzo.engine import Copy, Example, LoRAAdapter, LoRAConfig, OPTModel  # noqa: E402
from flashzo.engine.loss import copy_losses  # noqa: E402
from flashzo.engine.mezo import MeZOConfig, MeZOTrainer, evaluate  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
CPU_MODELS = ("opt-125m", "opt-1.3b")
GPU_MODELS = ("opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b")
SIDES = ("baseline", "flashzo", "floor")
MEMORY_SIDES = ("baseline", "flashzo", "infer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense 16-bit tensor-core peaks (TFLOP/s, no sparsity), matched against the device name.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))


# --------------------------------------------------------------------------------------------------
# Workloads: seeded random token ids in the shapes of the MeZO paper's tasks
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    prompt_len: tuple[int, int]  # inclusive range
    num_candidates: int = 0  # 0: an LM target instead
    candidate_len: tuple[int, int] = (1, 1)
    target_len: int = 0
    fixed_candidates: bool = True  # the same candidate tokens for every example (label words)


WORKLOADS = {
    "sst2": Workload(prompt_len=(12, 48), num_candidates=2),  # " terrible" / " great"
    "rte": Workload(prompt_len=(60, 250), num_candidates=2),  # "Yes" / "No"
    "multichoice": Workload(prompt_len=(16, 64), num_candidates=4, candidate_len=(3, 8), fixed_candidates=False),
    "lm": Workload(prompt_len=(32, 128), target_len=16),
}


def make_examples(workload: str, vocab_size: int, *, num_examples: int = 16, seed: int = 0) -> list[Example]:
    """A batch in the workload's shape. Prompts start with OPT's BOS (2); ids avoid the pad id (1)."""
    w = WORKLOADS[workload]
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(4, vocab_size, (n,), generator=g).tolist()

    def length(lo_hi):
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))

    label_words = [tokens(length(w.candidate_len)) for _ in range(w.num_candidates)]
    examples = []
    for i in range(num_examples):
        prompt = [2] + tokens(length(w.prompt_len) - 1)
        if w.num_candidates:
            cands = label_words if w.fixed_candidates else [tokens(length(w.candidate_len))
                                                             for _ in range(w.num_candidates)]
            examples.append(Example(prompt, candidates=[list(c) for c in cands], label=i % w.num_candidates))
        else:
            examples.append(Example(prompt, target=tokens(w.target_len)))
    return examples


def batch_tokens(examples) -> int:
    return sum(len(toks) for ex in examples for toks, _ in ex.sequences())


# --------------------------------------------------------------------------------------------------
# Building both sides
# --------------------------------------------------------------------------------------------------

@dataclass
class Sides:
    model: OPTModel | None
    trainer: MeZOTrainer | None
    adapter: LoRAAdapter | None
    hf: object | None
    baseline: MeZOBaseline | None


def build(preset: str, dtype: torch.dtype, device, *, lr: float, eps: float, seed: int,
          which=("flashzo", "baseline")) -> Sides:
    """The flashzo model (and trainer) and/or the PEFT baseline on the same random weights."""
    model = OPTModel.from_config(preset, seed=seed, dtype=dtype, device=device)
    adapter = LoRAAdapter.init(LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=seed),
                               model.config, device=device)
    hf = baseline = None
    if "baseline" in which:
        hf = hf_from_flashzo(model, adapter, dtype=dtype, device=device, share_weights=True)
        baseline = MeZOBaseline(hf, lr=lr, eps=eps, seed=seed)
    trainer = None
    if "flashzo" in which:
        trainer = MeZOTrainer(model, adapter, MeZOConfig(lr=lr, eps=eps, seed=seed))
    else:
        model = None  # the baseline's HF model holds the weights on its own
    return Sides(model, trainer, trainer.adapter if trainer else adapter, hf, baseline)


def run_baseline(s: Sides, examples, device) -> float:
    batch = collate(examples, pad_token_id=1, device=device)  # MeZO's collator runs every step
    return s.baseline.step(batch)[0]


def run_flashzo(s: Sides, examples) -> float:
    return s.trainer.step(examples).loss


def run_infer(s: Sides, examples) -> float:
    """One plain inference forward of the batch: one copy, sign 0, the adapter unperturbed."""
    batch = s.model.build_batch(examples, [Copy()], adapters=[s.trainer.adapter])
    return copy_losses(batch.readout, s.model.score(batch), examples).loss[0]


def run_floor(s: Sides, examples) -> float:
    return run_infer(s, examples) + run_infer(s, examples)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# FLOPs each side executes
# --------------------------------------------------------------------------------------------------

def _linear_flops_per_row(cfg, lora_r: int, lora_modules: int) -> int:
    h, f = cfg.hidden_size, cfg.ffn_dim
    return 2 * (4 * h * h + 2 * h * f) + lora_modules * 2 * lora_r * (h + h)


def _attention_flops(meta, h: int) -> int:
    """QK^T and PV over the keys each query row attends (its page table, causal)."""
    qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
    keys = 0
    for s in range(len(qo) - 1):
        n, m = qo[s + 1] - qo[s], kv[s + 1] - kv[s]
        keys += n * (m - n) + n * (n + 1) // 2
    return 4 * h * keys


def flashzo_flops(s: Sides, examples) -> int:
    cfg = s.model.config
    batch = s.model.build_batch(examples, s.trainer.copies(), adapters=[s.trainer.adapter],
                                eps=s.trainer.config.eps, sharing=s.trainer.config.sharing)
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    inputs, stats = batch.inputs, batch.stats
    below = min(inputs.fork_layer, L) if inputs.trunk_meta is not None else 0
    per_row = _linear_flops_per_row(cfg, 8, 2)
    flops = stats.token_layers * per_row
    flops += (L - below) * _attention_flops(inputs.meta, h)
    if inputs.trunk_meta is not None:
        flops += below * _attention_flops(inputs.trunk_meta, h)
    flops += 2 * h * cfg.vocab_size * batch.readout.rows.numel()
    if inputs.fork_index is not None and inputs.fork_layer < L:  # the fork layer's unadapted q/k/v: trunk rows only
        shared = [n for n in ("q_proj", "k_proj", "v_proj") if (inputs.fork_layer, n) not in s.trainer.adapter.slots]
        flops -= len(shared) * 2 * h * h * (stats.num_tokens - stats.trunk_tokens)
    return flops


def baseline_flops(cfg, examples) -> int:
    b = collate(examples)
    B, T = b.input_ids.shape
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    per_forward = B * T * L * _linear_flops_per_row(cfg, 8, 2)
    per_forward += L * 4 * h * B * T * T  # SDPA with a padding mask: the full L x L score matrix
    per_forward += 2 * h * cfg.vocab_size * B * T  # full logits
    return 2 * per_forward


def infer_flops(s: Sides, examples) -> int:
    cfg = s.model.config
    batch = s.model.build_batch(examples, [Copy()], adapters=[s.trainer.adapter])
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    return (batch.stats.token_layers * _linear_flops_per_row(cfg, 8, 2) + L * _attention_flops(batch.inputs.meta, h)
            + 2 * h * cfg.vocab_size * batch.readout.rows.numel())


# --------------------------------------------------------------------------------------------------
# Memory, in a fresh process per side
# --------------------------------------------------------------------------------------------------

def _status_mib(field: str) -> float:
    """VmRSS or VmHWM of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """Runs in the subprocess: build one side, reset the peak counter, run it, report the peak."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    side = spec["side"]
    which = ("baseline",) if side == "baseline" else ("flashzo",)
    s = build(spec["model"], dtype, device, lr=spec["lr"], eps=spec["eps"], seed=spec["seed"], which=which)
    examples = make_examples(spec["workload"], (s.model or s.hf).config.vocab_size,
                             num_examples=spec["num_examples"], seed=spec["seed"])
    fn = {"baseline": lambda: run_baseline(s, examples, device), "flashzo": lambda: run_flashzo(s, examples),
          "infer": lambda: run_infer(s, examples)}[side]
    out = {"side": side}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
        for _ in range(spec["steps"]):
            fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mib=peak / 2**20, loaded_mib=loaded / 2**20, step_mib=(peak - loaded) / 2**20,
                   method="torch.cuda.max_memory_allocated")
    else:
        # NOTE: VmHWM, not getrusage's ru_maxrss: ru_maxrss also keeps the high-water mark recorded
        # when any thread exits (the loaders' worker threads), which clear_refs does not reset; it
        # reported the model-loading peak instead of the step's.
        reset = _reset_peak_rss()
        loaded = _status_mib("VmRSS")
        for _ in range(spec["steps"]):
            fn()
        peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.update(peak_mib=peak, loaded_mib=loaded, step_mib=peak - loaded,
                   method="VmHWM after clear_refs" if reset else "ru_maxrss (no reset: includes loading)")
    return out


def measure_memory(spec: dict, *, in_process: bool = False) -> dict:
    if in_process:  # smoke: the code path without the subprocess's start-up cost
        return dict(memory_child(spec), method="in-process (smoke)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    # Run outside the checkout so its kernels/ folder never shadows an installed package.
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------------

def bench_cell(args, preset: str, workload: str, device, dtype_name: str, peak_tflops) -> dict:
    dtype = DTYPES[dtype_name]
    s = build(preset, dtype, device, lr=args.lr, eps=args.eps, seed=args.seed)
    cfg = s.model.config
    examples = make_examples(workload, cfg.vocab_size, num_examples=args.num_examples, seed=args.seed)
    # Same task, same weights: the two losses at theta (sign 0) before any step.
    loss_flashzo = evaluate(s.model, s.trainer.adapter, examples)["loss"]
    loss_baseline = float(mezo_loss(s.hf, collate(examples, device=device)))
    fns = {"baseline": lambda: run_baseline(s, examples, device), "flashzo": lambda: run_flashzo(s, examples),
           "floor": lambda: run_floor(s, examples)}
    times = {k: [] for k in SIDES}
    for rep in range(args.warmup + args.reps):
        order = SIDES[rep % 3:] + SIDES[:rep % 3]  # rotate: no side always runs first
        for side in order:
            sync(device)
            t0 = time.perf_counter()
            fns[side]()
            sync(device)
            if rep >= args.warmup:
                times[side].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    padded = collate(examples)
    row = dict(
        model=preset, workload=workload, dtype=dtype_name, examples=len(examples),
        batch_tokens=batch_tokens(examples), baseline_padded_tokens=padded.padded_tokens,
        flashzo_rows=s.model.build_batch(examples, s.trainer.copies(), adapters=[s.trainer.adapter]).stats.num_tokens,
        reps=args.reps, warmup=args.warmup,
        baseline_ms=1e3 * med["baseline"], flashzo_ms=1e3 * med["flashzo"], floor_ms=1e3 * med["floor"],
        speedup=med["baseline"] / med["flashzo"], step_over_floor=med["flashzo"] / med["floor"],
        baseline_ms_all=[round(1e3 * t, 2) for t in times["baseline"]],
        flashzo_ms_all=[round(1e3 * t, 2) for t in times["flashzo"]],
        floor_ms_all=[round(1e3 * t, 2) for t in times["floor"]],
        flashzo_examples_per_s=len(examples) / med["flashzo"],
        baseline_examples_per_s=len(examples) / med["baseline"],
        flashzo_tokens_per_s=batch_tokens(examples) / med["flashzo"],
        baseline_tokens_per_s=batch_tokens(examples) / med["baseline"],
        loss_flashzo=loss_flashzo, loss_baseline=loss_baseline,
    )
    fl = {"flashzo": flashzo_flops(s, examples), "baseline": baseline_flops(cfg, examples),
          "floor": 2 * infer_flops(s, examples)}
    for side, f in fl.items():
        row[f"{side}_gflop"] = f / 1e9
        row[f"{side}_tflops"] = f / med[side] / 1e12
        row[f"{side}_mfu"] = f / med[side] / 1e12 / peak_tflops if peak_tflops else None
    if args.profile:
        row["profile"] = profile_cell(args, fns, device, f"{preset}_{workload}")
    fns = s = None  # free both sides before the memory subprocesses run
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_memory:
        spec = dict(model=preset, workload=workload, device=str(device), dtype=dtype_name, lr=args.lr, eps=args.eps,
                    seed=args.seed, num_examples=args.num_examples, steps=args.memory_steps, threads=args.threads)
        for side in MEMORY_SIDES:
            m = measure_memory(dict(spec, side=side), in_process=args.smoke)
            row[f"{side}_peak_mib"] = m["peak_mib"]
            row[f"{side}_step_mib"] = m["step_mib"]
            row["memory_method"] = m["method"]
        row["flashzo_over_infer_peak"] = row["flashzo_peak_mib"] / row["infer_peak_mib"]
        row["baseline_over_flashzo_peak"] = row["baseline_peak_mib"] / row["flashzo_peak_mib"]
    return row


def profile_cell(args, fns, device, name: str) -> str:
    """torch.profiler over one step of each side; the op tables go to step_profile_<device>_<cell>.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    sort = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    parts = []
    for side in ("flashzo", "baseline"):
        with profile(activities=activities, record_shapes=True) as prof:
            fns[side]()
            sync(device)
        parts.append(f"## {side}: one step, top ops by self time\n")
        parts.append(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.profile_rows,
                                                                         max_name_column_width=60,
                                                                         max_shapes_column_width=70))
        parts.append(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60))
    tag = device_meta(device)["tag"] if not args.smoke else "smoke"
    path = os.path.join(args.out, f"step_profile_{tag}_{name}.txt")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return os.path.relpath(path, args.out)


# --------------------------------------------------------------------------------------------------
# Metadata and outputs
# --------------------------------------------------------------------------------------------------

def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "-"


def device_meta(device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for k, p in PEAK_TFLOPS if k in name), None)
        tag = "gpu-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    else:
        name, peak, tag = f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)", None, "cpu"
    return {"device": name, "tag": tag, "peak_bf16_tflops": peak}


def run_meta(device) -> dict:
    return dict(
        **{k: v for k, v in device_meta(device).items() if k != "tag"},
        torch=torch.__version__, transformers=_version("transformers"), peft=_version("peft"),
        triton=_version("triton"), python=platform.python_version(), commit=git_commit(),
        load_average=[round(x, 2) for x in os.getloadavg()], cores=os.cpu_count(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


CSV_FIELDS = (
    "model", "workload", "dtype", "examples", "batch_tokens", "baseline_padded_tokens", "flashzo_rows",
    "baseline_ms", "flashzo_ms", "floor_ms", "speedup", "step_over_floor",
    "flashzo_examples_per_s", "baseline_examples_per_s", "flashzo_tokens_per_s", "baseline_tokens_per_s",
    "baseline_gflop", "flashzo_gflop", "floor_gflop", "baseline_tflops", "flashzo_tflops", "baseline_mfu",
    "flashzo_mfu", "baseline_peak_mib", "flashzo_peak_mib", "infer_peak_mib", "baseline_step_mib",
    "flashzo_step_mib", "infer_step_mib", "flashzo_over_infer_peak", "baseline_over_flashzo_peak",
    "loss_baseline", "loss_flashzo", "reps", "warmup", "device", "commit", "load_average", "date",
)


def _fmt(x, spec=".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _mem(r: dict, side: str) -> str:
    if r.get(f"{side}_peak_mib") is None:
        return "-"
    return f"{r[f'{side}_peak_mib']:.0f} ({r[f'{side}_step_mib']:.0f})"


def markdown(results: dict) -> str:
    rows = results["rows"]
    runs = {r["run"]: r for r in rows}
    m = results["meta"]
    gpu = m["peak_bf16_tflops"] is not None
    rate = "TFLOP/s (MFU) baseline / flashzo" if gpu else "GFLOP/s baseline / flashzo"
    lines = [
        f"# MeZO step: flashzo vs the MeZO reference step ({m['device']})",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, triton {m['triton']}, "
        f"Python {m['python']}. Random weights of each preset's shape; LoRA r=8, alpha=16 on q_proj, v_proj; "
        "1 perturbation per step; 16 examples per batch; identical weights, adapter, batch, lr and eps on "
        "both sides. **baseline**: transformers OPT + PEFT running the official MeZO step "
        "(bench/mezo_baseline.py). **floor**: flashzo's two plain inference forwards of the batch. "
        "Times: median ms per step over interleaved reps after warm-up. tokens: the batch's tokens "
        "(every prompt + candidate/target sequence, unpadded) / the baseline's padded tokens per forward / "
        "the rows flashzo's one forward computes for both signs. Memory: peak MiB in a fresh process per "
        "side, weights included, the step's own part (above the loaded model) in parentheses; infer = one "
        "flashzo inference forward; step/infer = flashzo's peak over infer's.",
        "",
        f"| model | workload | dtype | tokens | baseline ms | flashzo ms | speedup | floor ms | step/floor "
        f"| flashzo ex/s | flashzo tok/s | GFLOP baseline / flashzo | {rate} | baseline peak | flashzo peak "
        "| infer peak | step/infer | loss diff | load avg | commit |",
        "|" + "---|" * 20,
    ]
    for r in rows:
        if gpu:
            fl = (f"{r['baseline_tflops']:.1f} ({100 * (r['baseline_mfu'] or 0):.1f}%) / "
                  f"{r['flashzo_tflops']:.1f} ({100 * (r['flashzo_mfu'] or 0):.1f}%)")
        else:
            fl = f"{1e3 * r['baseline_tflops']:.1f} / {1e3 * r['flashzo_tflops']:.1f}"
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['dtype']} "
            f"| {r['batch_tokens']} / {r['baseline_padded_tokens']} / {r['flashzo_rows']} | {r['baseline_ms']:.1f} "
            f"| {r['flashzo_ms']:.1f} | **{r['speedup']:.2f}x** | {r['floor_ms']:.1f} | {r['step_over_floor']:.2f} "
            f"| {r['flashzo_examples_per_s']:.2f} | {r['flashzo_tokens_per_s']:.0f} "
            f"| {r['baseline_gflop']:.0f} / {r['flashzo_gflop']:.0f} | {fl} | {_mem(r, 'baseline')} "
            f"| {_mem(r, 'flashzo')} | {_mem(r, 'infer')} | {_fmt(r.get('flashzo_over_infer_peak'), '.2f')} "
            f"| {abs(r['loss_baseline'] - r['loss_flashzo']):.1e} | {r['load_average'][0]:.2f} | {r['commit']} |")
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
        ax.bar([i + (k - 1) * width for i in range(len(rows))], [r[f"{side}_ms"] for r in rows], width,
               label={"floor": "floor (2 inference fwd)"}.get(side, side), color=color)
    for i, r in enumerate(rows):
        top = max(r["baseline_ms"], r["flashzo_ms"], r["floor_ms"])
        ax.annotate(f"{r['speedup']:.1f}x", (i, top * 1.05), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per MeZO step (log scale)")
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
    paths = [stem + ext for ext in (".json", ".csv", ".md", ".png")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results["rows"]:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    with open(paths[2], "w") as f:
        f.write(markdown(results))
    plot(results, paths[3])
    return paths


def merge(stem: str, new_rows: list[dict], meta: dict) -> dict:
    """Replace the cells this run measured in the results already at `stem`.json, keep the rest."""
    old = []
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json") as f:
            prev = json.load(f)
        if prev.get("meta", {}).get("device") == meta["device"]:
            old = prev.get("rows", [])
    key = lambda r: (r["model"], r["workload"], r["dtype"])  # noqa: E731
    fresh = {key(r) for r in new_rows}
    rows = [r for r in old if key(r) not in fresh] + new_rows
    order = {m: i for i, m in enumerate(GPU_MODELS + ("opt-tiny",))}
    wl = {w: i for i, w in enumerate(WORKLOADS)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), wl.get(r["workload"], 99), r["dtype"]))
    return {"meta": meta, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"OPT presets (random weights); default {CPU_MODELS} on a CPU, {GPU_MODELS} on a GPU")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS),
                   help="batch shapes: sst2, rte, multichoice, lm")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="both sides' dtype (default fp32 on a CPU, "
                   "bf16 on a GPU)")
    p.add_argument("--num-examples", type=int, default=16, help="examples per batch (MeZO's default is 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed interleaved reps (default 1 CPU, 3 GPU)")
    p.add_argument("--reps", type=int, default=None, help="timed interleaved reps (default 5 CPU, 20 GPU)")
    p.add_argument("--memory-steps", type=int, default=1, help="steps each memory subprocess runs")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate of both sides")
    p.add_argument("--eps", type=float, default=1e-3, help="MeZO's perturbation size, both sides")
    p.add_argument("--seed", type=int, default=0, help="weights, adapter and data seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both sides (default: torch's; --smoke: 1)")
    p.add_argument("--out", default=RESULTS, help="output directory")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long CI mode: opt-tiny on the CPU (unless --device), 4 examples, 1 rep, memory "
                        "for the first workload only")
    p.add_argument("--profile", action="store_true",
                   help="also run torch.profiler over one step of each side per cell (step_profile_*.txt)")
    p.add_argument("--profile-rows", type=int, default=25, help="ops listed per profile table")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the CSV, markdown and plot from this device's JSON without measuring")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return []
    if args.smoke and args.threads is None:
        args.threads = 1  # smoke figures mean nothing; one thread is fastest on a busy CI machine
    if args.threads:
        torch.set_num_threads(args.threads)
    default = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"  # smoke: CPU, fp32 (CI)
    device = torch.device(args.device or default)
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    if args.smoke:
        models, args.num_examples = ["opt-tiny"], min(args.num_examples, 4)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.reps = 1 if args.reps is None else args.reps
    else:
        models = args.models or list(GPU_MODELS if on_gpu else CPU_MODELS)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.reps = args.reps if args.reps is not None else (20 if on_gpu else 5)
    dm = device_meta(device)
    if args.render_only:
        stem = os.path.join(args.out, "step_smoke" if args.smoke else f"step_{dm['tag']}")
        with open(stem + ".json") as f:
            return write_outputs(json.load(f), stem)
    meta = run_meta(device)
    run_id = f"{meta['date']} {meta['commit']}"
    cells = [(m, w) for m in models for w in args.workloads]
    from tqdm import tqdm

    rows = []
    no_memory = args.no_memory
    for i, (preset, workload) in enumerate(tqdm(cells, desc="bench_step", disable=args.smoke)):
        args.no_memory = no_memory or (args.smoke and i > 0)
        row = bench_cell(args, preset, workload, device, dtype_name, dm["peak_bf16_tflops"])
        row.update(device=meta["device"], commit=meta["commit"], load_average=meta["load_average"],
                   date=meta["date"], run=run_id)
        rows.append(row)
        print(f"{preset} {workload}: baseline {row['baseline_ms']:.1f} ms, flashzo {row['flashzo_ms']:.1f} ms "
              f"({row['speedup']:.2f}x), floor {row['floor_ms']:.1f} ms (step/floor {row['step_over_floor']:.2f})",
              flush=True)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "step_smoke" if args.smoke else f"step_{dm['tag']}")
    results = merge(stem, rows, meta) if not args.smoke else {"meta": meta, "rows": rows}
    paths = write_outputs(results, stem)
    print("wrote " + ", ".join(paths))
    return paths


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
