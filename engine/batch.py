"""A step's data: one ragged, padding-free forward for everything a MeZO step computes.

A step scores its examples under 2q signed copies of the adapter (q SignedPairs). What the model
and the losses need is three explicit things (docs/design.md, "A step's data"):

- ModelInputs: what the forward reads (the trunk's token ids and positions, the attention
  metadata of each stage, the fork, the LoRA segments and weights);
- Readout: what the losses read (the rows that get logits, and for every scored token its row,
  its target and its group: a (copy, example, candidate) record);
- BatchStats: what the batch costs (tokens per copy, what sharing saved), for reports.

A batch is built by `CausalLM.build_batch` (engine/model.py), the one entry point: it checks the
examples against the model once and calls `plan_batch` here with the model's shape. The runtime
state a forward needs besides the batch (the KV pool, the attention backend and its plans) belongs
to the model (engine/model.py: CausalLM.prepare), never to the batch.

Every sequence a step needs (prompt + candidate for classification, prompt + target for LM) goes
into a radix tree of token runs, so a run shared by several sequences (a classification prompt
under its candidates, a few-shot prefix under many prompts, a duplicated prompt) is computed once
per copy; a node's page table lists its ancestors' slots, then its own. Copies are laid out
copy-major, so each copy is one segment of the perturbed LoRA kernel. Layers below the lowest
adapted layer are identical for every copy: they run once on an unsigned "trunk" copy and the
hidden states fork into the copies inside that layer, whose projections without an adapter also
run once on the trunk (docs/design.md, "Sharing"). Only the rows whose next-token distribution a
loss reads get logits. In the batch-invariant mode (engine/invariant.py) each example has a tree of
its own: a run shared with another example would split the example's sequences into other pieces,
and attention rounds a query row differently with another number of query rows in its call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from flashzo.kernels import LoRAPart, LoRAStack, Segments, stack_lora_parts
from flashzo.kernels.errors import InputError

from . import invariant
from .attention import AttentionMetadata
from .example import Example, Limits, check_examples
from .lora import LoRAAdapter

SHARING = ("all", "candidates", "none")


@dataclass(frozen=True)
class Copy:
    """One signed copy of the batch: which adapter, which perturbation seed, which sign."""

    adapter: int = 0
    seed: int = 0
    sign: int = 0


@dataclass(frozen=True)
class SignedPair:
    """The +eps and -eps copies of one perturbation: the unit of MeZO's two-sided difference."""

    seed: int
    adapter: int = 0

    @property
    def plus(self) -> Copy:
        return Copy(self.adapter, self.seed, +1)

    @property
    def minus(self) -> Copy:
        return Copy(self.adapter, self.seed, -1)


def pair_copies(pairs: Sequence[SignedPair]) -> list[Copy]:
    """The copies of some pairs, each pair's + then its - (the order pair_losses reads back)."""
    return [c for p in pairs for c in (p.plus, p.minus)]


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted matrix pair for every adapter of a batch, stacked once per batch."""

    a: torch.Tensor  # [n_adapters, r, in]
    b: torch.Tensor  # [n_adapters, out, r]
    a_offset: int  # flat index of A[0, 0] in the adapter's parameter space (z is indexed there)
    b_offset: int


# A stacked projection, as the batcher needs to know it: (layer, ((part name, first row, end row), ...)).
Projection = tuple[int, tuple[tuple[str, int, int], ...]]


@dataclass
class LoRABatch:
    """The adapters a forward applies: per adapted (layer, module) its weights; one segment per copy.

    stacks: per stacked projection of the model (keyed by its Projection), its adapted parts packed
    for the kernel's one-launch path (flashzo.kernels.stack_lora_parts), built once per batch.
    """

    weights: dict[tuple[int, str], LoRAWeights]
    segments: Segments  # over the signed rows, one per copy
    eps: float
    scaling: float
    stacks: dict[Projection, LoRAStack] = field(default_factory=dict)

    def stack(self, projection: Projection) -> LoRAStack | None:
        """The packed parts of `projection` that an adapter targets (None: none of them)."""
        if projection in self.stacks:
            return self.stacks[projection]
        return pack_projection(self.weights, projection)


@dataclass
class ModelInputs:
    """What CausalLM.forward reads: the trunk's tokens, each stage's attention metadata, the fork, LoRA."""

    input_ids: torch.Tensor  # [T0] trunk tokens (T0 = T without a fork)
    positions: torch.Tensor  # [T0]
    meta: AttentionMetadata  # the signed rows (all copies): layers >= fork_layer
    trunk_meta: AttentionMetadata | None  # the trunk: layers < fork_layer (None: no fork, or fork at 0)
    fork_layer: int  # the layer whose input is the trunk and whose output the signed rows
    fork_index: torch.Tensor | None  # [T] trunk row of each signed row (None: no fork)
    lora: LoRABatch | None

    @property
    def num_tokens(self) -> int:
        """Rows of the signed batch (all copies): what layers >= fork_layer compute."""
        return self.meta.num_tokens

    @property
    def trunk_tokens(self) -> int:
        """Rows of the trunk (0 without a fork): what layers < fork_layer compute."""
        return self.input_ids.numel() if self.fork_index is not None else 0

    def forks_at(self, layer_id: int) -> bool:
        return self.fork_index is not None and layer_id == self.fork_layer

    def stage(self, layer_id: int) -> AttentionMetadata:
        if self.trunk_meta is not None and layer_id < self.fork_layer:
            return self.trunk_meta
        return self.meta


class ReadoutGroup(NamedTuple):
    """The scored tokens of one sequence under one copy: a candidate, or an LM target."""

    copy: int
    example: int
    candidate: int  # 0 for an LM target


@dataclass
class Readout:
    """What the losses read: request k is log p(target[k]) at row rows[req_row[k]], of group req_group[k].

    Groups are ordered copy -> example -> candidate and a group's requests are contiguous, so every
    reduction over them is a segment sum in a fixed order (engine/loss.py).
    """

    rows: torch.Tensor  # [U] signed rows whose next-token log-probs are read (logits only there)
    req_row: torch.Tensor  # [R] index into rows
    req_target: torch.Tensor  # [R] token ids
    req_group: torch.Tensor  # [R] index into groups
    groups: list[ReadoutGroup]
    num_copies: int

    @property
    def num_groups(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class BatchStats:
    """What a batch costs, for reports and benchmarks (nothing here is read by the forward)."""

    num_copies: int
    num_layers: int
    tokens_per_copy: int  # rows one copy computes with this batch's sharing
    tokens_unshared: int  # what the same copy costs with no sharing at all
    num_tokens: int  # signed rows (all copies)
    trunk_tokens: int  # trunk rows (0 without a fork)
    fork_layer: int | None  # None: no fork

    @property
    def token_layers(self) -> int:
        """Token-layers the forward computes: sum over layers of the rows that layer runs on."""
        if self.fork_layer is None:
            return self.num_tokens * self.num_layers
        below = min(self.fork_layer, self.num_layers)
        return self.trunk_tokens * below + self.num_tokens * (self.num_layers - below)


@dataclass
class StepBatch:
    """One forward's inputs, what its losses read, and what it costs."""

    inputs: ModelInputs
    readout: Readout
    stats: BatchStats


class _Node:
    __slots__ = ("tokens", "children", "parent", "start", "row")

    def __init__(self, tokens: list[int], parent: "_Node | None", start: int):
        self.tokens = tokens
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.start = start  # position of tokens[0] in every sequence through this node
        self.row = -1  # first row of this node within a copy


class TokenLayout:
    """The token runs of one copy: a forest of nodes and, per sequence, the chain of nodes covering it
    (plan_batch's layout, and engine/perturbed_generate.py's for the prompts it prefills).

    A chain's last node may run past its sequence's end (a sequence that is a prefix of another
    reads the longer one's rows: causal attention makes them identical). Nodes are numbered parent
    first; node k's rows are row..row+len(tokens).
    """

    def __init__(self, seqs: list[tuple[int, int, list[int], int]], sharing: str, per_example: bool = False):
        self.root = _Node([], None, 0)
        self.seqs = seqs
        roots = [self.root]
        if sharing == "all":  # per_example: one tree per example, sharing only inside it
            trees: dict[int, _Node] = {}

            def tree(e: int) -> _Node:
                return trees.setdefault(e, _Node([], None, 0)) if per_example else self.root

            for e, _, toks, _ in seqs:
                self._insert(toks, tree(e))
            self.chains = [self._walk(toks, tree(e)) for e, _, toks, _ in seqs]
            roots = list(trees.values()) if per_example else roots
        elif sharing == "candidates":
            prompts: dict[int, _Node] = {}
            self.chains = []
            for e, _, toks, scored_from in seqs:
                if e not in prompts:
                    prompts[e] = self._add(toks[:scored_from], self.root, 0)
                self.chains.append([prompts[e], self._add(toks[scored_from:], prompts[e], scored_from)])
        else:
            self.chains = [[self._add(toks, self.root, 0)] for _, _, toks, _ in seqs]
        self.nodes: list[_Node] = []
        for root in roots:
            stack = list(reversed(root.children.values()))
            while stack:  # pre-order: a node's rows come after its ancestors'
                node = stack.pop()
                self.nodes.append(node)
                stack.extend(reversed(node.children.values()))
        row = 0
        for node in self.nodes:
            node.row, row = row, row + len(node.tokens)
        self.num_rows = row

    def _add(self, tokens: list[int], parent: _Node, start: int) -> _Node:
        node = _Node(tokens, parent, start)
        parent.children[len(parent.children)] = node  # no sharing: keyed by arrival, not by token
        return node

    def _insert(self, seq: list[int], root: _Node) -> None:
        node, i = root, 0
        while i < len(seq):
            child = node.children.get(seq[i])
            if child is None:
                node.children[seq[i]] = _Node(seq[i:], node, i)
                return
            m = 0
            while m < len(child.tokens) and i + m < len(seq) and child.tokens[m] == seq[i + m]:
                m += 1
            if m < len(child.tokens) and i + m < len(seq):  # diverges inside child: split it
                head = _Node(child.tokens[:m], node, child.start)
                node.children[seq[i]] = head
                child.tokens, child.start, child.parent = child.tokens[m:], child.start + m, head
                head.children[child.tokens[0]] = child
                child = head
            node, i = child, i + m

    @staticmethod
    def _walk(seq: list[int], root: _Node) -> list[_Node]:
        chain, node, i = [], root, 0
        while i < len(seq):
            node = node.children[seq[i]]
            chain.append(node)
            i += len(node.tokens)
        return chain

    @staticmethod
    def locate(chain: list[_Node], pos: int) -> tuple[_Node, int]:
        for node in chain:
            if node.start <= pos < node.start + len(node.tokens):
                return node, pos - node.start
        raise IndexError(pos)

    def page_table(self, node: _Node, base: int) -> list[int]:
        chain = []
        while node.parent is not None:  # up to its tree's root (which holds no tokens)
            chain.append(node)
            node = node.parent
        table = []
        for n in reversed(chain):
            table.extend(range(base + n.row, base + n.row + len(n.tokens)))
        return table


def build_batch(examples: Sequence[Example], copies: Sequence[Copy], *, num_layers: int, max_positions: int,
                vocab_size: int | None = None, device, **options) -> StepBatch:
    """Deprecated: use `CausalLM.build_batch` (model.build_batch(examples, copies, ...)), which knows the
    model's layers, limits, device and projections. This checks `examples` against `vocab_size` and
    `max_positions`, then builds the batch as plan_batch does; options: as CausalLM.build_batch's."""
    warnings.warn("flashzo.engine.build_batch is deprecated: use model.build_batch(examples, copies, ...)",
                  DeprecationWarning, stacklevel=2)
    limits = Limits(vocab_size if vocab_size is not None else 2**63, max_positions)
    check_examples(examples, limits, what="examples", training=False)
    return plan_batch(examples, copies, num_layers=num_layers, device=device, **options)


def plan_batch(examples: Sequence[Example], copies: Sequence[Copy], *, num_layers: int, device,
               adapters: Sequence[LoRAAdapter] = (), eps: float = 0.0, sharing: str = "all", fork: bool = True,
               examples_per_copy: Sequence[Sequence[int]] | None = None,
               projections: Sequence[Projection] = (), batch_invariant: bool | None = None) -> StepBatch:
    """The batch of examples an entry point has already checked (engine/example.py), for a model of
    `num_layers` layers on `device`: what CausalLM.build_batch returns (the arguments are its).

    projections: the model's stacked projections (CausalLM.projections); their adapted parts are
    packed for the kernel once here, not in every forward. Nothing here needs the model itself, so a
    batch's layout and cost can be planned for a shape without building its weights
    (bench/report_sharing.py does).
    batch_invariant: lay the batch out for the batch-invariant mode (sharing="all" shares runs only
    inside an example); None: the calling thread's mode (engine/invariant.py).
    """
    per_example = invariant.is_batch_invariant() if batch_invariant is None else batch_invariant
    if sharing not in SHARING:
        raise InputError(f"sharing must be one of {SHARING}, got {sharing!r}")
    if not copies:
        raise InputError("copies is empty")
    all_ex = tuple(range(len(examples)))
    per_copy = [tuple(e) for e in examples_per_copy] if examples_per_copy is not None else [all_ex] * len(copies)
    if len(per_copy) != len(copies):
        raise InputError(f"examples_per_copy has {len(per_copy)} entries for {len(copies)} copies")

    layouts: dict[tuple[int, ...], TokenLayout] = {}
    for ex_ids in per_copy:
        if ex_ids not in layouts:
            seqs = [(e, c, toks, scored_from) for e in ex_ids
                    for c, (toks, scored_from) in enumerate(examples[e].sequences())]
            layouts[ex_ids] = TokenLayout(seqs, sharing, per_example)

    same_layout = all(ex == per_copy[0] for ex in per_copy)
    lowest = min((a.lowest_layer for a in adapters), default=num_layers)
    use_fork = fork and same_layout and len(copies) > 1

    ids, pos, copy_start, qo_lens, tables, locs = [], [], [], [], [], []
    logit_rows: dict[int, int] = {}
    req_row, req_target, req_group, groups = [], [], [], []
    base = 0
    for ci, ex_ids in enumerate(per_copy):
        lay = layouts[ex_ids]
        copy_start.append(base)
        for node in lay.nodes:
            qo_lens.append(len(node.tokens))
            tables.append(lay.page_table(node, base))
            locs.extend(range(base + node.row, base + node.row + len(node.tokens)))
            if ci == 0 or not use_fork:  # with a fork only the trunk (copy 0's layout) is embedded
                ids.extend(node.tokens)
                pos.extend(range(node.start, node.start + len(node.tokens)))
        for (e, c, toks, scored_from), chain in zip(lay.seqs, lay.chains):
            g = len(groups)
            groups.append(ReadoutGroup(ci, e, c))
            for p in range(scored_from, len(toks)):
                node, off = lay.locate(chain, p - 1)  # the row whose output predicts token p
                r = base + node.row + off
                if r not in logit_rows:
                    logit_rows[r] = len(logit_rows)
                req_row.append(logit_rows[r])
                req_target.append(toks[p])
                req_group.append(g)
        base += lay.num_rows
    copy_start.append(base)

    meta = AttentionMetadata.build(qo_lens, tables, locs, device)
    trunk_meta, fork_index, fork_layer = None, None, 0
    if use_fork:
        # Every copy has copy 0's layout, so copy ci's row r is trunk row r - ci * trunk_rows.
        n0 = len(layouts[per_copy[0]].nodes)
        trunk_rows = layouts[per_copy[0]].num_rows
        if lowest > 0:
            trunk_meta = AttentionMetadata.build(qo_lens[:n0], tables[:n0], locs[:trunk_rows], device)
        fork_index = torch.arange(trunk_rows, device=device).repeat(len(copies))
        fork_layer = lowest

    lora = None
    if adapters:
        seg_lens = [copy_start[i + 1] - copy_start[i] for i in range(len(copies))]
        segments = Segments.from_lists(seg_lens, [c.adapter for c in copies], [c.seed for c in copies],
                                       [c.sign for c in copies], device=device)
        weights = stack_weights(adapters)
        stacks = {}
        for proj in projections:
            packed = pack_projection(weights, proj)
            if packed is not None:
                stacks[proj] = packed
        lora = LoRABatch(weights, segments, float(eps), adapters[0].config.scaling, stacks)

    lt = dict(dtype=torch.long, device=device)
    inputs = ModelInputs(input_ids=torch.tensor(ids, **lt), positions=torch.tensor(pos, **lt), meta=meta,
                         trunk_meta=trunk_meta, fork_layer=fork_layer, fork_index=fork_index, lora=lora)
    readout = Readout(rows=torch.tensor(list(logit_rows), **lt), req_row=torch.tensor(req_row, **lt),
                      req_target=torch.tensor(req_target, **lt), req_group=torch.tensor(req_group, **lt),
                      groups=groups, num_copies=len(copies))
    first = layouts[per_copy[0]]
    stats = BatchStats(num_copies=len(copies), num_layers=num_layers, tokens_per_copy=first.num_rows,
                       tokens_unshared=sum(len(toks) for _, _, toks, _ in first.seqs), num_tokens=meta.num_tokens,
                       trunk_tokens=inputs.trunk_tokens, fork_layer=fork_layer if use_fork else None)
    return StepBatch(inputs, readout, stats)


def stack_weights(adapters: Sequence[LoRAAdapter]) -> dict[tuple[int, str], LoRAWeights]:
    """Each adapted matrix of every adapter, stacked on a leading adapter axis, once per batch.

    One adapter needs no copy (views of its flat buffer). Several adapters (several jobs sharing a
    forward) must have one structure; their matrices are stacked here rather than in every
    projection of every forward. The stacked copies hold the adapters' values at build time: build
    a new batch after an update.
    """
    first = adapters[0]
    for j, ad in enumerate(adapters[1:], start=1):
        if ad.structure() != first.structure():
            raise InputError(f"adapter {j} has another structure (r, modules, layers) than adapter 0")
    out = {}
    for key, slot in first.slots.items():
        if len(adapters) == 1:
            a, b = slot.a.unsqueeze(0), slot.b.unsqueeze(0)
        else:
            a = torch.stack([ad.slots[key].a for ad in adapters])
            b = torch.stack([ad.slots[key].b for ad in adapters])
        out[key] = LoRAWeights(a, b, slot.a_offset, slot.b_offset)
    return out


def pack_projection(weights: dict[tuple[int, str], LoRAWeights], projection: Projection) -> LoRAStack | None:
    """The adapted parts of one stacked projection, packed for flashzo.kernels (None: no part adapted)."""
    layer, parts = projection
    adapted = [LoRAPart(start, stop, w.a, w.b, w.a_offset, w.b_offset)
               for name, start, stop in parts if (w := weights.get((layer, name))) is not None]
    return stack_lora_parts(adapted) if adapted else None

