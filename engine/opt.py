"""OPT: its decoder block, embeddings and head, written once for both front ends.

The block classes hold layers made by a `LayerOps` and run through a `BlockContext` (the protocols
of engine/model.py): `EngineOps` + `ForwardContext` give flashzo's own model over its paged KV pool
(OPTModel, below), the SGLang plugin's ops and context give the same block over SGLang's KV cache
(sglang_plugin/model.py). q, k and v are one stacked projection, `qkv_proj` (its parts keep their
own adapters and z indices), as SGLang and vLLM write them. Norms, linears and activations are the
row-invariant ones (engine/invariant.py; tests/test_family_ops.py checks this file calls no other).

Parameter names follow Hugging Face's (`decoder.layers.0.fc1.weight` ...) except the stacked
qkv_proj, whose rows hold q_proj, k_proj and v_proj; `checkpoint_names` (engine/model.py) maps
every checkpoint tensor to its parameter and rows, for loading and saving alike, and OPTModel's
`hf_prefix` the `model.` Hugging Face puts before them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import POSITION_OFFSET, OPTConfig
from .invariant import LayerNorm, Linear, rowwise
from .model import BlockContext, CausalLM, EngineOps, LayerOps

# config.json's activation_function -> the activation, over fixed row chunks in the batch-invariant
# mode: torch's CPU loops round a tail of T * ffn_dim elements that is not a whole vector in scalar
# code (gelu's erf/tanh), so the activation must not see how many rows share the call
ACTIVATION_FNS = {"relu": lambda x: rowwise(F.relu, x), "gelu": lambda x: rowwise(F.gelu, x),
               "gelu_new": lambda x: rowwise(lambda t: F.gelu(t, approximate="tanh"), x),
               "silu": lambda x: rowwise(F.silu, x)}


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_id: int, ops: LayerOps, prefix: str):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.enable_bias
        self.qkv_proj = ops.projection(h, (("q_proj", h), ("k_proj", h), ("v_proj", h)), bias, layer_id,
                                       prefix=f"{prefix}.qkv_proj", fork_input=True)
        self.out_proj = ops.projection(h, (("out_proj", h),), bias, layer_id, prefix=f"{prefix}.out_proj")
        self.attn = ops.attention(cfg.num_attention_heads, cfg.num_attention_heads, cfg.head_dim,
                                  cfg.head_dim ** -0.5, layer_id, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # x: [T_in, h] -> [T, h] (T_in: the trunk's rows at the fork layer)
        q, k, v = ctx.project(self.qkv_proj, x)
        return ctx.project(self.out_proj, ctx.attend(self.attn, q, k, v))[0]


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_id: int, ops: LayerOps, prefix: str):
        super().__init__()
        h, affine, bias = cfg.hidden_size, cfg.layer_norm_elementwise_affine, cfg.enable_bias
        self.layer_id, self.pre_ln = layer_id, cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, layer_id, ops, f"{prefix}.self_attn")
        self.self_attn_layer_norm = LayerNorm(h, elementwise_affine=affine, dtype=ops.dtype)
        self.fc1 = ops.projection(h, (("fc1", cfg.ffn_dim),), bias, layer_id, prefix=f"{prefix}.fc1")
        self.fc2 = ops.projection(cfg.ffn_dim, (("fc2", h),), bias, layer_id, prefix=f"{prefix}.fc2")
        self.final_layer_norm = LayerNorm(h, elementwise_affine=affine, dtype=ops.dtype)
        self.act = ACTIVATION_FNS[cfg.activation_function]

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # x: [T_in, h] -> [T, h]; pre-LN (most OPTs) or post-LN (opt-350m)
        r = ctx.residual(x, self.layer_id)
        if self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x = r + self.self_attn(x, ctx)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        r = x
        if self.pre_ln:
            x = self.final_layer_norm(x)
        x = r + ctx.project(self.fc2, self.act(ctx.project(self.fc1, x)[0]))[0]
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    """Embeddings, layers and the final norm/projection of OPT (the LM head is the tied embedding)."""

    def __init__(self, cfg: OPTConfig, ops: LayerOps, prefix: str = "decoder"):
        super().__init__()
        dtype = ops.dtype
        self.embed_tokens = ops.embedding(cfg.vocab_size, cfg.word_embed_proj_dim, prefix=f"{prefix}.embed_tokens")
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                            dtype=dtype)
        if cfg.has_projections:
            self.project_in = Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False, dtype=dtype)
            self.project_out = Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False, dtype=dtype)
        else:
            self.project_in = self.project_out = None
        if cfg.has_final_layer_norm:
            self.final_layer_norm = LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine,
                                                 dtype=dtype)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList([OPTDecoderLayer(cfg, i, ops, f"{prefix}.layers.{i}")
                                     for i in range(cfg.num_hidden_layers)])

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor,
              input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # [T] ids and positions -> [T, h]; OPT's learned positions are offset by 2
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """What comes between the last layer and the tied LM head: [n, h] -> [n, word_embed_proj_dim]."""
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(CausalLM):
    """OPT for causal-LM scoring on flashzo's paged KV cache. The LM head is tied to the token embedding."""

    family = "opt"
    config_class = OPTConfig
    hf_prefix = "model."  # OPTForCausalLM's `model.decoder.x` is `decoder.x` here (facebook's files name it so)
    tied_head = "lm_head.weight"  # the token embedding: a checkpoint may list it, nothing loads it

    def __init__(self, config: OPTConfig, *, dtype: torch.dtype | None = None, device=None):
        super().__init__(config)
        with torch.device(device or "cpu"):
            self.decoder = OPTDecoder(config, EngineOps())
        self._finish_init(dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight
