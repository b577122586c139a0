"""OPT, written the way SGLang writes models, over flashzo's paged KV and perturbed LoRA kernel.

Modules are built from an OPTConfig; `forward(input_ids, positions, batch)` takes the ragged tokens
of one ForwardBatch (no padding) and returns the hidden states of its signed rows. Parameter names
follow Hugging Face's (`decoder.layers.0.self_attn.q_proj.weight` ...), so checkpoints map 1:1.
Linear layers that an adapter targets call flashzo.kernels.perturbed_lora_linear with the batch's
segments (one per signed copy): the perturbation is regenerated inside the kernel, the stored
weights are never touched.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flashzo.kernels import perturbed_lora_linear

from .attention import KVPool, resolve_backend
from .batch import Copy, Example, ForwardBatch, build_batch
from .config import POSITION_OFFSET, OPTConfig

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class ZOLinear(nn.Module):
    """nn.Linear that becomes a perturbed LoRA linear when the batch carries an adapter for it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layer_id: int, name: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.key = (layer_id, name)

    def adapted(self, batch: ForwardBatch | None) -> bool:
        """Whether the batch carries an adapter for this layer (else every copy computes the same)."""
        return batch is not None and batch.lora is not None and self.key in batch.lora.adapters[0].slots

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None) -> torch.Tensor:
        lora = batch.lora if batch is not None else None
        slot = lora.adapters[0].slots.get(self.key) if lora is not None else None
        if slot is None:
            return F.linear(x, self.weight, self.bias)
        if len(lora.adapters) == 1:
            a, b = slot.a.unsqueeze(0), slot.b.unsqueeze(0)
        else:
            a = torch.stack([ad.slots[self.key].a for ad in lora.adapters])
            b = torch.stack([ad.slots[self.key].b for ad in lora.adapters])
        return perturbed_lora_linear(x, self.weight, self.bias, a, b, lora.segments, scaling=lora.scaling,
                                     eps=lora.eps, a_offset=slot.a_offset, b_offset=slot.b_offset)


class Attention(nn.Module):
    """RadixAttention's role: store this layer's K/V in the pool, attend over the batch's page tables."""

    def __init__(self, num_heads: int, head_dim: int, scaling: float, layer_id: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scaling, self.layer_id = num_heads, head_dim, scaling, layer_id

    def forward(self, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        # q, k, v: [T, H*D] -> [T, H*D]
        T = q.shape[0]
        shape = (T, self.num_heads, self.head_dim)
        meta = batch.stage(self.layer_id)
        batch.pool.write(self.layer_id, meta.out_cache_loc, k.view(shape), v.view(shape))
        o = batch.backend.forward(q.view(shape), meta, batch.pool, self.layer_id, self.scaling)
        return o.reshape(T, -1)


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_id: int):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.enable_bias
        self.q_proj = ZOLinear(h, h, bias, layer_id, "q_proj")
        self.k_proj = ZOLinear(h, h, bias, layer_id, "k_proj")
        self.v_proj = ZOLinear(h, h, bias, layer_id, "v_proj")
        self.out_proj = ZOLinear(h, h, bias, layer_id, "out_proj")
        self.attn = Attention(cfg.num_attention_heads, cfg.head_dim, cfg.head_dim ** -0.5, layer_id)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, fork: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, h] -> [T, h]; with `fork`, x holds the trunk's rows [T0, h] and this layer forks them
        if fork is None:
            q, k, v = self.q_proj(x, batch), self.k_proj(x, batch), self.v_proj(x, batch)
            return self.out_proj(self.attn(q, k, v, batch), batch)
        # Every copy feeds this layer the same input, so a projection without an adapter gives every
        # copy the same q/k/v: it runs once on the trunk. Adapted ones run on the signed rows.
        signed = None
        qkv = []
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            if proj.adapted(batch):
                signed = x[fork] if signed is None else signed
                qkv.append(proj(signed, batch))
            else:
                qkv.append(proj(x, None)[fork])
        return self.out_proj(self.attn(*qkv, batch), batch)


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_id: int):
        super().__init__()
        h, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, layer_id)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=affine)
        self.fc1 = ZOLinear(h, cfg.ffn_dim, cfg.enable_bias, layer_id, "fc1")
        self.fc2 = ZOLinear(cfg.ffn_dim, h, cfg.enable_bias, layer_id, "fc2")
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=affine)
        self.act = _ACT[cfg.activation_function]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, fork: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, h] -> [T, h]; with `fork` ([T] trunk row of each signed row), x is the trunk [T0, h]
        r = x if fork is None else x[fork]
        if self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x = r + self.self_attn(x, batch, fork)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        r = x
        if self.pre_ln:
            x = self.final_layer_norm(x)
        x = r + self.fc2(self.act(self.fc1(x, batch)), batch)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        if cfg.has_projections:
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        if cfg.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList([OPTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])


class OPTModel(nn.Module):
    """OPT for causal LM scoring. The LM head is tied to the token embedding."""

    def __init__(self, config: OPTConfig, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = config
        with torch.device(device or "cpu"):
            self.decoder = OPTDecoder(config)
        if dtype is not None:
            self.to(dtype)
        for p in self.parameters():
            p.requires_grad_(False)
        self._pool: KVPool | None = None
        self._backend = None
        self.backend_name: str | None = None  # None: resolved once on first use

    # Construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, *, seed: int = 0, dtype: torch.dtype | None = None, device=None) -> "OPTModel":
        """Random weights (normal(0, 0.02) like HF's init) for a config, an HF config or a preset name."""
        if isinstance(config, str):
            config = OPTConfig.from_name(config)
        elif not isinstance(config, OPTConfig):
            config = OPTConfig.from_hf(config)
        model = cls(config, dtype=torch.float32, device=device)
        gen = torch.Generator(device=model.device).manual_seed(seed)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.data.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                p.data.normal_(0.0, 0.02, generator=gen)
        if dtype is not None:
            model.to(dtype)
        return model

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # Forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T0] trunk tokens -> hidden states of the signed rows [T, h]."""
        d = self.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        x = x + d.embed_positions(positions + POSITION_OFFSET)
        for i, layer in enumerate(d.layers):
            # [T0, h] -> [T, h]: the trunk forks into the signed copies inside the first adapted layer
            x = layer(x, batch, batch.fork_index if i == batch.fork_layer else None)
        if batch.fork_index is not None and batch.fork_layer >= len(d.layers):
            x = x[batch.fork_index]
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, projection and tied LM head: [n, h] -> logits [n, vocab] (fp32)."""
        d = self.decoder
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        if d.project_out is not None:
            x = d.project_out(x)
        return F.linear(x, d.embed_tokens.weight).float()

    def prepare(self, batch: ForwardBatch) -> ForwardBatch:
        """Attach the (reused) KV pool and the attention backend, and plan every stage once."""
        cfg = self.config
        if self._backend is None:
            self._backend = resolve_backend(self.backend_name, device=self.device)
        if self._pool is None or self._pool.dtype != self.dtype or self._pool.device != self.device:
            self._pool = KVPool(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim,
                                dtype=self.dtype, device=self.device, num_buffers=1)
        rows = max(batch.meta.num_tokens, batch.trunk_meta.num_tokens if batch.trunk_meta else 0)
        self._pool.reserve(rows)
        batch.pool, batch.backend = self._pool, self._backend
        kw = dict(num_heads=cfg.num_attention_heads, head_dim=cfg.head_dim, dtype=self.dtype)
        self._backend.plan(batch.meta, stage=0, **kw)
        if batch.trunk_meta is not None:
            self._backend.plan(batch.trunk_meta, stage=1, **kw)
        return batch

    def set_attention_backend(self, name: str | None) -> None:
        """Force "torch" or "flashinfer" (None: automatic) for this model's later forwards."""
        self.backend_name, self._backend = name, None

    @torch.no_grad()
    def score(self, batch: ForwardBatch, *, logits_chunk: int = 1024) -> torch.Tensor:
        """log p(target) of every readout request of the batch: [R] fp32.

        Logits exist only for batch.logit_rows, `logits_chunk` rows at a time (never [tokens, vocab]).
        """
        self.prepare(batch)
        x = self.forward(batch.input_ids, batch.positions, batch)
        x = x[batch.logit_rows]  # [U, h]
        out = torch.empty(batch.req_row.shape[0], dtype=torch.float32, device=x.device)
        for r0 in range(0, x.shape[0], logits_chunk):
            logits = self.head(x[r0:r0 + logits_chunk])  # [u, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            sel = (batch.req_row >= r0) & (batch.req_row < r0 + logits_chunk)
            rows = batch.req_row[sel] - r0
            out[sel] = logits[rows, batch.req_target[sel]] - lse[rows]
        return out

    def build_batch(self, examples: Sequence[Example], copies: Sequence[Copy] = (Copy(),), **kw) -> ForwardBatch:
        cfg = self.config
        return build_batch(examples, copies, num_layers=cfg.num_hidden_layers,
                           max_positions=cfg.max_position_embeddings, device=self.device, **kw)

    @torch.no_grad()
    def token_logprobs(self, sequences: Sequence[Sequence[int]], adapter=None, *,
                       sharing: str = "all") -> list[torch.Tensor]:
        """For each sequence, log p(tok[i+1] | tok[:i+1]) for i = 0 .. len-2: a float32 tensor [len-1]."""
        for s, seq in enumerate(sequences):
            if len(seq) == 0:
                raise ValueError(f"sequence {s} is empty")
            bad = [t for t in seq if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise ValueError(f"sequence {s}: token id {bad[0]} outside the vocabulary of {self.config.vocab_size}")
        examples = [Example(prompt=list(seq[:1]), target=list(seq[1:])) for seq in sequences]
        adapters = [adapter] if adapter is not None else []
        batch = self.build_batch(examples, [Copy()], adapters=adapters, sharing=sharing)
        lp = self.score(batch)
        counts = torch.bincount(batch.req_group, minlength=batch.num_groups).tolist()
        return [t.cpu() for t in torch.split(lp, counts)]
