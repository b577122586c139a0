"""bench/code_notes.py's measurements of single CPU ops: how torch and MKL round a row or an element
by what surrounds it (the batch, the thread count, the code path), what the row chunks of the
batch-invariant mode cost, SDPA's padding and grouped-query paths, and dequantization.

Each function returns rows (code_notes.row); `smoke` picks small sizes. Run as a script, this module
is the child process of `narrow_rows` and `thread_rows`: MKL reads its code path from the
environment when it loads, so another path needs another process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import harness
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(harness.REPO, "tests")


def row(note: str, case: str, figure: str, value, unit: str) -> dict:
    return dict(note=note, case=case, figure=figure, value=value, unit=unit)


def spans(values: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def cpu_ms(fns: dict, *, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median CPU ms of each fn at one thread, the calls interleaved (harness.time_interleaved)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = harness.time_interleaved(fns, warmup=warmup, reps=reps, timer=time.process_time)
    finally:
        torch.set_num_threads(before)
    return {k: harness.quantile(v, 0.5) for k, v in times.items()}


# --------------------------------------------------------------------------------------------------
# kernels/rows.py: a row's bits by T, an element's by the code that computes it


def row_bits_rows(smoke: bool) -> list[dict]:
    note = "kernels/rows.py (module docstring)"
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 96), (768, 768)] if smoke else [(32, 96), (37, 130), (768, 768), (768, 3072), (3072, 768),
                                                   (8192, 2048)]
    out = []
    for K, N in shapes:
        W, first = torch.randn(N, K, generator=g), torch.randn(K, generator=g)
        classes: dict[bytes, list[int]] = {}
        for T in range(1, 17):
            x = torch.randn(T, K, generator=g)
            x[0] = first
            classes.setdefault((x @ W.T)[0].numpy().tobytes(), []).append(T)
        out.append(row(note, f"x @ W.T, K={K}, N={N}, fp32, {torch.get_num_threads()} threads",
                       "T (1-16) that give row 0 the same bits, grouped", " | ".join(map(spans, classes.values())),
                       f"{len(classes)} roundings"))
    n = 640 if smoke else 6400
    x = torch.randn(n, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, fn in (("silu", F.silu), ("sigmoid", torch.sigmoid),
                         ("gelu (tanh)", lambda t: F.gelu(t, approximate="tanh")), ("exp", torch.exp)):
            long = fn(x)
            alone = torch.stack([fn(x[i:i + 1].clone())[0] for i in range(n)])  # one element: scalar code
            out.append(row(note, f"{name}, one thread", "elements whose bits differ: alone vs in one long call",
                           int((alone != long).sum()), f"of {n}"))
    finally:
        torch.set_num_threads(before)
    return out


def row_chunk_rows(smoke: bool, reps: int) -> list[dict]:
    """kernels/rows.py row_chunk: CPU time of the row chunks against one plain call, at one thread."""
    from flashzo.kernels import apply_rows, mm_rows

    note = "kernels/rows.py row_chunk"
    g = torch.Generator().manual_seed(0)
    cases = [(300, 256, 256)] if smoke else [(954, 768, 768), (954, 768, 3072), (954, 3072, 768), (5280, 768, 768)]
    out = []

    def against_one_call(x, W):  # {"one": ms, 256: ms, 64: ms}
        return cpu_ms({"one": lambda: torch.mm(x, W.T), 256: lambda: mm_rows(x, W.T, chunk=256),
                       64: lambda: mm_rows(x, W.T, chunk=64)}, reps=reps)

    for T, K, N in cases:
        ms = against_one_call(torch.randn(T, K, generator=g), torch.randn(N, K, generator=g))
        for c in (256, 64):
            out.append(row(note, f"GEMM T={T}, K={K}, N={N}", f"{c}-row chunks over one call",
                           round(ms[c] / ms["one"], 2), f"x (one call {ms['one']:.2f} ms)"))
    T, K, V = (32, 256, 8192) if smoke else (32, 768, 50272)
    ms = against_one_call(torch.randn(T, K, generator=g), torch.randn(V, K, generator=g))
    for c in (256, 64):
        out.append(row(note, f"LM head T={T}, K={K}, N={V} (padded to a whole chunk)", f"{c}-row chunks over one call",
                       round(ms[c] / ms["one"], 2), f"x (one call {ms['one']:.2f} ms)"))
    T, H = (300, 256) if smoke else (954, 768)
    x, w = torch.randn(T, H, generator=g), torch.randn(H, generator=g)
    ln = lambda t: F.layer_norm(t, (H,), w, w)  # noqa: E731
    ms = cpu_ms({"one call": lambda: ln(x), "256-row chunks": lambda: apply_rows(ln, x, chunk=256),
                 "64-row chunks": lambda: apply_rows(ln, x, chunk=64)}, reps=3 * reps, warmup=2)
    out += [row(note, f"layer norm over [{T}, {H}]", k, round(v, 3), "ms") for k, v in ms.items()]
    return out


# --------------------------------------------------------------------------------------------------
# Other code paths of MKL and ATen, in child processes


def narrow_rows(smoke: bool) -> list[dict]:
    """kernels/rows.py NARROW: which positions of a 256-row call round differently, by N."""
    note = "kernels/rows.py NARROW"
    spec = dict(Ks=[32] if smoke else [2, 8, 32, 768], Ns=[8, 64] if smoke else [1, 2, 8, 16, 32, 48, 56, 64, 96])
    out = []
    for variant in ("native", "avx2"):
        res = _child(variant, "narrow", spec)
        if res is None:
            continue
        for N in spec["Ns"]:
            value = "; ".join(f"K={K}: {' '.join(map(str, res['positions'][f'{K},{N}'])) or 'none'}"
                              for K in spec["Ks"])
            out.append(row(note, f"{res['path']}, x @ W.T, N={N}, one thread",
                           "positions of 256 equal rows whose bits differ from position 0", value, ""))
    return out


def thread_rows(smoke: bool) -> list[dict]:
    """kernels/serial.py: bits by thread count (a GEMM on MKL's Intel AVX-512 path, silu) and by the
    number of GEMMs in a batched call."""
    note = "kernels/serial.py"
    out = []
    for variant in ("mkl-intel", "native"):
        res = _child(variant, "threads", {})
        if res is None:
            continue
        for case, (differ, total) in res["counts"].items():
            out.append(row(note, f"{res['path']}, {case}", "elements whose bits differ", differ, f"of {total}"))
    return out


def _child(variant: str, what: str, spec: dict) -> dict | None:
    """Run this module in a process whose MKL and ATen take `variant`'s code path (tests/test_isa.py's
    variants: native, avx2 (with the Intel preload), mkl-intel); None, with the reason, if it cannot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tmp = tempfile.mkdtemp()
    try:
        if variant != "native":
            cc = shutil.which("cc") or shutil.which("gcc")
            lib = os.path.join(tmp, "libmkl_intel_path.so")
            if cc is None or not torch.backends.mkl.is_available() or subprocess.run(
                    [cc, "-shared", "-fPIC", "-o", lib, os.path.join(TESTS, "mkl_intel_path.c")],
                    capture_output=True).returncode:
                print(f"{what} {variant}: skipped (no C compiler for tests/mkl_intel_path.c, or no MKL)",
                      file=sys.stderr)
                return None
            env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
        if variant == "avx2":
            env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), what, json.dumps(spec)], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _code_path() -> str:
    sys.path.insert(0, TESTS)
    from isa_worker import mkl_code_path

    return f"ATen {torch.backends.cpu.get_cpu_capability()}, MKL {mkl_code_path() or 'default'}"


def _narrow_child(spec: dict) -> dict:
    torch.set_num_threads(1)  # as mm_rows runs its chunks (kernels/serial.py)
    g = torch.Generator().manual_seed(0)
    positions = {}
    for K in spec["Ks"]:
        for N in spec["Ns"]:
            W, r = torch.randn(N, K, generator=g), torch.randn(K, generator=g)
            y = r.expand(256, K).contiguous() @ W.T  # W.T: as mm_rows is called (w_t = weight.T)
            positions[f"{K},{N}"] = [p for p in range(256) if not torch.equal(y[p], y[0])]
    return {"path": _code_path(), "positions": positions}


def _threads_child(spec: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(2, 256, 3072, generator=g), torch.randn(2, 3072, 768, generator=g)
    s = torch.randn(256, 3072, generator=g)

    def at(n, fn):
        torch.set_num_threads(n)
        return fn()

    counts = {}
    one, two = at(1, lambda: x[0] @ W[0]), at(2, lambda: x[0] @ W[0])
    counts["[256, 3072] x [3072, 768], 1 vs 2 threads"] = [int((one != two).sum()), one.numel()]
    for n in (1, 2):
        alone, batched = at(n, lambda: torch.bmm(x[:1], W[:1])[0]), at(n, lambda: torch.bmm(x, W)[0])
        counts[f"GEMM 0 of a batched call of 1 vs 2 GEMMs ([256, 3072] x [3072, 768]), {n} thread{'s' * (n > 1)}"] = [
            int((alone != batched).sum()), alone.numel()]
    one, seven = at(1, lambda: F.silu(s)), at(7, lambda: F.silu(s))
    counts["silu over [256, 3072], 1 vs 7 threads"] = [int((one != seven).sum()), one.numel()]
    return {"path": _code_path(), "counts": counts}


# --------------------------------------------------------------------------------------------------
# engine/attention.py: the torch backend's SDPA calls


def sdpa_rows(smoke: bool, reps: int) -> list[dict]:
    note = "engine/attention.py TorchAttentionBackend"
    g = torch.Generator().manual_seed(0)
    H, D = 12, 64
    out = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for L, S in ([(1, 64), (7, 40)] if smoke else [(1, 64), (1, 200), (7, 40), (16, 130), (100, 300)]):
            q = torch.randn(1, H, L, D, generator=g)
            k, v = torch.randn(1, H, S + 1, D, generator=g), torch.randn(1, H, S + 1, D, generator=g)
            mask = torch.arange(S)[None] <= torch.arange(L)[:, None] + (S - L)  # causal, bottom-right
            exact = F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], attn_mask=mask)
            padded = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat([mask, mask[:, :1] & False], 1))
            out.append(row(note, f"{L} quer{'y' if L == 1 else 'ies'} over {S} keys, {H} heads, one thread",
                           "elements whose bits differ: exact shape vs one more (masked) key",
                           int((exact != padded).sum()), f"of {exact.numel()}"))
        q, k, v = (torch.randn(8, H, n, D, generator=g) for n in (1, 64, 64))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            one = F.scaled_dot_product_attention(q[:1], k[:1], v[:1])[0]
            eight = F.scaled_dot_product_attention(q, k, v)[0]
            out.append(row(note, f"one query over 64 keys, {H} heads, {threads} thread{'s' * (threads > 1)}",
                           "elements whose bits differ: 1 vs 8 sequences per call", int((one != eight).sum()),
                           f"of {one.numel()}"))
    finally:
        torch.set_num_threads(before)
    note = "engine/attention.py grouped-query attention"
    H, KV = 9, 3  # SmolLM2-135M
    for n, L, S in ([(4, 8, 16)] if smoke else [(16, 20, 40), (1, 256, 256)]):
        q = torch.randn(n, H, L, D, generator=g)
        k, v = torch.randn(n, KV, S, D, generator=g), torch.randn(n, KV, S, D, generator=g)
        mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)

        def gqa(q=q, k=k, v=v, mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        def copy(q=q, k=k, v=v, mask=mask):  # K and V copied per query head
            return F.scaled_dot_product_attention(q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1),
                                                  attn_mask=mask)

        case = f"{n} sequence{'s' * (n > 1)} of {L} queries over {S} keys, {H} heads over {KV} KV heads, one thread"
        ms = cpu_ms({"enable_gqa": gqa, "repeat_interleave": copy}, reps=3 * reps, warmup=2)
        out += [row(note, case, "same bits", "yes" if torch.equal(gqa(), copy()) else "no", ""),
                row(note, case, "enable_gqa, CPU time", round(ms["enable_gqa"], 3), "ms"),
                row(note, case, "K and V copied per query head (repeat_interleave), CPU time",
                    round(ms["repeat_interleave"], 3), "ms")]
    return out


# --------------------------------------------------------------------------------------------------
# kernels/quant.py dequantize_into


def dequant_rows(smoke: bool, reps: int) -> list[dict]:
    from flashzo.kernels.quant import _BLOCK_ELEMENTS, _dequantize_rows, dequantize_into, quantize

    note = "kernels/quant.py dequantize_into"
    N, K = (1024, 512) if smoke else (8192, 2048)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    out = torch.empty(N, K)
    rows = max(1, _BLOCK_ELEMENTS // K)
    q8 = quantize(W, "int8")
    q4 = quantize(W, "int4", 32, symmetric=False)

    def int8_one_call():  # int8 data times the broadcast fp32 scales, in one mixed-dtype op
        torch.mul(q8.data, q8.scales.float(), out=out)

    def int4_addcmul():  # as dequantize_into's blocks, with one addcmul for (scale * q) + min
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            _dequantize_rows_addcmul(q4, r0, r1, out[r0:r1])

    fns = {
        "int8 per channel: one torch.mul of the int8 data by the fp32 scales": int8_one_call,
        "int8 per channel: a converting copy, then an in-place multiply, whole matrix":
            lambda: _dequantize_rows(q8, 0, N, out),
        f"int8 per channel: dequantize_into ({rows}-row blocks)": lambda: dequantize_into(q8, out),
        "int4 g32 asymmetric: mul_ then add_, whole matrix": lambda: _dequantize_rows(q4, 0, N, out),
        f"int4 g32 asymmetric: dequantize_into ({rows}-row blocks, mul_ then add_)": lambda: dequantize_into(q4, out),
        f"int4 g32 asymmetric: {rows}-row blocks, torch.addcmul": int4_addcmul,
    }
    ms = cpu_ms(fns, reps=reps)
    return [row(note, f"W [{N}, {K}] into fp32, one thread", k, round(v, 2), "ms CPU") for k, v in ms.items()]


def _dequantize_rows_addcmul(qw, r0: int, r1: int, out: torch.Tensor) -> None:
    n, K, group = r1 - r0, qw.shape[1], qw.group_size
    d = qw.data[r0:r1].view(n, K // 32, 1, 16)
    out.copy_(torch.cat((d & 15, d >> 4), dim=2).view(n, K))
    o = out.view(n, K // group, group)
    torch.addcmul(qw.mins[r0:r1].float()[..., None], o, qw.scales[r0:r1].float()[..., None], out=o)


if __name__ == "__main__":
    what, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"narrow": _narrow_child, "threads": _threads_child}[what](spec)))
