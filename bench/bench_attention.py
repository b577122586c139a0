"""Attention over the paged KV pool: FlashInfer's paged prefill against flashzo's torch backend.

Per shape (a batch of prompts, each read by one-token candidates, as a classification step lays it
out; engine/attention.py), both backends run on the same pool and metadata: the error of each
against a float64 dense reference (max |o - ref|, and FlashInfer's within twice torch's own error
plus 1e-3, the tests' bound), and p20/p50/p80 ms of one layer's attention. On a CPU (or without
flashinfer) only the torch backend runs: `--smoke` checks the plumbing in seconds.

    python bench/bench_attention.py                 # on a GPU with flashinfer-python installed
    python bench/bench_attention.py --smoke         # CPU, tiny shapes

Writes bench/results/attention_<device>.{json,csv,md,png} (smoke: attention_smoke.*).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from flashzo.engine.attention import (  # noqa: E402
    AttentionMetadata,
    KVPool,
    TorchAttentionBackend,
    flashinfer_available,
    resolve_backend,
)

# (name, prompts, prompt length, candidates per prompt, heads, KV heads, head dim)
SHAPES = [
    ("sst2-like opt-1.3b", 32, 40, 2, 32, 32, 64),
    ("rte-like opt-1.3b", 32, 180, 2, 32, 32, 64),
    ("rte-like opt-13b", 32, 180, 2, 40, 40, 128),
    ("gqa llama-3.2-1b", 32, 180, 2, 32, 8, 64),
]
SMOKE_SHAPES = [("smoke", 3, 9, 2, 2, 2, 16), ("smoke gqa", 2, 7, 3, 4, 2, 16)]


def layout(prompts: int, plen: int, cands: int, device) -> tuple[AttentionMetadata, int]:
    """Each prompt computed once, then `cands` one-token candidates whose page table is the prompt + itself."""
    qo, tables, locs, row = [], [], [], 0
    for _ in range(prompts):
        prompt = list(range(row, row + plen))
        qo.append(plen)
        tables.append(prompt)
        locs.extend(prompt)
        row += plen
        for _ in range(cands):
            qo.append(1)
            tables.append(prompt + [row])
            locs.append(row)
            row += 1
    return AttentionMetadata.build(qo, tables, locs, device), row


def dense_reference(q, kb, vb, meta, scaling):
    """Per-sequence causal attention in float64 (bottom-right aligned), KV heads repeated: [T, H, D]."""
    q, kb, vb = q.double(), kb.double(), vb.double()
    group = q.shape[1] // kb.shape[1]
    out = torch.empty_like(q)
    qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
    idx = meta.kv_indices.long().cpu()
    for s in range(meta.num_seqs):
        n, m = qo[s + 1] - qo[s], kv[s + 1] - kv[s]
        slots = idx[kv[s]:kv[s + 1]]
        k = kb[slots].repeat_interleave(group, dim=1)
        v = vb[slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,mhd->hnm", q[qo[s]:qo[s + 1]], k) * scaling
        allowed = torch.arange(m).view(1, m) <= (m - n) + torch.arange(n).view(n, 1)
        out[qo[s]:qo[s + 1]] = torch.einsum("hnm,mhd->nhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v)
    return out


def bench_shape(shape, device, dtype, warmup, reps) -> dict:
    name, prompts, plen, cands, H, KV, D = shape
    meta, T = layout(prompts, plen, cands, device)
    g = torch.Generator().manual_seed(0)
    pool = KVPool(1, KV, D, dtype=dtype, device=device, capacity=T)
    k, v = (torch.randn(T, KV, D, generator=g) for _ in range(2))
    pool.write(0, torch.arange(T, device=device), k.to(device, dtype), v.to(device, dtype))
    q = torch.randn(T, H, D, generator=g).to(device, dtype)
    scale = D ** -0.5
    ref = dense_reference(q.cpu(), *(b.cpu() for b in pool.buffers(0)), meta, scale)
    row = dict(shape=name, prompts=prompts, prompt_len=plen, candidates=cands, heads=H, kv_heads=KV, head_dim=D,
               rows=T, dtype=str(dtype).replace("torch.", ""))
    backends = {"torch": TorchAttentionBackend()}
    if device.type == "cuda" and flashinfer_available():
        backends["flashinfer"] = resolve_backend("flashinfer", device=device)
    for bname, backend in backends.items():
        plan = backend.plan(meta, num_heads=H, num_kv_heads=KV, head_dim=D, dtype=dtype)
        out = backend.forward(q, meta, plan, pool, 0, scale)
        row[f"{bname}_max_err"] = (out.double().cpu() - ref).abs().max().item()
        t = harness.time_ms(lambda b=backend, p=plan: b.forward(q, meta, p, pool, 0, scale), device,
                            warmup=warmup, reps=reps)
        row.update({f"{bname}_{k}": v for k, v in t.items()})
    if "flashinfer" in backends:
        row["flashinfer_within_bound"] = row["flashinfer_max_err"] <= 2 * row["torch_max_err"] + 1e-3
        row["speedup"] = row["torch_p50_ms"] / row["flashinfer_p50_ms"]
    return row


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# Paged attention: FlashInfer vs the torch backend ({m['device']}, commit {m['commit']})", "",
             "| shape | rows | H/KV/D | dtype | torch p50 ms | flashinfer p50 ms | speedup | max err torch "
             "/ flashinfer |", "|---|---|---|---|---|---|---|---|"]

    def fmt(r, key, spec, suffix=""):
        return "-" if r.get(key) is None else f"{r[key]:{spec}}{suffix}"

    for r in results["rows"]:
        lines.append(f"| {r['shape']} | {r['rows']} | {r['heads']}/{r['kv_heads']}/{r['head_dim']} | {r['dtype']} | "
                     f"{fmt(r, 'torch_p50_ms', '.3f')} | {fmt(r, 'flashinfer_p50_ms', '.3f')} | "
                     f"{fmt(r, 'speedup', '.1f', 'x')} | {fmt(r, 'torch_max_err', '.1e')} / "
                     f"{fmt(r, 'flashinfer_max_err', '.1e')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["torch_p50_ms"] for r in rows], width=0.4, label="torch backend")
    if any("flashinfer_p50_ms" in r for r in rows):
        ax.bar([i + 0.2 for i in x], [r.get("flashinfer_p50_ms", 0) for r in rows], width=0.4, label="FlashInfer")
    ax.set_xticks(list(x), [r["shape"] for r in rows], rotation=15, fontsize=7)
    ax.set_ylabel("one layer's attention, p50 ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="q/k/v dtype (default bf16)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls (on CUDA: do_bench's budget in calls)")
    p.add_argument("--reps", type=int, default=50, help="timed calls (on CUDA: do_bench's budget in calls)")
    p.add_argument("--out", default=harness.RESULTS, help="output directory")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, 1 rep (CI)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = SHAPES
    if args.smoke:
        shapes, dtype, args.warmup, args.reps = SMOKE_SHAPES, torch.float32, 1, 2
    meta = harness.run_meta("attention", device, dtype=str(dtype).replace("torch.", ""),
                            flashinfer=device.type == "cuda" and flashinfer_available())
    rows = [bench_shape(s, device, dtype, args.warmup, args.reps) for s in shapes]
    meta["load_average_end"] = harness.load_average()
    stem = os.path.join(args.out, "attention_smoke" if args.smoke else f"attention_{harness.device_tag(meta)}")
    paths = harness.write_results(stem, {"meta": meta, "rows": rows}, markdown=markdown, plot=plot, echo=True)
    bad = [r["shape"] for r in rows if r.get("flashinfer_within_bound") is False]
    if bad:
        print(f"FlashInfer outside the error bound on: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)
    return paths


if __name__ == "__main__":
    main()
