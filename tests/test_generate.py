"""engine/generate.py: prompt scoring equals token_logprobs bit for bit; incremental decoding over the
paged KV cache equals scoring the whole sequence again (greedy = argmax, seeded sampling reproducible).

The model is helpers.hf_opt's (q/k scaled to 0.3: peaky attention), so a decode step that reads a
wrong slot or a wrong position moves its log-probs by far more than the tolerance; the mutation
tests at the bottom keep that checked.
"""

import pytest
import torch
from helpers import hf_opt, nonzero_adapter, write_checkpoint

from flashzo.engine import LoRAConfig, load_opt
from flashzo.engine import generate as gen_mod
from flashzo.engine.generate import decode_pool, generate, prompt_logprobs
from flashzo.errors import InputError

PROMPTS = [[2], [2, 17, 5, 9], [2, 17, 5, 9, 33, 40, 41, 8, 12], [2, 17, 5, 60, 61]]  # 1 token; a shared prefix
TOL = 1e-5  # the decode step's rows are a different GEMM shape than the full recompute's: fp32 rounding


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_opt(write_checkpoint(hf_opt(seed=5), tmp_path_factory.mktemp("gen") / "opt", "safetensors"))


@pytest.fixture(scope="module")
def adapter(model):
    return nonzero_adapter(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj", "fc1")), seed=3)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_prompt_logprobs_equal_token_logprobs(model, adapter, with_adapter):
    ad = adapter if with_adapter else None
    seqs = PROMPTS + [[2, 17, 5, 9, 33, 40, 41, 8, 12, 70, 71]]
    ref = model.token_logprobs(seqs, ad)
    got = prompt_logprobs(model, seqs, ad, top=3)
    for r, g, seq in zip(ref, got, seqs):
        assert torch.equal(r, g.logprobs)  # bit for bit: the same batch, forward and logit chunks
        assert g.top_ids.shape == (len(seq) - 1, 3)
        assert torch.all(g.top_logprobs[:, :-1] >= g.top_logprobs[:, 1:])
        assert torch.all(g.top_logprobs[:, 0] >= g.logprobs - 1e-6)
        hit = g.top_ids[:, 0] == torch.tensor(seq[1:])
        assert torch.allclose(g.top_logprobs[hit, 0], g.logprobs[hit])


def recompute(model, ad, prompt, gen):
    """The full-recompute log-probs and argmax of every generated position."""
    full = list(prompt) + gen.tokens
    scored = prompt_logprobs(model, [full], ad, top=1)[0]
    n = len(prompt) - 1
    return scored.logprobs[n:], scored.top_ids[n:, 0]


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_decoding_equals_full_recompute(model, adapter, with_adapter):
    ad = adapter if with_adapter else None
    outs = generate(model, PROMPTS, ad, max_tokens=7, top=2)
    for prompt, g in zip(PROMPTS, outs):
        assert len(g.tokens) == 7 and g.finish_reason == "length"
        lp, argmax = recompute(model, ad, prompt, g)
        assert g.tokens == argmax.tolist()  # greedy continuation = argmax of token_logprobs' distributions
        assert torch.allclose(torch.tensor(g.logprobs), lp, atol=TOL, rtol=0)
        assert [t[0] for t in g.top_ids] == g.tokens


def test_decoding_alone_equals_decoding_together(model, adapter):
    together = generate(model, PROMPTS, adapter, max_tokens=5)
    for prompt, g in zip(PROMPTS, together):
        alone = generate(model, [prompt], adapter, max_tokens=5, pool=decode_pool(model))[0]
        assert alone.tokens == g.tokens
        assert alone.logprobs == pytest.approx(g.logprobs, abs=TOL)


def test_seeded_sampling_is_reproducible(model, adapter):
    kw = dict(max_tokens=12, temperature=1.5, top_p=0.95)
    a = generate(model, PROMPTS[1:3], adapter, seed=11, **kw)
    b = generate(model, PROMPTS[1:3], adapter, seed=11, **kw)
    c = generate(model, PROMPTS[1:3], adapter, seed=12, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    for prompt, g in zip(PROMPTS[1:3], a):  # sampled tokens' log-probs are the model's too
        lp, _ = recompute(model, adapter, prompt, g)
        assert torch.allclose(torch.tensor(g.logprobs), lp, atol=TOL, rtol=0)


def test_stop_tokens_end_a_sequence(model):
    free = generate(model, [PROMPTS[2]], max_tokens=6)[0]
    stop = free.tokens[2]
    first = free.tokens.index(stop)
    g = generate(model, [PROMPTS[2]], max_tokens=6, stop_tokens=[stop])[0]
    assert g.tokens == free.tokens[:first + 1] and g.finish_reason == "stop"


@pytest.mark.parametrize("kw, match", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_tokens=2, top_p=0.0), "top_p"),
    (dict(max_tokens=2, top=21), "top logprobs"),
    (dict(max_tokens=60), "positions"),
])
def test_bad_arguments_are_refused(model, kw, match):
    with pytest.raises(InputError, match=match):
        generate(model, [PROMPTS[2]], **kw)
    with pytest.raises(InputError, match="vocabulary"):
        generate(model, [[2, 10_000]], max_tokens=1)


# Mutation checks: a decode step at a wrong position, or one that misses a slot of its page table,
# must fail the comparison above by far (the model's attention is peaky enough to show it).
def _mutated(monkeypatch, change):
    real = gen_mod.step_inputs

    def step_inputs(ids, positions, qo_lens, tables, slots, adapter, device):
        if all(n == 1 for n in qo_lens):  # decode steps only
            positions, tables = change(positions, tables)
        return real(ids, positions, qo_lens, tables, slots, adapter, device)

    monkeypatch.setattr(gen_mod, "step_inputs", step_inputs)


@pytest.mark.parametrize("change", [
    lambda pos, tables: ([p + 1 for p in pos], tables),  # position off by one
    lambda pos, tables: (pos, [t[1:] for t in tables]),  # the sequence's first slot not read
])
def test_mutation_is_detected(model, adapter, monkeypatch, change):
    _mutated(monkeypatch, change)
    worst = 0.0
    for prompt in PROMPTS[1:]:
        g = generate(model, [prompt], adapter, max_tokens=4)[0]
        lp, _ = recompute(model, adapter, prompt, g)
        worst = max(worst, float((torch.tensor(g.logprobs[1:]) - lp[1:]).abs().max()))
    assert worst > 100 * TOL
