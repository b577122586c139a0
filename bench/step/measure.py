"""Measuring one (model, workload) cell: both sides built on the same weights, the interleaved timing
of baseline / flashzo / floor (and flashzo in the batch-invariant mode), the FLOPs each side
executes, and peak memory in a fresh process."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import engine_batch
import harness
import torch
from mezo_baseline import MeZOBaseline, collate, hf_from_flashzo, mezo_loss

from flashzo.engine import PRESETS, CausalLM, LlamaModel, LoRAAdapter, LoRAConfig, OPTModel
from flashzo.engine.llama_config import PRESETS as LLAMA_PRESETS
from flashzo.engine.mezo import MeZOConfig, MeZOTrainer, evaluate

from .workloads import batch_tokens, make_examples

ENTRY = os.path.join(harness.REPO, "bench", "bench_step.py")
SIDES = ("baseline", "flashzo", "floor")
MEMORY_SIDES = ("baseline", "flashzo", "infer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_R, LORA_MODULES = 8, ("q_proj", "v_proj")


# --------------------------------------------------------------------------------------------------
# Building and running both sides
# --------------------------------------------------------------------------------------------------

@dataclass
class Sides:
    model: CausalLM | None
    trainer: MeZOTrainer | None
    adapter: LoRAAdapter | None
    hf: object | None
    baseline: MeZOBaseline | None


def model_from_preset(preset: str, **kw) -> CausalLM:
    """Random weights of an OPT preset (opt-125m ...) or a Llama-family one (smollm2-135m, llama-3.2-1b ...)."""
    if preset in PRESETS:
        return OPTModel.from_config(preset, **kw)
    if preset in LLAMA_PRESETS:
        return LlamaModel.from_config(preset, **kw)
    raise ValueError(f"unknown preset {preset!r}; OPT: {', '.join(PRESETS)}; Llama: {', '.join(LLAMA_PRESETS)}")


def build(preset: str, dtype: torch.dtype, device, *, lr: float, eps: float, seed: int,
          which=("flashzo", "baseline")) -> Sides:
    """The flashzo model (and trainer) and/or the PEFT baseline on the same random weights."""
    model = model_from_preset(preset, seed=seed, dtype=dtype, device=device)
    adapter = LoRAAdapter.init(LoRAConfig(r=LORA_R, alpha=2 * LORA_R, target_modules=LORA_MODULES, seed=seed),
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
    return engine_batch.infer_loss(s.model, s.trainer.adapter, examples)


def run_floor(s: Sides, examples) -> float:
    return run_infer(s, examples) + run_infer(s, examples)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# FLOPs each side executes
# --------------------------------------------------------------------------------------------------

def linear_flops_per_row(cfg, lora_r: int = LORA_R, lora_modules=LORA_MODULES) -> int:
    """One row through one layer's linears (every linear of both families is an adaptable one) and the
    LoRA terms of `lora_modules`."""
    base = sum(2 * k * n for k, n in (cfg.lora_shape(m) for m in cfg.lora_modules))
    return base + sum(2 * lora_r * (k + n) for k, n in (cfg.lora_shape(m) for m in lora_modules))


def _attn_width(cfg) -> int:
    return cfg.num_attention_heads * cfg.head_dim  # QK^T and PV: 2 * H * D each per (row, key)


def counted_flops(cfg, c: engine_batch.BatchCounts) -> int:
    """Matmuls over the rows each layer computes, QK^T and PV over the keys each row attends, the LM
    head over the rows a loss reads; less the q/k/v rows a fork layer reuses from the trunk."""
    h = cfg.hidden_size
    return (c.token_layers * linear_flops_per_row(cfg) + 4 * _attn_width(cfg) * c.attention_keys
            + 2 * h * cfg.vocab_size * c.logit_rows - c.skipped_projection_flops)


def baseline_flops(cfg, examples) -> int:
    b = collate(examples)
    B, T = b.input_ids.shape
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    per_forward = B * T * L * linear_flops_per_row(cfg)
    per_forward += L * 4 * _attn_width(cfg) * B * T * T  # SDPA with a padding mask: the full L x L score matrix
    per_forward += 2 * h * cfg.vocab_size * B * T  # full logits
    return 2 * per_forward


# --------------------------------------------------------------------------------------------------
# Memory, in a fresh process per side
# --------------------------------------------------------------------------------------------------

def memory_child(spec: dict) -> dict:
    """Runs in the subprocess: build one side, reset the peak counter, run it, report the peak."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    side = spec["side"]
    which = ("baseline",) if side == "baseline" else ("flashzo",)
    s = build(spec["model"], DTYPES[spec["dtype"]], device, lr=spec["lr"], eps=spec["eps"], seed=spec["seed"],
              which=which)
    examples = make_examples(spec["workload"], (s.model or s.hf).config.vocab_size,
                             num_examples=spec["num_examples"], seed=spec["seed"])
    fn = {"baseline": lambda: run_baseline(s, examples, device), "flashzo": lambda: run_flashzo(s, examples),
          "infer": lambda: run_infer(s, examples)}[side]
    m = harness.peak_memory(fn, device, steps=spec["steps"])
    return {"side": side, **{k: m[k] for k in ("peak_mib", "loaded_mib", "step_mib", "method")}}


def measure_memory(spec: dict, *, in_process: bool = False) -> dict:
    if in_process:  # smoke: the code path without the subprocess's start-up cost
        return dict(memory_child(spec), method="in-process (smoke)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers go back to the OS: RSS follows use
    # Run outside the checkout so its kernels/ folder never shadows an installed package.
    out = subprocess.run([sys.executable, ENTRY, "--memory-child", json.dumps(spec)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------------------

def bench_cell(args, preset: str, workload: str, device, dtype_name: str, peak_tflops, tag: str) -> dict:
    """One row: times, rates, FLOPs, losses and (unless args.no_memory) memory of the three sides."""
    s = build(preset, DTYPES[dtype_name], device, lr=args.lr, eps=args.eps, seed=args.seed)
    cfg = s.model.config
    examples = make_examples(workload, cfg.vocab_size, num_examples=args.num_examples, seed=args.seed)
    # Same task, same weights: the two losses at theta (sign 0) before any step.
    loss_flashzo = evaluate(s.model, s.trainer.adapter, examples)["loss"]
    loss_baseline = float(mezo_loss(s.hf, collate(examples, device=device)))
    fns = {"baseline": lambda: run_baseline(s, examples, device), "flashzo": lambda: run_flashzo(s, examples),
           "floor": lambda: run_floor(s, examples)}
    sides = SIDES
    if getattr(args, "batch_invariant", False):
        # flashzo's step again, in the batch-invariant mode (engine/invariant.py), on the same model and
        # adapter values, interleaved with the others: the mode's cost measured in the same run
        inv = MeZOTrainer(s.model, s.trainer.adapter.clone(), dataclasses.replace(s.trainer.config,
                                                                                   batch_invariant=True))
        fns["invariant"] = lambda: inv.step(examples).loss
        sides = SIDES + ("invariant",)
    times = harness.time_interleaved(fns, warmup=args.warmup, reps=args.reps, sync=lambda: sync(device))
    q = {side: harness.timing_fields(times[side], prefix=f"{side}_") for side in sides}
    med = {side: q[side][f"{side}_p50_ms"] / 1e3 for side in sides}  # seconds
    step = engine_batch.step_counts(s.model, s.trainer, examples)
    n, tokens = len(examples), batch_tokens(examples)
    row = dict(
        model=preset, workload=workload, dtype=dtype_name, examples=n,
        batch_tokens=tokens, baseline_padded_tokens=collate(examples).padded_tokens, flashzo_rows=step.rows,
        reps=args.reps, warmup=args.warmup,
        baseline_ms=1e3 * med["baseline"], flashzo_ms=1e3 * med["flashzo"], floor_ms=1e3 * med["floor"],
        speedup=med["baseline"] / med["flashzo"], step_over_floor=med["flashzo"] / med["floor"],
        **{f"{side}_ms_all": [round(t, 2) for t in times[side]] for side in SIDES},
        **q["baseline"], **q["flashzo"], **q["floor"],
        flashzo_examples_per_s=n / med["flashzo"], baseline_examples_per_s=n / med["baseline"],
        flashzo_tokens_per_s=tokens / med["flashzo"], baseline_tokens_per_s=tokens / med["baseline"],
        loss_flashzo=loss_flashzo, loss_baseline=loss_baseline,
    )
    if "invariant" in med:
        row.update(invariant_ms=1e3 * med["invariant"], invariant_over_flashzo=med["invariant"] / med["flashzo"],
                   invariant_ms_all=[round(t, 2) for t in times["invariant"]], **q["invariant"])
    fl = {"flashzo": counted_flops(cfg, step), "baseline": baseline_flops(cfg, examples),
          "floor": 2 * counted_flops(cfg, engine_batch.infer_counts(s.model, s.trainer.adapter, examples))}
    for side, f in fl.items():
        row[f"{side}_gflop"] = f / 1e9
        row[f"{side}_tflops"] = f / med[side] / 1e12
        row[f"{side}_mfu"] = f / med[side] / 1e12 / peak_tflops if peak_tflops else None
    if args.profile:
        row["profile"] = profile_cell(args, fns, device, f"step_profile_{tag}_{preset}_{workload}.txt")
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
    """torch.profiler over one step of each side; the op tables go to `name` under args.out."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        f.write("\n".join(parts))
    return name
