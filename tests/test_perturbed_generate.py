"""engine/perturbed_generate.py: every copy of one batched decode generates what `generate` gives with
the explicitly perturbed adapter (adapter + sign * eps * z, z from trainer.perturbation).

For OPT and the Llama family (tests/conftest.py's family_models: peaky attention, so a decode step
that reads another copy's slots or a wrong position moves log-probs far past the tolerance; the
mutation tests at the bottom keep that checked):

- tokens identical, greedy and seeded sampling, with stop tokens (copies that stop early), prompts
  of different lengths (one of 1 token), a common prefix and a duplicate prompt;
- log-probs within twice the error of plain torch in fp32 (transformers with the perturbed adapter
  merged, fp32) against an fp64 reference (the same in fp64), plus 1e-6;
- in the batch-invariant mode: the bits of `generate`, tokens and log-probs;
- every sharing path (the prompts' radix tree, the trunk fork, copies sharing their rows below the
  fork) equal to the decode that shares nothing, and the sharing happens (rows counted).
"""

import copy

import pytest
import torch
from helpers import nonzero_adapter

from flashzo import LoRAConfig, MeZOConfig, MeZOTrainer
from flashzo.engine import Copy
from flashzo.engine import perturbed_generate as pg_mod
from flashzo.engine.generate import decode_pool, generate
from flashzo.engine.invariant import batch_invariant_mode
from flashzo.engine.perturbed_generate import generate_copies
from flashzo.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

FAMILIES = [("opt", "pre_ln"), ("llama", "gqa")]  # one per family (tests/helpers.py's FAMILY_CONFIGS)
PROMPTS = [[2, 17, 5, 9], [7], [2, 17, 5, 9, 33, 40, 41, 8, 12], [2, 17, 5, 60, 61], [2, 17, 5, 9]]
EPS = 0.05  # copies diverge from one another within a few tokens, but not all at once
ATOL = 1e-6


def trainer_for(model, q=3, seed=4):
    lora = LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"), layers=(1, 2))
    tr = MeZOTrainer(model, nonzero_adapter(model, lora, seed=seed), MeZOConfig(lr=0.0, eps=EPS, num_perturbations=q,
                                                                               seed=seed))
    tr.counters.step = 3  # any step: its seeds are a pure function of it
    return tr


def explicit_adapter(tr, c: int):
    """adapter + sign * eps * z of copy c of the trainer's current step, z from trainer.perturbation."""
    cp = tr.copies()[c]
    z = tr.perturbation(tr.step_count, c // 2)
    flat = torch.cat([z[k].flatten() for k in tr.adapter.named_tensors()])
    ad = tr.adapter.clone()
    ad.buffer.copy_(tr.adapter.buffer + cp.sign * tr.config.eps * flat)
    return ad


def hf_with(hf, adapter, dtype):
    """The transformers model in `dtype` with the adapter merged: W += scaling * B A."""
    m = copy.deepcopy(hf).to(dtype)
    mods = dict(m.named_modules())
    named = adapter.named_tensors()
    with torch.no_grad():
        for key in named:
            if key.endswith("lora_A.weight"):
                path = key[len("base_model.model."):-len(".lora_A.weight")]
                a, b = named[key].to(dtype), named[key.replace("lora_A", "lora_B")].to(dtype)
                mods[path].weight += adapter.config.scaling * (b @ a)
    return m


@torch.no_grad()
def teacher_logprobs(m, prompt, tokens) -> torch.Tensor:
    seq = list(prompt) + list(tokens)
    lp = torch.log_softmax(m(input_ids=torch.tensor([seq])).logits[0], dim=-1)  # in the model's dtype
    pos = torch.arange(len(prompt) - 1, len(seq) - 1)
    return lp[pos, torch.tensor(tokens)].double()


def run_both(model, tr, **kw):
    got = generate_copies(model, PROMPTS, tr.adapter, tr.copies(), eps=tr.config.eps, **kw)
    refs = [generate(model, PROMPTS, explicit_adapter(tr, c), **kw) for c in range(len(tr.copies()))]
    return got, refs


@pytest.mark.parametrize("family,name", FAMILIES)
@pytest.mark.parametrize("sampled", [False, True])
def test_every_copy_equals_generate_with_the_perturbed_adapter(family_models, family, name, sampled):
    hf, model = family_models(family, name)
    tr = trainer_for(model)
    kw = dict(max_tokens=7, temperature=1.3, top_p=0.9, seed=21) if sampled else dict(max_tokens=7)
    free, _ = run_both(model, tr, **kw)
    stop = free[1][0].tokens[2]  # copy 1 of prompt 0 stops at its third token; others at other places or never
    kw["stop_tokens"] = [stop]
    got, refs = run_both(model, tr, **kw)
    reasons = set()
    worst, torch_err = 0.0, 0.0
    for c, ref in enumerate(refs):
        hf64, hf32 = hf_with(hf, explicit_adapter(tr, c), torch.float64), hf_with(hf, explicit_adapter(tr, c),
                                                                                   torch.float32)
        for p, prompt in enumerate(PROMPTS):
            g = got[c][p]
            assert g.tokens == ref[p].tokens and g.finish_reason == ref[p].finish_reason, (c, p)
            reasons.add(g.finish_reason)
            ref64 = teacher_logprobs(hf64, prompt, g.tokens)
            worst = max(worst, float((torch.tensor(g.logprobs, dtype=torch.float64) - ref64).abs().max()))
            torch_err = max(torch_err, float((teacher_logprobs(hf32, prompt, g.tokens) - ref64).abs().max()))
    assert reasons == {"stop", "length"}
    print(f"log-prob error against fp64: {worst:.3g}, plain torch fp32's: {torch_err:.3g}")
    assert worst <= 2 * torch_err + ATOL, (worst, torch_err)
    # the copies really differ (a decode that ignored the perturbation would pass the rest only if they did not)
    assert len({tuple(got[c][p].tokens) for c in range(len(refs)) for p in (0, 2)}) > 2


@pytest.mark.parametrize("family,name", FAMILIES)
def test_batch_invariant_mode_gives_generates_bits(family_models, family, name):
    _, model = family_models(family, name)
    tr = trainer_for(model, q=2)
    with batch_invariant_mode(True):
        for kw in (dict(max_tokens=6), dict(max_tokens=6, temperature=0.8, seed=3)):
            got, refs = run_both(model, tr, **kw)
            for c, ref in enumerate(refs):
                for p in range(len(PROMPTS)):
                    assert got[c][p].tokens == ref[p].tokens
                    assert got[c][p].logprobs == ref[p].logprobs  # bit for bit


def decode_rows(model, fn):
    """Rows each layer computed during fn(), summed over the forwards (engine/model.py's trace)."""
    model.trace = []
    try:
        fn()
        rows = {}
        for layer, module, n in model.trace:
            if module == "k_proj":  # not adapted: counted once per row
                rows[layer] = rows.get(layer, 0) + n
        return rows
    finally:
        model.trace = None


@pytest.mark.parametrize("family,name", FAMILIES)
@pytest.mark.parametrize("invariant", [False, True])
def test_sharing_paths_equal_sharing_nothing(family_models, family, name, invariant):
    _, model = family_models(family, name)
    tr = trainer_for(model)
    copies = tr.copies() + [Copy(0, tr.copies()[0].seed, 0)]  # and an unperturbed copy
    out = {}
    with batch_invariant_mode(invariant):
        for sharing in ("all", "none"):
            for fork in (True, False):
                def run(sharing=sharing, fork=fork):
                    out[sharing, fork] = generate_copies(model, PROMPTS, tr.adapter, copies, eps=1e-3, max_tokens=5,
                                                         sharing=sharing, fork=fork)

                out[sharing, fork, "rows"] = decode_rows(model, run)
    base = out["none", False]
    for key in (("all", True), ("all", False), ("none", True)):
        for c in range(len(copies)):
            for p in range(len(PROMPTS)):
                assert out[key][c][p].tokens == base[c][p].tokens
                if invariant:
                    assert out[key][c][p].logprobs == base[c][p].logprobs
                else:
                    assert out[key][c][p].logprobs == pytest.approx(base[c][p].logprobs, abs=1e-5)
    # layer 0 (below the adapter) runs once for every copy with the fork; copies that agree share decode rows
    prompt_rows = sum(len(p) for p in PROMPTS)  # the prefill's rows per copy with no sharing
    assert out["none", True, "rows"][0] == out["none", False, "rows"][0] - (len(copies) - 1) * prompt_rows
    assert out["all", True, "rows"][0] < out["none", True, "rows"][0]
    assert out["all", True, "rows"][2] == out["all", False, "rows"][2]  # adapted layers: every copy's own rows


@pytest.mark.parametrize("family,name", FAMILIES)
def test_odd_shapes(family_models, family, name):
    _, model = family_models(family, name)
    tr = trainer_for(model, q=1)
    for prompts, kw in (([[5]], dict(max_tokens=3)), (PROMPTS, dict(max_tokens=1)), ([[5, 6]], dict(max_tokens=0))):
        got = generate_copies(model, prompts, tr.adapter, tr.copies(), eps=EPS, pool=decode_pool(model), **kw)
        for c in range(2):
            ref = generate(model, prompts, explicit_adapter(tr, c), **kw)
            assert [g.tokens for g in got[c]] == [g.tokens for g in ref]
            assert all(len(g.tokens) == kw["max_tokens"] for g in got[c])
    # a copy whose first token is a stop token ends at once; the other copy goes on
    first = generate_copies(model, [[5, 6]], tr.adapter, tr.copies(), eps=EPS, max_tokens=4)
    got = generate_copies(model, [[5, 6]], tr.adapter, tr.copies(), eps=EPS, max_tokens=4,
                          stop_tokens=[first[0][0].tokens[0]])
    assert got[0][0].tokens == first[0][0].tokens[:1] and got[0][0].finish_reason == "stop"
    ref = generate(model, [[5, 6]], explicit_adapter(tr, 1), max_tokens=4, stop_tokens=[first[0][0].tokens[0]])
    assert got[1][0].tokens == ref[0].tokens


@pytest.mark.parametrize("call, match", [
    (lambda m, tr: generate_copies(m, [[]], tr.adapter, tr.copies(), eps=EPS, max_tokens=2), "prompt 0 is empty"),
    (lambda m, tr: generate_copies(m, [[2, 3]], tr.adapter, tr.copies(), eps=EPS, max_tokens=500), "positions"),
    (lambda m, tr: generate_copies(m, [[2, 3]], tr.adapter, [], eps=EPS, max_tokens=2), "copies is empty"),
    (lambda m, tr: generate_copies(m, [[2, 3]], tr.adapter, [Copy(0, 1, 2)], eps=EPS, max_tokens=2), "sign"),
    (lambda m, tr: generate_copies(m, [[2, 3]], None, tr.copies(), eps=EPS, max_tokens=2), "no adapter"),
    (lambda m, tr: generate_copies(m, [[2, 3]], tr.adapter, tr.copies(), eps=EPS, max_tokens=2, sharing="x"),
     "sharing"),
    (lambda m, tr: generate_copies(m, [[2, 3]], tr.adapter, tr.copies(), eps=EPS, max_tokens=2, prompt_seeds=[1, 2]),
     "prompt_seeds"),
])
def test_bad_arguments_are_refused(family_models, call, match):
    _, model = family_models("opt", "pre_ln")
    with pytest.raises(InputError, match=match):
        call(model, trainer_for(model))


# Mutation checks: a copy that reads another copy's prompt slots above the fork, or a decode step at a
# wrong position, must fail the comparison with generate.
@pytest.mark.parametrize("family,name", FAMILIES)
@pytest.mark.parametrize("mutation", ["copy 0's slots", "position + 1"])
def test_mutation_is_detected(family_models, family, name, mutation, monkeypatch):
    _, model = family_models(family, name)
    tr = trainer_for(model, q=2)
    if mutation == "copy 0's slots":
        monkeypatch.setattr(pg_mod._Decode, "signed_prompt_table", lambda self, s: list(self.prompt_table[s % self.P]))
    else:
        real = pg_mod._Decode.step
        monkeypatch.setattr(pg_mod._Decode, "step", lambda self, active, toks, cur, k: real(
            self, active, toks, [x + 1 for x in cur], k))
    got, refs = run_both(model, tr, max_tokens=4)
    worst = 0.0
    for c, ref in enumerate(refs):
        for p in range(len(PROMPTS)):
            n = min(len(ref[p].tokens), len(got[c][p].tokens))
            worst = max([worst] + [abs(a - b) for a, b in zip(got[c][p].logprobs[:n], ref[p].logprobs[:n])])
    assert worst > 1e3 * ATOL
