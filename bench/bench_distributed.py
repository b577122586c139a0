"""MeZO steps/s on 1 and 2 CPU processes (gloo), and the bytes a step exchanges.

    python bench/bench_distributed.py            # opt-125m shapes (random weights), a few minutes
    python bench/bench_distributed.py --smoke    # opt-tiny, seconds; writes distributed_cpu_smoke.*

Runs, each in fresh processes started by this script (RANK/WORLD_SIZE in the environment, a file://
rendezvous, gloo): one process with --threads threads (the single-process run), one process with
W * --threads threads (the same cores used the way a user would without torch.distributed), and W
processes of --threads threads for each MeZOConfig.parallel mode. Every run does the same steps from
the same adapter on the same batches; the report gives steps/s, the speed-up over each single-process
run, the payload bytes per step (per rank, sent + received, counted at the all_gather), and the largest
difference of the final adapter from the single-process one (fp32 rounding of differently shaped
forwards, see engine/distributed.py). Each row also has p20/p50/p80 ms of rank 0's single steps, over
every pass.

Writes bench/results/distributed_cpu.{json,csv,md,png} (the smoke run: distributed_cpu_smoke.*) in
bench/harness.py's format, one row per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness
import torch

RESULTS = harness.RESULTS


# --------------------------------------------------------------------------------------------------
# One rank of one run (a subprocess of this script)


def worker(args) -> None:
    from flashzo import LoRAConfig, MeZOConfig, MeZOTrainer, OPTConfig, OPTModel
    from flashzo.engine import distributed

    torch.set_num_threads(args.threads)
    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        distributed.init_distributed(device="cpu", timeout_s=600, init_method=args.init_method)
    cfg = OPTConfig.from_name(args.model)
    model = OPTModel.from_config(cfg, seed=0)
    ex = examples(args.batch_size * (args.steps + args.warmup), args.prompt_len, cfg.vocab_size)
    tr = MeZOTrainer(model, LoRAConfig(r=args.lora_r, seed=0),
                     MeZOConfig(lr=1e-3, eps=1e-2, num_perturbations=args.q, seed=0, parallel=args.parallel))
    g = torch.Generator().manual_seed(1)
    for slot in tr.adapter.slots.values():  # B = 0 at init would make the first steps trivial
        slot.b.normal_(0, 0.02, generator=g)

    def batch(t):
        return ex[t * args.batch_size:(t + 1) * args.batch_size]

    for t in range(args.warmup):
        tr.step(batch(t))
    if world > 1:
        torch.distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    res, step_ms = [], []
    for t in range(args.steps):
        s0 = time.perf_counter()
        res.append(tr.step(batch(args.warmup + t)))
        step_ms.append(1e3 * (time.perf_counter() - s0))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"seconds": seconds, "cpu_seconds": cpu, "step_ms": step_ms}
    if tr.is_main:
        torch.save(tr.adapter.buffer.clone(), args.adapter_out)
        out.update(steps_per_second=args.steps / seconds, bytes_per_step=res[-1].bytes_exchanged,
                   loss=[r.loss for r in res], tokens_per_step=res[-1].tokens,
                   adapter_parameters=tr.adapter.num_parameters,
                   traffic=tr.exchange.traffic.per_step() if tr.exchange else None)
    print(json.dumps(out))
    distributed.shutdown()


def examples(n: int, prompt_len: int, vocab_size: int) -> list:
    """n SST-2-shaped examples of random token ids (a prompt, two one-token candidates, a label); only the
    shapes matter here, and this generator never changes under the benchmark."""
    from flashzo import Example

    g = torch.Generator().manual_seed(0)
    return [Example(prompt=torch.randint(3, vocab_size, (prompt_len,), generator=g).tolist(),
                    candidates=[[int(torch.randint(3, vocab_size, (1,), generator=g))] for _ in range(2)],
                    label=int(torch.randint(0, 2, (1,), generator=g))) for _ in range(n)]


def run(args, world: int, threads: int, parallel: str | None, tmp: str) -> dict:
    tag = f"w{world}-t{threads}-{parallel}"
    init = f"file://{os.path.join(tmp, tag + '.store')}"
    adapter = os.path.join(tmp, tag + ".pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model, "--q", str(args.q),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--prompt-len", str(args.prompt_len), "--lora-r", str(args.lora_r), "--threads", str(threads),
           "--init-method", init, "--adapter-out", adapter] + (["--parallel", parallel] if parallel else [])
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), OMP_NUM_THREADS=str(threads))
        # Outside the checkout, so that its kernels/ folder shadows nothing on sys.path.
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate() for p in procs]
    for r, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"{tag} rank {r} failed:\n{err[-4000:]}")
    ranks = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    res = ranks[0]
    # CPU seconds per step of the busiest rank: the step time if every thread had a core of its own
    res.update(world_size=world, threads_per_process=threads, parallel=parallel, adapter=torch.load(adapter),
               cpu_seconds_per_step_per_rank=[r["cpu_seconds"] / args.steps for r in ranks])
    return res


# --------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict) -> str:
    m, rows = results["meta"], results["rows"]
    la0, la1 = m["load_average"][0], m["load_average_end"][0]
    timed = any(r.get("p50_ms") is not None for r in rows)
    lines = [
        f"# MeZO on 1 and 2 CPU processes ({m['model']}, q={m['q']}, batch {m['batch_size']})",
        "",
        f"Device: {m['device_type']} ({m['cpu']}, {m['cores']} cores), backend gloo, dtype {m['dtype']}, "
        f"torch {m['torch']}, commit {m['commit']}, {m['date']}. LoRA r={m['lora_r']} on q_proj,v_proj "
        f"({m['adapter_parameters']} parameters); {m['batch_size']} classification examples (random token ids, "
        f"{m['prompt_len']}-token prompt, two 1-token candidates) per step; {m['steps']} timed steps after "
        f"{m['warmup']} warm-up.",
        "",
        f"Load average (1 min) {la0:.1f} at the start and {la1:.1f} at the end, on {m['cores']} cores shared "
        "with other jobs: the timings are indicative only.",
        "",
        f"| processes x threads | parallel | steps/s (best of {m['repeats']}) | each pass | "
        + ("ms/step p50 [p20, p80] | " if timed else "") + "vs 1 x 1 | "
        f"vs 1 x {m['max_world'] * m['threads_per_process']} | CPU s/step, busiest rank "
        "| bytes/step per rank (sent + received) | max adapter diff vs 1 process | max loss rel. diff |",
        "|" + "---|" * (11 if timed else 10),
    ]
    base1, base_w = rows[0]["steps_per_second"], rows[1]["steps_per_second"]
    for r in rows:
        each = ", ".join(f"{x:.3f}" for x in r["steps_per_second_each_pass"])
        ms = f"{r['p50_ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}] | " if timed else ""
        lines.append(f"| {r['world_size']} x {r['threads_per_process']} | {r['parallel'] or '-'} | "
                     f"{r['steps_per_second']:.3f} | {each} | {ms}{r['steps_per_second'] / base1:.2f}x | "
                     f"{r['steps_per_second'] / base_w:.2f}x | {r['cpu_seconds_per_step_busiest_rank']:.2f} | "
                     f"{r['bytes_per_step']} | {r['adapter_max_abs_diff']:.1e} | "
                     f"{r['losses_equal_single_process_rel']:.1e} |")
    lines += ["", "CPU s/step is the process CPU time (all its threads) of the busiest rank per timed step: what a "
              "step would take if every rank had its cores to itself. Bytes per step are the float64 payload of "
              "the step's single all_gather (5 header scalars + 2*ceil(q/W) losses, or 4q loss sums and counts), "
              "counted at the call: O(q), independent of the model and the batch; the wire adds gloo's framing."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"{r['world_size']}x{r['threads_per_process']}\n{r['parallel'] or 'single'}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(labels, [r["steps_per_second"] for r in rows], color="tab:blue")
    ax.set_ylabel("MeZO steps/s")
    m = results["meta"]
    la = m["load_average"][0]
    ax.set_title(f"{m['model']} on CPU, q={m['q']}, batch {m['batch_size']} (load avg {la:.1f} on {m['cores']} "
                 "cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m", help="OPT preset whose shape the random model takes")
    p.add_argument("--smoke", action="store_true", help="opt-tiny and 3 steps, seconds; writes *_smoke.*")
    p.add_argument("--q", type=int, default=2, help="perturbations per step")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (the global batch)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (random ids)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (q_proj, v_proj)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="passes over all runs (interleaved); the best is reported")
    p.add_argument("--world-size", type=int, default=2, help="processes of the distributed runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--modes", default="perturbations,batch", help="comma-separated MeZOConfig.parallel modes")
    p.add_argument("--out-dir", default=RESULTS, help="where distributed_cpu.{json,csv,md,png} go")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one rank
    p.add_argument("--parallel", default=None, help=argparse.SUPPRESS)
    p.add_argument("--init-method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--adapter-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.steps, args.batch_size, args.prompt_len, args.repeats = "opt-tiny", 3, 8, 12, 1
    if args.worker:
        worker(args)
        return

    w, th = args.world_size, args.threads
    modes = [m for m in args.modes.split(",") if m]
    meta = harness.run_meta(
        "distributed", "cpu", model=args.model, dtype="float32", backend="gloo", q=args.q,
        batch_size=args.batch_size, prompt_len=args.prompt_len, lora_r=args.lora_r, steps=args.steps,
        warmup=args.warmup, threads_per_process=th, max_world=w, repeats=args.repeats)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flashzo-bench-dist-") as tmp:
        todo = [(1, th, None), (1, w * th, None)] + [(w, th, m) for m in modes]
        passes = []
        for k in range(args.repeats):
            passes.append([])
            for world, threads, mode in todo:
                print(f"pass {k + 1}/{args.repeats}: {world} process(es) x {threads} thread(s), parallel={mode} ...",
                      flush=True)
                passes[-1].append(run(args, world, threads, mode, tmp))
    ref = passes[0][0]["adapter"]
    for i in range(len(todo)):
        runs = [p[i] for p in passes]
        best = dict(max(runs, key=lambda r: r["steps_per_second"]))
        best["steps_per_second_each_pass"] = [r["steps_per_second"] for r in runs]
        best["cpu_seconds_per_step_busiest_rank"] = min(max(r["cpu_seconds_per_step_per_rank"]) for r in runs)
        best["adapter_max_abs_diff"] = max(float((r["adapter"] - ref).abs().max()) for r in runs)
        best["losses_equal_single_process_rel"] = max(abs(a - b) / abs(b) for r in runs
                                                      for a, b in zip(r["loss"], passes[0][0]["loss"]))
        best.update(harness.timing_fields([t for r in runs for t in r["step_ms"]]))
        best["step_ms"] = [round(t, 2) for r in runs for t in r["step_ms"]]
        for key, value in (best.pop("traffic") or {}).items():
            best[f"traffic_{key}"] = value
        best.pop("adapter", None)
        rows.append(best)
    meta["load_average_end"] = harness.load_average()
    meta["adapter_parameters"] = rows[0]["adapter_parameters"]

    stem = os.path.join(args.out_dir, "distributed_cpu" + ("_smoke" if args.smoke else ""))
    harness.write_results(stem, {"meta": meta, "rows": rows}, markdown=markdown, plot=plot, echo=True)


if __name__ == "__main__":
    main()
