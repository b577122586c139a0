"""Benchmark of the quantized linear: flashzo's path against dense fp32 and what else torch offers.

CPU (the default on a machine without CUDA): fp32 activations (the CPU compute dtype), per layer
shape of SmolLM2-135M and of opt-1.3b / llama-3.2-1b (hidden 2048, intermediate 8192), T = 1, 64,
1024 rows, every variant interleaved in one run (bench/harness.py's time_interleaved), medians:

  fp32             F.linear(x, W, b) with the dense fp32 weight: the baseline
  flashzo <fmt>    flashzo.kernels.quantized_linear: the weight dequantized into a reused scratch
                   buffer, then one F.linear (bit-exact against quantized_linear_ref)
  blocked <fmt>    the weight dequantized block of output rows by block into a cache-sized buffer,
                   F.linear per block: the same values, MKL rounds a narrower GEMM differently
  int8pack         torch._weight_int8pack_mm (int8 per-channel symmetric only)
  int4pack <fmt>   torch.ops.aten._weight_int4pack_mm_for_cpu on _convert_weight_to_int4pack_for_cpu's
                   layout, its (q - 8) * scale + zero with zero = min + 8 * scale (rounded)

Each row records whether the variant's y equals quantized_linear_ref bit for bit, and its largest
difference. Formats: int8 per channel (fp16 scales), int4 g32 asymmetric (Q4_1's format), int4 g128
symmetric. Also printed and written: the bytes per parameter of every format, and the GPU kernel's
traffic model (bench/traffic.py: quant_launches) for the 1b shapes in bf16 at an H100's bandwidth and
peak. On CUDA it times instead, in bf16: the fused Triton kernel, the unfused dequantize + F.linear
(impl="torch") and the dense bf16 F.linear.

    python bench/bench_quant.py                 # CPU sweep -> bench/results/quant_cpu.{json,csv,md,png}
    python bench/bench_quant.py --smoke         # seconds: one small shape
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from traffic import quant_launches  # noqa: E402

from flashzo.kernels import quantize, quantized_linear, quantized_linear_ref  # noqa: E402
from flashzo.kernels.launch_plan import DeviceInfo  # noqa: E402
from flashzo.kernels.quant import bytes_per_param, dequantize_into, unpack_int4  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# model -> (layer, N, K)
SHAPES = {
    "smollm2-135m": [("q/o_proj", 576, 576), ("k/v_proj", 192, 576), ("gate/up_proj", 1536, 576),
                     ("down_proj", 576, 1536)],
    "opt-1.3b/llama-3.2-1b": [("q/o_proj", 2048, 2048), ("k/v_proj (llama)", 512, 2048),
                              ("fc1, gate/up_proj", 8192, 2048), ("fc2, down_proj", 2048, 8192)],
}
FORMATS = {"int8": ("int8", None, True), "int4-g32-asym": ("int4", 32, False), "int4-g128-sym": ("int4", 128, True)}
BLOCK_VALUES = 2**19  # the blocked variant's buffer: 2 MiB of fp32


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 1024], help="T, the rows of x")
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="layer shapes of these")
    p.add_argument("--packed-max-t", type=int, default=64,
                   help="time torch's packed int8/int4 kernels only up to this T (they are slow for fp32 x)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's). On a shared, loaded machine one thread "
                        "gives stable timings: two threads wait on each other at every op's barrier")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    p.add_argument("--smoke", action="store_true", help="one small shape, few reps: checks the code path")
    return p.parse_args()


def reps_for(T: int) -> int:
    return 41 if T <= 1 else 11 if T <= 64 else 5


def blocked_linear(x, qw, bias, buf):
    """Dequantize rows of W block by block into buf (cache-sized), F.linear per block."""
    N, K = qw.shape
    rows = max(1, BLOCK_VALUES // K)
    y = x.new_empty(x.shape[0], N)
    for r0 in range(0, N, rows):
        part = qw.select_rows(slice(r0, min(r0 + rows, N)))
        w = dequantize_into(part, buf[: part.shape[0] * K].view(part.shape))
        y[:, r0:r0 + part.shape[0]] = F.linear(x, w, None if bias is None else bias[r0:r0 + part.shape[0]])
    return y


def int4pack(qw):
    """torch's CPU int4 layout and [K/g, N, 2] (scale, zero) of a QuantizedWeight: (q - 8) * s + z."""
    nib = unpack_int4(qw.data).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, 2)
    s = qw.scales.float()
    zero = torch.zeros_like(s) if qw.symmetric else qw.mins.float() + 8 * s
    return packed, torch.stack([s.t(), zero.t()], -1).contiguous()


def cpu_cell(model, layer, N, K, T, packed_max_t, smoke):
    g = torch.Generator().manual_seed(N * 7 + K)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = 0.1 * torch.randn(N, generator=g)
    x = torch.randn(T, K, generator=g)
    fns, refs, fmt_of = {"fp32": lambda: F.linear(x, w, b)}, {}, {"fp32": "fp32"}
    buf = torch.empty(BLOCK_VALUES + K)
    for name, (mode, group, sym) in FORMATS.items():
        if group is not None and K % group:
            continue
        qw = quantize(w, mode, group, symmetric=sym)
        refs[name] = quantized_linear_ref(x, qw, b)
        fns[f"flashzo {name}"] = lambda qw=qw: quantized_linear(x, qw, b)
        if name != "int4-g128-sym":
            fns[f"blocked {name}"] = lambda qw=qw: blocked_linear(x, qw, b, buf)
        if T <= packed_max_t:
            if name == "int8":
                s = qw.scales.float()[:, 0].contiguous()
                fns["int8pack"] = lambda qw=qw, s=s: torch._weight_int8pack_mm(x, qw.data, s).add_(b)
            elif mode == "int4":
                wp, sz = int4pack(qw)
                fns[f"int4pack {name}"] = lambda wp=wp, sz=sz, gs=group: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, wp, gs, sz).add_(b)
    for v in fns:
        fmt_of[v] = "int8" if v == "int8pack" else v.split()[-1]
    reps = 2 if smoke else reps_for(T)
    times = harness.time_interleaved(fns, warmup=1, reps=reps)
    base = statistics.median(times["fp32"])
    rows = []
    for v, samples in times.items():
        y = fns[v]()
        ref = refs.get(fmt_of[v])
        p50 = statistics.median(samples)
        rows.append(dict(model=model, layer=layer, N=N, K=K, T=T, variant=v, format=fmt_of[v],
                         **harness.timing_fields(samples), vs_fp32=round(p50 / base, 3),
                         bit_exact=None if ref is None else bool(torch.equal(y, ref)),
                         max_abs_diff=None if ref is None else float((y - ref).abs().max()) if y.numel() else 0.0,
                         reps=reps))
    return rows


def format_table(K=2048) -> list[dict]:
    """Bytes per parameter of each format, measured from QuantizedWeight.nbytes at [256, K] (the same
    per parameter at any N)."""
    out = []
    w = torch.randn(256, K) / K**0.5
    cases = [("int8", None, True, torch.float16), ("int8", 32, True, torch.float16), ("int8", 32, False, torch.float16),
             ("int8", 16, True, torch.float32), ("int8", 32, False, torch.float32),
             ("int4", 32, True, torch.float16), ("int4", 32, False, torch.float16), ("int4", 64, True, torch.float16),
             ("int4", 64, False, torch.float16), ("int4", 128, True, torch.float16),
             ("int4", 128, False, torch.float16), ("int4", 32, False, torch.float32)]
    for mode, group, sym, sd in cases:
        qw = quantize(w, mode, group, symmetric=sym, scale_dtype=sd)
        per = qw.nbytes / w.numel()
        assert per == bytes_per_param(mode, group, symmetric=sym, scale_dtype=sd, K=K)
        out.append(dict(format=qw.describe(), bytes_per_param=per, vs_fp32=per / 4, vs_bf16=per / 2))
    return out


def traffic_table(dtype=torch.bfloat16, device_name="H100 SXM", num_sms=132) -> str:
    """quant_launches for the 1b shapes: per path its compulsory bytes (the fused kernel's requests
    beside), FLOPs, and the time they imply at the device's bandwidth and peak."""
    peak = harness.PEAKS[device_name]
    lines = [f"traffic model (bench/traffic.py quant_launches), {str(dtype)[6:]} x, at {peak.hbm_tbps} TB/s "
             f"and {peak.bf16_tflops} TFLOP/s ({device_name}); MB = 10**6 bytes, each operand once "
             "(fused: its requests, tiles re-read, in brackets)",
             f"{'N x K':>12} {'T':>5} {'format':>14} {'path':>8} {'MB read':>9} {'[requests]':>11} {'MB writ':>8} "
             f"{'GFLOP':>8} {'us@BW':>7} {'us@peak':>8}"]
    for _, N, K in SHAPES["opt-1.3b/llama-3.2-1b"]:
        for T in (1, 64, 1024, 4096):
            for name, (mode, group, sym) in FORMATS.items():
                kw = dict(symmetric=sym, device=DeviceInfo("cuda", num_sms))
                launches = quant_launches(T, K, N, mode, group or K, dtype, **kw)
                req = quant_launches(T, K, N, mode, group or K, dtype, requests=True, **kw)["fused"][0]
                for path in ("fused", "unfused", "dense"):
                    if path == "dense" and name != "int8":
                        continue
                    ls = launches[path]
                    rd, wr = sum(x.bytes_read for x in ls), sum(x.bytes_written for x in ls)
                    fl = sum(x.flops for x in ls)
                    requests = f"[{req.bytes_read / 1e6:.1f}]" if path == "fused" else ""
                    lines.append(f"{N:>6}x{K:<5} {T:>5} {name if path != 'dense' else '-':>14} {path:>8} "
                                 f"{rd / 1e6:>9.2f} {requests:>11} {wr / 1e6:>8.2f} {fl / 1e9:>8.2f} "
                                 f"{(rd + wr) / (peak.hbm_tbps * 1e12) * 1e6:>7.1f} "
                                 f"{fl / (peak.bf16_tflops * 1e12) * 1e6:>8.1f}")
    return "\n".join(lines)


def gpu_rows(args) -> list[dict]:
    """bf16 on CUDA: fused kernel, unfused dequantize + F.linear, dense bf16 F.linear."""
    dev = torch.device("cuda")
    rows = []
    for model in args.models:
        for layer, N, K in SHAPES[model]:
            w = (torch.randn(N, K) / K**0.5)
            wb, b = w.to(dev, torch.bfloat16), (0.1 * torch.randn(N)).to(dev, torch.bfloat16)
            for T in args.tokens:
                x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
                fns = {"dense bf16": lambda x=x, wb=wb, b=b: F.linear(x, wb, b)}
                for name, (mode, group, sym) in FORMATS.items():
                    qw = quantize(w, mode, group, symmetric=sym).to(dev)
                    fns[f"fused {name}"] = lambda x=x, qw=qw, b=b: quantized_linear(x, qw, b)
                    fns[f"unfused {name}"] = lambda x=x, qw=qw, b=b: quantized_linear(x, qw, b, impl="torch")
                t = {k: harness.time_ms(f, dev, warmup=25, reps=100) for k, f in fns.items()}
                base = t["dense bf16"]["p50_ms"]
                for k, v in t.items():
                    rows.append(dict(model=model, layer=layer, N=N, K=K, T=T, variant=k, format=k.split()[-1], **v,
                                     vs_dense=round(v["p50_ms"] / base, 3)))
    return rows


def markdown(results) -> str:
    m = results["meta"]
    lines = [f"# Quantized linear ({m['device']}, {m['dtype']})", "",
             f"torch {m['torch']}, triton {m['triton']}, commit {m['commit']}, {m['date']}, load average "
             f"{m['load_average']} -> {m.get('load_average_end')}.", "", f"Command: `{m['command']}`", "",
             "ms: p50 [p20, p80] of interleaved calls; x fp32: p50 over the fp32 F.linear's p50 in the same cell; "
             "bit-exact: y == quantized_linear_ref(x, qw, b) (dequantize, then F.linear) bit for bit.", "",
             "| model | layer | N x K | T | variant | ms | x fp32 | bit-exact | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        exact = "-" if r.get("bit_exact") is None else ("yes" if r["bit_exact"] else "no")
        diff = "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"
        ratio = r.get("vs_fp32", r.get("vs_dense"))
        lines.append(f"| {r['model']} | {r['layer']} | {r['N']}x{r['K']} | {r['T']} | {r['variant']} "
                     f"| {r['p50_ms']:.3f} [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {ratio:.2f} | {exact} | {diff} |")
    lines += ["", "## Bytes per parameter", "", "Measured from QuantizedWeight.nbytes at K = 2048 (data, scales, "
              "mins); fp32 is 4, bf16 2. The torch path adds one dense fp32 scratch matrix, the largest quantized "
              "layer's.", "", "| format | bytes / param | x fp32 | x bf16 |", "|---|---|---|---|"]
    for f in m["formats"]:
        lines.append(f"| {f['format']} | {f['bytes_per_param']:.4f} | {f['vs_fp32']:.3f} | {f['vs_bf16']:.3f} |")
    lines += ["", "## GPU traffic model", "", "```", m["traffic_model"], "```"]
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["variant"].startswith(("flashzo", "fused"))]
    cells = list(dict.fromkeys((r["N"], r["K"], r["T"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["N"], r["K"], r["T"], r["variant"]): r.get("vs_fp32", r.get("vs_dense")) for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cells)), 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ax.bar([j + i * width for j in range(len(cells))], [by.get(c + (v,), 0) for c in cells], width, label=v)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="dense baseline")
    ax.set_xticks([j + 0.4 for j in range(len(cells))])
    ax.set_xticklabels([f"{N}x{K}\nT={T}" for N, K, T in cells], fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("time / dense time")
    ax.set_title(f"quantized linear, {results['meta']['device']} ({results['meta']['commit']})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if on_gpu else "cpu")
    command = "python bench/bench_quant.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = harness.run_meta("quant", device, dtype="bf16" if on_gpu else "fp32", command=command.strip())
    if on_gpu:
        rows = gpu_rows(args)
        stem = "quant_" + harness.slug(meta["device"])
    else:
        models = {"smollm2-135m": SHAPES["smollm2-135m"][:1]} if args.smoke else {m: SHAPES[m] for m in args.models}
        tokens = [1, 3] if args.smoke else args.tokens
        rows = []
        for model, shapes in models.items():
            for layer, N, K in shapes:
                for T in tokens:
                    cell = cpu_cell(model, layer, N, K, T, args.packed_max_t, args.smoke)
                    rows += cell
                    print(f"{model} {layer} {N}x{K} T={T}: " + ", ".join(
                        f"{r['variant']} {r['p50_ms']:.3f} ms ({r['vs_fp32']:.2f}x"
                        f"{', exact' if r['bit_exact'] else ''})" for r in cell), flush=True)
        stem = "quant_cpu_smoke" if args.smoke else "quant_cpu"
    meta["formats"] = format_table()
    meta["traffic_model"] = traffic_table()
    meta["load_average_end"] = harness.load_average()
    print(meta["traffic_model"])
    harness.write_results(str(args.out / stem), {"meta": meta, "rows": rows}, markdown=markdown, plot=plot)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
