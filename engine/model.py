"""The model-family interface, the engine's implementation of it, and CausalLM, every family's base.

A family (OPT in engine/opt.py, Llama in engine/llama.py; docs/design.md, "Model families") writes
its decoder block once, against two protocols: the layers it holds are made by a `LayerOps`
(projections, attention, the token embedding), and its forward calls a `BlockContext`:

    ctx.residual(x, layer_id)         the block's residual stream (the signed rows at a fork)
    ctx.positions(layer_id)           the positions of the rows the block computes (rotary embeddings)
    ctx.project(proj, x) -> [parts]   a stacked projection (q, k, v ...), one output per part
    ctx.attend(attn, q, k, v) -> o    attention over the KV cache

Two front ends implement them: the engine's here (EngineOps makes ZOProjection and PagedAttention,
which hold parameters and shapes; ForwardContext runs them over flashzo's paged KV pool with the
perturbed LoRA kernels), and the SGLang plugin's (sglang_plugin/model.py: SGLangOps, SGLangContext).

`CausalLM` is what MeZOTrainer, the batcher, the losses and the CLI see of any family: `config`
(vocab_size, num_hidden_layers, max_position_embeddings, the adaptable modules: see engine/lora.py),
`build_batch`, `score`, `token_logprobs`, `device`, `dtype`; and what every family shares: random
weights (`from_config`) and the map between its parameter names and its checkpoints'. A family
subclass sets its config class and naming, builds `self.decoder` (with `embed`, `layers`, `final`)
and names its LM head. The model owns its runtime state (the KV pool, the attention backend), never
the batch.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Protocol, Sequence

import torch
from torch import nn

from flashzo.kernels import base_linear, perturbed_lora_add_, perturbed_lora_linear_parts, row_chunk
from flashzo.kernels.errors import InputError
from flashzo.kernels.quant import quantize as quantize_weight

from . import invariant
from .attention import KVPool, resolve_backend
from .batch import Copy, ModelInputs, Readout, StepBatch, plan_batch
from .example import Example, Limits, check_examples, check_sequences
from .quantized import (
    QuantizedEmbedding,
    QuantSpec,
    TokenEmbedding,
    WeightFormat,
    copy_rows_,
    install_dense_,
    install_quantized_,
    quantized_weights,
    weight_value,
)

HEAD_BLOCK = 2**20  # elements of the LM head's weight per GEMM (a quantized head's scratch: 4 MiB in fp32)


def head_rows(k: int) -> int:
    """Vocabulary rows per GEMM of an LM head over hidden size k (CausalLM.head): a multiple of 64."""
    return max(64, HEAD_BLOCK // max(k, 1) // 64 * 64)


def _row_blocks(shape, device, gen):
    """from_config's draws of one matrix, normal(0, 0.02) from `gen`, in blocks of rows of about
    HEAD_BLOCK values: yields (first row, the block [rows, *shape[1:]])."""
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, HEAD_BLOCK // max(per_row, 1))
    for r0 in range(0, shape[0], step):
        rows = min(step, shape[0] - r0)
        yield r0, torch.empty((rows, *shape[1:]), dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)


# --------------------------------------------------------------------------------------------------
# The interface a family's block is written against
# --------------------------------------------------------------------------------------------------


class LayerOps(Protocol):
    """Makes the layers a family's block holds (the engine: EngineOps; SGLang: SGLangOps).

    `prefix` is the layer's name in the model (`decoder.layers.0.self_attn.qkv_proj`): SGLang's
    layers take it, and the engine checks that it is the layer's path (CausalLM._finish_init).
    """

    dtype: torch.dtype | None  # the parameters' dtype (None: fp32, cast by the model afterwards)

    def projection(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool, layer_id: int, *,
                   prefix: str, fork_input: bool = False) -> nn.Module:
        """A linear whose output rows are `parts` ((module name, width), ...) stacked; `fork_input` marks
        the block's first projection (its input is the trunk at the fork layer)."""

    def attention(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float, layer_id: int, *,
                  prefix: str) -> nn.Module:
        """Attention over the KV cache: query head h reads KV head h // (num_heads / num_kv_heads)."""

    def embedding(self, num: int, dim: int, *, prefix: str) -> nn.Module:
        """The token embedding: ids [T] -> [T, dim]."""


class BlockContext(Protocol):
    """What a family's block calls in a forward (the engine: ForwardContext; SGLang: SGLangContext)."""

    def residual(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        """The block's residual stream: x, or at the fork layer the trunk's row of every signed row."""

    def positions(self, layer_id: int) -> torch.Tensor:
        """[T] positions of the rows layer `layer_id` computes."""

    def project(self, proj: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [T_in, in] -> one [T, width] per part of `proj` (a LayerOps.projection)."""

    def attend(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H*D], k, v: [T, KV*D] -> [T, H*D], through `attn` (a LayerOps.attention)."""


# --------------------------------------------------------------------------------------------------
# The engine's front end
# --------------------------------------------------------------------------------------------------


class ZOProjection(nn.Module):
    """A linear layer whose output rows are the model's adaptable matrices ("parts") stacked.

    weight: [sum of the parts' widths, in_features]; part i is rows parts[i] of the weight and of
    the output, named as its module is (q_proj, k_proj, v_proj of one qkv_proj ...). It holds the
    parameters; ForwardContext.project runs it: a part that the batch's adapter targets runs
    flashzo's perturbed LoRA linear (docs/design.md, "The kernels") with the z indices of its own
    matrices, the others a plain linear. `fork_input` marks the block's first projection: at the
    fork layer its input is the trunk (shared by every copy), so its unadapted parts run once on
    the trunk and only the adapted ones on the signed rows.
    """

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool, layer_id: int, *,
                 prefix: str = "", fork_input: bool = False):
        super().__init__()
        out = sum(n for _, n in parts)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.layer_id, self.prefix, self.fork_input = layer_id, prefix, fork_input
        self.parts: list[tuple[str, int, int]] = []  # (module name, first row, end row)
        start = 0
        for name, n in parts:
            self.parts.append((name, start, start + n))
            start += n

    @property
    def projection(self) -> tuple:
        """This projection as the batcher knows it (engine/batch.py's Projection)."""
        return (self.layer_id, tuple(self.parts))

    def part_rows(self, name: str) -> tuple[int, int]:
        for part, start, stop in self.parts:
            if part == name:
                return start, stop
        raise KeyError(name)


class PagedAttention(nn.Module):
    """RadixAttention's role over flashzo's KV pool: its shape; ForwardContext.attend runs it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float, layer_id: int, *,
                 prefix: str = ""):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling, self.layer_id, self.prefix = scaling, layer_id, prefix


class EngineOps(LayerOps):
    """The engine's LayerOps: parameters in fp32 (the model casts them), named by their prefix."""

    dtype = None

    def projection(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool, layer_id: int, *,
                   prefix: str, fork_input: bool = False) -> ZOProjection:
        return ZOProjection(in_features, parts, bias, layer_id, prefix=prefix, fork_input=fork_input)

    def attention(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float, layer_id: int, *,
                  prefix: str) -> PagedAttention:
        return PagedAttention(num_heads, num_kv_heads, head_dim, scaling, layer_id, prefix=prefix)

    def embedding(self, num: int, dim: int, *, prefix: str) -> TokenEmbedding:
        return TokenEmbedding(num, dim, prefix=prefix)


class ForwardContext(BlockContext):
    """The engine's BlockContext for one forward: the batch's inputs plus the model's runtime (pool,
    backend, per-stage plans); `project` and `attend` run the engine's layers.

    `trace`, when a list, receives (layer_id, module name, rows) for every part of every projection
    the forward computes, with the rows it was computed on (tests and benchmarks count work with it).
    """

    def __init__(self, inputs: ModelInputs, pool: KVPool, backend, plans: dict, trace: list | None = None):
        self.inputs, self.pool, self.backend, self.plans, self.trace = inputs, pool, backend, plans, trace
        self._signed_positions: torch.Tensor | None = None

    @property
    def lora(self):
        return self.inputs.lora

    def stage(self, layer_id: int):
        """(attention metadata, backend plan) of the stage `layer_id` belongs to (trunk or signed)."""
        meta = self.inputs.stage(layer_id)
        return meta, self.plans[id(meta)]

    def residual(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        """The fork layer's input holds the trunk's rows; its residual stream is every copy's rows."""
        return x[self.inputs.fork_index] if self.inputs.forks_at(layer_id) else x

    def positions(self, layer_id: int) -> torch.Tensor:
        """[T] positions of the rows layer `layer_id` computes (its residual's rows): the trunk's below the
        fork layer, the signed copies' (each a trunk row, `fork_index`) from the fork layer on."""
        inputs = self.inputs
        if inputs.fork_index is None or layer_id < inputs.fork_layer:
            return inputs.positions
        if self._signed_positions is None:
            self._signed_positions = inputs.positions[inputs.fork_index]
        return self._signed_positions

    def project(self, proj: ZOProjection, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [T_in, in] -> one [T, n_i] per part (T = T_in, or the signed rows at a fork)
        lora = self.lora
        stack = lora.stack(proj.projection) if lora is not None else None
        fork = self.inputs.fork_index if proj.fork_input and self.inputs.forks_at(proj.layer_id) else None
        inv = invariant.is_batch_invariant()  # docs/design.md, "Batch invariance"
        w = weight_value(proj.weight)  # a tensor, or a QuantizedWeight (docs/design.md, "Quantized weights")
        if stack is None:  # every copy computes the same: one GEMM, on the trunk at a fork
            y = invariant.linear(x, w, proj.bias)
            self._trace(proj, None, x.shape[0])
            if fork is not None:
                y = y[fork]
        elif fork is None:  # one base GEMM, one shrink and one expand for every adapted part
            y = perturbed_lora_linear_parts(x, w, proj.bias, stack, lora.segments, scaling=lora.scaling,
                                            eps=lora.eps, batch_invariant=inv)
            self._trace(proj, None, x.shape[0])
        else:
            # At the fork every copy's input is the trunk's: the base GEMM runs once on the trunk's
            # rows, and only the LoRA term of the adapted parts on every copy's rows; base_linear is
            # the base perturbed_lora_linear_parts computes, so a row gets the same bits either way.
            y = base_linear(x, w, proj.bias, batch_invariant=inv)[fork]
            signed = x[fork]
            perturbed_lora_add_(y, signed.to(y.dtype), stack, lora.segments, scaling=lora.scaling, eps=lora.eps,
                                batch_invariant=inv)
            y = y.to(x.dtype)
            self._trace(proj, {(p.start, p.stop) for p in stack.parts}, x.shape[0], signed.shape[0])
        return [y[:, start:stop] for _, start, stop in proj.parts]

    def attend(self, attn: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H*D], k, v: [T, KV*D] -> [T, H*D]: store this layer's K/V, attend over the page tables
        T = q.shape[0]
        meta, plan = self.stage(attn.layer_id)
        kv_shape = (T, attn.num_kv_heads, attn.head_dim)
        self.pool.write(attn.layer_id, meta.out_cache_loc, k.reshape(kv_shape), v.reshape(kv_shape))
        o = self.backend.forward(q.reshape(T, attn.num_heads, attn.head_dim), meta, plan, self.pool, attn.layer_id,
                                 attn.scaling)
        return o.reshape(T, -1)

    def _trace(self, proj: ZOProjection, adapted: set | None, rows: int, signed_rows: int = 0) -> None:
        """Record every part's rows: `rows`, or `signed_rows` for the parts in `adapted` (at a fork)."""
        if self.trace is not None:
            self.trace.extend((proj.layer_id, name, signed_rows if adapted and (start, stop) in adapted else rows)
                              for name, start, stop in proj.parts)


# --------------------------------------------------------------------------------------------------
# Every family's base
# --------------------------------------------------------------------------------------------------


class CausalLM(nn.Module):
    """Base of every family's engine model: batching, runtime, scoring, random weights, checkpoint names;
    the family adds its decoder.

    A subclass sets `family` (its name in engine/family.py), `config_class`, `hf_prefix` and
    `tied_head` (how its checkpoints name tensors), builds `self.decoder` in __init__ (with
    `embed(input_ids, positions)`, `layers`, `final(x)`) with EngineOps, calls `_finish_init`, and
    implements `lm_head_weight`.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type]  # from_hf(dict), from_name(preset), to_hf()
    # What Hugging Face's checkpoints put before this model's parameter names: OPTForCausalLM stores
    # the model's `decoder.x` as `model.decoder.x` (facebook's original files as `decoder.x`).
    hf_prefix: ClassVar[str] = ""
    # A checkpoint tensor tied to another (the LM head of a tied model): a checkpoint may list it,
    # only its shape is checked; a model with a head of its own has it among its parameters.
    tied_head: ClassVar[str | None] = "lm_head.weight"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._pool: KVPool | None = None
        self._backend = None
        self.backend_name: str | None = None  # None: resolved once on first use
        self.trace: list | None = None  # see ForwardContext
        self._projections: list[tuple] | None = None
        self.quant_spec: QuantSpec | None = None  # what quantized this model's weights, if anything

    def _finish_init(self, dtype: torch.dtype | None) -> None:
        for name, module in self.named_modules():  # the name SGLang would give a layer is its path here
            prefix = getattr(module, "prefix", None)
            if prefix is not None and prefix != name:
                raise RuntimeError(f"{type(self).__name__}: the layer at {name!r} was made with prefix {prefix!r} "
                                   "(LayerOps, engine/model.py: a layer's prefix is its name in the model)")
        if dtype is not None:
            self.to(dtype)
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, config, *, seed: int = 0, dtype: torch.dtype | None = None, device=None,
                    quantize=None) -> CausalLM:
        """Random weights for a config, a Hugging Face config (dict or object) or a preset name: every
        matrix normal(0, 0.02) (Hugging Face's init), norms' weights 1, biases 0.

        quantize: None, "int8", "int4" or a QuantSpec (engine/quantized.py): every weight `quantizable`
        lists is drawn in fp32 and quantized a block of rows at a time (neither the fp32 model nor an
        fp32 weight ever exists whole; the draws are the dense model's, drawn in the same blocks)."""
        if isinstance(config, str):
            config = cls.config_class.from_name(config)
        elif not isinstance(config, cls.config_class):
            config = cls.config_class.from_hf(config)
        spec = QuantSpec.of(quantize)
        model = cls(config, dtype=torch.float32, device="meta")  # shapes only; filled one tensor at a time
        formats = model.weight_formats(spec) if spec is not None else {}
        device = torch.device(device if device is not None else "cpu")
        norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, invariant.RMSNorm))
                 for p in m.parameters(recurse=False)}
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in list(model.named_parameters()):
            if name in formats:  # drawn and quantized a block of rows at a time: no fp32 copy of the weight
                f = formats[name]
                qw = f.empty(*p.shape, device=device)
                for r0, block in _row_blocks(p.shape, device, gen):
                    copy_rows_(qw, r0, quantize_weight(block, f.mode, f.group_size, symmetric=f.symmetric,
                                                       scale_dtype=f.scale_dtype))
                install_quantized_(model, name, qw, torch.float32)
                continue
            t = torch.empty(p.shape, dtype=torch.float32, device=device)
            if id(p) in norms:
                t.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                t.zero_()
            else:  # the same blocks as a quantized weight's, so the two models' draws are one
                for r0, block in _row_blocks(p.shape, device, gen):
                    t[r0:r0 + block.shape[0]] = block
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(t, requires_grad=False))
            del t
        model.quant_spec = spec
        if dtype is not None:
            model.to(dtype)
        return model

    # Quantized weights (docs/design.md, "Quantized weights"; engine/quantized.py) -------------------
    def quantizable(self) -> list[str]:
        """The weights quantization replaces: every linear's (stacked projections, invariant.Linear) and the
        token embedding's; norms, biases and other embeddings stay in the compute dtype."""
        return [f"{name}.weight" for name, m in self.named_modules()
                if isinstance(m, (ZOProjection, invariant.Linear, TokenEmbedding, QuantizedEmbedding))]

    def weight_formats(self, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16) -> dict[str, WeightFormat]:
        """The format of every quantizable weight under `spec`; a weight whose rows do not fit it (K not a
        multiple of the group) is refused by the name of a checkpoint tensor it holds."""
        first = {}
        for key, (pname, _) in checkpoint_names(self).items():
            first.setdefault(pname, type(self).hf_key(key))
        out = {}
        for name in self.quantizable():
            K = self.get_submodule(name.rpartition(".")[0]).weight.shape[1]  # a Parameter or a QuantizedParameter
            out[name] = spec.weight_format(K, f"tensor {first.get(name, name)!r}", scale_dtype)
        return out

    def quantize_(self, quantize, group_size: int | None = None, symmetric: bool | None = None) -> CausalLM:
        """Quantize this dense model's `quantizable` weights in place, one at a time (every format is
        checked before any weight changes). Returns the model."""
        spec = QuantSpec.of(quantize, group_size, symmetric)
        if spec is None or quantized_weights(self):
            raise InputError("quantize_ takes a mode ('int8' or 'int4') and a model that is not quantized yet")
        for name, f in self.weight_formats(spec).items():
            p = self.get_parameter(name)
            qw = quantize_weight(p.data, f.mode, f.group_size, symmetric=f.symmetric, scale_dtype=f.scale_dtype)
            install_quantized_(self, name, qw, p.dtype)
            del p
        self.quant_spec = spec
        return self

    def dequantize_(self) -> CausalLM:
        """Replace every quantized weight by a parameter holding its dequantized values in the compute
        dtype: the dense model that computes what this one does (the same bits on a CPU). Returns it."""
        for name, holder in quantized_weights(self).items():
            install_dense_(self, name, holder.dequantize())
        self.quant_spec = None
        return self

    @property
    def quantization(self) -> dict | None:
        """None for a dense model; else what was asked (mode, group_size, symmetric: None = the default) and
        `weights`: the formats the weights are held in, with their counts ({"int4 g32 asym fp16": 210})."""
        weights = quantized_weights(self)
        if not weights:
            return None
        formats: dict[str, int] = {}
        for holder in weights.values():
            d = holder.value.describe()
            formats[d] = formats.get(d, 0) + 1
        spec = self.quant_spec.to_dict() if self.quant_spec is not None else {}
        return {**spec, "weights": dict(sorted(formats.items()))}

    @classmethod
    def checkpoint_key(cls, key: str) -> str:
        """A checkpoint tensor's name in this model's naming (`model.decoder.x` -> `decoder.x` for OPT)."""
        prefix = cls.hf_prefix
        return key[len(prefix):] if prefix and key.startswith(prefix) else key

    @classmethod
    def hf_key(cls, name: str) -> str:
        """A parameter name (as checkpoint_names gives it) -> the name transformers writes."""
        return cls.hf_prefix + name

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    @property
    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def limits(self) -> Limits:
        return Limits.of(self.config)

    # Forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T0] trunk tokens -> hidden states of the signed rows [T, h]."""
        d = self.decoder
        x = d.embed(input_ids, positions)
        inputs = ctx.inputs
        for layer in d.layers:
            # [T0, h] -> [T, h]: the trunk forks into the signed copies inside the first adapted layer
            x = layer(x, ctx)
        if inputs.fork_index is not None and inputs.fork_layer >= len(d.layers):
            x = x[inputs.fork_index]
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm(s) and the LM head: [n, h] -> logits [n, vocab] (fp32).

        The vocabulary goes in blocks of `head_rows(h)` rows of the head's weight, one GEMM each (a
        quantized head is dequantized one block at a time: never the whole matrix), the same blocks
        for a dense and a quantized head, so both give the same bits. In the batch-invariant mode each
        block's GEMM runs the row chunks of the whole head's width (kernels/rows.py: a wide GEMM)."""
        h = self.decoder.final(x)  # [n, k]
        w = weight_value(self.lm_head_weight)  # [V, k]: a tensor or a QuantizedWeight
        V, K = w.shape
        rows, chunk = head_rows(K), row_chunk(h.device, V)
        logits = torch.empty((h.shape[0], V), dtype=torch.float32, device=h.device)
        for v0 in range(0, V, rows):
            block = w[v0:v0 + rows] if isinstance(w, torch.Tensor) else w.select_rows(slice(v0, v0 + rows))
            logits[:, v0:v0 + rows] = invariant.linear(h, block, chunk=chunk)
        return logits

    def prepare(self, inputs: ModelInputs, *, pool: KVPool | None = None) -> ForwardContext:
        """The runtime for one forward: the (reused) KV pool, the attention backend, each stage planned once.

        pool: a caller's own pool instead of the model's (a cache that outlives the forward, as
        incremental decoding keeps one: engine/generate.py); the caller sizes it.
        """
        cfg = self.config
        if self._backend is None:
            self._backend = resolve_backend(self.backend_name, device=self.device)
        if pool is None:
            if self._pool is None or self._pool.dtype != self.dtype or self._pool.device != self.device:
                self._pool = KVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype=self.dtype,
                                    device=self.device, num_buffers=1)
            pool = self._pool
            rows = max(inputs.meta.num_tokens, inputs.trunk_meta.num_tokens if inputs.trunk_meta else 0)
            pool.reserve(rows)
        kw = dict(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  dtype=self.dtype)
        plans = {id(inputs.meta): self._backend.plan(inputs.meta, stage=0, **kw)}
        if inputs.trunk_meta is not None:
            plans[id(inputs.trunk_meta)] = self._backend.plan(inputs.trunk_meta, stage=1, **kw)
        return ForwardContext(inputs, pool, self._backend, plans, trace=self.trace)

    def set_attention_backend(self, name: str | None) -> None:
        """Force "torch" or "flashinfer" (None: automatic) for this model's later forwards."""
        self.backend_name, self._backend = name, None

    # Scoring --------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, batch: StepBatch, *, logits_chunk: int = 1024) -> torch.Tensor:
        """log p(target) of every readout request of the batch: [R] fp32."""
        ctx = self.prepare(batch.inputs)
        x = self.forward(batch.inputs.input_ids, batch.inputs.positions, ctx)
        return self.readout_logprobs(x, batch.readout, logits_chunk=logits_chunk)

    def readout_logprobs(self, x: torch.Tensor, readout: Readout, *, logits_chunk: int = 1024) -> torch.Tensor:
        """x: [T, h] hidden states -> [R] log-probs; logits exist only for readout.rows, a chunk at a time."""
        x = x[readout.rows]  # [U, h]
        out = torch.empty(readout.req_row.shape[0], dtype=torch.float32, device=x.device)
        for r0 in range(0, x.shape[0], logits_chunk):
            logits = self.head(x[r0:r0 + logits_chunk])  # [u, vocab]
            lse = invariant.logsumexp(logits)
            sel = (readout.req_row >= r0) & (readout.req_row < r0 + logits_chunk)
            rows = readout.req_row[sel] - r0
            out[sel] = logits[rows, readout.req_target[sel]] - lse[rows]
        return out

    def build_batch(self, examples: Sequence[Example], copies: Sequence[Copy] = (Copy(),), *,
                    adapters: Sequence = (), eps: float = 0.0, sharing: str = "all", fork: bool = True,
                    examples_per_copy: Sequence[Sequence[int]] | None = None, checked: bool = False,
                    batch_invariant: bool | None = None) -> StepBatch:
        """The one forward batch scoring `examples` under `copies` (engine/batch.py, docs/design.md "A
        step's data").

        adapters: the LoRAAdapters the copies index (`Copy.adapter`); eps: the perturbation size.
        sharing: "all" (radix tree over every sequence: prompts under their candidates, common
        prefixes, duplicates), "candidates" (a prompt per example, shared by its candidates only) or
        "none" (every sequence computed on its own: the reference the sharing paths are tested
        against). fork: run the layers below the lowest adapted layer, and that layer's projections
        without an adapter, once on an unsigned trunk (needs every copy to score the same
        examples). examples_per_copy: which examples each copy scores (default: all of them in every
        copy), when several jobs with different batches share one forward.
        checked: the caller has already checked `examples` against this model (engine/example.py:
        every public entry point checks once); otherwise they are checked here.
        batch_invariant: lay the batch out for the batch-invariant mode (sharing="all" shares runs only
        inside an example); None: the calling thread's mode (engine/invariant.py).
        """
        if not checked:
            check_examples(examples, self.limits, what="examples", training=False)
        return plan_batch(examples, copies, adapters=adapters, eps=eps, num_layers=self.config.num_hidden_layers,
                          device=self.device, sharing=sharing, fork=fork, examples_per_copy=examples_per_copy,
                          projections=self.projections, batch_invariant=batch_invariant)

    def plan_batch(self, examples: Sequence[Example], copies: Sequence[Copy] = (Copy(),), **kw) -> StepBatch:
        """Deprecated: `build_batch(examples, copies, checked=True, ...)`."""
        warnings.warn("CausalLM.plan_batch is deprecated: use build_batch(..., checked=True)", DeprecationWarning,
                      stacklevel=2)
        return self.build_batch(examples, copies, checked=True, **kw)

    @property
    def projections(self) -> list[tuple]:
        """Every stacked projection of the model, as the batcher packs LoRA weights for them."""
        if self._projections is None:
            self._projections = [m.projection for m in self.modules() if isinstance(m, ZOProjection)]
        return self._projections

    @torch.no_grad()
    def token_logprobs(self, sequences: Sequence[Sequence[int]], adapter=None, *,
                       sharing: str = "all") -> list[torch.Tensor]:
        """For each sequence, log p(tok[i+1] | tok[:i+1]) for i = 0 .. len-2: a float32 tensor [len-1]."""
        check_sequences(sequences, self.limits)
        examples = [Example(prompt=list(seq[:1]), target=list(seq[1:])) for seq in sequences]
        adapters = [adapter] if adapter is not None else []
        batch = self.build_batch(examples, [Copy()], adapters=adapters, sharing=sharing, checked=True)
        lp = self.score(batch)
        counts = torch.bincount(batch.readout.req_group, minlength=batch.readout.num_groups).tolist()
        return [t.cpu() for t in torch.split(lp, counts)]


def checkpoint_names(module: nn.Module) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Every checkpoint tensor `module`'s parameters hold -> (parameter name, its rows, or None: all).

    A stacked projection (one with `parts`, as ZOProjection and the SGLang plugin's projection have)
    named `<path>.qkv_proj` holds the checkpoint's `<path>.q_proj`, `<path>.k_proj` and
    `<path>.v_proj` in its rows; every other parameter is its own checkpoint tensor. Loaders read a
    checkpoint through this map and savers write one through it, so the two cannot disagree.
    """
    out = {}
    for mod_name, mod in module.named_modules():
        parts = getattr(mod, "parts", None)
        for leaf, _ in mod.named_parameters(recurse=False):
            pname = f"{mod_name}.{leaf}" if mod_name else leaf
            if parts is None:
                out[pname] = (pname, None)
                continue
            parent = mod_name.rpartition(".")[0]
            for part, start, stop in parts:
                out[f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}"] = (pname, (start, stop))
    return out
