"""The paged KV pool, attention metadata and backends (engine/attention.py).

The torch backend is checked against dense per-sequence causal attention in fp64, the FlashInfer
backend's plan arguments against hand-written arrays (on a CPU, without flashinfer), and the
FlashInfer backend itself against the torch backend on a GPU where flashinfer is installed.
"""

import math

import pytest
import torch

from flashzo.engine import Copy, Example, OPTConfig, OPTModel
from flashzo.engine.attention import (
    AttentionMetadata,
    FlashInferAttentionBackend,
    KVPool,
    TorchAttentionBackend,
    flashinfer_plan_args,
    flashinfer_supports,
    force_backend,
    resolve_backend,
)
from flashzo.engine.batch import plan_batch


def random_meta(qo_lens, ctx_lens, *, shared, seed=0, device="cpu"):
    """Sequences whose page tables are `ctx_lens[s]` context slots then their own qo_lens[s] rows.

    Own rows are laid out first (slots 0..T), context slots are drawn from a pool of `shared` extra
    slots (so several sequences read the same slots) in random order, as a radix tree never would:
    the backend must follow the page table, not assume anything about slot order.
    """
    g = torch.Generator().manual_seed(seed)
    T = sum(qo_lens)
    tables, locs, row = [], [], 0
    for n, c in zip(qo_lens, ctx_lens):
        ctx = (T + torch.randperm(shared, generator=g)[:c]).tolist()
        own = list(range(row, row + n))
        tables.append(ctx + own)
        locs.extend(own)
        row += n
    return AttentionMetadata.build(list(qo_lens), tables, locs, device), T + shared


def dense_reference(q, kb, vb, meta, scaling, dtype=torch.float64):
    """Per-sequence causal attention in `dtype` (default fp64; bottom-right aligned): [T, H, D]."""
    q, kb, vb = q.to(dtype), kb.to(dtype), vb.to(dtype)
    out = torch.empty_like(q)
    qo, kv = meta.qo_indptr.tolist(), meta.kv_indptr.tolist()
    for s in range(len(qo) - 1):
        rows = slice(qo[s], qo[s + 1])
        slots = meta.kv_indices[kv[s]:kv[s + 1]].long()
        n, m = qo[s + 1] - qo[s], kv[s + 1] - kv[s]
        k, v = kb[slots], vb[slots]  # [m, H, D]
        scores = torch.einsum("nhd,mhd->hnm", q[rows], k) * scaling
        allowed = torch.arange(m).view(1, m) <= (m - n) + torch.arange(n).view(n, 1)
        scores = scores.masked_fill(~allowed, -math.inf)
        out[rows] = torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)
    return out


def fill_pool(pool, layer_id, num_slots, seed):
    g = torch.Generator().manual_seed(seed)
    kb, vb = pool.buffers(layer_id)
    kb[:num_slots] = torch.randn(num_slots, pool.num_heads, pool.head_dim, generator=g).to(kb)
    vb[:num_slots] = torch.randn(num_slots, pool.num_heads, pool.head_dim, generator=g).to(vb)


@pytest.mark.parametrize("qo_lens,ctx_lens", [
    ([1], [0]),  # a single token
    ([37, 1, 1, 5], [0, 36, 12, 3]),  # candidates of one token over long contexts
    ([130, 7, 1, 2, 19], [0, 130, 3, 60, 1]),
])
@pytest.mark.parametrize("max_chunk_elems", [1 << 22, 64, 1])
def test_torch_backend_matches_dense_fp64(qo_lens, ctx_lens, max_chunk_elems):
    H, D = 3, 16
    meta, num_slots = random_meta(qo_lens, ctx_lens, shared=max(max(ctx_lens), 1), seed=len(qo_lens))
    pool = KVPool(2, H, D, dtype=torch.float32, device="cpu", capacity=num_slots)
    fill_pool(pool, 1, num_slots, seed=1)
    q = torch.randn(meta.num_tokens, H, D, generator=torch.Generator().manual_seed(2))
    backend = TorchAttentionBackend(max_chunk_elems=max_chunk_elems)
    plan = backend.plan(meta)
    if max_chunk_elems == 1:
        assert len(plan) == len(qo_lens)  # one chunk per sequence
    o = backend.forward(q, meta, plan, pool, 1, D ** -0.5)
    ref = dense_reference(q, *pool.buffers(1), meta, D ** -0.5)
    torch.testing.assert_close(o.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("H,KV", [(6, 2), (6, 1), (9, 3), (4, 4)])
@pytest.mark.parametrize("max_chunk_elems", [1 << 22, 1])
def test_torch_backend_grouped_query_attention(H, KV, max_chunk_elems):
    """GQA / MQA: a pool of KV < H heads; query head h reads KV head h // (H / KV), as transformers'
    repeat_kv and FlashInfer map them (the reference expands K/V by that index explicitly)."""
    D = 8
    meta, num_slots = random_meta([37, 1, 5, 2], [0, 36, 12, 30], shared=40, seed=H + KV)
    pool = KVPool(2, KV, D, dtype=torch.float32, device="cpu", capacity=num_slots)
    fill_pool(pool, 0, num_slots, seed=5)
    q = 3 * torch.randn(meta.num_tokens, H, D, generator=torch.Generator().manual_seed(6))  # peaky scores
    backend = TorchAttentionBackend(max_chunk_elems=max_chunk_elems)
    o = backend.forward(q, meta, backend.plan(meta, num_heads=H, head_dim=D), pool, 0, D ** -0.5)
    kb, vb = pool.buffers(0)
    head = torch.arange(H) // (H // KV)
    ref = dense_reference(q, kb[:, head], vb[:, head], meta, D ** -0.5)
    # within twice the error of plain fp32 torch attention on the same inputs
    err32 = (dense_reference(q, kb[:, head], vb[:, head], meta, D ** -0.5, torch.float32).double() - ref).abs().max()
    assert (o.double() - ref).abs().max() <= 2 * err32 + 1e-7
    if KV not in (1, H):  # another mapping (head h -> h % KV) gives another result: the test can fail
        wrong = dense_reference(q, kb[:, torch.arange(H) % KV], vb[:, torch.arange(H) % KV], meta, D ** -0.5)
        assert (wrong - ref).abs().max() > 1e-2


def test_torch_backend_chunks_cover_every_row_once():
    meta, _ = random_meta([5, 1, 1, 9, 2, 1], [0, 4, 8, 2, 7, 0], shared=8)
    backend = TorchAttentionBackend(max_chunk_elems=40)
    plan = backend.plan(meta)
    assert len(plan) > 1
    rows = torch.cat([c.dst_rows for c in plan])
    assert sorted(rows.tolist()) == list(range(meta.num_tokens))


def test_torch_backend_does_not_pad_candidates_to_prompts():
    # 8 prompts of 200 tokens and 16 one-token candidates over them: two chunks, not one padded to 200.
    meta, _ = random_meta([200] * 8 + [1] * 16, [0] * 8 + [200] * 16, shared=200)
    chunks = TorchAttentionBackend().chunks(meta, num_heads=12, head_dim=64)
    assert sorted(max(q for q, _, _ in c) for c in chunks) == [1, 200]
    # The memory bound holds for the gathered K/V too: many candidates over long page tables split.
    meta, _ = random_meta([1] * 64, [199] * 64, shared=199)
    small = TorchAttentionBackend(max_chunk_elems=16 * 12 * (1 + 2 * 200) * 64)
    assert [len(c) for c in small.chunks(meta, num_heads=12, head_dim=64)] == [16] * 4


def test_metadata_rejects_bad_page_tables():
    with pytest.raises(ValueError, match="page table"):
        AttentionMetadata.build([3], [[0, 1]], [0, 1, 2], "cpu")
    with pytest.raises(ValueError, match="output slots"):
        AttentionMetadata.build([2], [[0, 1]], [0], "cpu")


# ------------------------------------------------------------------------------------------------
# FlashInfer's plan arguments, on a CPU


def test_flashinfer_plan_args_hand_example():
    # One prompt [11, 12, 13] with candidates [21] and [22, 23]; one copy; sharing="all".
    # Rows: prompt 0..2, candidate [21] row 3, candidate [22, 23] rows 4..5.
    ex = Example([11, 12, 13], candidates=[[21], [22, 23]], label=0)
    batch = plan_batch([ex], [Copy()], num_layers=2, device="cpu", sharing="all")
    meta = batch.inputs.meta
    args, kwargs = flashinfer_plan_args(meta, num_heads=4, head_dim=64, dtype=torch.bfloat16)
    qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo, num_kv, head_dim, page_size = args
    assert qo_indptr.tolist() == [0, 3, 4, 6]
    assert kv_indptr.tolist() == [0, 3, 7, 12]
    assert kv_indices.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 4, 5]
    assert last_page_len.tolist() == [1, 1, 1]
    for t in (qo_indptr, kv_indptr, kv_indices, last_page_len):
        assert t.dtype == torch.int32
    for t in (qo_indptr, kv_indptr, last_page_len):
        assert t.device.type == "cpu"  # plan reads them on the host
    assert (num_qo, num_kv, head_dim, page_size) == (4, 4, 64, 1)
    assert kwargs == dict(causal=True, sm_scale=64 ** -0.5, q_data_type=torch.bfloat16,
                          kv_data_type=torch.bfloat16)
    # ... and they are exactly what the torch backend reads.
    assert qo_indptr.tolist() == meta.qo_indptr.tolist() == meta.qo_indptr_host
    assert kv_indptr.tolist() == meta.kv_indptr.tolist() == meta.kv_indptr_host
    assert kv_indices.tolist() == meta.kv_indices.tolist()
    assert last_page_len.tolist() == [1] * meta.num_seqs  # page size 1: every last page holds one token


def test_flashinfer_plan_args_forked_batch():
    # Two prompts sharing [5, 6]; two copies forked at layer 1: the trunk stage is copy 0's layout.
    exs = [Example([5, 6, 7], candidates=[[8]]), Example([5, 6, 9], target=[10])]
    batch = plan_batch(exs, [Copy(sign=1), Copy(sign=-1)], num_layers=2, device="cpu")
    # Rows of a copy: [5, 6] 0..1, [7, 8] 2..3, [9, 10] 4..5 (the split happens after 6).
    trunk, _ = flashinfer_plan_args(batch.inputs.trunk_meta, num_heads=2, head_dim=64, dtype=torch.float16)
    assert trunk[0].tolist() == [0, 2, 4, 6]
    assert trunk[1].tolist() == [0, 2, 6, 10]
    assert trunk[2].tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5]
    assert trunk[3].tolist() == [1, 1, 1]
    signed, _ = flashinfer_plan_args(batch.inputs.meta, num_heads=2, head_dim=64, dtype=torch.float16)
    assert signed[0].tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert signed[1].tolist() == [0, 2, 6, 10, 12, 16, 20]
    assert signed[2].tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 6, 7, 8, 9, 6, 7, 10, 11]
    assert signed[3].tolist() == [1] * 6


def test_flashinfer_supports():
    assert flashinfer_supports(64, torch.bfloat16) and flashinfer_supports(128, torch.float16)
    assert not flashinfer_supports(80, torch.bfloat16)  # opt-2.7b: torch path
    assert not flashinfer_supports(64, torch.float32)  # FlashInfer's prefill has no fp32 kernels


# ------------------------------------------------------------------------------------------------
# The pool and the backend choice


def test_kv_pool_reserve_reuses_and_grows():
    pool = KVPool(4, 2, 8, dtype=torch.float32, device="cpu", num_buffers=1, capacity=100)
    assert pool.capacity >= 100 and len(pool.k) == 1
    assert pool.buffers(0)[0] is pool.buffers(3)[0]
    ptr = pool.k[0].data_ptr()
    pool.reserve(100)
    pool.reserve(10)
    assert pool.k[0].data_ptr() == ptr
    pool.reserve(101)
    assert pool.capacity >= 150  # grows by 1.5x at least
    serving = KVPool(4, 2, 8, dtype=torch.float32, device="cpu", num_buffers=4, capacity=8)
    assert serving.buffers(1)[0] is not serving.buffers(2)[0]


def test_kv_pool_write():
    pool = KVPool(1, 2, 4, dtype=torch.float32, device="cpu", capacity=10)
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    pool.write(0, torch.tensor([7, 2, 5]), k, v)
    assert torch.equal(pool.k[0][[7, 2, 5]], k) and torch.equal(pool.v[0][[7, 2, 5]], v)


def test_model_reuses_pool_across_batches():
    model = OPTModel.from_config(OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, ffn_dim=64, max_position_embeddings=64))
    model.set_attention_backend("torch")
    small = [Example([1, 2, 3], candidates=[[4], [5]])]
    model.score(model.build_batch(small * 3))
    pool = model._pool
    storage, capacity = pool.k[0].data_ptr(), pool.capacity
    model.score(model.build_batch(small, sharing="none"))
    assert model._pool is pool and pool.k[0].data_ptr() == storage and pool.capacity == capacity
    big = [Example(list(range(1, 40)), candidates=[[4], [5]])]
    batch = model.build_batch(big * 4, sharing="none")
    model.score(batch)
    assert model._pool is pool and pool.capacity >= batch.stats.num_tokens > capacity


def test_resolve_backend():
    assert isinstance(resolve_backend("torch"), TorchAttentionBackend)
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("xformers")
    with pytest.raises(ValueError):
        resolve_backend("flashinfer", device="cpu")
    assert isinstance(resolve_backend(device="cpu"), TorchAttentionBackend)
    try:
        force_backend("torch")
        assert isinstance(resolve_backend(device="cuda"), TorchAttentionBackend)
    finally:
        force_backend(None)
    with pytest.raises(ValueError):
        force_backend("xformers")


# ------------------------------------------------------------------------------------------------
# GPU: FlashInfer against the torch backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_matches_torch_backend(dtype):
    pytest.importorskip("flashinfer")
    H, D, dev = 4, 128, "cuda"
    meta, num_slots = random_meta([37, 1, 1, 130, 2, 9], [0, 36, 129, 5, 60, 0], shared=130, device=dev)
    pool = KVPool(2, H, D, dtype=dtype, device=dev, capacity=num_slots)
    fill_pool(pool, 0, num_slots, seed=3)
    q = torch.randn(meta.num_tokens, H, D, generator=torch.Generator().manual_seed(4)).to(dev, dtype)
    ref = dense_reference(q, *pool.buffers(0), meta, D ** -0.5)
    fi = FlashInferAttentionBackend(device=dev)
    plan = fi.plan(meta, num_heads=H, head_dim=D, dtype=dtype)
    assert plan[0] == "flashinfer"
    o_fi = fi.forward(q, meta, plan, pool, 0, D ** -0.5)
    th = TorchAttentionBackend()
    o_th = th.forward(q, meta, th.plan(meta), pool, 0, D ** -0.5)
    err_fi = (o_fi.double() - ref).abs().max().item()
    err_th = (o_th.double() - ref).abs().max().item()
    assert err_fi <= 2 * err_th + 1e-3, (err_fi, err_th)


@pytest.mark.gpu
@pytest.mark.parametrize("H,KV", [(8, 2), (8, 1)])
def test_flashinfer_grouped_query_attention_matches_dense(H, KV):
    pytest.importorskip("flashinfer")
    D, dev, dtype = 64, "cuda", torch.bfloat16
    meta, num_slots = random_meta([37, 1, 1, 130, 2], [0, 36, 129, 5, 60], shared=130, device=dev)
    pool = KVPool(2, KV, D, dtype=dtype, device=dev, capacity=num_slots)
    fill_pool(pool, 0, num_slots, seed=3)
    q = torch.randn(meta.num_tokens, H, D, generator=torch.Generator().manual_seed(4)).to(dev, dtype)
    kb, vb = pool.buffers(0)
    head = torch.arange(H, device=dev) // (H // KV)
    ref = dense_reference(q, kb[:, head], vb[:, head], meta, D ** -0.5)
    fi = FlashInferAttentionBackend(device=dev)
    plan = fi.plan(meta, num_heads=H, num_kv_heads=KV, head_dim=D, dtype=dtype)
    assert plan[0] == "flashinfer"
    o_fi = fi.forward(q, meta, plan, pool, 0, D ** -0.5)
    th = TorchAttentionBackend()
    o_th = th.forward(q, meta, th.plan(meta, num_heads=H, head_dim=D), pool, 0, D ** -0.5)
    err_fi, err_th = (o_fi.double() - ref).abs().max().item(), (o_th.double() - ref).abs().max().item()
    assert err_fi <= 2 * err_th + 1e-3, (err_fi, err_th)


@pytest.mark.gpu
def test_flashinfer_model_scores_match_torch_backend():
    pytest.importorskip("flashinfer")
    cfg = OPTConfig(vocab_size=101, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                    ffn_dim=512, max_position_embeddings=256)
    model = OPTModel.from_config(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    exs = [Example([1 + i % 90 for i in range(k, k + 40 + 7 * k)], candidates=[[3], [4, 5]]) for k in range(5)]
    model.set_attention_backend("torch")
    ref = model.score(model.build_batch(exs, [Copy(), Copy()]))
    model.set_attention_backend("flashinfer")
    batch = model.build_batch(exs, [Copy(), Copy()])
    out = model.score(batch)
    assert model.prepare(batch.inputs).stage(0)[1][0] == "flashinfer"
    model32 = OPTModel.from_config(cfg, seed=0, device="cuda")
    model32.set_attention_backend("torch")
    exact = model32.score(model32.build_batch(exs, [Copy(), Copy()]))
    err, err_ref = (out - exact).abs().max().item(), (ref - exact).abs().max().item()
    assert err <= 2 * err_ref + 1e-2, (err, err_ref)
