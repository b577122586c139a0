"""Benchmark of the perturbed LoRA linear: fused kernels vs the torch code a user would write.

On CUDA, for OPT q_proj shapes (K = N = hidden size) and MeZO's batch layout (the first half of the
tokens at +eps, the second half at -eps, one seed), it times:

  fused    flashzo's perturbed_lora_linear: cuBLAS base GEMM + Triton shrink/expand, z regenerated
  unfused  F.linear + z materialized with torch.randn (a seeded torch.Generator, once per seed),
           A + s*eps*z and B + s*eps*z materialized, the LoRA matmuls in the model dtype with the
           add fused into cuBLAS (addmm_): the fastest plain-torch version
  base     F.linear(x, W, b) alone: the floor the fused path cannot beat

and reports p20/p50/p80 ms (bench/harness.py: triton.testing.do_bench, after warm-up), TFLOP/s of the
useful work (2*T*K*N + 2*T*r*(K+N)) at the median against the device's peak, the ratio to the floor
and to unfused. Results: JSON, CSV, Markdown and PNG under --out, named after the device. On a CPU (or
with --smoke) it runs a tiny configuration with the torch paths only (perf_counter timing) and writes
perturbed_lora_cpu_smoke.{json,csv,md,png}.

    python bench/bench_perturbed_lora.py                 # GPU sweep
    python bench/bench_perturbed_lora.py --smoke         # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from tqdm import tqdm
from traffic import lora_launches

from flashzo.kernels import DeviceInfo, LoRAKernelConfig, Segments, perturbed_lora_linear

MODELS = {"opt-1.3b": 2048, "opt-6.7b": 4096, "opt-13b": 5120}  # hidden size = q_proj's K and N
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=list(MODELS),
        help="OPT models whose q_proj shape (K = N = hidden size) is timed",
    )
    p.add_argument(
        "--tokens",
        nargs="+",
        type=int,
        default=[256, 2048, 8192],
        help="T, the number of token rows (half at +eps, half at -eps)",
    )
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 64], help="LoRA ranks r")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype of x and W")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (on CUDA: do_bench's "
                   "warm-up budget, this many calls' time)")
    p.add_argument("--reps", type=int, default=50, help="timed calls; p20/p50/p80 are reported (on CUDA: "
                   "do_bench's budget, this many calls' time)")
    p.add_argument(
        "--config",
        default="",
        help="kernel block sizes for the fused path, e.g. 'shrink_block_m=128,expand_rows=512'",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny CPU configuration with the torch paths only; runs in seconds",
    )
    return p.parse_args()


def make_inputs(T, H, r, dtype, device, seed=1234):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w = (torch.randn(H, H, generator=g) / H**0.5).to(device, dtype)
    b = (0.1 * torch.randn(H, generator=g)).to(device, dtype)
    lora_a = (torch.randn(1, r, H, generator=g) / H**0.5).to(device)
    lora_b = (0.01 * torch.randn(1, H, r, generator=g)).to(device)
    half = T // 2
    segments = Segments.from_lists([half, T - half], [0, 0], [seed, seed], [1, -1], device=device)
    return x, w, b, lora_a, lora_b, segments


def unfused(x, w, b, lora_a, lora_b, segments, *, scaling, eps):
    """The plain-torch perturbed LoRA: z from torch.randn, A_eff/B_eff materialized, LoRA in x.dtype."""
    y = F.linear(x, w, b)
    indptr, adapters, seeds, signs = (
        t.tolist() for t in (segments.indptr, segments.adapter, segments.seed, segments.sign)
    )
    zs = {}
    for s in range(len(adapters)):
        start, stop, a, seed, sign = indptr[s], indptr[s + 1], adapters[s], seeds[s], signs[s]
        if seed not in zs:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            zs[seed] = (
                torch.randn(lora_a.shape[1:], generator=gen, device=x.device),
                torch.randn(lora_b.shape[1:], generator=gen, device=x.device),
            )
        z_a, z_b = zs[seed]
        a_eff = (lora_a[a] + (sign * eps) * z_a).to(x.dtype)  # [r, K]
        b_eff = (lora_b[a] + (sign * eps) * z_b).to(x.dtype)  # [N, r]
        y[start:stop].addmm_(x[start:stop] @ a_eff.T, b_eff.T, alpha=scaling)
    return y


def parse_config(text: str) -> LoRAKernelConfig:
    fields = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        fields[key.strip()] = None if value.strip() == "None" else int(value)
    return LoRAKernelConfig(**fields)


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if on_gpu else "cpu")
    meta = harness.run_meta("perturbed_lora", device, dtype=args.dtype, config=args.config or "default")
    if on_gpu:
        models, tokens, ranks = {m: MODELS[m] for m in args.models}, args.tokens, args.ranks
        stem = "perturbed_lora_" + harness.slug(meta["device"])
        warmup, reps = args.warmup, args.reps
    else:
        models, tokens, ranks = {"tiny-256": 256}, [64, 256], [8]
        stem = "perturbed_lora_cpu_smoke"
        warmup, reps = 2, 5
    dtype = DTYPES[args.dtype]
    peak = None if dtype == torch.float32 else meta["peak_bf16_tflops"]
    config = parse_config(args.config)

    rows = []
    todo = [(m, H, T, r) for m, H in models.items() for T in tokens for r in ranks]
    for model, H, T, r in tqdm(todo, desc="perturbed_lora", disable=not on_gpu):
        shape = dict(model=model, T=T, K=H, N=H, r=r)
        rows += bench_shape(shape, dtype, device, config, warmup, reps, peak)
    main_name = rows[0]["variant"]

    meta["load_average_end"] = harness.load_average()
    print_table(rows, meta)
    # the traffic model of the same calls (on a CPU: of a reference H100 SXM, plus the shape the
    # old split-K expand was worst at), next to the measured fused time where there is one
    measured = {(r["model"], r["T"], r["r"]): r["ms"] for r in rows if r["variant"] == "fused"}
    shapes = [(m, H, T, r) for m, H, T, r in todo] + ([] if on_gpu else [("opt-1.3b", 2048, 2048, 8)])
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 132
    meta["traffic_model"] = model_table(shapes, dtype, meta["device"] if on_gpu else "H100 SXM", num_sms, config,
                                        measured)
    print(meta["traffic_model"])
    harness.write_results(str(args.out / stem), {"meta": meta, "rows": rows}, markdown=markdown,
                          plot=lambda results, path: plot(results["rows"], main_name, path, results["meta"]))


def bench_shape(shape, dtype, device, config, warmup, reps, peak) -> list[dict]:
    """Time the three variants at one shape; one CSV row per variant."""
    T, H, r = shape["T"], shape["K"], shape["r"]
    x, w, b, lora_a, lora_b, segments = make_inputs(T, H, r, dtype, device)
    kw = dict(scaling=2.0, eps=1e-3)
    on_gpu = device.type == "cuda"
    impl = "triton" if on_gpu else "torch"
    variants = {
        "fused" if on_gpu else "torch_path": lambda: perturbed_lora_linear(
            x, w, b, lora_a, lora_b, segments, impl=impl, config=config, a_offset=0, b_offset=r * H, **kw
        ),
        "unfused": lambda: unfused(x, w, b, lora_a, lora_b, segments, **kw),
        "base": lambda: F.linear(x, w, b),
    }
    timings = {name: harness.time_ms(fn, device, warmup=warmup, reps=reps) for name, fn in variants.items()}
    ms = {name: t["p50_ms"] for name, t in timings.items()}
    rows = []
    for name, t in ms.items():
        flops = 2 * T * H * H + (0 if name == "base" else 2 * T * r * (H + H))
        tflops = flops / t / 1e9
        rows.append(dict(
            **shape, variant=name, ms=round(t, 4), **timings[name], tflops=round(tflops, 3),
            pct_of_peak=round(100 * tflops / peak, 1) if peak else "",
            vs_base=round(t / ms["base"], 3), vs_unfused=round(t / ms["unfused"], 3),
        ))  # fmt: skip
    return rows


def print_table(rows, meta) -> None:
    print(
        f"\nperturbed_lora_linear on {meta['device']}, {meta['dtype']}, torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {meta['commit']}, config {meta['config']}"
    )
    head = (
        f"{'model':>9} {'T':>5} {'K=N':>5} {'r':>3} {'variant':>10} {'ms':>9} {'TFLOP/s':>8} "
        f"{'%peak':>6} {'/base':>6} {'/unfused':>8}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['model']:>9} {row['T']:>5} {row['K']:>5} {row['r']:>3} {row['variant']:>10} "
            f"{row['ms']:>9.4f} {row['tflops']:>8.2f} {row['pct_of_peak']!s:>6} {row['vs_base']:>6.2f} "
            f"{row['vs_unfused']:>8.2f}"
        )


def markdown(results) -> str:
    m = results["meta"]
    lines = [
        f"# perturbed_lora_linear ({m['device']}, {m['dtype']})",
        "",
        f"torch {m['torch']}, triton {m['triton']}, commit {m['commit']}, kernel config {m['config']}, {m['date']}. "
        "ms: p50 [p20, p80] per call; TFLOP/s of the useful work at p50; /base and /unfused: p50 over p50.",
        "",
        "| model | T | K=N | r | variant | ms | TFLOP/s | % of peak | /base | /unfused |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        pct = f"{r['pct_of_peak']:.1f}" if r["pct_of_peak"] != "" else "-"
        lines.append(
            f"| {r['model']} | {r['T']} | {r['K']} | {r['r']} | {r['variant']} "
            f"| {r['p50_ms']:.4f} [{r['p20_ms']:.4f}, {r['p80_ms']:.4f}] | {r['tflops']:.2f} | {pct} "
            f"| {r['vs_base']:.2f} | {r['vs_unfused']:.2f} |")
    if m.get("traffic_model"):
        lines += ["", "```", m["traffic_model"].strip("\n"), "```"]
    return "\n".join(lines) + "\n"


# FLOP rate of each kind of math relative to the bf16 peak (TF32 tensor cores: half; fp32 FMA: ~1/15)
MATH_RATE = {"bf16": 1.0, "fp16": 1.0, "tf32": 0.5, "fp32": 1 / 15, "ieee": 1 / 15, "none": None}


def model_table(shapes, dtype, device_name, num_sms, config, measured) -> str:
    """bench/traffic.py's lora_launches for each (model, K=N, T, r) shape, MeZO's layout (half the rows
    at +eps, half at -eps): per launch its grid, bytes, FLOPs and z draws, and the time they imply
    at the device's bandwidth and peak (the larger of the two); per shape the sum next to the
    measured fused time (``measured``: {(model, T, r): ms}, GPU only)."""
    peak = harness.peak_for(device_name) or harness.PEAKS["H100 SXM"]  # the implied times need a device's peaks
    tflops, tbs = peak.bf16_tflops, peak.hbm_tbps
    lines = [
        f"\ntraffic model (bench/traffic.py's lora_launches) at {tbs} TB/s, {tflops} TFLOP/s bf16 dense "
        f"({device_name}, {num_sms} SMs)",
        f"{'model':>9} {'T':>5} {'r':>3} {'launch':>9} {'grid':>10} {'MB read':>8} {'MB writ':>8} "
        f"{'GFLOP':>8} {'M draws':>7} {'us@BW':>7} {'us@peak':>7} {'us':>7} {'meas us':>8}",
    ]
    for model, H, T, r in shapes:
        segments = Segments.from_lists([T // 2, T - T // 2], [0, 0], [5, 5], [1, -1])
        launches = lora_launches(
            segments, H, H, [(0, H, r)], dtype, device=DeviceInfo("cuda", num_sms), config=config
        )
        total = 0.0
        for ln in launches:
            t_bw = ln.bytes / (tbs * 1e12) * 1e6
            rate = MATH_RATE[ln.math]
            t_peak = ln.flops / (tflops * rate * 1e12) * 1e6 if rate else 0.0
            total += max(t_bw, t_peak)
            lines.append(
                f"{model:>9} {T:>5} {r:>3} {ln.name:>9} {'x'.join(map(str, ln.grid)) or '-':>10} "
                f"{ln.bytes_read / 1e6:>8.2f} {ln.bytes_written / 1e6:>8.2f} {ln.flops / 1e9:>8.2f} "
                f"{ln.z_draws / 1e6:>7.2f} {t_bw:>7.1f} {t_peak:>7.1f} {max(t_bw, t_peak):>7.1f} {'':>8}"
            )
        ms = measured.get((model, T, r))
        meas = f"{1e3 * ms:>8.1f}" if ms is not None else f"{'-':>8}"
        lines.append(f"{model:>9} {T:>5} {r:>3} {'total':>9} {'':>10} {'':>8} {'':>8} {'':>8} {'':>7} "
                     f"{'':>7} {'':>7} {total:>7.1f} {meas}")  # fmt: skip
    lines.append("z draws (Philox + Box-Muller, ~100 instructions each) are not in the implied times.")
    return "\n".join(lines)


def plot(rows, main_name, path, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["model"], r["T"], r["r"]) for r in rows))
    by = {(r["model"], r["T"], r["r"], r["variant"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(shapes)), 4))
    width = 0.4
    for i, name in enumerate([main_name, "unfused"]):
        xs = [j + (i - 0.5) * width for j in range(len(shapes))]
        ax.bar(xs, [by[s + (name,)]["vs_base"] for s in shapes], width, label=name)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="base GEMM (floor)")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{m}\nT={T} r={r}" for m, T, r in shapes], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("time / base GEMM time")
    ax.set_title(f"perturbed LoRA linear, {meta['dtype']}, {meta['device']} ({meta['commit']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
