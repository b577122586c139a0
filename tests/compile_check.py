"""Compile every flashzo Triton kernel ahead of time for sm_80 and sm_90, as the real launchers launch it.

No GPU is needed. The launchers run on meta/CPU tensors with a stand-in Triton driver whose target is
a CUDA GPU; every launch is intercepted where Triton is about to compile it (its ``jit_cache_hook``),
which records the kernel, its specialized signature, constexprs, attributes and launch options
exactly as a GPU run would compile them, and the launch is skipped. The distinct launches are then
compiled with ``triton.compile`` down to cubin with the ptxas of the Triton wheel, for each
architecture, and measured: registers and spills (ptxas -v), shared memory, tensor-core
instructions in the PTX. tests/test_compile.py runs this in a subprocess (Triton must not be in
interpreter mode) and checks the report; by hand:

    python tests/compile_check.py --out /tmp/compile.json      # prints one line per kernel build

The calls cover every dtype each launcher takes and every tile choice of the plan (launch_plan.py):
single projections at r in {1, 4, 8, 16, 32, 64}, stacked ones of 3 parts at r in {8, 16, 32, 64}
(so u widths 8 to 256), realistic and odd shapes, K split and not; the quantized GEMM in every
weight format GGUF files repack into (int8 per channel, group 16 and 32; int4 group 32 and 128,
symmetric and asymmetric, fp16 and fp32 scales) for bf16, and a few for fp16 and fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
# Most shared memory one block may use (opt-in): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def capture() -> list[dict]:
    """Run the representative calls through the real launchers; returns one record per launch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check needs Triton's compiler: unset TRITON_INTERPRET")
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class CaptureDriver:  # just enough of a driver for JITFunction.run to reach the compile step
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

    records = []
    launch = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        records.append(
            dict(
                module=jit.fn.__module__,
                name=jit.fn.__name__,
                signature=dict(compile["signature"]),
                constants={tuple(k): _plain(v) for k, v in compile["constants"].items()},
                attrs={tuple(k): v for k, v in compile["configs"][0].items()},
                options=dict(
                    num_warps=compile["num_warps"],
                    num_stages=compile["num_stages"],
                    num_ctas=compile["num_ctas"],
                    enable_fp_fusion=compile["enable_fp_fusion"],
                ),
                launch_options={k: v for k, v in launch["kwargs"].items() if k not in jit.arg_names},
                grid=launch["grid"],
                case=launch["case"],
            )
        )
        return True  # skip the compile and the launch

    run = JITFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch.update(grid=[int(g) for g in grid], kwargs=dict(kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    driver.set_active(CaptureDriver())
    knobs.runtime.jit_cache_hook = hook
    JITFunction.run = recording_run
    _import_kernel_modules()

    for mod in _kernel_modules():  # the launchers may run on meta/CPU tensors here
        if hasattr(mod, "check_triton_device"):
            mod.check_triton_device = lambda device: None
    try:
        for case, call in representative_calls():
            launch["case"] = case
            call()
    finally:  # the stand-in driver stays: without a GPU there is no default one to restore
        JITFunction.run = run
        knobs.runtime.jit_cache_hook = None
    return records


def representative_calls():
    """(case name, call) through the public launchers."""
    import torch

    from flashzo.kernels import (
        LoRAPart,
        Segments,
        gaussian,
        perturbed_lora_add_,
        perturbed_lora_linear,
        perturbed_lora_linear_parts,
        zo_update_,
    )

    meta = torch.device("meta")
    for seed, numel, offset in ((5, 4099, 0), (2**40 + 3, 2**20, 123)):
        yield f"gaussian numel={numel}", lambda s=seed, n=numel, o=offset: gaussian(
            s, n, offset=o, device="cpu", impl="triton"
        )
    for q, numel in ((1, 4099), (3, 2**20)):
        params = torch.zeros(numel)
        yield f"zo_update q={q} numel={numel}", lambda p=params, q=q: zo_update_(
            p, [7, 2**40 + 3, 11][:q], [0.5, -1.0, 0.25][:q], lr=1e-3, weight_decay=0.1, offset=33, impl="triton"
        )

    def segments(T):
        if T == 37:
            return Segments.from_lists([10, 0, 20, 7], [0, 1, 0, 1], [5, 7, 2**40 + 3, 5], [1, -1, 0, -1])
        return Segments.from_lists([T // 2, T - T // 2], [0, 0], [5, 5], [1, -1])

    kw = dict(scaling=2.0, eps=1e-3, impl="triton")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        # OPT-1.3b's q_proj at every rank; odd shapes (masks, unaligned strides) for one dtype
        shapes = [(2048, 2048, 2048, (1, 4, 8, 16, 32, 64))]
        if dtype == torch.bfloat16:
            shapes.append((37, 70, 17, (1, 8)))
        for T, K, N, ranks in shapes:
            for r in ranks:
                x, w = torch.empty(T, K, dtype=dtype, device=meta), torch.empty(N, K, dtype=dtype, device=meta)
                b = torch.empty(N, dtype=dtype, device=meta)
                lora_a, lora_b = torch.empty(2, r, K, device=meta), torch.empty(2, N, r, device=meta)
                odd = "odd " if K % 16 else ""
                yield f"{odd}linear {dtype} T={T} K={K} N={N} r={r}", lambda x=x, w=w, b=b, a=lora_a, bb=lora_b, T=T: (
                    perturbed_lora_linear(x, w, b, a, bb, segments(T), a_offset=0, b_offset=10**6, **kw)
                )
        # a stacked q, k, v (grouped-query widths) at every rank, and one with mixed ranks
        K = 2048
        for ranks in ((8,) * 3, (16,) * 3, (32,) * 3, (64,) * 3, (16, 4, 4)):
            widths = (2048, 512, 512)
            x = torch.empty(2048, K, dtype=dtype, device=meta)
            w = torch.empty(sum(widths) + 64, K, dtype=dtype, device=meta)  # 64 unadapted columns
            parts, start = [], 0
            for width, r in zip(widths, ranks, strict=True):
                a, bb = torch.empty(2, r, K, device=meta), torch.empty(2, width, r, device=meta)
                parts.append(LoRAPart(start, start + width, a, bb, start * 100, start * 100 + r * K))
                start += width
            yield f"parts {dtype} ranks={ranks}", lambda x=x, w=w, p=parts: perturbed_lora_linear_parts(
                x, w, None, p, segments(2048), **kw
            )
            y = torch.empty(2048, w.shape[0], dtype=dtype, device=meta)
            yield f"add {dtype} ranks={ranks}", lambda x=x, y=y, p=parts: perturbed_lora_add_(
                y, x, p, segments(2048), **kw
            )
    yield from quant_calls(meta)


# (mode, group size (None: per channel), symmetric, scale dtype): the formats of engine/gguf_quant.py's
# repacks (Q6_K, Q8_0, Q5_K, Q4_0, Q4_1, Q4_K) and quantize()'s defaults
QUANT_FORMATS = {
    "bf16": [("int8", None, True, "float16"), ("int8", 16, True, "float32"), ("int8", 32, True, "float16"),
             ("int8", 32, False, "float32"), ("int4", 32, True, "float16"), ("int4", 32, False, "float16"),
             ("int4", 32, False, "float32"), ("int4", 128, True, "float16")],
    "fp16": [("int8", None, True, "float16"), ("int4", 32, False, "float16")],
    "fp32": [("int8", None, True, "float16"), ("int8", 16, True, "float32"), ("int4", 32, False, "float16")],
}


def quant_weight(N, K, mode, group, symmetric, scale_dtype, device):
    """A QuantizedWeight of the format with empty tensors on `device`."""
    import torch

    from flashzo.kernels.quant import QuantizedWeight

    groups = K // (group or K)
    data = torch.empty(N, K // 2 if mode == "int4" else K, device=device,
                       dtype=torch.int8 if (mode, symmetric) == ("int8", True) else torch.uint8)
    sd = getattr(torch, scale_dtype)
    scales = torch.empty(N, groups, dtype=sd, device=device)
    mins = None if symmetric else torch.empty(N, groups, dtype=sd, device=device)
    return QuantizedWeight((N, K), mode, group or K, symmetric, data, scales, mins)


def quant_calls(device):
    """The quantized GEMM on llama-3.2-1b's gate_proj shape (T=2048, K=2048, N=8192), and an odd one."""
    import torch

    from flashzo.kernels.quant_linear import quantized_linear

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name, formats in QUANT_FORMATS.items():
        dtype = dtypes[name]
        x, b = torch.empty(2048, 2048, dtype=dtype, device=device), torch.empty(8192, dtype=dtype, device=device)
        for fmt in formats:
            qw = quant_weight(8192, 2048, *fmt, device)
            yield f"quant {name} {qw.describe()}", lambda x=x, qw=qw, b=b: quantized_linear(x, qw, b, impl="triton")
    x = torch.empty(37, 70, dtype=torch.bfloat16, device=device)
    qw = quant_weight(33, 70, "int8", None, False, "float16", device)
    yield f"odd quant bf16 {qw.describe()}", lambda: quantized_linear(x, qw, None, impl="triton")


def _import_kernel_modules():
    """flashzo.kernels loads its modules on first use: import every one of them here."""
    import importlib
    import pkgutil

    import flashzo.kernels

    for info in pkgutil.iter_modules(flashzo.kernels.__path__):
        importlib.import_module(f"flashzo.kernels.{info.name}")


def _kernel_modules():
    return [m for name, m in sorted(sys.modules.items()) if name.startswith("flashzo.kernels") and m is not None]


def project_jit_functions() -> dict[str, list[str]]:
    """Every @triton.jit function defined in flashzo.kernels: module -> names."""
    from triton.runtime.jit import JITFunction

    found = {}
    for mod in _kernel_modules():
        for name, value in vars(mod).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == mod.__name__:
                found.setdefault(mod.__name__, []).append(name)
    return found


def distinct(records: list[dict]) -> list[dict]:
    """One record per distinct build: kernel, signature (argument types), constexprs and options,
    and whether the case is an odd shape. Builds that differ only in Triton's divisibility
    attributes of aligned shapes (R = 8 or 16, K = 2048 or 4096) are compiled once, from the
    first case that launched them."""
    seen = {}
    for rec in records:
        key = json.dumps(
            [rec["module"], rec["name"], rec["signature"], sorted(map(str, rec["constants"].items())),
             rec["options"], rec["case"].startswith("odd ")],
            default=str,
        )  # fmt: skip
        if key not in seen:
            seen[key] = dict(rec, cases=[])
        seen[key]["cases"].append(rec["case"])
    return list(seen.values())


def compile_one(args) -> dict:
    """Compile one record for one architecture; returns its measurements (or its error)."""
    rec, arch = args
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: registers, spills
    knobs.compilation.always_compile = True
    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    src = ASTSource(fn, rec["signature"], rec["constants"], rec["attrs"])
    out = dict(kernel=f"{rec['module']}.{rec['name']}", arch=arch, constants=_describe_constants(fn, rec))
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=rec["options"])
    except Exception as e:  # a compile or ptxas error is a result, reported by the test
        out.update(error=f"{type(e).__name__}: {e}"[:4000])
        return out
    ptxas = log.getvalue()
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    dots = re.findall(r"tt\.dot .*?inputPrecision = (\w+)", ttir)
    out.update(
        seconds=round(time.perf_counter() - t0, 2),
        registers=_ptxas_number(ptxas, r"Used (\d+) registers"),
        spill_stores=_ptxas_number(ptxas, r"(\d+) bytes spill stores"),
        spill_loads=_ptxas_number(ptxas, r"(\d+) bytes spill loads"),
        shared=int(compiled.metadata.shared),
        shared_limit=SHARED_LIMIT[arch],
        dot_precisions=sorted(set(dots)),
        tensor_cores=bool(re.search(r"\b(mma\.sync|wgmma\.mma_async)", ptx)),
        cubin_bytes=len(compiled.asm["cubin"]),
        ptxas_report=bool(ptxas.strip()),
    )
    return out


def _ptxas_number(log: str, pattern: str) -> int | None:
    values = [int(v) for v in re.findall(pattern, log)]
    return max(values) if values else None


def _describe_constants(fn, rec) -> dict:
    names = fn.arg_names
    return {names[k[0]]: v for k, v in rec["constants"].items() if names[k[0]].isupper()}


def _plain(value):
    return value.value if hasattr(value, "value") else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    records = capture()
    builds = distinct(records)
    t_capture = time.perf_counter() - t0
    todo = [(rec, arch) for rec in builds for arch in ARCHS]
    # spawn, not fork: the parent holds torch's threads and a stand-in driver
    import multiprocessing

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_one, todo))
    for res, (rec, _) in zip(results, todo, strict=True):
        res["cases"] = rec["cases"]
        res["options"] = rec["options"]
        res["launch_options"] = rec["launch_options"]
    import triton

    from flashzo.kernels.launch_plan import min_dot_inner

    report = dict(
        triton=triton.__version__,
        min_dot_inner=min_dot_inner(),
        archs=list(ARCHS),
        launches=len(records),
        builds=len(builds),
        project_jit_functions=project_jit_functions(),
        launched=sorted({f"{r['module']}.{r['name']}" for r in records}),
        kernel_sources={f"{r['module']}.{r['name']}": _source(r) for r in records},
        results=results,
        capture_seconds=round(t_capture, 2),
        seconds=round(time.perf_counter() - t0, 2),
    )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    for res in results:
        status = res.get("error", "").split("\n")[0] or (
            f"{res['registers']} regs, {res['spill_stores']} B spilled, {res['shared']} B shared, "
            f"tensor cores {res['tensor_cores']}, {res['seconds']} s"
        )
        print(f"sm_{res['arch']} {res['kernel'].split('.')[-1]} {res['constants']}: {status}")
    print(f"{len(records)} launches, {len(builds)} distinct builds x {len(ARCHS)} archs in {report['seconds']} s")
    return 0


def _source(rec) -> str:
    import importlib

    return getattr(importlib.import_module(rec["module"]), rec["name"]).src


if __name__ == "__main__":
    sys.exit(main())
