"""flashzo's models inside SGLang: each family's own engine block, run with SGLang's layers and KV cache.

SGLang builds a model from the checkpoint's config (`architectures`: OPTForCausalLM,
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) and calls `forward(input_ids, positions,
forward_batch)` with the ragged tokens of a batch. The decoder block, embeddings, final norm and
checkpoint name mapping are the engine's (engine/opt.py, engine/llama.py), built with the ops here
(SGLangOps and SGLangContext implement engine/model.py's LayerOps and BlockContext protocols):
projections are `SGLangProjection`s (SGLang's ReplicatedLinear, so its LoRA manager can wrap them),
attention is SGLang's RadixAttention (its KV pool, its attention backend: torch_native on a CPU),
the token embedding is SGLang's VocabParallelEmbedding (an untied Llama head its ParallelLMHead);
rotary embeddings rotate by the batch's `positions`. Every adapted projection runs `zo_linear`
(routing.py): flashzo's perturbed LoRA linear over the batch's requests, each with its own adapter,
seed and sign. This module holds only that glue.

What SGLang's LoRA manager needs, and where it is:
- adaptable modules named as SGLang normalizes PEFT targets: q/k/v -> one stacked `qkv_proj`,
  gate/up -> `gate_up_proj` (sglang/srt/lora/utils.py: get_normalized_target_modules); the engine's
  blocks stack them the same way, in the same part order;
- of a layer type it can wrap: `ReplicatedLinear` (single GPU / CPU; no tensor parallelism);
- `get_hidden_dim(module, layer)`: their (in, out) sizes (a stacked module's out: its parts' sum,
  q + 2 kv under grouped-query attention); `should_apply_lora(name)`: decoder-layer projections only.
The LoRA wrapper is never run: zo_linear reads the pool buffers it was given (`A_buffer`,
`B_buffer`) and the backend's batch_info, and computes with flashzo's kernel.

Weights: every layout flashzo's load_model reads arrives through SGLang's loader as (name, tensor)
and goes through the engine's CheckpointFill (engine/loading.py): q/k/v (gate/up) land in their rows
of the stacked projection, a tied `lm_head.weight` is checked and skipped, and an unknown, misshapen
or missing tensor is an InputError naming it, as in flashzo.load_model. A sliding window shorter
than the model's positions refuses longer requests by name, as flashzo does.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from torch import nn

from flashzo.engine.example import Limits
from flashzo.engine.family import FAMILIES
from flashzo.engine.llama import LlamaDecoder
from flashzo.engine.loading import CheckpointFill
from flashzo.engine.model import BlockContext, LayerOps
from flashzo.engine.opt import OPTDecoder
from flashzo.errors import InputError

from .routing import AdapterCache, Routes, build_routes, zo_linear


def _tp_size() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_size)
    except Exception:  # no parallel context (unit tests build the model directly)
        return 1


class SGLangProjection(ReplicatedLinear):
    """A (possibly stacked) projection SGLang's LoRA manager can wrap; parts as in engine ZOProjection."""

    def __init__(self, in_features: int, parts, bias: bool, layer_id: int, params_dtype, prefix: str):
        super().__init__(in_features, sum(n for _, n in parts), bias=bias, params_dtype=params_dtype, prefix=prefix)
        self.layer_id = layer_id
        self.parts, start = [], 0
        for name, n in parts:
            self.parts.append((name, start, start + n))
            start += n


class SGLangOps(LayerOps):
    """The LayerOps that build a family's shared block (engine/opt.py, engine/llama.py) out of SGLang's
    layers, in SGLang's default dtype. SGLang's forward never forks, so `fork_input` changes nothing."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def projection(self, in_features, parts, bias, layer_id, *, prefix, fork_input=False) -> SGLangProjection:
        return SGLangProjection(in_features, parts, bias, layer_id, self.dtype, prefix)

    def attention(self, num_heads, num_kv_heads, head_dim, scaling, layer_id, *, prefix) -> RadixAttention:
        return RadixAttention(num_heads, head_dim, scaling, num_kv_heads=num_kv_heads, layer_id=layer_id,
                              prefix=prefix)

    def embedding(self, num, dim, *, prefix) -> VocabParallelEmbedding:
        return VocabParallelEmbedding(num, dim, params_dtype=self.dtype, prefix=prefix)


class SGLangContext(BlockContext):
    """The BlockContext inside SGLang: its batch, its positions, the route of every request's rows."""

    def __init__(self, forward_batch: ForwardBatch, routes: Routes | None, positions: torch.Tensor):
        self.forward_batch, self.routes, self._positions = forward_batch, routes, positions

    def residual(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        return x  # SGLang's batches never fork: every request carries its own rows

    def positions(self, layer_id: int) -> torch.Tensor:
        return self._positions  # every layer computes the batch's rows

    def project(self, proj: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Every part's output of an SGLangProjection, or of SGLang's LoRA wrapper around one: [T, n] each."""
        base = getattr(proj, "base_layer", proj)
        pool = (proj.A_buffer, proj.B_buffer) if getattr(proj, "set_lora", False) else None
        outs = []
        for i, (name, o0, o1) in enumerate(base.parts):
            bias = base.bias[o0:o1] if base.bias is not None else None
            outs.append(zo_linear(x, base.weight[o0:o1], bias, self.routes, layer_id=base.layer_id, name=name,
                                  part=i, out=(o0, o1), pool=pool))
        return outs

    def attend(self, attn: RadixAttention, q, k, v) -> torch.Tensor:
        return attn(q, k, v, self.forward_batch)


class _DecoderHolder(nn.Module):
    """Holds OPT's decoder under `model.` so parameters are named as OPTForCausalLM's checkpoints name them."""

    def __init__(self, decoder: OPTDecoder):
        super().__init__()
        self.decoder = decoder


def _checkpoint_config(config) -> dict:
    """The checkpoint's config: SGLang on a CPU pads sizes such as intermediate_size to a multiple of 32
    and keeps the checkpoint's as `original_<name>` (sglang/srt/configs/update_config.py:
    adjust_config_with_unaligned_cpu_tp); flashzo's block computes the checkpoint's shapes."""
    d = config if isinstance(config, dict) else config.to_dict()
    out = dict(d)
    for key, value in d.items():
        if key.startswith("original_") and key[len("original_"):] in d and value is not None:
            out[key[len("original_"):]] = value
    return out


class _FlashzoCausalLM(nn.Module):
    """What every family's SGLang entry class shares: SGLang's LoRA hooks, routing, forward, weights.

    A subclass sets `family` (engine/family.py), `stacks` (each adaptable module SGLang's LoRA
    manager sees -> the family's parts in it) and builds the decoder in `_build(ops)`, returning
    (the module whose parameters the checkpoint names, the decoder, the LM head).
    """

    family = ""
    stacks: dict[str, tuple[str, ...]] = {}

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        name = type(self).__name__
        if quant_config is not None:
            raise InputError(f"flashzo's SGLang {name} runs unquantized checkpoints only (quantization="
                             f"{type(quant_config).__name__})")
        if _tp_size() != 1:
            raise InputError(f"flashzo's SGLang {name} runs on one device (tp_size 1): its projections are "
                             "ReplicatedLinear and its LoRA kernel is not tensor-parallel")
        self.config = config  # the HF config object SGLang reads (vocab_size, num_hidden_layers ...)
        self.zo_config = FAMILIES[self.family].config_cls.from_hf(_checkpoint_config(config))
        root, decoder, self.lm_head = self._build(SGLangOps(torch.get_default_dtype()))
        self._parts = (root, decoder)  # a tuple: not registered again as submodules (root may be self)
        self.logits_processor = LogitsProcessor(config)
        self._adapters: AdapterCache | None = None
        self._lora_backend = None
        self._lora_searched = False  # SGLang's LoRA manager wraps modules after __init__, before any forward

    def _build(self, ops: SGLangOps):
        raise NotImplementedError

    # What SGLang's LoRA manager asks of the model ---------------------------------------------------
    def get_hidden_dim(self, module_name: str, layer_idx: int = 0) -> tuple[int, int]:
        parts = self.stacks.get(module_name)
        if parts is None:
            raise InputError(f"flashzo's SGLang {type(self).__name__} adapts {', '.join(self.stacks)}; an adapter "
                             f"targets {module_name!r}")
        shapes = [self.zo_config.lora_shape(p) for p in parts]
        return shapes[0][0], sum(n for _, n in shapes)

    def should_apply_lora(self, module_name: str) -> bool:
        return ".layers." in module_name and module_name.rsplit(".", 1)[-1] in self.stacks

    # Forward ------------------------------------------------------------------------------------------
    def _routes(self, forward_batch: ForwardBatch, num_rows: int) -> Routes:
        if self._adapters is None:
            self._adapters = AdapterCache(self.zo_config, self.lm_head.weight.device)
        if not self._lora_searched:
            for module in self.modules():
                if hasattr(module, "base_layer") and hasattr(module, "lora_backend"):
                    self._lora_backend = module.lora_backend
                    break
            self._lora_searched = True
        return build_routes(forward_batch, num_rows, lora_backend=self._lora_backend, adapters=self._adapters,
                            device=self.lm_head.weight.device)

    def _check_lengths(self, forward_batch: ForwardBatch) -> None:
        limit = Limits.of(self.zo_config)
        if not limit.reason:
            return
        lens = getattr(forward_batch, "seq_lens_cpu", None)
        longest = int(lens.max()) if lens is not None and lens.numel() else 0
        if longest > limit.max_positions:
            raise InputError(f"a request of {longest} tokens is longer than the model's {limit.positions}")

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                pp_proxy_tensors=None, input_embeds: Optional[torch.Tensor] = None,
                get_embedding: bool = False) -> LogitsProcessorOutput:
        d = self._parts[1]
        if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            # A captured graph would replay one batch's routes for every later batch.
            raise RuntimeError(f"flashzo's SGLang {type(self).__name__} chooses each request's adapter and "
                               "perturbation in Python and cannot be captured in a CUDA graph: start SGLang with "
                               "--disable-cuda-graph")
        if get_embedding:
            raise InputError(f"flashzo's SGLang {type(self).__name__} is a causal LM; it does not serve embeddings")
        self._check_lengths(forward_batch)
        routes = self._routes(forward_batch, input_ids.shape[0])
        ctx = SGLangContext(forward_batch, routes, positions)
        x = d.embed(input_ids, positions, input_embeds)
        for layer in d.layers:
            x = layer(x, ctx)
        return self.logits_processor(input_ids, d.final(x), self.lm_head, forward_batch)

    # Weights ------------------------------------------------------------------------------------------
    def _row_limits(self) -> dict[str, int]:
        """Parameters whose rows SGLang pads (the vocabulary) -> the rows a checkpoint fills."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.zo_config
        limits = self._row_limits()
        root = self._parts[0]
        fill = CheckpointFill(root, FAMILIES[self.family], tied_shape=(cfg.vocab_size, self._embed_dim),
                              row_limits=limits)
        for key, tensor in weights:
            fill.put(key, tensor, "checkpoint")
        fill.finish("checkpoint")
        params = dict(root.named_parameters())
        for name, rows in limits.items():
            params[name].data[rows:].zero_()  # SGLang's padding rows


class OPTForCausalLM(_FlashzoCausalLM):
    """SGLang's entry class for OPT checkpoints (matched by the config's `architectures`)."""

    family = "opt"
    stacks = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "out_proj": ("out_proj",), "fc1": ("fc1",),
              "fc2": ("fc2",)}

    def _build(self, ops):
        cfg = self.zo_config
        self._embed_dim = cfg.word_embed_proj_dim
        self.model = _DecoderHolder(OPTDecoder(cfg, ops, prefix="model.decoder"))
        return self.model, self.model.decoder, self.model.decoder.embed_tokens  # the head is tied

    def _row_limits(self):
        return {"decoder.embed_tokens.weight": self.zo_config.vocab_size}


class LlamaForCausalLM(_FlashzoCausalLM):
    """SGLang's entry class for Llama-family checkpoints (Llama, SmolLM; Mistral and Qwen2 below)."""

    family = "llama"
    stacks = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
              "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def _build(self, ops):
        cfg = self.zo_config
        self._embed_dim = cfg.hidden_size
        self.model = LlamaDecoder(cfg, ops, prefix="model")
        if cfg.tie_word_embeddings:
            head = self.model.embed_tokens
        else:
            head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, params_dtype=ops.dtype, prefix="lm_head")
        return self, self.model, head

    def _row_limits(self):
        limits = {"model.embed_tokens.weight": self.zo_config.vocab_size}
        if not self.zo_config.tie_word_embeddings:
            limits["lm_head.weight"] = self.zo_config.vocab_size
        return limits


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


EntryClass = [OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM]
