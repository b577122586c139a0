"""OPT model configuration: one dataclass for the whole family, with the real shapes as presets.

Besides Hugging Face's fields, a family config answers what the rest of flashzo asks of any model
(docs/design.md, "Model families"): its attention shape (heads, KV heads, head dim), its adaptable
linears in the adapter's buffer order (`lora_modules`), each one's (in, out) shape, and the key PEFT
gives it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from flashzo.kernels.errors import InputError

# OPT's learned positional embedding is indexed by position + 2 (a fairseq leftover).
POSITION_OFFSET = 2


@dataclass
class OPTConfig:
    """The shape and options of an OPT model, with Hugging Face's field names (config.json).

    `from_name(preset)` gives the released checkpoints' shapes (PRESETS), `from_hf(dict)` reads a
    config.json, `to_hf()` writes one. `lora_modules` lists the linears an adapter may target.
    """

    family: ClassVar[str] = "opt"
    # the adaptable linears, in the order an adapter's flat buffer holds them within a layer
    lora_modules: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None: same as hidden_size
    do_layer_norm_before: bool = True  # False: post-LN (opt-350m)
    remove_final_layer_norm: bool = False  # HF's `_remove_final_layer_norm`
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    torch_dtype: str | None = None  # the checkpoint's dtype, as config.json names it

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise InputError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise InputError(
                f"activation_function {self.activation_function!r} is not one of {sorted(ACTIVATIONS)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                     "max_position_embeddings", "word_embed_proj_dim"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")

    # Derived shapes -----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads  # OPT has no grouped-query attention

    def lora_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one adaptable linear."""
        h, f = self.hidden_size, self.ffn_dim
        return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h),
                "fc1": (h, f), "fc2": (f, h)}[name]

    @staticmethod
    def peft_prefix(layer: int, name: str) -> str:
        """PEFT's key for a module of OPTForCausalLM (adapter name removed, as saved files have it)."""
        sub = f"self_attn.{name}" if name in ("q_proj", "k_proj", "v_proj", "out_proj") else name
        return f"base_model.model.model.decoder.layers.{layer}.{sub}"

    @property
    def has_projections(self) -> bool:
        """project_in / project_out exist when the embedding width differs from the model width."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def num_parameters(self) -> int:
        h, f, n = self.hidden_size, self.ffn_dim, self.num_hidden_layers
        b = 1 if self.enable_bias else 0
        ln = 2 * h if self.layer_norm_elementwise_affine else 0  # one LayerNorm's weight and bias
        per_layer = 4 * h * h + 2 * h * f + b * (4 * h + f + h) + 2 * ln
        emb = self.vocab_size * self.word_embed_proj_dim + (self.max_position_embeddings + 2) * h
        proj = 2 * h * self.word_embed_proj_dim if self.has_projections else 0
        return n * per_layer + emb + proj + (ln if self.has_final_layer_norm else 0)

    # Conversions --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: Any) -> "OPTConfig":
        """From a Hugging Face OPT config (a dict as in config.json, or a transformers config)."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != "opt" and not any(str(a).startswith("OPT") for a in archs):
            raise InputError(
                f"not an OPT config: model_type={model_type!r}, architectures={archs!r} "
                "(flashzo runs the OPT family)"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "remove_final_layer_norm":
                if "_remove_final_layer_norm" in d:
                    kwargs[f.name] = bool(d["_remove_final_layer_norm"])
            elif f.name in d and d[f.name] is not None:
                kwargs[f.name] = d[f.name]
        dtype = d.get("torch_dtype") or d.get("dtype")  # transformers 5 writes "dtype"
        kwargs["torch_dtype"] = None if dtype is None else str(dtype).replace("torch.", "")
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The config.json dict transformers writes for this model."""
        d = {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "layerdrop": 0.0,
            "init_std": 0.02,
            "use_cache": True,
            "tie_word_embeddings": True,
        }
        for f in dataclasses.fields(self):
            if f.name not in ("remove_final_layer_norm", "torch_dtype"):
                d[f.name] = getattr(self, f.name)
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        return d

    @classmethod
    def from_name(cls, name: str) -> "OPTConfig":
        key = name.lower().split("/")[-1]
        if key not in PRESETS:
            raise InputError(f"unknown OPT preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[key])


ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")

# The shapes of the released checkpoints (facebook/opt-*).
PRESETS: dict[str, dict] = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864),
    # Small shapes for tests and the demo (random weights only).
    "opt-tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=128,
                     max_position_embeddings=512),
}
"""OPT presets for `OPTConfig.from_name`: the released checkpoints' shapes (opt-125m ... opt-66b) and opt-tiny."""
