"""LoRA adapters (engine/lora.py): PEFT's initialisation, the flat buffer, PEFT's file format, configs.

Loading PEFT adapters into flashzo's models and back, with log-probabilities compared against
PEFT on transformers, is tests/test_opt.py's.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flashzo.engine import LoRAAdapter, LoRAConfig, OPTConfig  # noqa: E402

ALL_SIX = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def test_adapter_round_trip(tmp_path):
    cfg = OPTConfig.from_name("opt-tiny")
    adapter = LoRAAdapter.init(LoRAConfig(r=3, alpha=5, target_modules=("fc2", "q_proj"), layers=(3, 1)), cfg)
    adapter.buffer.normal_()
    adapter.save_pretrained(str(tmp_path))
    again = LoRAAdapter.from_pretrained(str(tmp_path), cfg)
    assert again.structure() == adapter.structure()
    assert torch.equal(again.buffer, adapter.buffer)
    assert again.base_model_name_or_path is None


def test_adapter_names_its_base_model(tmp_path):
    cfg = OPTConfig.from_name("opt-tiny")
    adapter = LoRAAdapter.init(LoRAConfig(r=2), cfg)
    adapter.base_model_name_or_path = "/models/opt-tiny"
    adapter.clone().save_pretrained(str(tmp_path / "a"))  # kept by clone() and to()
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "/models/opt-tiny"
    assert LoRAAdapter.from_pretrained(str(tmp_path / "a"), cfg).base_model_name_or_path == "/models/opt-tiny"
    adapter.save_pretrained(str(tmp_path / "b"), base_model_name_or_path="/elsewhere")  # the argument wins
    assert LoRAAdapter.from_pretrained(str(tmp_path / "b"), cfg).base_model_name_or_path == "/elsewhere"


@pytest.mark.parametrize("edit,needle", [
    (dict(r=None), r"no 'r' \(the LoRA rank\)"), (dict(r="8"), "'r' must be an integer rank"),
    (dict(r=0), "r must be an integer in 1.."), (dict(lora_alpha="16"), "'lora_alpha' must be a number"),
    (dict(target_modules=[1, 2]), "target_modules must be module names"),
    (dict(layers_to_transform=["0"]), "layers_to_transform must be layer indices"),
])
def test_bad_adapter_config_is_refused_by_name(tmp_path, edit, needle):
    cfg = OPTConfig.from_name("opt-tiny")
    LoRAAdapter.init(LoRAConfig(r=2), cfg).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    d = json.loads(path.read_text())
    for k, v in edit.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=needle) as info:
        LoRAAdapter.from_pretrained(str(tmp_path), cfg)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------
# LoRAAdapter.init and the flat buffer
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets,layers", [(("q_proj", "v_proj"), None), (ALL_SIX, (0, 3)),
                                            (("fc2", "k_proj"), (2,))])
def test_init_matches_peft(targets, layers):
    hf_cfg = transformers.OPTConfig(vocab_size=64, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                                    ffn_dim=80, max_position_embeddings=32)
    cfg = OPTConfig.from_hf(hf_cfg)
    adapter = LoRAAdapter.init(LoRAConfig(r=8, alpha=16, target_modules=targets, layers=layers), cfg)
    torch.manual_seed(0)
    pm = peft.get_peft_model(transformers.OPTForCausalLM(hf_cfg),
                             peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(targets),
                                             layers_to_transform=list(layers) if layers else None))
    peft_sd = peft.get_peft_model_state_dict(pm)
    ours = adapter.named_tensors()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in peft_sd.items()}
    for k, v in ours.items():
        assert v.dtype == torch.float32
        if ".lora_B." in k:
            assert torch.count_nonzero(v) == 0 and torch.count_nonzero(peft_sd[k]) == 0, k
        else:  # kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / v.shape[1] ** 0.5
            for t in (v, peft_sd[k]):
                assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound, k
                # uniform: mean 0 (std bound/sqrt(3n)) and variance bound^2/3, within 6 sigma
                n = t.numel()
                assert abs(t.mean().item()) < 6 * bound / (3 * n) ** 0.5, k
                assert abs(t.pow(2).mean().item() / (bound * bound / 3) - 1) < 6 * (0.8 / n) ** 0.5, k
    # seeded: the same seed gives the same adapter, another seed another one
    same = LoRAAdapter.init(LoRAConfig(r=8, alpha=16, target_modules=targets, layers=layers), cfg)
    other = LoRAAdapter.init(LoRAConfig(r=8, alpha=16, target_modules=targets, layers=layers, seed=1), cfg)
    assert torch.equal(same.buffer, adapter.buffer) and not torch.equal(other.buffer, adapter.buffer)


@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("targets,layers", [(("q_proj", "v_proj"), None),
                                            (("fc2", "out_proj", "fc1"), (1, 3)), (ALL_SIX, None)])
def test_flat_buffer_layout(r, targets, layers):
    cfg = OPTConfig.from_name("opt-tiny")
    adapter = LoRAAdapter.init(LoRAConfig(r=r, target_modules=targets, layers=layers), cfg)
    buf = adapter.buffer
    assert buf.dtype == torch.float32 and buf.dim() == 1 and buf.is_contiguous()
    used = layers if layers is not None else tuple(range(cfg.num_hidden_layers))
    order = [(li, m) for li in used for m in cfg.lora_modules if m in targets]
    assert list(adapter.slots) == order  # layer ascending, then the family's module order

    base, esize, expected_offset = buf.data_ptr(), buf.element_size(), 0
    for key in order:
        slot = adapter.slots[key]
        k, n = cfg.lora_shape(key[1])
        assert slot.a.shape == (r, k) and slot.b.shape == (n, r)
        for view, offset in ((slot.a, slot.a_offset), (slot.b, slot.b_offset)):
            assert view.is_contiguous()
            assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert view.data_ptr() == base + offset * esize  # the view starts at its offset ...
            assert offset == expected_offset  # ... right after the previous one: increasing, no gaps
            assert offset + view.numel() <= buf.numel()  # ... and ends inside the buffer
            expected_offset += view.numel()
    assert buf.numel() == expected_offset == adapter.num_parameters
    assert buf.numel() == sum(r * sum(cfg.lora_shape(m)) for _, m in order)

    # writing the buffer is writing the views, and unflatten reads a flat tensor the same way
    flat = torch.arange(buf.numel(), dtype=torch.float32)
    buf.copy_(flat)
    for k, v in adapter.unflatten(flat).items():
        assert torch.equal(v, adapter.named_tensors()[k]), k




def test_config_is_canonical_and_checked():
    a = LoRAConfig(r=4, target_modules=("v_proj", "q_proj"), layers=(3, 1, 3))
    assert a == LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], layers=(1, 3))  # a set, in one order
    assert a.layers == (1, 3) and a.scaling == 16 / 4
    for kwargs, match in [(dict(r=0), "r must be"), (dict(r=65), "r must be"), (dict(r=2.5), "r must be"),
                          (dict(target_modules=()), "empty"), (dict(target_modules=("bogus",)), "bogus"),
                          (dict(alpha=0), "alpha"), (dict(layers=()), "layers"), (dict(layers=(-1,)), "layers")]:
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**kwargs)


def test_adapter_refuses_modules_and_layers_the_model_lacks():
    cfg = OPTConfig.from_name("opt-tiny")
    with pytest.raises(ValueError, match="gate_proj"):  # a Llama linear: OPT has none
        LoRAAdapter.empty(LoRAConfig(target_modules=("q_proj", "gate_proj")), cfg)
    with pytest.raises(ValueError, match="out of range"):
        LoRAAdapter.empty(LoRAConfig(layers=(4,)), cfg)


def test_fits_compares_shapes():
    cfg = OPTConfig.from_name("opt-tiny")
    ad = LoRAAdapter.empty(LoRAConfig(target_modules=("fc1",)), cfg)
    assert ad.fits(cfg) and ad.fits(OPTConfig.from_name("opt-tiny"))
    wider = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=256,
                      max_position_embeddings=512)  # opt-tiny with a wider fc1
    assert not ad.fits(wider)


def test_an_adapter_of_another_model_is_refused_naming_it(tmp_path):
    cfg = OPTConfig.from_name("opt-tiny")  # 4 layers
    deeper = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, ffn_dim=128,
                       max_position_embeddings=512)
    adapter = LoRAAdapter.init(LoRAConfig(r=2, layers=(6,)), deeper)
    adapter.save_pretrained(str(tmp_path), base_model_name_or_path="/m/8")
    with pytest.raises(ValueError, match="this adapter does not fit the model .*out of range.*trained on /m/8"):
        LoRAAdapter.from_pretrained(str(tmp_path), cfg)
