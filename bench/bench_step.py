"""End-to-end MeZO step: flashzo against the MeZO reference step, on the same work.

Both sides get identical weights (one random model of a preset's shape, OPT or Llama family; the
Hugging Face model is built from flashzo's tensors), the identical LoRA adapter (r=8, alpha=16, q_proj + v_proj, PEFT's
init), identical batches and hyperparameters (lr, eps, weight decay 0). Per (model, workload) cell:

  baseline   bench/mezo_baseline.py: transformers (OPT / Llama) + PEFT LoRA, MeZO's collation (every candidate
             its own sequence, left padding to a multiple of 8), in-place +eps/-2eps/+eps with
             torch.normal, full logits, then the update regenerating z: the official MeZO step
  flashzo    MeZOTrainer.step(examples): both signed passes in one ragged forward over the paged KV
             (prompts shared by their candidates), z regenerated in the kernels, the fused update
  floor      two plain inference forwards of the same batch in flashzo (sign 0, one copy each, the
             adapter applied unperturbed): what any MeZO implementation must at least compute

Timing: each rep runs the three in rotating order (interleaved), after `--warmup` untimed reps;
the median and the 20th/80th percentiles of `--reps` are reported (wall clock, the device
synchronized before and after: a step includes its host work - batch building, the loss read-back -
so this is bench/harness.py's time_interleaved, not a kernel timer). examples/s = batch examples / step;
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
    python bench/bench_step.py --smoke                  # seconds: opt-tiny and llama-tiny, CI
    python bench/bench_step.py --models opt-125m --workloads sst2 --batch-invariant   # the mode's cost

Writes bench/results/step_<device>.{json,csv,png,md} (smoke: step_smoke.*) in bench/harness.py's
result format; a later run replaces the cells it measured and keeps the others. The code is in
bench/step/: workloads.py (the batch shapes), measure.py (timing, FLOPs, memory), report.py (table,
plot, merge); what it reads from flashzo's batch type is in bench/engine_batch.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from step.measure import DTYPES, bench_cell, memory_child  # noqa: E402
from step.report import merge, write_outputs  # noqa: E402
from step.workloads import CPU_MODELS, GPU_MODELS, WORKLOADS, make_examples  # noqa: E402, F401

RESULTS = harness.RESULTS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"OPT or Llama-family presets (random weights); default {CPU_MODELS} on a CPU, {GPU_MODELS} "
                        "on a GPU")
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
    p.add_argument("--batch-invariant", action="store_true",
                   help="also time flashzo's step in the batch-invariant mode (engine/invariant.py), interleaved "
                        "with the others: the invariant_ms and invariant_over_flashzo columns")
    p.add_argument("--out", default=RESULTS, help="output directory")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long CI mode: opt-tiny and llama-tiny on the CPU (unless --device), 4 examples, "
                        "1 rep, memory for the first workload only")
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
        models, args.num_examples = ["opt-tiny", "llama-tiny"], min(args.num_examples, 4)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.reps = 1 if args.reps is None else args.reps
    else:
        models = args.models or list(GPU_MODELS if on_gpu else CPU_MODELS)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.reps = args.reps if args.reps is not None else (20 if on_gpu else 5)
    info = harness.device_info(device)
    tag = "smoke" if args.smoke else harness.device_tag(info)
    stem = os.path.join(args.out, f"step_{tag}")
    if args.render_only:
        return write_outputs(harness.read_results(stem + ".json"), stem)
    meta = harness.run_meta("step", device)
    run_id = f"{meta['date']} {meta['commit']}"
    cells = [(m, w) for m in models for w in args.workloads]
    from tqdm import tqdm

    rows = []
    no_memory = args.no_memory
    for i, (preset, workload) in enumerate(tqdm(cells, desc="bench_step", disable=args.smoke)):
        args.no_memory = no_memory or (args.smoke and i > 0)
        row = bench_cell(args, preset, workload, device, dtype_name, meta["peak_bf16_tflops"], tag)
        row.update(device=meta["device"], commit=meta["commit"], load_average=meta["load_average"],
                   date=meta["date"], run=run_id)
        rows.append(row)
        print(f"{preset} {workload}: baseline {row['baseline_ms']:.1f} ms, flashzo {row['flashzo_ms']:.1f} ms "
              f"({row['speedup']:.2f}x), floor {row['floor_ms']:.1f} ms (step/floor {row['step_over_floor']:.2f})"
              + (f", batch-invariant {row['invariant_ms']:.1f} ms ({row['invariant_over_flashzo']:.2f}x flashzo)"
                 if "invariant_ms" in row else ""), flush=True)
    meta["load_average_end"] = harness.load_average()
    results = merge(stem, rows, meta) if not args.smoke else {"meta": meta, "rows": rows}
    return write_outputs(results, stem)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
