"""Perturbed generation: a step's signed copies of an adapter continue a batch of prompts in one
batched incremental decode (docs/design.md, "Rewards on generated text").

    generate_copies(model, prompts, adapter, copies, eps=..., max_tokens=...) -> out[copy][prompt]

Copy c generates what `generate(model, prompts, adapter + sign_c * eps * z_c)` would (engine/generate.py),
without ever forming that adapter: the rows of the decode are (copy, prompt) sequences, copy-major,
so each copy is one segment of the perturbed LoRA kernel (its seed and sign; z regenerated inside
the kernel, never stored). What the copies have in common is computed once, as the scoring path
shares it (docs/design.md, "Sharing"):

- prefill: the prompts are laid out once per copy as a radix tree of token runs (engine/batch.py's
  TokenLayout: a common few-shot prefix or a duplicate prompt is computed once per copy), and the
  layers below the lowest adapted layer run once on an unsigned trunk that forks into the copies;
- decode: below the fork a row depends only on its tokens (the prompt and what was generated), so
  the copies of a prompt that generated the same tokens so far (greedy decoding under a small eps:
  most of them) share one trunk row and its K/V slots; from the fork layer on every copy computes
  its own rows.

KV slots. The pool has one buffer per layer. Layers below the fork are written only by the trunk and
the others only by the copies, so the trunk's slots and the copies' slots are two independent slot
spaces of the same pool: the trunk's prefill rows are slots [0, R) and its decode rows follow as they
appear; copy c's prefill rows are [c R, (c+1) R) and sequence s = c P + p owns max_tokens slots from
C R + s max_tokens on for what it generates.

In the batch-invariant mode (engine/invariant.py) each prompt has a tree of its own, and every row is
computed by row-invariant operations, so a copy's tokens and log-probs are the bits `generate` gives
with the explicitly perturbed adapter (tests/test_perturbed_generate.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from flashzo.kernels import Segments
from flashzo.kernels.errors import InputError

from . import invariant
from .attention import AttentionMetadata, KVPool
from .batch import Copy, LoRABatch, ModelInputs, TokenLayout, pack_projection, stack_weights
from .generate import Generation, check_decode_args, choose_tokens, decode_pool, token_logprobs_of
from .lora import LoRAAdapter
from .model import CausalLM

GENERATION_SHARING = ("all", "none")


class _LoRARows:
    """The adapter's matrices stacked and packed once per decode; one segment per copy, per forward."""

    def __init__(self, model: CausalLM, adapter: LoRAAdapter | None, copies: Sequence[Copy], eps: float):
        self.copies, self.eps, self.device = copies, float(eps), model.device
        self.weights = stack_weights([adapter]) if adapter is not None else None
        self.stacks = {}
        if adapter is not None:
            self.scaling = adapter.config.scaling
            for proj in model.projections:
                packed = pack_projection(self.weights, proj)
                if packed is not None:
                    self.stacks[proj] = packed

    def batch(self, rows_per_copy: Sequence[int]) -> LoRABatch | None:
        if self.weights is None:
            return None
        c = self.copies
        segments = Segments.from_lists(list(rows_per_copy), [0] * len(c), [x.seed for x in c], [x.sign for x in c],
                                       device=self.device)
        return LoRABatch(self.weights, segments, self.eps, self.scaling, self.stacks)


def _check_copies(copies, adapter) -> list[Copy]:
    copies = list(copies)
    if not copies:
        raise InputError("copies is empty")
    for i, c in enumerate(copies):
        if not isinstance(c, Copy):
            raise InputError(f"copies[{i}] is a {type(c).__name__}, not a flashzo.engine.Copy")
        if c.adapter != 0:
            raise InputError(f"copies[{i}] names adapter {c.adapter}; generate_copies decodes one adapter (index 0)")
        if c.sign not in (-1, 0, 1):
            raise InputError(f"copies[{i}] has sign {c.sign!r}; a sign is -1, 0 or +1")
        if c.sign != 0 and adapter is None:
            raise InputError(f"copies[{i}] is perturbed (sign {c.sign}) but no adapter was given")
    return copies


@torch.no_grad()
def generate_copies(model: CausalLM, prompts: Sequence[Sequence[int]], adapter: LoRAAdapter | None,
                    copies: Sequence[Copy], *, eps: float, max_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, prompt_seeds: Sequence[int] | None = None,
                    top: int = 0, stop_tokens: Sequence[int] = (), sharing: str = "all", fork: bool = True,
                    pool: KVPool | None = None, stats: dict | None = None) -> list[list[Generation]]:
    """Continue every prompt under every copy of `adapter` by up to `max_tokens` tokens, in one decode.

    copies: Copy(0, seed, sign) each (a step's 2q copies: MeZOTrainer.copies()); copy c's weights are
    adapter + sign * eps * z(seed), z regenerated inside the kernels. Returns `out[c][p]`, a Generation
    (tokens, their log-probs, finish_reason) as `generate` returns for one prompt: greedy at
    temperature 0; otherwise sampled from softmax(logits / temperature) in the top_p nucleus, with a
    generator seeded by prompt_seeds[p] (default seed + p, seed None: 0) for every copy of prompt p
    (common random numbers: two copies differ only where their distributions do). A sequence stops
    at a token of `stop_tokens` (kept in its tokens).

    sharing: "all" (the prompts' common token runs computed once per copy, and copies whose tokens
    agree share their rows below the fork) or "none" (every sequence on its own); fork: run the layers
    below the lowest adapted layer once for every copy (False: every copy runs every layer). Both are
    tested equal to the decode that shares nothing. pool: a reusable decode_pool(model). stats: a dict
    that receives the rows computed: "rows" (the copies' rows, prefill and decode), "trunk_rows" (rows
    below the fork) and "generated" (tokens generated).
    """
    top = check_decode_args(model, prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top=top)
    copies = _check_copies(copies, adapter)
    if sharing not in GENERATION_SHARING:
        raise InputError(f"sharing must be one of {GENERATION_SHARING}, got {sharing!r}")
    if adapter is not None and not adapter.fits(model.config):
        raise InputError("the adapter was made for a model of another shape")
    C, P = len(copies), len(prompts)
    if prompt_seeds is not None and len(prompt_seeds) != P:
        raise InputError(f"prompt_seeds has {len(prompt_seeds)} entries for {P} prompts")
    out = [[Generation() for _ in range(P)] for _ in range(C)]
    if max_tokens == 0 or P == 0:
        return out
    decode = _Decode(model, prompts, adapter, copies, eps=eps, max_tokens=max_tokens, sharing=sharing, fork=fork,
                     pool=pool)
    decode.run(out, temperature=float(temperature), top_p=float(top_p), top=top,
               seeds=[(0 if seed is None else int(seed)) + p for p in range(P)] if prompt_seeds is None
               else [int(s) for s in prompt_seeds], stop=set(int(t) for t in stop_tokens))
    if stats is not None:
        stats.update(rows=decode.rows, trunk_rows=decode.trunk_rows,
                     generated=sum(len(g.tokens) for row in out for g in row))
    return out


class _Decode:
    """One generate_copies call: the prefill's layout, the slots, and the per-step inputs."""

    def __init__(self, model, prompts, adapter, copies, *, eps, max_tokens, sharing, fork, pool):
        self.model, self.device = model, model.device
        self.C, self.P, self.M = len(copies), len(prompts), max_tokens
        self.prompts = [[int(t) for t in p] for p in prompts]
        self.lens = [len(p) for p in self.prompts]
        # In the batch-invariant mode a prompt's runs are never shared with another prompt's (engine/batch.py).
        self.layout = TokenLayout([(p, 0, toks, len(toks)) for p, toks in enumerate(self.prompts)], sharing,
                                  per_example=invariant.is_batch_invariant())
        self.R = self.layout.num_rows
        self.dedupe = sharing == "all"
        lowest = adapter.lowest_layer if adapter is not None else model.config.num_hidden_layers
        self.use_fork = fork and self.C > 1
        self.fork_layer = lowest if self.use_fork else 0
        self.lora = _LoRARows(model, adapter, copies, eps)
        self.pool = pool if pool is not None else decode_pool(model)
        self.gen0 = self.C * self.R  # first slot of the generated tokens' (copies' slot space)
        self.pool.reserve(self.gen0 + self.C * self.P * self.M)  # >= the trunk's R + C P M slots too
        # per prompt: its last token's row in a copy's block, its page table in copy 0's block (the trunk's)
        self.last_row, self.prompt_table = [], []
        for p, chain in enumerate(self.layout.chains):
            node, off = self.layout.locate(chain, self.lens[p] - 1)
            self.last_row.append(node.row + off)
            self.prompt_table.append(self.layout.page_table(chain[-1], 0)[:self.lens[p]])
        # the trunk's nodes: a token history below the fork; prompts with one page table share a node
        first: dict[tuple, int] = {}
        prompt_node = [first.setdefault(tuple(t), p) for p, t in enumerate(self.prompt_table)]
        self.trunk_tables: dict = {p: self.prompt_table[p] for p in set(prompt_node)}
        self.trunk_node: list = [prompt_node[s % self.P] for s in range(self.C * self.P)]  # per sequence
        self.next_trunk_slot = self.R
        self.rows, self.trunk_rows = 0, 0  # computed so far

    # The prefill ----------------------------------------------------------------------------------
    def prefill(self) -> torch.Tensor:
        """Every copy's prompts -> logits [C*P, vocab] at each (copy, prompt)'s last prompt token."""
        lay, C, R = self.layout, self.C, self.R
        node_lens = [len(n.tokens) for n in lay.nodes]
        ids = [t for n in lay.nodes for t in n.tokens]
        pos = [i for n in lay.nodes for i in range(n.start, n.start + len(n.tokens))]
        tables = [lay.page_table(n, c * R) for c in range(C) for n in lay.nodes]
        meta = AttentionMetadata.build(node_lens * C, tables, list(range(C * R)), self.device)
        trunk_meta, fork_index = None, None
        if self.use_fork:
            if self.fork_layer > 0:
                trunk_meta = AttentionMetadata.build(node_lens, tables[:len(lay.nodes)], list(range(R)), self.device)
            fork_index = torch.arange(R, device=self.device).repeat(C)
        else:
            ids, pos = ids * C, pos * C
        x = self._forward(ids, pos, meta, trunk_meta, fork_index, [R] * C)
        rows = [c * R + self.last_row[p] for c in range(C) for p in range(self.P)]
        return self.model.head(x[torch.tensor(rows, device=self.device)])

    # A decode step --------------------------------------------------------------------------------
    def step(self, active: list[int], tokens: list[int], cur: list[int], k: int) -> torch.Tensor:
        """Feed sequence s = active[j] its token tokens[j] at position cur[s] (its (k+1)-th generated token)
        -> logits [len(active), vocab]."""
        P, M = self.P, self.M
        tables, locs = [], []
        for s in active:
            g = self.gen0 + s * M
            tables.append(self.signed_prompt_table(s) + list(range(g, g + k + 1)))
            locs.append(g + k)
        meta = AttentionMetadata.build([1] * len(active), tables, locs, self.device)
        trunk_meta, fork_index = None, None
        if self.use_fork:
            rows: dict[tuple, int] = {}  # (parent node, token) -> this step's trunk row
            ids, pos, t_tables, t_locs, fork = [], [], [], [], []
            for s, tok in zip(active, tokens):
                key = (self.trunk_node[s], tok) if self.dedupe else (s,)
                if key not in rows:
                    rows[key] = len(ids)
                    slot = self.next_trunk_slot
                    self.next_trunk_slot += 1
                    node = ("t", k, rows[key])  # a new history: its parent's page table, then its slot
                    self.trunk_tables[node] = self.trunk_tables[self.trunk_node[s]] + [slot]
                    ids.append(tok)
                    pos.append(cur[s])
                    t_tables.append(self.trunk_tables[node])
                    t_locs.append(slot)
                fork.append(rows[key])
                self.trunk_node[s] = ("t", k, rows[key])
            if self.fork_layer > 0:
                trunk_meta = AttentionMetadata.build([1] * len(ids), t_tables, t_locs, self.device)
            fork_index = torch.tensor(fork, dtype=torch.long, device=self.device)
            self._drop_old_trunk_tables(k)
        else:
            ids, pos = list(tokens), [cur[s] for s in active]
        per_copy = [0] * self.C
        for s in active:
            per_copy[s // P] += 1
        return self.model.head(self._forward(ids, pos, meta, trunk_meta, fork_index, per_copy))

    def signed_prompt_table(self, s: int) -> list[int]:
        """Sequence s's prompt slots in its copy's block (the copies' slot space)."""
        base = (s // self.P) * self.R
        return [base + x for x in self.prompt_table[s % self.P]]

    def _drop_old_trunk_tables(self, k: int) -> None:
        # histories of step k-1 are never extended again: every live sequence now points at step k's
        live = set(self.trunk_node)
        for key in [key for key in self.trunk_tables if key not in live and isinstance(key, tuple)]:
            del self.trunk_tables[key]

    def _forward(self, ids, pos, meta, trunk_meta, fork_index, rows_per_copy) -> torch.Tensor:
        self.rows += meta.num_tokens
        self.trunk_rows += len(ids) if fork_index is not None else 0
        lt = dict(dtype=torch.long, device=self.device)
        inputs = ModelInputs(input_ids=torch.tensor(ids, **lt), positions=torch.tensor(pos, **lt), meta=meta,
                             trunk_meta=trunk_meta, fork_layer=self.fork_layer, fork_index=fork_index,
                             lora=self.lora.batch(rows_per_copy))
        return self.model.forward(inputs.input_ids, inputs.positions, self.model.prepare(inputs, pool=self.pool))

    # The loop -------------------------------------------------------------------------------------
    def run(self, out: list[list[Generation]], *, temperature: float, top_p: float, top: int, seeds: list[int],
            stop: set[int]) -> list[list[Generation]]:
        C, P = self.C, self.P
        gens = [torch.Generator().manual_seed(seeds[s % P]) if temperature > 0 else None for s in range(C * P)]
        cur = [self.lens[s % P] for s in range(C * P)]
        active = list(range(C * P))  # sequence s = c * P + p, copy-major: each copy one kernel segment
        logits = self.prefill()
        for k in range(self.M):
            toks = choose_tokens(logits, temperature, top_p, [gens[s] for s in active])
            lps, top_ids, top_lps = token_logprobs_of(logits, toks, top)
            still, fed = [], []
            for j, (s, tok) in enumerate(zip(active, toks)):
                g = out[s // P][s % P]
                g.tokens.append(tok)
                g.logprobs.append(lps[j])
                if top:
                    g.top_ids.append(top_ids[j])
                    g.top_logprobs.append(top_lps[j])
                if tok in stop:
                    g.finish_reason = "stop"
                elif k + 1 < self.M:
                    still.append(s)
                    fed.append(tok)
            active = still
            if not active:
                break
            logits = self.step(active, fed, cur, k)
            for s in active:
                cur[s] += 1
        return out
