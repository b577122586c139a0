"""Shared test helpers: small random transformers checkpoints written in every layout, and comparisons.

Imported by the test modules as `helpers` (tests/ is on sys.path under pytest); no test module
imports another.
"""

from __future__ import annotations

import json
import os

import torch

from flashzo.engine.model import checkpoint_names

LAYOUTS = ("safetensors", "safetensors_sharded", "bin", "bin_sharded", "original")

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=64)


# --------------------------------------------------------------------------------------------------
# Checkpoint writers
# --------------------------------------------------------------------------------------------------

def hf_opt(seed: int = 0, **overrides):
    """A transformers OPTForCausalLM with random weights everywhere (layer norms and biases too)."""
    import transformers

    cfg = transformers.OPTConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):  # peaky attention, not near-uniform
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# A small Llama-family shape: 8 query heads over 2 KV heads (grouped-query attention), 3 layers.
LLAMA_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def hf_llama(seed: int = 0, model_type: str = "llama", qk_std: float = 0.5, **overrides):
    """A transformers Llama / Mistral / Qwen2 causal LM with random weights everywhere (norms, biases too).

    q_proj and k_proj get std `qk_std` so attention is peaky: with HF's default init (std 0.02) it is
    nearly uniform, and a wrong rotary embedding or KV-head mapping would move log-probs by less than
    the tests' tolerance (tests/test_llama.py checks that a 1% change of one weight does not pass).
    """
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    cfg = cls[0](**{**LLAMA_TINY, **overrides})
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(qk_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def state_dict(model, *, prefix: bool = True, lm_head: bool = True) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and not lm_head:
            continue
        if not prefix and k.startswith("model."):
            k = k[len("model."):]
        sd[k] = v.detach().clone().contiguous()
    return sd


def write_bin_shards(sd: dict[str, torch.Tensor], path: str, num_shards: int = 3) -> None:
    keys = list(sd)
    n = len(keys)
    weight_map = {}
    for s in range(num_shards):
        name = f"pytorch_model-{s + 1:05d}-of-{num_shards:05d}.bin"
        part = keys[s * n // num_shards:(s + 1) * n // num_shards]
        torch.save({k: sd[k] for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_checkpoint(model, path, layout: str) -> str:
    """Write the transformers `model` into directory `path` in one of LAYOUTS; returns path."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    if layout == "safetensors":
        model.save_pretrained(path)
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
        return path
    if layout == "safetensors_sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert sum(f.endswith(".safetensors") for f in os.listdir(path)) > 1
        return path
    model.config.save_pretrained(path)  # transformers 5 writes no .bin itself: these are written by hand
    if layout == "bin":  # older transformers: model.* names, lm_head.weight included
        torch.save(state_dict(model), os.path.join(path, "pytorch_model.bin"))
    elif layout == "bin_sharded":
        write_bin_shards(state_dict(model), path)
    elif layout == "original":  # facebook/opt-*: decoder.* names, no lm_head.weight
        torch.save(state_dict(model, prefix=False, lm_head=False), os.path.join(path, "pytorch_model.bin"))
    else:
        raise ValueError(layout)
    return path


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """A flashzo model's weights by checkpoint name (`decoder.layers.0.self_attn.q_proj.weight` ...):
    the rows of stacked projections split out as the checkpoint stores them."""
    params = dict(model.named_parameters())
    out = {}
    for name, (pname, rows) in checkpoint_names(model).items():
        out[name] = params[pname] if rows is None else params[pname][rows[0]:rows[1]]
    return out


def assert_same_weights(model, hf_model, dtype=torch.float32) -> None:
    ours = checkpoint_tensors(model)
    theirs = {k[len("model."):]: v for k, v in hf_model.state_dict().items() if k.startswith("model.")}
    assert set(ours) == set(theirs)
    for p in model.parameters():
        assert p.dtype == dtype and not p.requires_grad
    for name, p in ours.items():
        assert torch.equal(p, theirs[name].to(dtype)), name


def edit_json(path: str, **changes) -> None:
    with open(path) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with open(path, "w") as f:
        json.dump(d, f)


# --------------------------------------------------------------------------------------------------
# SGLang (tests/test_sglang.py, tests/test_sglang_engine.py)
# --------------------------------------------------------------------------------------------------

# FLASHZO_REQUIRE_SGLANG=1 (CI's SGLang step) turns every "not set up" skip into a failure.
SGLANG_REQUIRED = os.environ.get("FLASHZO_REQUIRE_SGLANG", "") == "1"
SGLANG_SETUP_HINT = "CPU: scripts/install_sglang_cpu.sh; GPU: pip install -e '.[sglang]'"
SGLANG_PLUGIN = "flashzo.sglang"
# vocab 70: SGLang pads the embedding to 128 rows; 3 layers: layers_to_transform can skip one; gelu_new:
# SGLang's own OPT runs it as the identity (sglang/srt/models/opt.py: get_activation), so matching
# flashzo also shows that the plugin, not SGLang's OPT, served the request
SGLANG_TINY = dict(vocab_size=70, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                   max_position_embeddings=96, activation_function="gelu_new")


def sglang_not_set_up(reason: str) -> None:
    """Skip the calling test module (fail it under FLASHZO_REQUIRE_SGLANG=1) with the set-up hint."""
    import pytest

    if SGLANG_REQUIRED:
        pytest.fail(f"{reason} ({SGLANG_SETUP_HINT}); FLASHZO_REQUIRE_SGLANG=1 forbids skipping", pytrace=False)
    pytest.skip(f"{reason} ({SGLANG_SETUP_HINT})", allow_module_level=True)


def require_sglang() -> None:
    """At a test module's top: SGLang must be importable (and transformers, which it needs)."""
    import pytest

    try:
        import sglang  # noqa: F401
    except ImportError as e:
        sglang_not_set_up(f"SGLang is not installed ({e})")
    pytest.importorskip("transformers")


def real_torchvision() -> bool:
    """Whether a real torchvision is installed (then SGLang needs no stand-in)."""
    import importlib.util
    import sys

    tv = sys.modules.get("torchvision")
    if tv is not None:
        return not getattr(tv, "__flashzo_stub__", False)
    return importlib.util.find_spec("torchvision") is not None  # the stand-in's finder declines this caller


def require_boot_pth() -> None:
    """SGLang's worker processes import sglang before the plugin: they need the .pth start-up shim."""
    from flashzo.sglang import boot

    if real_torchvision():
        return
    path = boot.pth_path()
    text = open(path).read() if os.path.isfile(path) else ""
    if os.path.abspath(boot.__file__) not in text:
        state = "names another flashzo checkout" if text else "is missing"
        sglang_not_set_up(f"SGLang's CPU start-up shim {path} {state}, so SGLang's workers cannot import without "
                          f"torchvision; `python -m flashzo.sglang install` writes it for this checkout")


def write_word_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer ("w5 w6" -> [5, 6]) saved next to a checkpoint, as SGLang's server wants one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def nonzero_adapter(model, config, seed: int):
    """An adapter as training leaves it: every A and B nonzero."""
    from flashzo.engine import LoRAAdapter

    adapter = LoRAAdapter.empty(config, model.config)
    adapter.buffer.copy_(0.2 * torch.randn(adapter.buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return adapter


def sglang_setup(root) -> dict:
    """An OPT checkpoint with a tokenizer, flashzo's model of it, and two adapters saved in PEFT format."""
    from flashzo.engine import LoRAConfig, load_opt

    ckpt = write_checkpoint(hf_opt(seed=3, **SGLANG_TINY), root / "opt", "safetensors")
    write_word_tokenizer(ckpt, SGLANG_TINY["vocab_size"])
    model = load_opt(ckpt)
    adapters = {
        "qv": nonzero_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "fc1")), 1),
        "all": nonzero_adapter(model, LoRAConfig(r=2, alpha=3, target_modules=("q_proj", "k_proj", "v_proj",
                                                                               "out_proj", "fc2"), layers=(0, 2)), 2),
    }
    paths = {}
    for name, adapter in adapters.items():
        paths[name] = str(root / f"adapter_{name}")
        adapter.save_pretrained(paths[name])
    return dict(root=root, ckpt=ckpt, model=model, adapters=adapters, paths=paths)
