"""flashzo's OPT as an SGLang model: the engine's own OPT block, run with SGLang's layers and KV cache.

SGLang builds it from the checkpoint's config (`architectures: ["OPTForCausalLM"]`) and calls
`forward(input_ids, positions, forward_batch)` with the ragged tokens of a batch. The decoder block,
embeddings, final norm and checkpoint name mapping are engine/opt.py's, built with the ops here:
projections are `SGLangProjection`s (SGLang's ReplicatedLinear, so its LoRA manager can wrap them),
attention is SGLang's RadixAttention (its KV pool, its attention backend: torch_native on a CPU),
the token embedding is SGLang's VocabParallelEmbedding. Every adapted projection runs `zo_linear`
(routing.py): flashzo's perturbed LoRA linear over the batch's requests, each with its own adapter,
seed and sign. This module holds only that glue.

What SGLang's LoRA manager needs for OPT, and where it is:
- adaptable modules named as SGLang normalizes PEFT targets: q/k/v -> one stacked `qkv_proj`,
  `out_proj`, `fc1`, `fc2` (sglang/srt/lora/utils.py: get_normalized_target_modules); the engine's
  OPT block stacks q/k/v the same way;
- of a layer type it can wrap: `ReplicatedLinear` (single GPU / CPU; no tensor parallelism);
- `get_hidden_dim(module, layer)`: their (in, out) sizes, which SGLang's default only knows for
  Llama-style names; `should_apply_lora(name)`: decoder-layer projections only.
The LoRA wrapper is never run: zo_linear reads the pool buffers it was given (`A_buffer`,
`B_buffer`) and the backend's batch_info, and computes with flashzo's kernel.

Weights: every layout flashzo's load_opt reads arrives through SGLang's loader as (name, tensor) and
goes through the engine's CheckpointFill (engine/loading.py): q/k/v land in their rows of qkv_proj,
`lm_head.weight` (tied) is checked and skipped, and an unknown, misshapen or missing tensor is an
InputError naming it, as in flashzo.load_opt.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from torch import nn

from flashzo.engine.config import OPTConfig
from flashzo.engine.family import FAMILIES
from flashzo.engine.loading import CheckpointFill
from flashzo.engine.opt import OPTDecoder
from flashzo.errors import InputError

from .routing import AdapterCache, Routes, build_routes, zo_linear

LORA_MODULES = ("qkv_proj", "out_proj", "fc1", "fc2")


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


class SGLangOps:
    """Builds the shared OPT block (engine/opt.py) out of SGLang's layers, in SGLang's default dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def projection(self, in_features, parts, bias, layer_id, *, prefix="", fork_input=False) -> SGLangProjection:
        return SGLangProjection(in_features, parts, bias, layer_id, self.dtype, prefix)

    def attention(self, num_heads, num_kv_heads, head_dim, scaling, layer_id, *, prefix="") -> RadixAttention:
        return RadixAttention(num_heads, head_dim, scaling, num_kv_heads=num_kv_heads, layer_id=layer_id,
                              prefix=prefix)

    def embedding(self, num, dim, *, prefix="") -> VocabParallelEmbedding:
        return VocabParallelEmbedding(num, dim, params_dtype=self.dtype, prefix=prefix)


class SGLangContext:
    """The block's forward context inside SGLang: its batch, and the route every request's rows take."""

    def __init__(self, forward_batch: ForwardBatch, routes: Routes | None):
        self.forward_batch, self.routes = forward_batch, routes

    def residual(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        return x  # SGLang's batches never fork: every request carries its own rows

    def project(self, module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Every part's output of an SGLangProjection, or of SGLang's LoRA wrapper around one: [T, n] each."""
        base = getattr(module, "base_layer", module)
        pool = (module.A_buffer, module.B_buffer) if getattr(module, "set_lora", False) else None
        outs = []
        for i, (name, o0, o1) in enumerate(base.parts):
            bias = base.bias[o0:o1] if base.bias is not None else None
            outs.append(zo_linear(x, base.weight[o0:o1], bias, self.routes, layer_id=base.layer_id, name=name,
                                  part=i, out=(o0, o1), pool=pool))
        return outs

    def attend(self, attn: RadixAttention, q, k, v) -> torch.Tensor:
        return attn(q, k, v, self.forward_batch)


class _DecoderHolder(nn.Module):
    """Holds the decoder under `model.` so parameters are named as OPTForCausalLM's checkpoints name them."""

    def __init__(self, decoder: OPTDecoder):
        super().__init__()
        self.decoder = decoder


class OPTForCausalLM(nn.Module):
    """SGLang's entry class for OPT checkpoints (matched by the config's `architectures`)."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise InputError("flashzo's SGLang OPT runs unquantized checkpoints only (quantization="
                             f"{type(quant_config).__name__})")
        if _tp_size() != 1:
            raise InputError("flashzo's SGLang OPT runs on one device (tp_size 1): its projections are "
                             "ReplicatedLinear and its LoRA kernel is not tensor-parallel")
        self.config = config  # the HF config object SGLang reads (vocab_size, num_hidden_layers ...)
        self.zo_config = OPTConfig.from_hf(config)
        self.model = _DecoderHolder(OPTDecoder(self.zo_config, SGLangOps(torch.get_default_dtype()),
                                               prefix="model.decoder"))
        self.lm_head = self.model.decoder.embed_tokens  # tied
        self.logits_processor = LogitsProcessor(config)
        self._adapters: AdapterCache | None = None
        self._lora_backend = None
        self._lora_searched = False  # SGLang's LoRA manager wraps modules after __init__, before any forward

    # What SGLang's LoRA manager asks of the model ---------------------------------------------------
    def get_hidden_dim(self, module_name: str, layer_idx: int = 0) -> tuple[int, int]:
        h, f = self.zo_config.hidden_size, self.zo_config.ffn_dim
        dims = {"qkv_proj": (h, 3 * h), "out_proj": (h, h), "fc1": (h, f), "fc2": (f, h)}
        if module_name not in dims:
            raise InputError(f"flashzo's SGLang OPT adapts {', '.join(LORA_MODULES)} (q/k/v as qkv_proj); "
                             f"an adapter targets {module_name!r}")
        return dims[module_name]

    def should_apply_lora(self, module_name: str) -> bool:
        return ".layers." in module_name and module_name.rsplit(".", 1)[-1] in LORA_MODULES

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

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                pp_proxy_tensors=None, input_embeds: Optional[torch.Tensor] = None,
                get_embedding: bool = False) -> LogitsProcessorOutput:
        d = self.model.decoder
        if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            # A captured graph would replay one batch's routes for every later batch.
            raise RuntimeError("flashzo's SGLang OPT chooses each request's adapter and perturbation in Python "
                               "and cannot be captured in a CUDA graph: start SGLang with --disable-cuda-graph")
        routes = self._routes(forward_batch, input_ids.shape[0])
        if get_embedding:
            raise InputError("flashzo's SGLang OPT is a causal LM; it does not serve embeddings")
        ctx = SGLangContext(forward_batch, routes)
        x = d.embed(input_ids, positions, input_embeds)
        for layer in d.layers:
            x = layer(x, ctx)
        return self.logits_processor(input_ids, d.final(x), self.lm_head, forward_batch)

    # Weights ------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.zo_config
        embed = "decoder.embed_tokens.weight"
        fill = CheckpointFill(self.model, FAMILIES["opt"], tied_shape=(cfg.vocab_size, cfg.word_embed_proj_dim),
                              row_limits={embed: cfg.vocab_size})  # SGLang pads the vocabulary rows
        for key, tensor in weights:
            fill.put(key, tensor, "checkpoint")
        fill.finish("checkpoint")
        self.model.decoder.embed_tokens.weight.data[cfg.vocab_size:].zero_()  # SGLang's padding rows


EntryClass = OPTForCausalLM
