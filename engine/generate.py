"""Text generation and prompt scoring for serving: incremental decoding over the paged KV cache.

A training forward needs one layer's K/V at a time (engine/attention.py: KVPool with one buffer);
decoding keeps every layer's K/V for the next step, so it runs on a pool of its own with one buffer
per layer. Sequence s owns the slots [start_s, start_s + prompt_s + max_tokens): the prefill writes
the prompt's slots, and each decode step feeds one new token per sequence whose page table lists all
of the sequence's earlier slots and then its own (AttentionMetadata's bottom-right causal mask with
qo_len 1). Only CausalLM's public pieces are used (prepare, forward, head, build_batch), so every
model family decodes the same way.

    prompt_logprobs(model, sequences, adapter, top=N)   what model.token_logprobs computes, bit for
                                                        bit, plus the top-N of every distribution
    generate(model, prompts, adapter, max_tokens=...)   greedy at temperature 0, seeded sampling
                                                        otherwise
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from flashzo.kernels import Segments
from flashzo.kernels.errors import InputError

from . import invariant
from .attention import AttentionMetadata, KVPool
from .batch import Copy, LoRABatch, ModelInputs, stack_weights
from .example import Example, check_sequences
from .lora import LoRAAdapter
from .model import CausalLM

MAX_TOP_LOGPROBS = 20


@dataclass
class ScoredPrompt:
    """log p(tok[i+1] | tok[:i+1]) of a sequence, and the top-N next tokens at each of its positions."""

    logprobs: torch.Tensor  # [len-1] float32, equal to model.token_logprobs
    top_ids: torch.Tensor  # [len-1, N] int64 (N = 0: none asked for)
    top_logprobs: torch.Tensor  # [len-1, N] float32


@dataclass
class Generation:
    """What generate() produced for one prompt."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p of each token under the model (temperature 1)
    top_ids: list[list[int]] = field(default_factory=list)  # per token: the top-N token ids
    top_logprobs: list[list[float]] = field(default_factory=list)
    finish_reason: str = "length"  # "length" (max_tokens reached) or "stop" (a stop token)


def _check_top(top: int) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InputError(f"top logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {top!r}")
    return top


@torch.no_grad()
def prompt_logprobs(model: CausalLM, sequences: Sequence[Sequence[int]], adapter: LoRAAdapter | None = None, *,
                    top: int = 0, sharing: str = "all", logits_chunk: int = 1024) -> list[ScoredPrompt]:
    """model.token_logprobs(sequences, adapter) (the same batch, forward and logit chunks: the same
    bits), with the `top` most likely next tokens at every position besides."""
    check_sequences(sequences, model.limits)
    top = _check_top(top)
    examples = [Example(prompt=list(seq[:1]), target=list(seq[1:])) for seq in sequences]
    batch = model.build_batch(examples, [Copy()], adapters=[adapter] if adapter is not None else [], sharing=sharing,
                              checked=True)
    ctx = model.prepare(batch.inputs)
    x = model.forward(batch.inputs.input_ids, batch.inputs.positions, ctx)
    readout = batch.readout
    x = x[readout.rows]  # [U, h]
    R = readout.req_row.shape[0]
    lp = torch.empty(R, dtype=torch.float32, device=x.device)
    top_ids = torch.empty(R, top, dtype=torch.long, device=x.device)
    top_lp = torch.empty(R, top, dtype=torch.float32, device=x.device)
    for r0 in range(0, x.shape[0], logits_chunk):  # as CausalLM.readout_logprobs chunks them
        logits = model.head(x[r0:r0 + logits_chunk])  # [u, vocab]
        lse = torch.logsumexp(logits, dim=-1)
        sel = (readout.req_row >= r0) & (readout.req_row < r0 + logits_chunk)
        rows = readout.req_row[sel] - r0
        lp[sel] = logits[rows, readout.req_target[sel]] - lse[rows]
        if top:
            v, i = torch.topk(logits[rows], top, dim=-1)
            top_ids[sel], top_lp[sel] = i, v - lse[rows].unsqueeze(1)
    counts = torch.bincount(readout.req_group, minlength=readout.num_groups).tolist()
    return [ScoredPrompt(a.cpu(), b.cpu(), c.cpu()) for a, b, c in
            zip(torch.split(lp, counts), torch.split(top_ids, counts), torch.split(top_lp, counts))]


def decode_pool(model: CausalLM, capacity: int = 0) -> KVPool:
    """A KV pool whose K/V outlive the forward: one buffer per layer."""
    cfg = model.config
    return KVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype,
                  device=model.device, num_buffers=cfg.num_hidden_layers, capacity=capacity)


def _lora(adapter: LoRAAdapter | None, rows: int, device) -> LoRABatch | None:
    if adapter is None:
        return None
    segments = Segments.from_lists([rows], [0], [0], [0], device=device)  # sign 0: the plain LoRA forward
    return LoRABatch(stack_weights([adapter]), segments, 0.0, adapter.config.scaling)


def step_inputs(ids: list[int], positions: list[int], qo_lens: list[int], tables: list[list[int]],
                slots: list[int], adapter: LoRAAdapter | None, device) -> ModelInputs:
    """One decoding forward's inputs: sequence s feeds qo_lens[s] tokens (in order) that write `slots`
    and read its page table tables[s] (its earlier slots, then its new ones)."""
    lt = dict(dtype=torch.long, device=device)
    meta = AttentionMetadata.build(qo_lens, tables, slots, device)
    return ModelInputs(input_ids=torch.tensor(ids, **lt), positions=torch.tensor(positions, **lt), meta=meta,
                       trunk_meta=None, fork_layer=0, fork_index=None, lora=_lora(adapter, len(ids), device))


def check_decode_args(model: CausalLM, prompts, *, max_tokens, temperature, top_p, top) -> int:
    """Refuse a decode's arguments before any work (InputError naming the argument or the prompt);
    returns `top`."""
    check_sequences(prompts, model.limits, what="prompt")
    top = _check_top(top)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise InputError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and 0.0 <= temperature <= 100.0):
        raise InputError(f"temperature must be a number in [0, 100], got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be a number in (0, 1], got {top_p!r}")
    limit = model.limits
    for s, p in enumerate(prompts):
        if len(p) + max_tokens > limit.max_positions:
            raise InputError(f"prompt {s} ({len(p)} tokens) + max_tokens {max_tokens} is more than the model's "
                             f"{limit.positions}")
    return top


def token_logprobs_of(logits: torch.Tensor, tokens: Sequence[int], top: int) -> tuple[list[float], list, list]:
    """logits: [n, vocab] fp32, one chosen token per row -> (log p of each row's token, each row's top-N ids,
    their log-probs); log p = logit - logsumexp (engine/invariant.py's, as CausalLM.readout_logprobs)."""
    lse = invariant.logsumexp(logits)  # [n]
    rows = torch.arange(len(tokens), device=logits.device)
    lp = (logits[rows, torch.tensor(list(tokens), dtype=torch.long, device=logits.device)] - lse).tolist()
    if not top:
        return lp, [[] for _ in tokens], [[] for _ in tokens]
    tv, ti = torch.topk(logits, top, dim=-1)
    return lp, ti.tolist(), (tv - lse.unsqueeze(1)).tolist()


def choose_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  gens: Sequence[torch.Generator | None]) -> list[int]:
    """choose_token for every row of logits [n, vocab] (row i drawing from gens[i]); greedy in one argmax."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1).tolist()  # the first maximal index, as a row's argmax gives
    return [choose_token(logits[row], temperature, top_p, g) for row, g in enumerate(gens)]


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One decoding choice. logits: [vocab] fp32 -> a token id: the argmax at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top_p nucleus, from `gen`."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, i = torch.sort(probs, descending=True)
        keep = torch.cumsum(p, 0) - p < top_p  # the smallest head whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, i[keep], p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.no_grad()
def generate(model: CausalLM, prompts: Sequence[Sequence[int]], adapter: LoRAAdapter | None = None, *,
             max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             top: int = 0, stop_tokens: Sequence[int] = (), pool: KVPool | None = None) -> list[Generation]:
    """Continue every prompt by up to `max_tokens` tokens, all prompts decoding together.

    temperature 0: greedy (the argmax of each step's distribution); otherwise sampling from
    softmax(logits / temperature), restricted to the top_p nucleus, from a generator seeded with
    seed + prompt index (seed None: 0), so the same call gives the same tokens. A sequence stops
    early at a token of `stop_tokens` (which is kept). pool: a reusable decode_pool(model).
    """
    top = check_decode_args(model, prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top=top)
    out = [Generation() for _ in prompts]
    if max_tokens == 0 or not prompts:
        return out
    device = model.device
    lens = [len(p) for p in prompts]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n + max_tokens)
    pool = pool if pool is not None else decode_pool(model)
    pool.reserve(starts[-1])
    gens = [torch.Generator().manual_seed((0 if seed is None else int(seed)) + s) if temperature > 0 else None
            for s in range(len(prompts))]
    stop = set(int(t) for t in stop_tokens)

    # prefill: every prompt at once, each in its own slots
    ids = [int(t) for p in prompts for t in p]
    positions = [i for n in lens for i in range(n)]
    tables = [list(range(starts[s], starts[s] + n)) for s, n in enumerate(lens)]
    inputs = step_inputs(ids, positions, lens, tables, [x for t in tables for x in t], adapter, device)
    x = model.forward(inputs.input_ids, inputs.positions, model.prepare(inputs, pool=pool))
    ends = torch.tensor(lens).cumsum(0) - 1
    logits = model.head(x[ends.to(device)])  # [S, vocab]
    active = list(range(len(prompts)))
    cur = list(lens)
    for step in range(max_tokens):
        toks = choose_tokens(logits, float(temperature), float(top_p), [gens[s] for s in active])
        lps, top_ids, top_lps = token_logprobs_of(logits, toks, top)
        still = []
        for row, (s, tok) in enumerate(zip(active, toks)):
            g = out[s]
            g.tokens.append(tok)
            g.logprobs.append(lps[row])
            if top:
                g.top_ids.append(top_ids[row])
                g.top_logprobs.append(top_lps[row])
            if tok in stop:
                g.finish_reason = "stop"
            elif step + 1 < max_tokens:
                still.append(s)
        active = still
        if not active:
            break
        # decode: one new token per sequence; its page table is its earlier slots, then the new one
        ids = [out[s].tokens[-1] for s in active]
        positions = [cur[s] for s in active]
        tables = [list(range(starts[s], starts[s] + cur[s] + 1)) for s in active]
        slots = [starts[s] + cur[s] for s in active]
        inputs = step_inputs(ids, positions, [1] * len(active), tables, slots, adapter, device)
        logits = model.head(model.forward(inputs.input_ids, inputs.positions, model.prepare(inputs, pool=pool)))
        for s in active:
            cur[s] += 1
    return out
