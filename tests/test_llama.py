"""The Llama family's own (engine/llama.py, engine/llama_config.py): configs, rotary sensitivity,
refusals, the sliding window, sharing under grouped-query attention, MeZO against transformers + PEFT.

Everything runs on a CPU in fp32 on small random models written by transformers (tests/helpers.py's
FAMILY_CONFIGS["llama"]: Llama with GQA, MQA, tied and untied heads, llama3 and linear rope scaling,
biases; Qwen2 with its q/k/v biases; Mistral with a sliding window and a head_dim that is not
hidden/heads). What every family shares (log-probabilities against transformers, PEFT adapters both
ways, preset shapes, a perturbed forward writing nothing) is tested in tests/test_family.py. The
random models are made sensitive (helpers.hf_llama: peaky attention), and
`test_random_model_is_sensitive` checks that those comparisons could fail: a 1% change of one
weight, rows' positions off by one, a rope base 1% off and a wrong KV-head mapping each move
log-probs by far more than the tolerance.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import (  # noqa: E402
    ATOL,
    FAMILY_CONFIGS,
    LONGEST,
    checkpoint_tensors,
    edit_json,
    hf_family_model,
    hf_llama,
    hf_logprobs,
    make_sequences,
    max_diff,
    write_checkpoint,
)

import flashzo  # noqa: E402
from flashzo.engine import Copy, Example, LlamaConfig, LlamaModel, LoRAAdapter, LoRAConfig, load_model, save_model  # noqa: E402
from flashzo.engine.model import ForwardContext  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf(name, seed=1, **extra):
    return hf_family_model("llama", name, seed=seed, **extra)


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS["llama"]))
def test_config_from_transformers(name):
    hf = _hf(name)
    cfg = LlamaConfig.from_hf(hf.config)
    assert cfg.num_key_value_heads == hf.config.num_key_value_heads
    c = hf.config
    assert cfg.head_dim == (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert LlamaConfig.from_hf(transformers.AutoConfig.for_model(**cfg.to_hf()).to_dict()) == cfg
    model = LlamaModel(cfg, device="meta")
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not (k == "lm_head.weight"
                                                                             and cfg.tie_word_embeddings)}
    assert {k: tuple(v.shape) for k, v in checkpoint_tensors(model).items()} == theirs
    assert cfg.num_parameters == sum(p.numel() for p in hf.parameters())


def _perturbed_logprobs(model, seqs, mutate):
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            mutate(model)
        return model.token_logprobs(seqs)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_random_model_is_sensitive(tmp_path, monkeypatch):
    """The comparisons above could fail: each of these mistakes moves log-probs by > 10x the tolerance."""
    hf = _hf("gqa")
    model = load_model(write_checkpoint(hf, tmp_path, "safetensors"))
    seqs = make_sequences(hf.config.vocab_size, longest=LONGEST["llama"])
    base = model.token_logprobs(seqs)
    assert max_diff(base, hf_logprobs(hf, seqs)) < ATOL
    attn = model.model.layers[1].self_attn
    k0, k1 = attn.qkv_proj.part_rows("k_proj")
    v0, v1 = attn.qkv_proj.part_rows("v_proj")
    D = model.config.head_dim

    def one_percent(m):  # 1% of one weight matrix (k_proj of layer 1)
        m.model.layers[1].self_attn.qkv_proj.weight[k0:k1] *= 1.01

    def swap_kv_heads(m):  # query head h reading the wrong KV head
        w = m.model.layers[1].self_attn.qkv_proj.weight
        for a, b in ((k0, k1), (v0, v1)):
            w[a:b] = torch.cat([w[a + D:b], w[a:a + D]])

    mistakes = {"1% of k_proj": one_percent, "swapped KV heads": swap_kv_heads}
    for what, mutate in mistakes.items():
        assert max_diff(_perturbed_logprobs(model, seqs, mutate), base) > 10 * ATOL, what
    inv_freq = model.model.rotary.inv_freq.clone()
    model.model.rotary.inv_freq = inv_freq * 1.01 ** -(torch.arange(inv_freq.numel()) / inv_freq.numel())
    model.model.rotary._cache = []
    assert max_diff(model.token_logprobs(seqs), base) > 10 * ATOL, "rope base 1% off"
    model.model.rotary.inv_freq, model.model.rotary._cache = inv_freq, []
    real = ForwardContext.positions  # rope is relative: a common shift changes nothing, a relative one must

    def offset(self, layer):
        p = real(self, layer)
        return p + (torch.arange(p.numel()) % 2)

    monkeypatch.setattr(ForwardContext, "positions", offset)
    assert max_diff(model.token_logprobs(seqs), base) > 10 * ATOL, "every other row's position off by one"


@pytest.mark.parametrize("name", ["gqa", "mqa_tied", "qwen2"])
def test_save_model_round_trip(tmp_path, name):
    hf = _hf(name)
    model = load_model(write_checkpoint(hf, tmp_path / "in", "safetensors"))
    save_model(model, tmp_path / "out")
    again = load_model(tmp_path / "out")
    for (n, p), (m, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    seqs = make_sequences(hf.config.vocab_size, seed=5, longest=41)
    assert max_diff(hf_logprobs(hf2, seqs), hf_logprobs(hf, seqs)) == 0.0


def test_dtype_and_load_model_dispatch(tmp_path):
    path = write_checkpoint(_hf("gqa"), tmp_path, "safetensors")
    model = flashzo.load_model(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and isinstance(model, flashzo.LlamaModel)
    with pytest.raises(ValueError, match="not an OPT config"):
        flashzo.load_opt(path)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

def test_presets_and_random_weights():
    assert LlamaConfig.from_name("HuggingFaceTB/SmolLM2-135M").num_key_value_heads == 3
    assert LlamaConfig.from_name("mistral-7b").position_limit[0] == 4096
    assert LlamaConfig.from_name("qwen2.5-0.5b").qkv_bias and not LlamaConfig.from_name("qwen2.5-0.5b").o_bias
    model = LlamaModel.from_config("llama-tiny", seed=0)
    again = LlamaModel.from_config("llama-tiny", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="unknown Llama-family preset"):
        LlamaConfig.from_name("llama-2-70b")


# --------------------------------------------------------------------------------------------------
# Refused configs and checkpoints
# --------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "rope type 'yarn'"),
    (dict(rope_scaling=dict(type="dynamic", factor=2.0), rope_parameters=None), "rope type 'dynamic'"),
    (dict(rope_scaling=dict(rope_type="longrope", factor=2.0)), "rope type 'longrope'"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0)), "lacks"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e4)}), "per layer type"),
]


@pytest.mark.parametrize("changes,match", BAD_CONFIGS)
def test_bad_configs_are_refused_by_name(tmp_path, changes, match):
    path = write_checkpoint(hf_llama(seed=0), tmp_path, "safetensors")
    edit_json(os.path.join(path, "config.json"), **changes)
    with pytest.raises(flashzo.InputError, match=match):
        load_model(path)


def test_sliding_window_limits_sequences(tmp_path):
    """Sequences within the window are exact (every key is inside it); a longer one is refused by name."""
    hf = hf_llama(seed=2, model_type="mistral", sliding_window=16)
    model = load_model(write_checkpoint(hf, tmp_path, "safetensors"))
    seq = list(range(3, 19))  # 16 tokens: the window
    assert max_diff(model.token_logprobs([seq]), hf_logprobs(hf, [seq])) < ATOL
    with pytest.raises(flashzo.InputError, match="sliding_window"):
        model.token_logprobs([seq + [5]])
    tr = flashzo.MeZOTrainer(model, LoRAConfig(r=1), flashzo.MeZOConfig(lr=1e-3))
    with pytest.raises(flashzo.InputError, match="16 positions .sliding_window"):
        tr.step([Example(seq, target=[5])])
    qwen = LlamaConfig.from_hf({**hf_llama(model_type="qwen2").config.to_dict(), "use_sliding_window": True,
                                "sliding_window": 16, "max_window_layers": 1, "layer_types": None})
    assert qwen.position_limit[0] == 16
    assert LlamaConfig.from_hf({**qwen.to_hf(), "use_sliding_window": False}).position_limit[0] == 128


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf("gqa")
    path = write_checkpoint(hf, tmp_path, "safetensors")
    file = os.path.join(path, "model.safetensors")
    good = load_file(file)
    key = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in good.items() if k != key}, file)
    with pytest.raises(flashzo.InputError, match=f"{key}.*missing"):
        load_model(path)
    save_file({**good, key: good[key][:8]}, file)  # one KV head instead of two
    with pytest.raises(flashzo.InputError, match=r"k_proj.weight' has shape \(8, 64\), but the config expects "
                                                 r"\(16, 64\)"):
        load_model(path)
    save_file({**good, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, file)
    with pytest.raises(flashzo.InputError, match="unexpected tensor 'model.layers.0.self_attn.rotary_emb"):
        load_model(path)
    save_file({k: v for k, v in good.items() if k != "lm_head.weight"}, file)  # untied: the head is needed
    with pytest.raises(flashzo.InputError, match="lm_head.weight.*missing"):
        load_model(path)
    save_file(good, file)
    edit_json(os.path.join(path, "config.json"), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(flashzo.InputError, match="not a model flashzo runs"):
        load_model(path)


# --------------------------------------------------------------------------------------------------
# Sharing: every path equals the computation that shares nothing
# --------------------------------------------------------------------------------------------------

def _examples(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    shot = toks(19)
    return [Example(shot + toks(5), candidates=[[5], [6, 7], [6]], label=1),
            Example(shot + toks(2), candidates=[[8, 9, 10], [11]], label=0),
            Example(toks(7), candidates=[[5], [6]], label=1),
            Example(shot[:9], target=shot[9:] + toks(4))]


@pytest.mark.parametrize("layers,targets", [((1, 2), SEVEN), ((0,), ("k_proj", "up_proj")),
                                            (None, ("q_proj", "v_proj"))])
def test_sharing_and_fork_equal_no_sharing(family_models, layers, targets):
    _, model = family_models("llama", "gqa")
    exs = _examples(model.config.vocab_size)
    ad = LoRAAdapter.init(LoRAConfig(r=4, target_modules=targets, layers=layers), model.config)
    ad.buffer.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    copies = [Copy(0, 11, 1), Copy(0, 11, -1), Copy(0, 12, 1), Copy(0, 12, -1)]
    kw = dict(adapters=[ad], eps=0.05)
    ref = model.score(model.build_batch(exs, copies, sharing="none", fork=False, **kw))
    for sharing in ("all", "candidates", "none"):
        for fork in (True, False):
            batch = model.build_batch(exs, copies, sharing=sharing, fork=fork, **kw)
            assert (batch.inputs.fork_index is not None) == fork
            model.trace = []
            try:
                out = model.score(batch)
                rows = {(layer, n): r for layer, n, r in model.trace}
            finally:
                model.trace = None
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            if fork:  # the fork layer's unadapted q/k/v ran once, on the trunk's rows
                low = ad.lowest_layer
                for n in ("q_proj", "k_proj", "v_proj"):
                    want = batch.stats.num_tokens if (low, n) in ad.slots else batch.stats.trunk_tokens
                    assert rows[(low, n)] == want, (n, rows[(low, n)])
    per_copy = ref.view(len(copies), -1)  # the copies differ: the comparison could fail
    assert (per_copy[0] - per_copy[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# MeZO: the trajectory equals the published algorithm on transformers + PEFT with flashzo's z
# --------------------------------------------------------------------------------------------------

def _peft_loss(pm, examples) -> float:
    """MeZO's objective on transformers + PEFT, each sequence alone (no padding): classification CE over
    the candidates' mean log-probs, or the token-weighted LM NLL (docs/design.md, "Losses")."""
    total, count = 0.0, 0
    for ex in examples:
        seqs = [(list(ex.prompt) + list(c), len(c)) for c in (ex.candidates or [ex.target])]
        scores = []
        for toks, n in seqs:
            lp = hf_logprobs(pm, [toks])[0][-n:].double()
            scores.append(lp.mean() if ex.candidates is not None else lp.sum())
            count += 0 if ex.candidates is not None else n
        if ex.candidates is not None:
            s = torch.stack(scores)
            total += float(torch.logsumexp(s, 0) - s[ex.label]) / len(examples)
        else:
            total -= float(scores[0])
    return total / count if count else total


@pytest.mark.parametrize("kind", ["classification", "lm"])
def test_mezo_trajectory_equals_published_algorithm(family_models, kind):
    hf, model = family_models("llama", "qwen2")
    exs = [e for e in _examples(model.config.vocab_size, seed=4) if (e.candidates is None) == (kind == "lm")]
    if kind == "lm":
        exs = exs + [Example([5, 6, 7], target=[8, 9, 10, 11, 12])]
    lora = LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "k_proj", "o_proj", "up_proj"), layers=(1, 2), seed=3)
    eps, lr = 1e-2, 5e-2 if kind == "classification" else 1e-2
    tr = flashzo.MeZOTrainer(model, lora, flashzo.MeZOConfig(lr=lr, eps=eps, seed=9))
    gen = torch.Generator().manual_seed(1)
    for slot in tr.adapter.slots.values():
        slot.b.copy_(0.05 * torch.randn(slot.b.shape, generator=gen))
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(
        lora.target_modules), layers_to_transform=[1, 2], lora_dropout=0.0)).eval()
    params = {n.replace(".default.", "."): p for n, p in pm.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for k, v in tr.adapter.named_tensors().items():
            params[k].copy_(v)
    start = tr.adapter.buffer.clone()
    for t in range(3):
        z = tr.perturbation(t)
        theta = {k: p.detach().clone() for k, p in params.items()}
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(theta[k] + sign * eps * z[k])
            losses.append(_peft_loss(pm, exs))
        g = (losses[0] - losses[1]) / (2 * eps)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta[k] - lr * g * z[k])
        res = tr.step(exs)
        assert res.loss_plus[0] == pytest.approx(losses[0], abs=1e-5)
        assert res.loss_minus[0] == pytest.approx(losses[1], abs=1e-5)
        assert res.projected_grads[0] == pytest.approx(g, rel=1e-2, abs=1e-3)
    theirs = torch.cat([params[k].detach().flatten() for k in tr.adapter.named_tensors()])
    moved = (tr.adapter.buffer - start).norm()
    assert moved > 1e-3 and (tr.adapter.buffer - theirs).norm() / moved < 1e-2


def test_trainer_features_on_llama(tmp_path, family_models):
    """q > 1, resume and step_together work for the family as for OPT (tests/test_mezo.py)."""
    _, model = family_models("llama", "mqa_tied")
    exs = [e for e in _examples(model.config.vocab_size, seed=6) if e.candidates is not None]
    cfg = flashzo.MeZOConfig(lr=1e-2, eps=1e-2, num_perturbations=2, seed=4)
    lora = LoRAConfig(r=2, target_modules=("v_proj", "gate_proj"), layers=(1, 2))
    a = flashzo.MeZOTrainer(model, lora, cfg)
    a.step(exs)
    a.save(tmp_path / "ck")
    a.step(exs)
    b = flashzo.MeZOTrainer.resume(tmp_path / "ck", model)
    b.step(exs)
    assert torch.equal(a.adapter.buffer, b.adapter.buffer)
    c = flashzo.MeZOTrainer(model, lora, cfg)
    d = flashzo.MeZOTrainer(model, LoRAConfig(r=2, target_modules=("v_proj", "gate_proj"), layers=(1, 2), seed=1),
                            flashzo.MeZOConfig(lr=2e-2, eps=1e-2, seed=5))
    alone = [flashzo.MeZOTrainer(model, t.adapter.clone(), t.config) for t in (c, d)]
    together = flashzo.step_together([c, d], [exs[:2], exs[1:]])
    for tr, r, b in zip(alone, together, [exs[:2], exs[1:]]):
        assert tr.step(b).loss_plus == pytest.approx(r.loss_plus, abs=1e-5)

