"""The batch-invariant checks in a process of their own (tests/test_isa.py starts it under other
instruction sets and thread counts).

    python isa_worker.py OUT.json THREADS      runs at THREADS intra-op threads, writes OUT.json

OUT.json holds what this process's torch and MKL run on (the ATen CPU capability, MKL's own
description of its code path), the problems found inside the process (a row whose bits depend on the
rows beside it, for the row-invariant ops and the torch attention backend in the mode, at shapes where
a library splits its work by threads or batch size), and digests of the results, which the test
compares between processes at other thread counts: they must be the same bits.

Also `digest_case`, the digest of a dist_worker.run_case result (the test applies it to the ranks'
results too).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def digest_case(res: dict) -> dict:
    """run_case's result with every float as its exact hex and the adapter as a digest."""
    def exact(v):
        if isinstance(v, float):
            return v.hex()
        if isinstance(v, (list, tuple)):
            return [exact(x) for x in v]
        if isinstance(v, dict):
            return {k: exact(x) for k, x in sorted(v.items())}
        return v
    return {"adapter": digest(res["adapter"]),
            **{k: exact(res[k]) for k in ("loss_plus", "loss_minus", "grads", "loss", "eval")}}


def mkl_code_path() -> str:
    """MKL's description of the code path it runs (the first line it prints in verbose mode)."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    if not hasattr(lib, "MKL_Verbose"):
        return "no MKL"
    r, w = os.pipe()
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(w, 1)
    try:
        lib.MKL_Verbose(1)
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))
        lib.MKL_Verbose(0)
        ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(w)
    text = os.read(r, 1 << 16).decode(errors="replace")
    os.close(r)
    head = next((line for line in text.splitlines() if "architecture" in line), "")
    return head.split("architecture", 1)[-1].split(", Lnx")[0].strip()


def rows_alone_vs_in_batches(fn, row: torch.Tensor, sizes, problems: list, name: str, seed: int = 0):
    """fn's row for `row` alone, `row` at every position of 600 rows, and `row` at the first, middle and
    last position of batches of `sizes` random rows; a problem for every row whose bits differ.
    Returns the digests."""
    g = torch.Generator().manual_seed(seed)
    ref = fn(row[None])[0]
    out = [digest(ref)]
    y = fn(row.expand((600,) + tuple(row.shape)).contiguous())  # the row at every position of every chunk
    for p in range(600):
        if not torch.equal(y[p], ref):
            problems.append(f"{name}: the row at {p} of 600 copies of it differs from the row alone")
    for T in sizes:
        x = torch.randn((T,) + tuple(row.shape), generator=g, dtype=torch.float32).to(row.dtype)
        where = sorted({0, T // 2, T - 1})
        x[where] = row
        y = fn(x)
        out.append(digest(y))
        for p in where:
            if not torch.equal(y[p], ref):
                problems.append(f"{name}: the row at {p} of {T} rows differs from the row alone")
    return out


def op_checks(problems: list) -> dict:
    from flashzo.engine import invariant
    from flashzo.kernels import apply_rows, mm_rows

    g = torch.Generator().manual_seed(0)
    out = {}
    # GEMMs: MKL's AVX-512 path splits K = 3072 between threads; N = 1 (a rank-1 LoRA shrink), a
    # narrow N (a LoRA shrink, a tiny model's projection) and a short K take other kernels; bf16 goes
    # to oneDNN
    for K, N, dt in [(3072, 768, torch.float32), (768, 8, torch.float32), (8, 32, torch.float32),
                     (8, 200, torch.float32), (32, 1, torch.float32), (37, 130, torch.float32),
                     (768, 768, torch.bfloat16)]:
        W = torch.randn(N, K, generator=g).to(dt)
        row = torch.randn(K, generator=g).to(dt)
        out[f"mm_rows {K}x{N} {dt}"] = rows_alone_vs_in_batches(
            lambda x, W=W: mm_rows(x, W.T), row, [300, 600], problems, f"mm_rows {K}x{N} {dt}")
    # row-wise ops: silu over 256 x 3072 elements is cut by threads; a vocabulary-wide log-sum-exp
    w = torch.randn(768, generator=g)
    for name, fn, width in [
        ("silu", F.silu, 3072),
        ("logsumexp", lambda t: torch.logsumexp(t, -1), 50272),
        ("layer_norm", lambda t: F.layer_norm(t, (768,), w, w, 1e-5), 768),
        ("rms_norm", lambda t: invariant.rms_norm(t, w, 1e-6), 768),
        ("cos", lambda t: torch.cos(t * 30), 64),
    ]:
        row = torch.randn(width, generator=g)
        out[f"apply_rows {name}"] = rows_alone_vs_in_batches(
            lambda x, fn=fn: apply_rows(fn, x), row, [70, 300, 600], problems, f"apply_rows {name}")
    out["attention"] = attention_check(problems)
    return out


def attention_check(problems: list) -> list:
    """One sequence's rows in the torch backend's invariant plan, alone and in stages of others."""
    from flashzo.engine import invariant
    from flashzo.engine.attention import AttentionMetadata, KVPool, TorchAttentionBackend

    g = torch.Generator().manual_seed(1)
    H, KV, D = 8, 2, 64
    lens = [(5, 9), (1, 300), (40, 40), (3, 200), (2, 2), (60, 333)]  # (qo_len, kv_len)
    pool = KVPool(1, KV, D, dtype=torch.float32, device="cpu", capacity=1024)
    kb, vb = pool.buffers(0)
    kb.copy_(torch.randn(kb.shape, generator=g))
    vb.copy_(torch.randn(vb.shape, generator=g))
    slots = [torch.randperm(kb.shape[0], generator=g)[:m].tolist() for _, m in lens]
    queries = [torch.randn(n, H, D, generator=g) for n, _ in lens]

    def run(order):
        qo_lens = [lens[s][0] for s in order]
        meta = AttentionMetadata.build(qo_lens, [slots[s] for s in order], [0] * sum(qo_lens), "cpu")
        be = TorchAttentionBackend()
        o = be.forward(torch.cat([queries[s] for s in order]), meta, be.plan(meta, num_heads=H, head_dim=D),
                       pool, 0, D ** -0.5)
        qo = meta.qo_indptr_host
        return {s: o[qo[i]:qo[i + 1]] for i, s in enumerate(order)}

    out = []
    with invariant.batch_invariant_mode(True):
        for s in (1, 5):
            alone = run([s])[s]
            out.append(digest(alone))
            for order in ([s] + [t for t in range(len(lens)) if t != s], list(range(len(lens)))[::-1]):
                if not torch.equal(run(order)[s], alone):
                    problems.append(f"attention: sequence {s} in the stage {order} differs from it alone")
    return out


def main(out_path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    import dist_worker as W

    problems: list[str] = []
    res = {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
           "mkl": mkl_code_path(), "ops": op_checks(problems)}
    models = {f: W.make_model(f) for f in ("opt", "llama")}
    res["cases"] = {name: digest_case(W.run_case(models[W.family_of_case(name)], par, task, q, n, batch_invariant=True))
                    for name, par, task, q, n in W.INVARIANT_CASES}
    res["problems"] = problems
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
