"""K fine-tuning jobs in one `flashzo serve` vs the same K jobs one after another with `flashzo train`.

    python bench/bench_serve.py            # opt-tiny shapes (random weights), K = 1, 2, 4, a few minutes
    python bench/bench_serve.py --smoke    # a 2-layer toy, K = 2, under a minute; writes serve_cpu_smoke.*

Every job trains the same number of steps on its own data (SST-2-shaped classification: random token
ids, a prompt, two one-token candidates) with its own seed and lr, one eps and adapter shape (so the
server's scheduler runs all K in one forward per step). For each K:

  serve   one server (started once, not timed), the K files uploaded and the K jobs created at once,
          polled until all succeeded: aggregate steps/s = K x steps / (first create -> last success);
          a job's wall time is its create -> success as the client sees it (50 ms polls)
  train   `flashzo train` K times, one after another, each a fresh process (what a user would run
          instead): aggregate steps/s over the whole sequence; a job's wall time includes its process
          start and model load, its training-loop time is what fit() reports

Both sides run with --threads torch threads (OMP_NUM_THREADS for flashzo train). The server's
metrics give the mean jobs per forward. Writes bench/results/serve_cpu.{json,csv,md,png} (the smoke
run: serve_cpu_smoke.*) in bench/harness.py's format, with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import harness

RESULTS = harness.RESULTS
BIN = os.path.dirname(sys.executable)


def write_data(path: str, n: int, vocab: int, prompt_len: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = [rng.randrange(4, vocab) for _ in range(rng.randrange(prompt_len // 2, prompt_len + 1))]
            f.write(json.dumps({"prompt": prompt, "candidates": [[rng.randrange(4, vocab)], [rng.randrange(4, vocab)]],
                                "label": rng.randrange(2)}) + "\n")


def job_options(args, k: int) -> dict:
    return dict(steps=args.steps, batch_size=args.batch_size, lr=1e-3 * (k + 1), eps=1e-2, lora_r=args.lora_r,
                seed=k, target_modules="q_proj,v_proj")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(threads: int) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads))
    e.pop("TRITON_INTERPRET", None)  # the CPU paths are plain torch
    return e


def run_serve(args, model_dir: str, data: list[str], tmp: str, ks: list[int]) -> list[dict]:
    import httpx
    import openai

    port = free_port()
    log = open(os.path.join(tmp, "server.log"), "w")
    cmd = [os.path.join(BIN, "flashzo"), "serve", "--model", f"m={model_dir}", "--data-dir",
           os.path.join(tmp, "serve-data"), "--port", str(port), "--threads", str(args.threads),
           "--log-level", "warning", "--max-jobs-per-forward", str(max(ks))]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(args.threads), cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(open(log.name).read()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        files = [c.files.create(file=open(p, "rb"), purpose="fine-tune").id for p in data]
        rows = []
        for K in ks:
            m0 = httpx.get(url + "/metrics").text
            t0 = time.perf_counter()
            jobs = [c.fine_tuning.jobs.create(model="m", training_file=files[k], method={
                "type": "mezo", "mezo": {"hyperparameters": job_options(args, k)}}).id for k in range(K)]
            created = {j: time.perf_counter() for j in jobs}
            done: dict[str, float] = {}
            while len(done) < K:
                for j in jobs:
                    if j not in done:
                        st = c.fine_tuning.jobs.retrieve(j).status
                        if st == "succeeded":
                            done[j] = time.perf_counter()
                        elif st in ("failed", "cancelled"):
                            raise RuntimeError(f"job {j} {st}: {c.fine_tuning.jobs.retrieve(j).error}")
                time.sleep(0.05)
            wall = max(done.values()) - t0
            m1 = httpx.get(url + "/metrics").text
            fw = _metric(m1, "flashzo_scheduler_steps_total") - _metric(m0, "flashzo_scheduler_steps_total")
            shared = _metric(m1, "flashzo_jobs_per_forward_sum") - _metric(m0, "flashzo_jobs_per_forward_sum")
            per_job = [1e3 * (done[j] - created[j]) for j in jobs]
            rows.append({"mode": "serve", "k": K, "steps_per_job": args.steps, "wall_s": wall,
                         "aggregate_steps_per_s": K * args.steps / wall, "forwards": fw,
                         "jobs_per_forward": shared / fw if fw else None,
                         "job_wall_ms": [round(x, 1) for x in per_job], **harness.timing_fields(per_job, "job_wall_")})
            print(f"serve K={K}: {rows[-1]['aggregate_steps_per_s']:.2f} steps/s, {shared / fw:.2f} jobs per forward",
                  flush=True)
        return rows
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def run_train(args, model_dir: str, data: list[str], tmp: str, K: int) -> dict:
    per_job, loop_s = [], []
    t0 = time.perf_counter()
    for k in range(K):
        out = os.path.join(tmp, f"train-{K}-{k}")
        cmd = [os.path.join(BIN, "flashzo"), "train", "--model", model_dir, "--train", data[k], "--out", out,
               "--no-progress"]
        for name, value in job_options(args, k).items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        s0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env(args.threads), cwd=tmp, timeout=3600)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        per_job.append(1e3 * (time.perf_counter() - s0))
        loop_s.append(json.loads(r.stdout[r.stdout.index("{"):])["seconds"])
    wall = time.perf_counter() - t0
    print(f"train K={K}: {K * args.steps / wall:.2f} steps/s", flush=True)
    return {"mode": "train", "k": K, "steps_per_job": args.steps, "wall_s": wall,
            "aggregate_steps_per_s": K * args.steps / wall, "forwards": K * args.steps, "jobs_per_forward": 1.0,
            "job_wall_ms": [round(x, 1) for x in per_job], **harness.timing_fields(per_job, "job_wall_"),
            "train_loop_s": loop_s, "aggregate_loop_steps_per_s": K * args.steps / sum(loop_s)}


def markdown(results: dict) -> str:
    m, rows = results["meta"], results["rows"]
    lines = [f"# K jobs in one `flashzo serve` vs K x `flashzo train` ({m['model']}, {m['dtype']})", "",
             f"Device: {m['device']}, torch {m['torch']}, commit {m['commit']}, {m['date']}; {m['steps']} steps per "
             f"job, batch {m['batch_size']} SST-2-shaped examples (prompts of {m['prompt_len'] // 2}-"
             f"{m['prompt_len']} random tokens, two 1-token candidates), LoRA r={m['lora_r']} on q_proj,v_proj, "
             f"q=1, {m['threads']} torch thread(s) on both sides. Load average {m['load_average'][0]:.1f} at the "
             f"start, {m['load_average_end'][0]:.1f} at the end ({m['cores']} cores, shared).", "",
             f"Command: `{m['command']}`", "",
             "| K | side | aggregate steps/s | vs train | per-job wall s: p50 [p20, p80] | jobs per forward | "
             "train-loop steps/s (train only) |", "|---|---|---|---|---|---|---|"]
    base = {r["k"]: r["aggregate_steps_per_s"] for r in rows if r["mode"] == "train"}
    for r in sorted(rows, key=lambda r: (r["k"], r["mode"])):
        loop = f"{r['aggregate_loop_steps_per_s']:.2f}" if r.get("aggregate_loop_steps_per_s") else "-"
        lines.append(f"| {r['k']} | {r['mode']} | {r['aggregate_steps_per_s']:.2f} | "
                     f"{r['aggregate_steps_per_s'] / base[r['k']]:.2f}x | {r['job_wall_p50_ms'] / 1e3:.1f} "
                     f"[{r['job_wall_p20_ms'] / 1e3:.1f}, {r['job_wall_p80_ms'] / 1e3:.1f}] | "
                     f"{r['jobs_per_forward']:.2f} | {loop} |")
    lines += ["", "serve: a job's wall time runs from its create request to the client seeing it succeeded (queueing "
              "and validation included, server start-up not: a server is started once). train: each job is a fresh "
              "`flashzo train` process, so its wall time includes Python start-up and model loading; the last "
              "column is the training loop alone (fit()'s own clock)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    ks = sorted({r["k"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.4))
    w = 0.38
    for i, mode in enumerate(("serve", "train")):
        vals = [next(r["aggregate_steps_per_s"] for r in rows if r["k"] == k and r["mode"] == mode) for k in ks]
        ax.bar([x + (i - 0.5) * w for x in range(len(ks))], vals, w, label=f"{mode}")
    ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
    ax.set_ylabel("aggregate MeZO steps/s")
    m = results["meta"]
    ax.set_title(f"K jobs: one flashzo serve vs K x flashzo train ({m['model']}, CPU)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-tiny", help="OPT preset whose shape the random model takes")
    p.add_argument("--smoke", action="store_true", help="a 2-layer toy, K = 2, 4 steps; writes *_smoke.*")
    p.add_argument("--ks", default="1,2,4", help="comma-separated numbers of concurrent jobs")
    p.add_argument("--steps", type=int, default=60, help="steps per job")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--prompt-len", type=int, default=32, help="longest prompt (random token ids)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (q_proj, v_proj)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of each flashzo train")
    p.add_argument("--out-dir", default=RESULTS, help="where serve_cpu.{json,csv,md,png} go")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k]
    import torch

    from flashzo import OPTConfig, OPTModel, save_opt

    if args.smoke:
        cfg = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                        max_position_embeddings=64)
        args.model, args.steps, args.batch_size, args.prompt_len, args.lora_r, ks = "toy", 4, 4, 12, 2, [2]
    else:
        cfg = OPTConfig.from_name(args.model)
    torch.set_num_threads(args.threads)
    meta = harness.run_meta("serve", "cpu", model=args.model, dtype="float32", steps=args.steps,
                            batch_size=args.batch_size, prompt_len=args.prompt_len, lora_r=args.lora_r,
                            ks=ks, command="python bench/bench_serve.py " + " ".join(shlex.quote(a) for a in
                                                                                    (argv or sys.argv[1:])))
    with tempfile.TemporaryDirectory(prefix="flashzo-bench-serve-") as tmp:
        model_dir = os.path.join(tmp, "model")
        save_opt(OPTModel.from_config(cfg, seed=0), model_dir)
        data = []
        for k in range(max(ks)):
            data.append(os.path.join(tmp, f"train{k}.jsonl"))
            write_data(data[-1], 8 * args.batch_size, cfg.vocab_size, args.prompt_len, seed=k)
        rows = run_serve(args, model_dir, data, tmp, ks)
        rows += [run_train(args, model_dir, data, tmp, K) for K in ks]
    meta["load_average_end"] = harness.load_average()
    stem = os.path.join(args.out_dir, "serve_cpu" + ("_smoke" if args.smoke else ""))
    harness.write_results(stem, {"meta": meta, "rows": rows}, markdown=markdown, plot=plot, echo=True)


if __name__ == "__main__":
    main()
