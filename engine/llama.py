"""The Llama family (Llama, Mistral, Qwen2, SmolLM): its decoder block, written once for both front ends.

    x = r + o_proj(attend(rope(q), rope(k), v))      q, k, v = qkv_proj(rmsnorm(x)); GQA: KV <= H heads
    x = x + down_proj(silu(gate) * up)               gate, up = gate_up_proj(rmsnorm(x))

As in engine/opt.py, the block classes hold layers made by a `LayerOps` and run through a
`BlockContext` (engine/model.py): flashzo's own model over its paged KV pool (LlamaModel, below) and
the SGLang plugin (sglang_plugin/model.py) run the same classes. q, k and v are one stacked `qkv_proj` (parts
of different widths under grouped-query attention), gate and up one `gate_up_proj`, as SGLang
writes them; each part keeps its own adapter and z indices. Rotary embeddings rotate the rows a
layer computes, at the positions `ctx.positions(layer_id)` gives: the trunk's below the fork, the
signed copies' from the fork layer on (docs/design.md, "Sharing").

Parameter names are Hugging Face's (`model.layers.0.mlp.down_proj.weight`, `lm_head.weight`) except
the stacked projections, whose rows hold the checkpoint's separate tensors (checkpoint_names). Norms,
linears and activations are the row-invariant ones (engine/invariant.py; tests/test_family_ops.py
checks this file calls no other).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import invariant
from .invariant import Linear, RMSNorm
from .llama_config import LlamaConfig
from .model import BlockContext, CausalLM, EngineOps, LayerOps

# --------------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] (fp32) of a config: default, linear or llama3 scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # positions / factor
        return inv_freq / s["factor"]
    # llama3: long wavelengths slowed down by `factor`, short ones kept, a smooth ramp between
    factor, old = s["factor"], s["original_max_position_embeddings"]
    low, high = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high) & ~(wavelen > low)
    return torch.where(medium, ramp, scaled)


class Rotary:
    """Rotates q and k by their rows' positions (the first and second half of each head are the pairs).

    One object is shared by every layer of a model; it keeps the cos/sin of the last two position
    tensors it saw (a forward's trunk and signed rows), so a forward computes them once per stage.
    """

    def __init__(self, cfg: LlamaConfig):
        self.inv_freq = rope_inv_freq(cfg)  # [D/2] fp32, on the CPU until first use
        self._cache: list[tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor]] = []

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D] in `dtype` (computed in fp32)
        for pos, dt, cos, sin in self._cache:
            if pos is positions and dt == dtype:
                return cos, sin
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        # cos/sin over a tensor of T * D elements: torch's CPU loops leave a tail that is not a whole
        # vector to scalar code, which may round differently, so in the batch-invariant mode
        # (engine/invariant.py) they run over fixed-size row chunks
        cos = invariant.rowwise(torch.cos, emb).to(dtype)[:, None, :]
        sin = invariant.rowwise(torch.sin, emb).to(dtype)[:, None, :]
        self._cache = [(positions, dtype, cos, sin)] + self._cache[:1]
        return cos, sin

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int):
        # q: [T, H*D], k: [T, KV*D] -> the same shapes, rotated
        T = q.shape[0]
        cos, sin = self.cos_sin(positions, q.dtype)
        q = q.reshape(T, -1, head_dim)
        k = k.reshape(T, -1, head_dim)
        return (_rotate(q, cos, sin).reshape(T, -1), _rotate(k, cos, sin).reshape(T, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


# --------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------

class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int, ops: LayerOps, prefix: str, rotary: Rotary):
        super().__init__()
        H, KV, D, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.layer_id, self.head_dim, self.rotary = layer_id, D, rotary
        self.qkv_proj = ops.projection(h, (("q_proj", H * D), ("k_proj", KV * D), ("v_proj", KV * D)), cfg.qkv_bias,
                                       layer_id, prefix=f"{prefix}.qkv_proj", fork_input=True)
        self.o_proj = ops.projection(H * D, (("o_proj", h),), cfg.o_bias, layer_id, prefix=f"{prefix}.o_proj")
        self.attn = ops.attention(H, KV, D, D ** -0.5, layer_id, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # x: [T_in, h] -> [T, h] (T_in: the trunk's rows at the fork layer)
        q, k, v = ctx.project(self.qkv_proj, x)
        q, k = self.rotary(ctx.positions(self.layer_id), q, k, self.head_dim)
        return ctx.project(self.o_proj, ctx.attend(self.attn, q, k, v))[0]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int, ops: LayerOps, prefix: str):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = ops.projection(h, (("gate_proj", i), ("up_proj", i)), cfg.mlp_bias, layer_id,
                                           prefix=f"{prefix}.gate_up_proj")
        self.down_proj = ops.projection(i, (("down_proj", h),), cfg.mlp_bias, layer_id, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        gate, up = ctx.project(self.gate_up_proj, x)
        return ctx.project(self.down_proj, invariant.rowwise(F.silu, gate) * up)[0]  # see Rotary on rowwise


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int, ops: LayerOps, prefix: str, rotary: Rotary):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=ops.dtype)
        self.self_attn = LlamaAttention(cfg, layer_id, ops, f"{prefix}.self_attn", rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=ops.dtype)
        self.mlp = LlamaMLP(cfg, layer_id, ops, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # x: [T_in, h] -> [T, h] (pre-norm residual blocks)
        r = ctx.residual(x, self.layer_id)
        x = r + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class LlamaDecoder(nn.Module):
    """Token embedding, layers and the final norm (Hugging Face's LlamaModel; the LM head is outside)."""

    def __init__(self, cfg: LlamaConfig, ops: LayerOps, prefix: str = "model"):
        super().__init__()
        self.rotary = Rotary(cfg)
        self.embed_tokens = ops.embedding(cfg.vocab_size, cfg.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i, ops, f"{prefix}.layers.{i}", self.rotary)
                                     for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=ops.dtype)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor,
              input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # [T] ids -> [T, h]; positions enter through the rotary embeddings, not here
        return self.embed_tokens(input_ids) if input_embeds is None else input_embeds

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class LlamaModel(CausalLM):
    """A Llama-family model for causal-LM scoring on flashzo's paged KV cache (tied or untied LM head)."""

    family = "llama"
    config_class = LlamaConfig
    hf_prefix = ""  # Hugging Face's names are the model's (`model.layers.0...`, `lm_head.weight`)
    tied_head = "lm_head.weight"  # with tie_word_embeddings a checkpoint may still list it: only its shape is checked

    def __init__(self, config: LlamaConfig, *, dtype: torch.dtype | None = None, device=None):
        super().__init__(config)
        with torch.device(device or "cpu"):
            self.model = LlamaDecoder(config, EngineOps())
            self.lm_head = None if config.tie_word_embeddings else \
                Linear(config.hidden_size, config.vocab_size, bias=False)
        self._finish_init(dtype)

    @property
    def decoder(self) -> LlamaDecoder:
        return self.model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
