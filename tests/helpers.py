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

def make_sequences(vocab: int, seed: int = 0, *, longest: int = 33) -> list[list[int]]:
    """Token sequences of varied lengths (1 and 2 included, the longest `longest`), a shared prefix, and a
    duplicate: what a family's log-probs are compared on."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (1, 2, 3, 9, longest, 1)]
    seqs.append(seqs[4][:12] + torch.randint(vocab, (5,), generator=gen).tolist())
    seqs.append(list(seqs[3]))
    return seqs


@torch.no_grad()
def hf_logprobs(model, sequences) -> list[torch.Tensor]:
    """log p(tok[i+1] | tok[:i+1]) of each sequence under a transformers (or PEFT) model, fp32."""
    out = []
    for seq in sequences:
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()  # [len, vocab]
        lp = torch.log_softmax(logits, dim=-1)[:-1]
        out.append(lp.gather(1, torch.tensor(seq[1:], dtype=torch.long)[:, None])[:, 0])
    return out


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


# --------------------------------------------------------------------------------------------------
# Every family's random transformers models, by name (tests/test_family.py, test_opt.py, test_llama.py)
# --------------------------------------------------------------------------------------------------

ATOL = 1e-4  # log-probs, fp32 against fp32: both sides differ only in summation order
# transformers config overrides of TINY (OPT) and LLAMA_TINY (the Llama family: (model_type, overrides))
LLAMA3 = dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)  # head_dim 8: one frequency kept, one ramped, two scaled
FAMILY_CONFIGS = {
    "opt": {
        "pre_ln": {},
        "post_ln_proj": dict(word_embed_proj_dim=16, do_layer_norm_before=False),  # opt-350m's shape
        "head_dim_80": dict(hidden_size=160, num_attention_heads=2, ffn_dim=96),  # opt-2.7b's head_dim
        "no_bias": dict(enable_bias=False),
        "no_ln_affine": dict(layer_norm_elementwise_affine=False),
        "no_final_ln_gelu": dict(_remove_final_layer_norm=True, activation_function="gelu"),
    },
    "llama": {
        "gqa": ("llama", {}),
        "mqa_tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
        "llama3_rope": ("llama", dict(rope_parameters=LLAMA3)),
        "linear_rope_biases": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0),
                                             attention_bias=True, mlp_bias=True)),
        "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
        "mistral_head_dim": ("mistral", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                             sliding_window=64)),
    },
}
# the longest sequence make_sequences gives each family's comparisons (within both tiny shapes' positions)
LONGEST = {"opt": 33, "llama": 41}


def hf_family_model(family: str, name: str, seed: int = 1, **extra):
    """FAMILY_CONFIGS[family][name] as a transformers model with random weights everywhere (biases a
    Llama-family config has are made to matter: transformers initialises them to zero)."""
    if family == "opt":
        return hf_opt(seed=seed, **{**FAMILY_CONFIGS["opt"][name], **extra})
    model_type, overrides = FAMILY_CONFIGS[family][name]
    hf = hf_llama(seed=seed, model_type=model_type, **{**overrides, **extra})
    if model_type == "qwen2" or overrides.get("attention_bias"):
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    return hf


def max_diff(ours, ref) -> float:
    """The largest |difference| between two lists of per-sequence fp32 log-probs of equal shapes."""
    assert len(ours) == len(ref)
    out = 0.0
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, (a.dtype, a.shape, b.shape)
        if a.numel():
            out = max(out, (a - b).abs().max().item())
    return out


# --------------------------------------------------------------------------------------------------
# The perturbed LoRA kernels' problems (tests/test_perturbed_lora.py, test_perturbed_lora_parts.py)
# --------------------------------------------------------------------------------------------------

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
# T = 37 rows in four segments, one empty: 10 + 0 + 20 + 7; three seeds (one > 2**32), all three signs
ROWS_37, SEEDS_37, SIGNS_37 = [10, 0, 20, 7], [5, 7, 2**40 + 3, 5], [1, -1, 0, -1]


def segments_37(adapters):
    """The 37-row segment table with the given adapter of each segment."""
    from flashzo.kernels import Segments

    return Segments.from_lists(ROWS_37, list(adapters), SEEDS_37, SIGNS_37, device=KERNEL_DEVICE)


def max_err(y, ref) -> float:
    return (y.double() - ref.double()).abs().max().item() if y.numel() else 0.0


def torch_in_dtype(x, w, b, parts, segments, *, scaling: float, eps: float):
    """What plain torch gives in x's dtype: F.linear in that dtype, each LoRAPart's delta in fp32
    (perturbed_lora_linear_ref on the part's rows), the sum cast. Its error against an fp64
    reference is what a kernel's is held to: within twice it, plus a small atol (KERNEL_ATOL)."""
    import torch.nn.functional as F

    from flashzo.kernels import perturbed_lora_linear_ref

    y = F.linear(x, w, b).float()
    for p in parts:
        y[:, p.start:p.stop] += perturbed_lora_linear_ref(
            x, torch.zeros_like(w[p.start:p.stop]), None, p.lora_a, p.lora_b, segments, scaling=scaling, eps=eps,
            a_offset=p.a_offset, b_offset=p.b_offset, out_dtype=torch.float32)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format), written with the gguf package's writer
# --------------------------------------------------------------------------------------------------

_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf_key: str) -> str:
    if hf_key in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_key]
    _, _, layer, rest = hf_key.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{leaf}"


def llama_cpp_permute(w, n_head: int):
    """What llama.cpp's converter does to q/k rows of `llama` files: per head, the two halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_bytes(qtype, rows: int, cols: int, seed: int = 0):
    """Random blocks of a K-quant type (gguf-py can dequantize them but not quantize): random quants and
    scales, the fp16 super-block scales set to small finite values."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    halves = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype.name]
    for k, off in enumerate(halves):
        raw[:, :, off:off + 2] = np.frombuffer(np.float16(0.01 / (k + 1)).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(hf_model, path, *, qtype=None, extra=None, drop=(), metadata=None) -> str:
    """A transformers Llama / Qwen2 model as a GGUF file, as llama.cpp's converter lays it out.

    qtype(hf_key, array) -> the GGMLQuantizationType to store a tensor in (default F32; 1-D tensors
    always F32); extra: more {gguf name: float array}; drop: GGUF names to leave out; metadata:
    {key: value} written or overriding (None removes).
    """
    import gguf
    import numpy as np

    cfg = hf_model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[cfg.model_type]
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    meta = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "rope.dimension_count": D,
            "vocab_size": cfg.vocab_size}
    meta = {f"{arch}.{k}": v for k, v in meta.items()}
    meta.update(metadata or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    tensors = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()
               if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    for key, a in tensors.items():
        name = gguf_name(key)
        if name in drop:
            continue
        if arch == "llama" and ".attn_q." in name:
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        t = gguf.GGMLQuantizationType.F32 if qtype is None or a.ndim == 1 else qtype(key, a)
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        elif t == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif t.name in ("Q4_K", "Q5_K", "Q6_K"):
            w.add_tensor(name, k_quant_bytes(t, *a.shape, seed=len(name)), raw_dtype=t)
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), t), raw_dtype=t)
    for name, a in (extra or {}).items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


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


WORDS = ["<pad>", "<unk>", "</s>", "It", "was", "great", "terrible", "good", "bad", "movie", "the", "a", "plot"]


def tiny_opt_with_words(path: str) -> str:
    """A tiny random OPT (seed 0, 64 positions) saved by transformers into `path`, with a word-level
    tokenizer of WORDS beside it: a checkpoint as a user has one, in seconds."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    transformers.OPTForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path
