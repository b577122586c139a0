"""What running a reward in the worker process costs (engine/reward_calls.py): per call, against inline.

A trivial reward (`_reward` below: a module-level function the worker imports by name) is called on
batches of N (prompt, completion, reference) triples of short text, inline and in the worker,
interleaved; plus the worker's start (the interpreter, the handshake) measured alone. A step of the
reward demo makes 2q P = 256 calls.

    python bench/bench_reward_calls.py [--smoke]

Writes bench/results/reward_calls_<device>.{json,csv,md,png} (smoke: reward_calls_smoke.*).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from flashzo.engine.reward_calls import RewardCaller  # noqa: E402


def _reward(prompt, completion, reference) -> float:
    return float(completion.startswith(reference))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 256, 4096], help="calls per batch")
    ap.add_argument("--reps", type=int, default=20, help="timed rounds")
    ap.add_argument("--smoke", action="store_true", help="few calls and rounds: checks the plumbing")
    ap.add_argument("--out-dir", default=harness.RESULTS, help="where the results go")
    args = ap.parse_args()
    if args.smoke:
        args.calls, args.reps = [1, 8], 2
    import bench_reward_calls  # this module by its name, so the worker can import _reward

    fn = bench_reward_calls._reward
    starts = []
    for _ in range(3 if args.smoke else 10):
        c = RewardCaller(fn)
        t0 = time.perf_counter()
        c([("p", "great", "great")], [(0, 0)])
        starts.append(1e3 * (time.perf_counter() - t0))
        c.close()
    worker, inline = RewardCaller(fn), RewardCaller(fn, isolation="inline")
    rows = []
    for n in args.calls:
        calls = [("The word was", " great, I think", "great")] * n
        where = [(i, 0) for i in range(n)]
        fns = {"inline": lambda calls=calls, where=where: inline(calls, where),
               "worker": lambda calls=calls, where=where: worker(calls, where)}
        times = harness.time_interleaved(fns, warmup=2, reps=args.reps)
        row = {"calls": n}
        for name, ms in times.items():
            row.update(harness.timing_fields(ms, prefix=f"{name}_"))
            row[f"{name}_us_per_call"] = 1e3 * harness.quantile(ms, 0.5) / n
        row.update(harness.timing_fields(starts, prefix="worker_start_"))
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    worker.close()
    results = {"meta": harness.run_meta("reward_calls", "cpu"), "rows": rows}
    stem = "reward_calls_smoke" if args.smoke else f"reward_calls_{harness.device_tag(results['meta'])}"
    harness.write_results(os.path.join(args.out_dir, stem), results, markdown=markdown, plot=plot, echo=True)


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# Reward calls: worker process vs inline ({m['device']}, commit {m['commit']})", "",
             "Worker start (interpreter + handshake + first call), p50: "
             f"{results['rows'][0]['worker_start_p50_ms']:.1f} ms.",
             "", "| calls per batch | inline us/call | worker us/call | worker p50 ms per batch |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['calls']} | {r['inline_us_per_call']:.2f} | {r['worker_us_per_call']:.2f} | "
                     f"{r['worker_p50_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("inline", "worker"):
        ax.loglog([r["calls"] for r in rows], [r[f"{name}_us_per_call"] for r in rows], marker="o", label=name)
    ax.set_xlabel("calls per batch")
    ax.set_ylabel("us per call (p50)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
