"""Attention over a token-granular paged KV pool: the pool, the metadata, and two backends.

Page size is 1, as in SGLang: every token owns one slot per layer, and a sequence's attention reads
the slots its page table lists, in position order, its own new tokens last. Slots can be listed by
several sequences (a classification prompt read by its candidates, a common prefix read by many
prompts); that sharing is all in the page tables, the kernels never know about it.

Backends implement the same small interface and are resolved once:

    plan = backend.plan(meta, *, num_heads, num_kv_heads, head_dim, dtype, stage=0)   once per stage
    backend.forward(q, meta, plan, pool, layer_id, scaling) -> o                        once per layer

A plan is what the backend prepared for one stage's metadata; the model keeps it in the forward's
context (engine/model.py), never on the metadata or the batch. With grouped-query attention
(num_kv_heads < num_heads) query head h reads K/V head h // (num_heads // num_kv_heads).

`torch` is exact and runs anywhere (the reference). `flashinfer` uses FlashInfer's paged prefill on
CUDA (fp16/bf16, head_dim 64/128/256; anything else falls back to the torch path).
`resolve_backend()` picks flashinfer when CUDA and FlashInfer are present, torch otherwise; tests
force either with `resolve_backend("torch")` or `force_backend("torch")`.

NOTE: the FlashInfer backend is written against flashinfer-python 0.6.x's
`BatchPrefillWithPagedKVCacheWrapper` (plan(qo_indptr, paged_kv_indptr, paged_kv_indices,
paged_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal=, sm_scale=,
q_data_type=, kv_data_type=, and disable_split_kv= in the batch-invariant mode; the wrapper's
backend="fa2") then run(q, (k_cache, v_cache))) by reading its source. The arguments it hands to plan
are tested on a CPU (`flashinfer_plan_args`), and tests/test_attention.py has a GPU-marked test
comparing it with the torch backend (what has run on a GPU: docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flashzo.kernels.errors import InputError
from flashzo.kernels.serial import run_serial

from . import invariant


class KVPool:
    """K/V slots for `num_layers` layers: k[layer]: [capacity, H, D], likewise v.

    A MeZO step computes every token of its batch in one forward and never decodes, so a layer's K/V
    is dead once the layer is done. `num_buffers` physical layer buffers back the logical layers
    (layer i uses buffer i % num_buffers): 1 for training (the pool costs one layer's K/V, like an
    inference forward), `num_layers` for a cache that outlives the forward (serving).
    The pool is allocated once and only grows; it is reused across steps. Growing drops the old
    contents (a forward writes every slot it reads before reading it).
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str, num_buffers: int = 1, capacity: int = 0):
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.num_buffers = max(1, min(num_buffers, num_layers))
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` slots per layer (grows by at least 1.5x to amortise regrowth)."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, int(self.capacity * 1.5), 16)
        shape = (capacity, self.num_heads, self.head_dim)
        self.k = self.v = []  # free the old buffers before allocating the new ones
        self.k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_buffers)]
        self.v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_buffers)]
        self.capacity = capacity

    def buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer_id % self.num_buffers
        return self.k[i], self.v[i]

    def write(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [T, H, D] -> slots loc: [T]
        kb, vb = self.buffers(layer_id)
        kb.index_copy_(0, loc, k.to(kb.dtype))
        vb.index_copy_(0, loc, v.to(vb.dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class AttentionMetadata:
    """One forward stage's ragged queries over the pool (FlashInfer's paged-prefill vocabulary).

    Sequence s owns query rows qo_indptr[s]:qo_indptr[s+1] (rows of this stage, tokens in position
    order) and reads the slots kv_indices[kv_indptr[s]:kv_indptr[s+1]] (its page table). Its own new
    tokens are the last qo_len entries of its page table, so the causal mask is bottom-right aligned:
    query i attends page-table entries j <= kv_len - qo_len + i. Row t writes slot out_cache_loc[t].
    """

    qo_indptr: torch.Tensor  # [S+1] int32
    kv_indptr: torch.Tensor  # [S+1] int32
    kv_indices: torch.Tensor  # [nnz] int32
    out_cache_loc: torch.Tensor  # [T] int64
    qo_indptr_host: list[int] = field(default_factory=list)
    kv_indptr_host: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.qo_indptr_host) - 1

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr_host[-1]

    @classmethod
    def build(cls, qo_lens: list[int], page_tables: list[list[int]], out_cache_loc: list[int],
              device) -> "AttentionMetadata":
        if len(qo_lens) != len(page_tables):
            raise InputError(f"{len(qo_lens)} sequences but {len(page_tables)} page tables")
        qo_indptr = [0]
        for n in qo_lens:
            qo_indptr.append(qo_indptr[-1] + n)
        kv_indptr = [0]
        flat: list[int] = []
        for pt in page_tables:
            flat.extend(pt)
            kv_indptr.append(len(flat))
        for s, (n, pt) in enumerate(zip(qo_lens, page_tables)):
            if not 0 < n <= len(pt):
                raise InputError(f"sequence {s}: {n} new tokens and a page table of {len(pt)} slots "
                                 "(need 0 < new tokens <= slots)")
        if len(out_cache_loc) != qo_indptr[-1]:
            raise InputError(f"{len(out_cache_loc)} output slots for {qo_indptr[-1]} query rows")
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            qo_indptr=torch.tensor(qo_indptr, **i32),
            kv_indptr=torch.tensor(kv_indptr, **i32),
            kv_indices=torch.tensor(flat, **i32),
            out_cache_loc=torch.tensor(out_cache_loc, dtype=torch.int64, device=device),
            qo_indptr_host=qo_indptr,
            kv_indptr_host=kv_indptr,
        )


# --------------------------------------------------------------------------------------------------
# torch backend: exact, any device
# --------------------------------------------------------------------------------------------------

@dataclass
class _TorchChunk:
    q_rows: torch.Tensor  # [n, L] rows of q (padded entries point at the sequence's first row)
    dst_rows: torch.Tensor  # [m] rows of o written by this chunk (the valid entries of q_rows)
    q_valid: torch.Tensor  # [n, L] bool
    kv_slots: torch.Tensor  # [n, S] slots (padded entries point at the sequence's first slot)
    mask: torch.Tensor  # [n, 1, L, S] bool, True = attend


class TorchAttentionBackend:
    """Gathers each sequence's page table from the pool and runs masked SDPA, a few sequences at a time.

    Sequences are sorted by (new tokens, page-table length) and padded into chunks. A chunk of n
    sequences padded to L queries over S slots costs n*H*max(L*S, (L + 2*S)*D) elements (its score
    matrices, or its gathered q, k and v), kept under `max_chunk_elems`; a chunk also closes when its
    padded area n*L*S would exceed twice its sequences' own area (plus a little), so one-token
    candidates are not padded to a long prompt's length. Padded query rows attend to their
    sequence's first slot (never to nothing: no NaN) and are dropped; padded key slots are masked
    out, so the result is exact.

    Batch-invariant mode (engine/invariant.py): a padded key, masked out, still changes how SDPA
    blocks its reduction over keys (a sequence padded by one key can round differently), and SDPA's
    CPU kernel splits its work by the batch (one query row over 64 keys can round differently at 1
    and 8 sequences per call, with two threads); how many elements, for which shapes:
    bench/results/code_notes_cpu.md, "engine/attention.py TorchAttentionBackend". So every sequence
    is one call of exactly its own shape [1, H, qo_len, kv_len] on fresh copies of its q, K and V
    (`_InvariantPlan`): its result depends on them only. On a CPU each call runs single-threaded, the
    sequences in parallel (kernels/serial.py): SDPA's kernel splits its work by the thread count, and
    its GEMMs are MKL's.
    """

    name = "torch"

    def __init__(self, max_chunk_elems: int = 1 << 24, max_padding: float = 2.0):
        self.max_chunk_elems = max_chunk_elems
        self.max_padding = max_padding

    def chunks(self, meta: AttentionMetadata, num_heads: int = 1, head_dim: int = 1) -> list[list[tuple]]:
        """Groups of (qo_len, kv_len, seq) that share one padded SDPA call."""
        qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
        seqs = sorted((qo[s + 1] - qo[s], kv[s + 1] - kv[s], s) for s in range(meta.num_seqs)
                      if qo[s + 1] > qo[s])
        chunks, group, max_q, max_kv, area = [], [], 0, 0, 0
        for item in seqs:
            n, mq, mk = len(group) + 1, max(max_q, item[0]), max(max_kv, item[1])
            cost = n * num_heads * max(mq * mk, (mq + 2 * mk) * head_dim)
            padded = n * mq * mk > self.max_padding * (area + item[0] * item[1]) + 4096
            if group and (cost > self.max_chunk_elems or padded):
                chunks.append(group)
                group, mq, mk, area = [], item[0], item[1], 0
            group.append(item)
            max_q, max_kv, area = mq, mk, area + item[0] * item[1]
        if group:
            chunks.append(group)
        return chunks

    def plan(self, meta: AttentionMetadata, *, num_heads: int = 1, head_dim: int = 1, **_):
        if invariant.is_batch_invariant():
            return _InvariantPlan.of(meta)
        qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
        device = meta.qo_indptr.device
        kv_indices = meta.kv_indices.long()
        chunks = self.chunks(meta, num_heads, head_dim)
        planned = []
        for group in chunks:
            n, L, S = len(group), max(x[0] for x in group), max(x[1] for x in group)
            i = torch.arange(L).view(1, L, 1)
            j = torch.arange(S).view(1, 1, S)
            qlen = torch.tensor([x[0] for x in group]).view(n, 1, 1)
            klen = torch.tensor([x[1] for x in group]).view(n, 1, 1)
            mask = (j < klen) & (j <= klen - qlen + i)  # [n, L, S]
            q_rows = torch.zeros(n, L, dtype=torch.long)
            q_valid = torch.zeros(n, L, dtype=torch.bool)
            kv_pos = torch.zeros(n, S, dtype=torch.long)
            for g, (ql, kl, s) in enumerate(group):
                q_rows[g, :] = qo[s]
                q_rows[g, :ql] = torch.arange(qo[s], qo[s] + ql)
                q_valid[g, :ql] = True
                kv_pos[g, :] = kv[s]
                kv_pos[g, :kl] = torch.arange(kv[s], kv[s] + kl)
            planned.append(_TorchChunk(
                q_rows=q_rows.to(device), dst_rows=q_rows[q_valid].to(device), q_valid=q_valid.to(device),
                kv_slots=kv_indices[kv_pos.to(device)], mask=mask.unsqueeze(1).to(device),
            ))
        return planned

    def forward(self, q: torch.Tensor, meta: AttentionMetadata, plan, pool: KVPool,
                layer_id: int, scaling: float) -> torch.Tensor:
        # q: [T, H, D] -> o: [T, H, D]; the pool holds KV <= H heads (grouped-query attention)
        if isinstance(plan, _InvariantPlan):
            return plan.forward(q, pool, layer_id, scaling)
        kb, vb = pool.buffers(layer_id)
        group = q.shape[1] // kb.shape[1]
        o = torch.empty_like(q)
        for c in plan:
            qc = q[c.q_rows].transpose(1, 2)  # [n, H, L, D]
            kc = kb[c.kv_slots].transpose(1, 2).to(q.dtype)  # [n, KV, S, D]
            vc = vb[c.kv_slots].transpose(1, 2).to(q.dtype)
            # grouped-query attention: query head h reads KV head h // group; SDPA's enable_gqa does it
            # without copying K and V per query head (its bits and time against repeat_interleave's copies:
            # bench/results/code_notes_cpu.md, "engine/attention.py grouped-query attention")
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scaling, enable_gqa=group > 1)
            oc = oc.transpose(1, 2)  # [n, L, H, D]
            o[c.dst_rows] = oc[c.q_valid]
        return o


@dataclass
class _InvariantPlan:
    """The torch backend's plan in the batch-invariant mode: every sequence alone, at its own shape."""

    kv_slots: torch.Tensor  # [sum kv_len] the page tables, sequence after sequence
    seqs: list[tuple[int, int, int, int]]  # (first q_rows entry, qo_len, first kv_slots entry, kv_len)
    masks: list[torch.Tensor]  # per sequence [1, 1, qo_len, kv_len] bool, bottom-right causal

    @classmethod
    def of(cls, meta: AttentionMetadata) -> "_InvariantPlan":
        qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
        device = meta.qo_indptr.device
        seqs, masks, cache = [], [], {}
        for s in range(meta.num_seqs):  # every sequence has rows (AttentionMetadata.build): they tile the stage
            n, m = qo[s + 1] - qo[s], kv[s + 1] - kv[s]
            seqs.append((qo[s], n, kv[s], m))
            if (n, m) not in cache:
                allowed = torch.arange(m).view(1, m) <= (m - n) + torch.arange(n).view(n, 1)
                cache[(n, m)] = allowed.view(1, 1, n, m).to(device)
            masks.append(cache[(n, m)])
        return cls(kv_slots=meta.kv_indices.long(), seqs=seqs, masks=masks)

    def forward(self, q: torch.Tensor, pool: KVPool, layer_id: int, scaling: float) -> torch.Tensor:
        kb, vb = pool.buffers(layer_id)
        group = q.shape[1] // kb.shape[1]
        k_all = kb[self.kv_slots].to(q.dtype)  # [nnz, KV, D]: one gather for the stage
        v_all = vb[self.kv_slots].to(q.dtype)
        o = torch.empty_like(q)  # [T, H, D]

        def attend(s: int) -> None:  # one sequence, alone at its own shape
            (q0, n, k0, m), mask = self.seqs[s], self.masks[s]
            qs = _fresh(q[q0:q0 + n])  # [1, H, n, D]
            ks, vs = _fresh(k_all[k0:k0 + m]), _fresh(v_all[k0:k0 + m])  # [1, KV, m, D]
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling,
                                                 enable_gqa=group > 1)  # [1, H, n, D]
            o[q0:q0 + n] = out[0].transpose(0, 1)

        if q.device.type == "cpu":
            run_serial(attend, range(len(self.seqs)))
        else:
            for s in range(len(self.seqs)):
                attend(s)
        return o


def _fresh(x: torch.Tensor) -> torch.Tensor:
    # [n, H, D] rows of a bigger tensor -> [1, H, n, D] in new memory: the same layout and alignment
    # whatever the batch around it (a view's offset would depend on it)
    return x.transpose(0, 1).unsqueeze(0).clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# FlashInfer backend: CUDA
# --------------------------------------------------------------------------------------------------

FLASHINFER_HEAD_DIMS = (64, 128, 256)
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


def flashinfer_supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether FlashInfer's paged prefill covers this head dim and dtype (else the torch path runs)."""
    return head_dim in FLASHINFER_HEAD_DIMS and dtype in FLASHINFER_DTYPES


def flashinfer_plan_args(meta: AttentionMetadata, *, num_heads: int, head_dim: int, dtype: torch.dtype,
                         num_kv_heads: int | None = None, sm_scale: float | None = None,
                         batch_invariant: bool = False) -> tuple[tuple, dict]:
    """(args, kwargs) of BatchPrefillWithPagedKVCacheWrapper.plan for one stage (no flashinfer import).

    The three indptr-like arrays are int32 host tensors: plan reads them on the host anyway
    (`.to("cpu")`, a device sync if they lived on the GPU) and copies them to the device itself.
    The page indices stay on the metadata's device. Page size 1: every last page holds 1 token.
    batch_invariant: no split of a sequence's keys (disable_split_kv; see flashinfer_tile_classes).
    """
    i32 = dict(dtype=torch.int32, device="cpu")
    args = (
        torch.tensor(meta.qo_indptr_host, **i32),  # qo_indptr [S+1]
        torch.tensor(meta.kv_indptr_host, **i32),  # paged_kv_indptr [S+1]
        meta.kv_indices,  # paged_kv_indices [nnz] int32
        torch.ones(meta.num_seqs, **i32),  # paged_kv_last_page_len [S]
        num_heads,  # num_qo_heads
        num_kv_heads or num_heads,  # num_kv_heads (grouped-query attention: fewer than num_qo_heads)
        head_dim,  # head_dim_qk
        1,  # page_size
    )
    kwargs = dict(causal=True, sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                  q_data_type=dtype, kv_data_type=dtype)
    if batch_invariant:
        kwargs["disable_split_kv"] = True
    return args, kwargs


# FlashInfer's FA2 planner picks one query tile for a whole plan from the mean packed query length
# (qo_len * num_heads / num_kv_heads) of its sequences: 16 rows up to 16, 64 up to 64, 128 beyond
# (head_dim < 256, sm_80+), and the tile decides how the warps split the keys, hence the order of a
# row's softmax sums. A plan of sequences of one class has its mean in that class, so planning each
# class on its own makes every sequence's tile a function of its own length.
FA2_TILE_BOUNDS = (16, 64)


def flashinfer_tile_classes(meta: AttentionMetadata, group_size: int = 1) -> list[list[int]]:
    """The stage's sequences (indices, in order) grouped by FA2 query-tile class of their packed query
    length qo_len * group_size (group_size = num_heads // num_kv_heads), classes in increasing order."""
    qo = meta.qo_indptr_host
    classes: dict[int, list[int]] = {}
    for s in range(meta.num_seqs):
        n = (qo[s + 1] - qo[s]) * group_size
        classes.setdefault(sum(n > b for b in FA2_TILE_BOUNDS), []).append(s)
    return [classes[c] for c in sorted(classes)]


def sub_metadata(meta: AttentionMetadata, seqs: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """The metadata of some sequences of a stage (for attention only: no output slots), and their
    query rows in the stage: [rows] int64 on the metadata's device."""
    qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
    qo_ptr, kv_ptr, pages, rows = [0], [0], [], []
    for s in seqs:
        qo_ptr.append(qo_ptr[-1] + qo[s + 1] - qo[s])
        kv_ptr.append(kv_ptr[-1] + kv[s + 1] - kv[s])
        pages.append(meta.kv_indices[kv[s]:kv[s + 1]])
        rows.append(torch.arange(qo[s], qo[s + 1]))
    device = meta.qo_indptr.device
    i32 = dict(dtype=torch.int32, device=device)
    sub = AttentionMetadata(qo_indptr=torch.tensor(qo_ptr, **i32), kv_indptr=torch.tensor(kv_ptr, **i32),
                            kv_indices=torch.cat(pages), out_cache_loc=torch.empty(0, dtype=torch.int64, device=device),
                            qo_indptr_host=qo_ptr, kv_indptr_host=kv_ptr)
    return sub, torch.cat(rows).to(device)


class FlashInferAttentionBackend:
    """FlashInfer's batch prefill over the paged pool (NHD layout, page size 1, causal, bottom-right).

    One plan per forward stage (a wrapper per stage: the trunk stage and the signed stage of a forked
    batch are both planned before the forward runs); the same plan serves every layer of that stage.
    The softmax scale is fixed at plan time (FlashInfer's run() takes none); forward checks that the
    layer asks for the planned scale.

    Batch-invariant mode (engine/invariant.py): FlashInfer's FA2 kernels (backend="fa2", never the
    auto choice), one plan per query-tile class (flashinfer_tile_classes), no split of a sequence's
    keys (disable_split_kv): a row's reduction order is then fixed by its own sequence's length.
    tests/test_invariant.py has the GPU-marked check (what the mode has been verified on:
    docs/batch-invariance.md, "Where it does not hold").
    """

    name = "flashinfer"

    def __init__(self, workspace_bytes: int = 256 << 20, device: str | torch.device = "cuda"):
        import flashinfer  # noqa: F401  (fails here, not mid-forward, if missing)

        self._flashinfer = flashinfer
        # One float workspace for every wrapper: their runs are sequential on one stream.
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrappers: dict[int, object] = {}
        self._fallback = TorchAttentionBackend()

    def _wrapper(self, key):
        if key not in self._wrappers:
            kw = {"backend": "fa2"} if isinstance(key, tuple) else {}  # (stage, tile class): the invariant plans
            self._wrappers[key] = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", **kw)
        return self._wrappers[key]

    def plan(self, meta: AttentionMetadata, *, num_heads: int, head_dim: int, dtype: torch.dtype,
             num_kv_heads: int | None = None, stage: int = 0, sm_scale: float | None = None) -> tuple:
        if not flashinfer_supports(head_dim, dtype):
            # NOTE: FlashInfer's prefill kernels cover fp16/bf16 and these head dims; fp32 models and
            # opt-2.7b (head_dim 80) use the exact torch path instead.
            return ("torch", self._fallback.plan(meta, num_heads=num_heads, head_dim=head_dim))
        if invariant.is_batch_invariant():
            plans = []
            for c, seqs in enumerate(flashinfer_tile_classes(meta, num_heads // (num_kv_heads or num_heads))):
                sub, rows = sub_metadata(meta, seqs)
                args, kwargs = flashinfer_plan_args(sub, num_heads=num_heads, head_dim=head_dim, dtype=dtype,
                                                    num_kv_heads=num_kv_heads, sm_scale=sm_scale, batch_invariant=True)
                w = self._wrapper((stage, c))
                w.plan(*args, **kwargs)
                plans.append((w, kwargs["sm_scale"], rows))
            return ("flashinfer-classes", plans)
        args, kwargs = flashinfer_plan_args(meta, num_heads=num_heads, head_dim=head_dim, dtype=dtype,
                                            num_kv_heads=num_kv_heads, sm_scale=sm_scale)
        w = self._wrapper(stage)
        w.plan(*args, **kwargs)
        return ("flashinfer", (w, kwargs["sm_scale"]))

    def forward(self, q: torch.Tensor, meta: AttentionMetadata, plan: tuple, pool: KVPool, layer_id: int,
                scaling: float) -> torch.Tensor:
        kind, plan = plan
        if kind == "torch":
            return self._fallback.forward(q, meta, plan, pool, layer_id, scaling)
        kb, vb = pool.buffers(layer_id)
        kv = (kb.unsqueeze(1), vb.unsqueeze(1))  # pool: [capacity, H, D] -> pages of one token: [capacity, 1, H, D]
        if kind == "flashinfer-classes":
            o = torch.empty_like(q)
            for wrapper, sm_scale, rows in plan:
                _check_scale(scaling, sm_scale, layer_id)
                o[rows] = wrapper.run(q[rows].contiguous(), kv)
            return o
        wrapper, sm_scale = plan
        _check_scale(scaling, sm_scale, layer_id)
        return wrapper.run(q.contiguous(), kv)


def _check_scale(scaling: float, sm_scale: float, layer_id: int) -> None:
    if abs(scaling - sm_scale) > 1e-6 * sm_scale:
        raise InputError(f"layer {layer_id} asks for softmax scale {scaling}, the plan has {sm_scale}")


def flashinfer_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


_FORCED: str | None = None


def resolve_backend(name: str | None = None, device: torch.device | str | None = None):
    """The attention backend: `name` ("torch" | "flashinfer"), else the forced one, else the best one."""
    name = name or _FORCED
    dev = torch.device(device) if device is not None else None
    if name is None:
        on_cuda = dev is None or dev.type == "cuda"
        name = "flashinfer" if on_cuda and flashinfer_available() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "flashinfer":
        if dev is not None and dev.type != "cuda":
            raise InputError(f"attention backend 'flashinfer' needs a CUDA device, the model is on {dev}")
        if not flashinfer_available():
            raise InputError("attention backend 'flashinfer' needs CUDA and the flashinfer-python package")
        return FlashInferAttentionBackend(device=dev if dev is not None else "cuda")
    raise InputError(f"unknown attention backend {name!r}; choose 'torch' or 'flashinfer'")


def force_backend(name: str | None) -> None:
    """Force every later resolve_backend() call (tests); None restores automatic choice."""
    global _FORCED
    if name not in (None, "torch", "flashinfer"):
        raise InputError(f"unknown attention backend {name!r}")
    _FORCED = name
