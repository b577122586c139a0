"""Which LoRA each token of an SGLang forward batch uses, and the projection that applies it.

A forward batch is a run of requests, each owning `generate_sequence_lengths()` consecutive token
rows. Every request takes one route:

    base        no adapter                                  x @ W.T + b
    lora        an adapter served by SGLang's LoRA manager  + scaling * (x @ A.T) @ B.T      (sign 0)
                (request `lora_path`): its memory-pool slot, rank and scaling come from the LoRA
                backend's batch_info; A and B from the pool buffers the manager bound to the layer
    perturbed   a flashzo perturbation in the request id    + scaling * (x @ (A + s eps Z_A).T)
                (see request.py): the adapter is read by                  @ (B + s eps Z_B).T
                the plugin, fp32, in flashzo's flat layout

Requests with the same route key form a group; each group is one call of flashzo's
`perturbed_lora_linear` (segments = its requests, each with its own seed and sign), over the rows
of the group (gathered only when the batch holds more than one group).

Why the perturbed adapter does not come from SGLang's LoRA pool: LoRAManager.prepare_lora_batch
(sglang/srt/lora/lora_manager.py) hands the backend and layers only per-request pool slots, ranks and
scalings; which modules and layers an adapter targets (its PEFT config, hence every matrix's offset in
flashzo's flat z index) never reaches the model, and LoRAMemoryPool.init_buffers
(sglang/srt/lora/mem_pool.py) stores A and B in the model's dtype, while flashzo's perturbation is
defined on fp32 parameters. Plain (sign 0) LoRA serving needs neither, so it uses SGLang's pool.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flashzo.engine.lora import LoRAAdapter
from flashzo.errors import InputError
from flashzo.kernels import Segments, perturbed_lora_linear

from .request import Perturbation, parse_rid

ADAPTER_CACHE_SIZE = int(os.environ.get("FLASHZO_SGLANG_ADAPTER_CACHE", "8"))


class AdapterCache:
    """flashzo LoRAAdapters read from PEFT directories, one per (path, version), least recent evicted."""

    def __init__(self, model_config, device, capacity: int = ADAPTER_CACHE_SIZE):
        self.model_config, self.device, self.capacity = model_config, device, max(1, capacity)
        self._items: collections.OrderedDict[tuple[str, str], LoRAAdapter] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, p: Perturbation) -> LoRAAdapter:
        key = (p.adapter, p.version)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        adapter = LoRAAdapter.from_pretrained(p.adapter, self.model_config, device=self.device)
        with self._lock:
            self._items[key] = adapter
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return adapter


@dataclass
class Group:
    kind: str  # "base" | "lora" | "perturbed"
    rows: torch.Tensor | None  # [n] rows of the batch (None: all rows, in order)
    num_rows: int
    lens: list[int] = field(default_factory=list)  # tokens of each request of the group, in order
    slot: int = 0  # lora: memory-pool slot
    rank: int = 0  # lora: the slot adapter's rank
    scaling: float = 0.0  # lora / perturbed
    adapter: LoRAAdapter | None = None  # perturbed
    eps: float = 0.0  # perturbed
    segments: Segments | None = None  # lora / perturbed: over the group's rows


@dataclass
class Routes:
    num_rows: int
    groups: list[Group]

    @property
    def plain(self) -> bool:
        return all(g.kind == "base" for g in self.groups)


def _cpu_list(batch_info, name: str) -> list | None:
    t = getattr(batch_info, f"{name}_cpu", None)
    if t is None:
        t = getattr(batch_info, name, None)
    return None if t is None else [x for x in t.tolist()]


def request_slots(batch_info, lens: list[int]) -> list[int] | None:
    """Memory-pool slot of every request, read from a LoRA backend's batch_info (None: no LoRA batch)."""
    if batch_info is None:
        return None
    bs = len(lens)
    req = getattr(batch_info, "req_weight_indices", None)
    if req is not None:
        return [int(x) for x in req.tolist()[:bs]]
    weights, seg_lens = _cpu_list(batch_info, "weight_indices"), _cpu_list(batch_info, "seg_lens")
    num = int(getattr(batch_info, "num_segments", len(weights)))
    token_slot: list[int] = []
    for w, n in zip(weights[:num], seg_lens[:num]):
        token_slot.extend([int(w)] * int(n))
    perm = getattr(batch_info, "permutation", None)
    if perm is not None:  # segment order is a permutation of the token order
        order = perm.tolist()[:len(token_slot)]
        unpermuted = [0] * len(token_slot)
        for i, t in enumerate(order):
            unpermuted[t] = token_slot[i]
        token_slot = unpermuted
    slots, start = [], 0
    for n in lens:
        slots.append(token_slot[start] if n > 0 and start < len(token_slot) else 0)
        start += n
    return slots


def build_routes(forward_batch, num_rows: int, *, lora_backend, adapters: AdapterCache,
                 device) -> Routes:
    """Group the requests of `forward_batch` (num_rows token rows) by route."""
    from sglang.srt.lora.utils import generate_sequence_lengths

    rids = list(forward_batch.rids or [])
    perturbations = [parse_rid(r) for r in rids]
    batch_info = lora_backend.batch_info if lora_backend is not None else None
    if all(p is None for p in perturbations) and not getattr(batch_info, "has_active_lora", batch_info is not None):
        return Routes(num_rows, [Group("base", None, num_rows)])  # plain serving: no per-request work
    lens = [int(n) for n in generate_sequence_lengths(forward_batch, device="cpu").tolist()]
    perturbations = (perturbations + [None] * len(lens))[:len(lens)]
    rids = (rids + [None] * len(lens))[:len(lens)]
    slots = request_slots(batch_info, lens)
    ranks = _cpu_list(batch_info, "lora_ranks") if slots is not None else None
    scalings = _cpu_list(batch_info, "scalings") if slots is not None else None

    keyed: dict[tuple, Group] = {}
    order: list[tuple] = []
    row_lists: dict[tuple, list[int]] = {}
    seg_info: dict[tuple, list[tuple[int, int, int]]] = {}
    start = 0
    for i, n in enumerate(lens):
        p = perturbations[i]
        slot = slots[i] if slots is not None else 0
        rank = int(ranks[slot]) if ranks is not None else 0
        if p is not None:
            if rank > 0:
                raise InputError(f"request {rids[i]!r} names both a LoRA adapter (lora_path) and a flashzo "
                                 "perturbation; a perturbed request carries its adapter in its request id")
            key = ("perturbed", p.adapter, p.version, float(p.eps))
            if key not in keyed:
                adapter = adapters.get(p)
                keyed[key] = Group("perturbed", None, 0, adapter=adapter, eps=float(p.eps),
                                   scaling=adapter.config.scaling)
        elif rank > 0:
            key = ("lora", slot)
            if key not in keyed:
                keyed[key] = Group("lora", None, 0, slot=slot, rank=rank, scaling=float(scalings[slot]))
        else:
            key = ("base",)
            if key not in keyed:
                keyed[key] = Group("base", None, 0)
        if key not in row_lists:
            order.append(key)
            row_lists[key], seg_info[key] = [], []
        row_lists[key].extend(range(start, start + n))
        seg_info[key].append((n, p.seed if p is not None else 0, p.sign if p is not None else 0))
        keyed[key].lens.append(n)
        start += n
    if start < num_rows:  # padding rows (no request): base
        key = ("base",)
        if key not in keyed:
            keyed[key] = Group("base", None, 0)
            order.append(key)
            row_lists[key], seg_info[key] = [], []
        row_lists[key].extend(range(start, num_rows))
        seg_info[key].append((num_rows - start, 0, 0))

    groups = []
    for key in order:
        g, rows = keyed[key], row_lists[key]
        g.num_rows = len(rows)
        if not (len(order) == 1 and rows == list(range(num_rows))):
            g.rows = torch.tensor(rows, dtype=torch.long, device=device)
        if g.kind != "base":
            info = seg_info[key]
            g.segments = Segments.from_lists([n for n, _, _ in info], [0] * len(info),
                                             [s for _, s, _ in info], [sg for _, _, sg in info])
        groups.append(g)
    return Routes(num_rows, groups)


# --------------------------------------------------------------------------------------------------
# The projection
# --------------------------------------------------------------------------------------------------

def _pool_part(buffers: tuple[torch.Tensor, torch.Tensor], slot: int, rank: int, part: int,
               out: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [1, r, K], B [1, n, r]) fp32 of one part of a (possibly stacked) module in SGLang's pool.

    Stacked modules (qkv_proj) hold their parts' A matrices one after another along the rank axis,
    packed at the adapter's own rank (mem_pool.load_lora_weight_to_buffer), and their B matrices
    along the output axis.
    """
    a_buf, b_buf = buffers
    a = a_buf[slot, part * rank:(part + 1) * rank]  # [r, K]
    b = b_buf[slot, out[0]:out[1], :rank]  # [n, r]
    return a.unsqueeze(0).float(), b.unsqueeze(0).float()


def zo_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routes: Routes | None, *,
              layer_id: int, name: str, part: int, out: tuple[int, int],
              pool: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """y = x @ W.T + b plus each group's LoRA term: x [T, K] -> y [T, N] in x's dtype.

    weight/bias: this part's rows of the module (a view); pool: the module's (A_buffer, B_buffer)
    in SGLang's LoRA pool, None if SGLang's LoRA manager does not adapt it.
    """
    if routes is None or routes.plain:
        return F.linear(x, weight, bias)
    if len(routes.groups) == 1:
        return _group_linear(x, weight, bias, routes.groups[0], layer_id, name, part, out, pool)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for g in routes.groups:
        y[g.rows] = _group_linear(x[g.rows], weight, bias, g, layer_id, name, part, out, pool)
    return y


def _group_linear(x, weight, bias, g: Group, layer_id, name, part, out, pool) -> torch.Tensor:
    if g.kind == "perturbed":
        slot = g.adapter.slots.get((layer_id, name))
        if slot is None:
            return F.linear(x, weight, bias)
        return perturbed_lora_linear(x, weight, bias, slot.a.unsqueeze(0), slot.b.unsqueeze(0), g.segments,
                                     scaling=g.scaling, eps=g.eps, a_offset=slot.a_offset, b_offset=slot.b_offset)
    if g.kind == "lora" and pool is not None:
        a, b = _pool_part(pool, g.slot, g.rank, part, out)
        return perturbed_lora_linear(x, weight, bias, a, b, g.segments, scaling=g.scaling, eps=0.0,
                                     a_offset=0, b_offset=0)
    return F.linear(x, weight, bias)
