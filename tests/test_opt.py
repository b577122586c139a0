"""OPT's own: its config against transformers' (projections, post-LN, the final norm) and its presets.

What every family shares (log-probabilities against transformers from every checkpoint layout, PEFT
adapters both ways, preset shapes, a perturbed forward writing nothing) is tested once for all of
them in tests/test_family.py, on the OPT configs of tests/helpers.py's FAMILY_CONFIGS.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from helpers import FAMILY_CONFIGS, checkpoint_tensors, hf_family_model  # noqa: E402

from flashzo.engine import PRESETS, OPTConfig, OPTModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS["opt"]))
def test_config_from_transformers(name):
    hf = hf_family_model("opt", name)
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
