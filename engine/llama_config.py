"""Llama-family configuration (Llama, Mistral, Qwen2, SmolLM): one dataclass, the real shapes as presets.

The three Hugging Face model types share one architecture: RMSNorm, rotary embeddings, grouped-query
attention, a SwiGLU MLP. What differs is written as fields:

    attention biases   Llama: `attention_bias` on q, k, v and o; Qwen2: on q, k, v only
    sliding window     Mistral's `sliding_window`; Qwen2's when `use_sliding_window`
    rope scaling       none, "linear" or "llama3" (transformers 5's `rope_parameters`, or the older
                       `rope_theta` + `rope_scaling`)

A feature flashzo does not implement is refused by name (InputError): another rope type, a partial
rotary factor, another activation. A sliding window is exact for sequences no longer than the
window (every key is inside it), so the window becomes the model's position limit
(engine/example.py: Limits) and a longer sequence is refused, naming the window.
Like OPTConfig (engine/config.py), it answers what the rest of flashzo asks of a family
(docs/design.md, "Model families").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from flashzo.kernels.errors import InputError

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("linear", "llama3")  # besides the default (unscaled) rotary embedding
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LlamaConfig:
    """The shape and options of a Llama-family model (Llama, Mistral, Qwen2, SmolLM), with Hugging Face's
    field names (config.json).

    `from_name(preset)` gives a preset's shapes, `from_hf(dict)` reads a config.json (refusing by name
    what flashzo does not implement), `to_hf()` writes one. `lora_modules` lists the linears an
    adapter may target.
    """

    family: ClassVar[str] = "llama"
    # the adaptable linears, in the order an adapter's flat buffer holds them within a layer
    lora_modules: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")

    model_type: str = "llama"  # "llama" | "mistral" | "qwen2": which Hugging Face class writes it
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor"} or llama3's keys; None: unscaled
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj (Llama's attention_bias; always in Qwen2)
    o_bias: bool = False  # a bias on o_proj (Llama's attention_bias)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # the window of the layers that use one (None: full attention)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype, as config.json names it

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise InputError(f"model_type {self.model_type!r} is not one of {sorted(MODEL_TYPES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise InputError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                 f"{self.num_attention_heads} (and the config gives no head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise InputError(f"head_dim must be a positive even integer (rotary embeddings rotate pairs), got "
                             f"{self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise InputError(f"hidden_act {self.hidden_act!r} is not supported: the Llama family's MLP is SwiGLU "
                             "(silu)")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise InputError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise InputError(f"rope_theta must be positive, got {self.rope_theta!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise InputError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            raise InputError("a qwen2 model has biases on q_proj, k_proj and v_proj only (qkv_bias=True, "
                             "o_bias=False, mlp_bias=False)")
        if self.model_type == "mistral" and (self.qkv_bias or self.o_bias or self.mlp_bias):
            raise InputError("a mistral model has no biases")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise InputError("a llama model's attention_bias covers q, k, v and o alike (qkv_bias == o_bias)")

    # What the rest of flashzo asks of a family --------------------------------------------------
    @property
    def position_limit(self) -> tuple[int, str]:
        """(longest sequence, what limits it): the positions, or a sliding window shorter than them."""
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            return self.sliding_window, "sliding_window: flashzo attends over whole sequences only"
        return self.max_position_embeddings, ""

    def lora_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one adaptable linear."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[name]

    @staticmethod
    def peft_prefix(layer: int, name: str) -> str:
        """PEFT's key for a module of a *ForCausalLM of the family (adapter name removed, as saved files have it)."""
        sub = "self_attn" if name in ATTENTION_MODULES else "mlp"
        return f"base_model.model.model.layers.{layer}.{sub}.{name}"

    @property
    def num_parameters(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n * (attn + mlp + 2 * h) + emb + h

    # Conversions --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: Any) -> "LlamaConfig":
        """From a Hugging Face Llama, Mistral or Qwen2 config (a dict as in config.json, or a transformers config)."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            archs = d.get("architectures") or []
            model_type = next((t for t, a in MODEL_TYPES.items() if a in archs), None)
            if model_type is None:
                raise InputError(f"not a Llama-family config: model_type={d.get('model_type')!r}, "
                                 f"architectures={archs!r} (flashzo's Llama family reads {sorted(MODEL_TYPES)})")
        theta, scaling = _read_rope(d)
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls)
                  if f.name in d and d[f.name] is not None and f.name not in ("rope_theta", "rope_scaling",
                                                                               "sliding_window", "model_type")}
        kwargs.update(model_type=model_type, rope_theta=theta, rope_scaling=scaling)
        if model_type == "qwen2":
            kwargs.update(qkv_bias=True, o_bias=False)
            # transformers: the window applies when use_sliding_window, to the layers from max_window_layers on
            use = bool(d.get("use_sliding_window")) and d.get("sliding_window") is not None
            n = d.get("num_hidden_layers", 32)
            layers = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28) else "full"
                                              for i in range(n)]
            kwargs["sliding_window"] = d["sliding_window"] if use and "sliding_attention" in layers else None
        else:
            bias = bool(d.get("attention_bias", False))
            kwargs.update(qkv_bias=bias, o_bias=bias)
            kwargs["sliding_window"] = d.get("sliding_window")
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        dtype = d.get("torch_dtype") or d.get("dtype")  # transformers 5 writes "dtype"
        kwargs["torch_dtype"] = None if dtype is None else str(dtype).replace("torch.", "")
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The config.json dict of this model's Hugging Face class (transformers 5 and older read it)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        d = {
            "model_type": self.model_type,
            "architectures": [MODEL_TYPES[self.model_type]],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings, "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None, "rope_parameters": rope,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:  # qwen2: every layer slides when a window is set (the same for sequences within it)
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=0 if self.sliding_window is not None else self.num_hidden_layers)
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        return d

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        key = name.lower().split("/")[-1]
        if key not in PRESETS:
            raise InputError(f"unknown Llama-family preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[key])


def _read_rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters`, else the older two fields."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise InputError(f"rope_parameters per layer type ({sorted(params)}) are not supported")
    old = d.get("rope_scaling") or {}
    if not isinstance(old, dict):
        raise InputError(f"rope_scaling must be an object, got {old!r}")
    # older configs: rope_theta + rope_scaling; a config with both formats: the scaling named is applied
    params = {"rope_theta": d.get("rope_theta"), **(params or {}), **old}
    if "type" in old:
        params.pop("rope_type", None)
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", params.pop("type", "default"))  # the oldest configs say "type"
    factor = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise InputError(f"partial_rotary_factor {factor} is not supported (flashzo rotates the whole head)")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = d.get("original_max_position_embeddings",
                                                           d.get("max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **params}


def _check_rope_scaling(s: dict | None) -> dict | None:
    if s is None:
        return None
    if not isinstance(s, dict):
        raise InputError(f"rope_scaling must be a dict or None, got {s!r}")
    rope_type = s.get("rope_type", s.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_TYPES:
        raise InputError(f"rope type {rope_type!r} is not supported (flashzo implements the default rotary "
                         f"embedding and {', '.join(ROPE_TYPES)})")
    keys = ("factor",) if rope_type == "linear" else LLAMA3_KEYS
    missing = [k for k in keys if s.get(k) is None]
    if missing:
        raise InputError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    out = {"rope_type": rope_type}
    for k in keys:
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InputError(f"rope_scaling {k} must be a positive number, got {v!r}")
        out[k] = v
    if rope_type == "llama3" and out["low_freq_factor"] >= out["high_freq_factor"]:
        raise InputError("rope_scaling llama3 needs low_freq_factor < high_freq_factor")
    if rope_type == "linear" and "original_max_position_embeddings" in s:
        out["original_max_position_embeddings"] = s["original_max_position_embeddings"]
    ignored = sorted(set(s) - set(out) - {"type", "rope_type", "rope_theta"})
    if ignored:
        raise InputError(f"rope_scaling of type {rope_type!r}: fields {ignored} are not supported")
    return out


_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

# The shapes of the released checkpoints (random weights only: no weights are downloaded).
PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
                         bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, qkv_bias=True, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                       bos_token_id=151643, eos_token_id=151643),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       bos_token_id=1, eos_token_id=2),
    # Small shapes for tests and benchmarks' smoke runs (random weights only).
    "llama-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5),
}
"""Llama-family presets for `LlamaConfig.from_name`: released models' shapes and llama-tiny."""
