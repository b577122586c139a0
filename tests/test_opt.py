"""OPTModel against transformers and PEFT: log-probabilities, LoRA adapters both ways, presets, invariants.

Everything runs on a CPU in fp32 on small random models; the reference for a sequence is
transformers' OPTForCausalLM run on that sequence alone (no padding), log_softmax of its logits
gathered at the next tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import LAYOUTS, checkpoint_tensors, hf_logprobs, hf_opt, make_sequences, write_checkpoint  # noqa: E402

from flashzo.engine import (  # noqa: E402
    PRESETS,
    Copy,
    Example,
    LoRAAdapter,
    LoRAConfig,
    OPTConfig,
    OPTModel,
    load_opt,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

ATOL = 1e-4  # fp32 against fp32: both sides differ only in summation order

# transformers OPTConfig overrides of test_loading.TINY
CONFIGS = {
    "pre_ln": {},
    "post_ln_proj": dict(word_embed_proj_dim=16, do_layer_norm_before=False),  # opt-350m's shape
    "head_dim_80": dict(hidden_size=160, num_attention_heads=2, ffn_dim=96),  # opt-2.7b's head_dim
    "no_bias": dict(enable_bias=False),
    "no_ln_affine": dict(layer_norm_elementwise_affine=False),
    "no_final_ln_gelu": dict(_remove_final_layer_norm=True, activation_function="gelu"),
}


def assert_logprobs_close(ours, ref) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.dtype == torch.float32 and a.shape == b.shape, (i, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m, i=i: f"sequence {i}: {m}")


# --------------------------------------------------------------------------------------------------
# Log-probabilities equal transformers', from every checkpoint layout
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request):
    hf = hf_opt(seed=1, **CONFIGS[request.param])
    seqs = make_sequences(hf.config.vocab_size)
    return hf, seqs, hf_logprobs(hf, seqs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_match_transformers(tmp_path, reference, layout):
    hf, seqs, ref = reference
    model = load_opt(write_checkpoint(hf, tmp_path, layout))
    lp = model.token_logprobs(seqs)
    assert [t.shape[0] for t in lp] == [len(s) - 1 for s in seqs]
    assert_logprobs_close(lp, ref)


def test_config_from_transformers(reference):
    hf, _, _ = reference
    cfg = OPTConfig.from_hf(hf.config)
    d = hf.config
    assert cfg.has_projections == (d.word_embed_proj_dim != d.hidden_size)
    assert cfg.has_final_layer_norm == (hf.model.decoder.final_layer_norm is not None)
    assert cfg.head_dim == d.hidden_size // d.num_attention_heads
    assert OPTConfig.from_hf(cfg.to_hf()) == cfg
    model = OPTModel(cfg, device="meta")
    theirs = {k[len("model."):]: tuple(v.shape) for k, v in hf.state_dict().items() if k.startswith("model.")}
    assert {k: tuple(v.shape) for k, v in checkpoint_tensors(model).items()} == theirs
    assert cfg.num_parameters == sum(p.numel() for p in hf.parameters())  # lm_head tied: counted once


# --------------------------------------------------------------------------------------------------
# LoRA adapters: PEFT -> flashzo and flashzo -> PEFT
# --------------------------------------------------------------------------------------------------

ALL_SIX = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_CASES = [
    ("pre_ln", ("q_proj", "v_proj"), None),
    ("pre_ln", ALL_SIX, None),
    ("pre_ln", ALL_SIX, (0, 2)),
    ("pre_ln", ("v_proj", "fc2"), (1,)),
    ("post_ln_proj", ALL_SIX, (2,)),
]


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
    """name -> (transformers model, the same model loaded by flashzo), 3 layers, built once per name."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = hf_opt(seed=2, num_hidden_layers=3, **CONFIGS[name])
            path = write_checkpoint(hf, tmp_path_factory.mktemp(name), "safetensors")
            cache[name] = hf, load_opt(path)
        return cache[name]

    return get


def _lora_case_ids(case):
    name, targets, layers = case
    return f"{name}-{'+'.join(targets)}-layers{'all' if layers is None else ''.join(map(str, layers))}"


@pytest.mark.parametrize("case", LORA_CASES, ids=_lora_case_ids)
def test_peft_adapter_loads_in_flashzo(tmp_path, lora_base, case):
    name, targets, layers = case
    hf, model = lora_base(name)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                          layers_to_transform=list(layers) if layers is not None else None)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT initialises B to zero: the adapter would be a no-op
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(str(tmp_path))

    adapter = LoRAAdapter.from_pretrained(str(tmp_path), model.config)
    assert set(adapter.config.target_modules) == set(targets)
    # PEFT writes target_modules in set order: the structure must not depend on it
    same = LoRAConfig(r=4, alpha=8, target_modules=tuple(reversed(targets)), layers=layers)
    assert adapter.structure() == LoRAAdapter.empty(same, model.config).structure()
    assert adapter.config.layers == layers and adapter.config.scaling == 2.0
    peft_sd = peft.get_peft_model_state_dict(pm)
    assert set(adapter.named_tensors()) == set(peft_sd)
    for k, v in adapter.named_tensors().items():
        assert torch.equal(v, peft_sd[k]), k

    seqs = make_sequences(model.config.vocab_size, seed=3)
    with_adapter = model.token_logprobs(seqs, adapter=adapter)
    assert_logprobs_close(with_adapter, hf_logprobs(pm, seqs))
    # the adapter matters: the same model without it differs
    without = model.token_logprobs(seqs)
    diff = [(a - b).abs().max().item() for a, b in zip(with_adapter, without, strict=True) if a.numel()]
    assert max(diff) > 1e-3


@pytest.mark.parametrize("case", LORA_CASES, ids=_lora_case_ids)
def test_flashzo_adapter_loads_in_peft(tmp_path, lora_base, case):
    name, targets, layers = case
    hf, model = lora_base(name)
    adapter = LoRAAdapter.init(LoRAConfig(r=4, alpha=8, target_modules=targets, layers=layers, seed=5),
                               model.config)
    gen = torch.Generator().manual_seed(11)
    for slot in adapter.slots.values():
        slot.b.copy_(0.2 * torch.randn(slot.b.shape, generator=gen))
    adapter.save_pretrained(str(tmp_path))

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    peft_sd = peft.get_peft_model_state_dict(pm)
    assert set(peft_sd) == set(adapter.named_tensors())
    for k, v in adapter.named_tensors().items():
        assert torch.equal(v, peft_sd[k]), k

    seqs = make_sequences(model.config.vocab_size, seed=4)
    assert_logprobs_close(model.token_logprobs(seqs, adapter=adapter), hf_logprobs(pm, seqs))


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

def _hf_meta_model(cfg: OPTConfig):
    with torch.device("meta"):
        return transformers.OPTForCausalLM(transformers.OPTConfig.from_dict(cfg.to_hf()))


HF_PARAMETERS = {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "opt-1.3b": 1_315_758_080}


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-13b", "opt-tiny"])
def test_preset_shapes_match_transformers(name):
    """Built on the meta device only: opt-1.3b and up are far too big to build in a test."""
    cfg = OPTConfig.from_name(name)
    hf = _hf_meta_model(cfg)
    theirs = {k[len("model."):]: tuple(v.shape) for k, v in hf.state_dict().items() if k.startswith("model.")}
    ours = OPTModel(cfg, device="meta")
    assert {k: tuple(v.shape) for k, v in checkpoint_tensors(ours).items()} == theirs
    n_hf = sum(p.numel() for p in hf.parameters())  # lm_head is tied: counted once
    assert cfg.num_parameters == n_hf == sum(p.numel() for p in ours.parameters())
    if name in HF_PARAMETERS:
        assert cfg.num_parameters == HF_PARAMETERS[name]


def test_presets():
    c125 = OPTConfig.from_name("opt-125m")
    assert abs(c125.num_parameters / 125e6 - 1) < 0.01
    assert c125.has_final_layer_norm and not c125.has_projections and c125.head_dim == 64
    c350 = OPTConfig.from_name("facebook/opt-350m")
    assert c350.has_projections and c350.word_embed_proj_dim == 512 and c350.hidden_size == 1024
    assert not c350.do_layer_norm_before and not c350.has_final_layer_norm
    assert OPTConfig.from_name("opt-2.7b").head_dim == 80
    for name, kw in PRESETS.items():
        cfg = OPTConfig.from_name(name)
        assert cfg.vocab_size == kw.get("vocab_size", 50272), name
        if name.endswith("b"):
            billions = float(name.split("-")[1][:-1])
            assert abs(cfg.num_parameters / (billions * 1e9) - 1) < 0.05, name
    with pytest.raises(ValueError, match="unknown OPT preset"):
        OPTConfig.from_name("opt-7b")
    with pytest.raises(ValueError, match="not an OPT config"):
        OPTConfig.from_hf({"model_type": "llama"})


# --------------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------------

def test_weights_untouched_by_adapter_forward():
    model = OPTModel.from_config("opt-tiny", seed=0)
    adapter = LoRAAdapter.init(LoRAConfig(r=4, target_modules=ALL_SIX, layers=(1, 2)), model.config)
    for slot in adapter.slots.values():
        slot.b.normal_(0.0, 0.1)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    lora = adapter.buffer.clone()

    seqs = make_sequences(model.config.vocab_size, seed=9)
    plain = model.token_logprobs(seqs, adapter=adapter)
    examples = [Example(prompt=s[:1], target=s[1:]) for s in seqs if len(s) > 1]
    copies = [Copy(0, seed=123, sign=+1), Copy(0, seed=123, sign=-1), Copy(0, seed=0, sign=0)]
    batch = model.build_batch(examples, copies, adapters=[adapter], eps=1e-2)
    scores = model.score(batch)

    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), f"{n} changed"
    assert torch.equal(adapter.buffer, lora), "adapter changed"
    # the perturbed copies did run a different forward (so the check above could have failed)
    per_copy = scores.view(len(copies), -1)
    assert not torch.equal(per_copy[0], per_copy[2]) and not torch.equal(per_copy[1], per_copy[2])
    torch.testing.assert_close(per_copy[2], torch.cat([t for t in plain if t.numel()]), rtol=0, atol=1e-5)
