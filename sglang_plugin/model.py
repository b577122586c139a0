"""flashzo's OPT as an SGLang model: RadixAttention over SGLang's KV cache, flashzo's LoRA kernel.

SGLang builds it from the checkpoint's config (`architectures: ["OPTForCausalLM"]`) and calls
`forward(input_ids, positions, forward_batch)` with the ragged tokens of a batch. Attention is
SGLang's RadixAttention (its KV pool, its attention backend: torch_native on a CPU). Every adapted
projection is `zo_linear` (routing.py): flashzo's perturbed LoRA linear over the batch's requests,
each with its own adapter, seed and sign.

What SGLang's LoRA manager needs for OPT, and where it is:
- adaptable modules named as SGLang normalizes PEFT targets: q/k/v -> one stacked `qkv_proj`,
  `out_proj`, `fc1`, `fc2` (sglang/srt/lora/utils.py: get_normalized_target_modules);
- of a layer type it can wrap: `ReplicatedLinear` (single GPU / CPU; no tensor parallelism);
- `get_hidden_dim(module, layer)`: their (in, out) sizes, which SGLang's default only knows for
  Llama-style names; `should_apply_lora(name)`: decoder-layer projections only.
The LoRA wrapper is never run: zo_linear reads the pool buffers it was given (`A_buffer`,
`B_buffer`) and the backend's batch_info, and computes with flashzo's kernel.

Weights: every layout flashzo's load_opt reads arrives through SGLang's loader as (name, tensor);
names `model.decoder.*` and `decoder.*` map 1:1, q/k/v land in their rows of qkv_proj,
`lm_head.weight` (tied) is checked and skipped, and an unknown, misshapen or missing tensor is a
ValueError naming it, as in flashzo.load_opt.
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

from flashzo.engine.config import POSITION_OFFSET, OPTConfig
from flashzo.engine.opt import _ACT

from .routing import AdapterCache, Routes, build_routes, zo_linear

QKV = ("q_proj", "k_proj", "v_proj")
LORA_MODULES = ("qkv_proj", "out_proj", "fc1", "fc2")


def _tp_size() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_size)
    except Exception:  # no parallel context (unit tests build the model directly)
        return 1


class ZOLinear(ReplicatedLinear):
    """A (possibly stacked) projection: parts (flashzo module name, rows of the weight) under zo_linear."""

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool, layer_id: int,
                 params_dtype: torch.dtype | None, prefix: str):
        super().__init__(in_features, sum(n for _, n in parts), bias=bias, params_dtype=params_dtype, prefix=prefix)
        self.layer_id = layer_id
        self.parts, start = [], 0
        for name, n in parts:
            self.parts.append((name, (start, start + n)))
            start += n


def apply_zo(module: nn.Module, x: torch.Tensor, routes: Routes | None) -> list[torch.Tensor]:
    """Every part's output of a ZOLinear, or of SGLang's LoRA wrapper around one: [T, n_part] each."""
    base = getattr(module, "base_layer", module)
    pool = (module.A_buffer, module.B_buffer) if getattr(module, "set_lora", False) else None
    outs = []
    for i, (name, (o0, o1)) in enumerate(base.parts):
        bias = base.bias[o0:o1] if base.bias is not None else None
        outs.append(zo_linear(x, base.weight[o0:o1], bias, routes, layer_id=base.layer_id, name=name,
                              part=i, out=(o0, o1), pool=pool))
    return outs


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_id: int, dtype, prefix: str):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.enable_bias
        self.qkv_proj = ZOLinear(h, tuple((n, h) for n in QKV), bias, layer_id, dtype, f"{prefix}.qkv_proj")
        self.out_proj = ZOLinear(h, (("out_proj", h),), bias, layer_id, dtype, f"{prefix}.out_proj")
        self.attn = RadixAttention(cfg.num_attention_heads, cfg.head_dim, cfg.head_dim ** -0.5,
                                   num_kv_heads=cfg.num_attention_heads, layer_id=layer_id, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor, forward_batch: ForwardBatch, routes: Routes | None) -> torch.Tensor:
        q, k, v = apply_zo(self.qkv_proj, x, routes)  # [T, h] each
        o = self.attn(q, k, v, forward_batch)
        return apply_zo(self.out_proj, o, routes)[0]


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_id: int, dtype, prefix: str):
        super().__init__()
        h, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, layer_id, dtype, f"{prefix}.self_attn")
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=affine, dtype=dtype)
        self.fc1 = ZOLinear(h, (("fc1", cfg.ffn_dim),), cfg.enable_bias, layer_id, dtype, f"{prefix}.fc1")
        self.fc2 = ZOLinear(cfg.ffn_dim, (("fc2", h),), cfg.enable_bias, layer_id, dtype, f"{prefix}.fc2")
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=affine, dtype=dtype)
        self.act = _ACT[cfg.activation_function]

    def forward(self, x: torch.Tensor, forward_batch: ForwardBatch, routes: Routes | None) -> torch.Tensor:
        # x: [T, h]; the same block as flashzo.engine.opt.OPTDecoderLayer
        r = x
        if self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x = r + self.self_attn(x, forward_batch, routes)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        r = x
        if self.pre_ln:
            x = self.final_layer_norm(x)
        x = r + apply_zo(self.fc2, self.act(apply_zo(self.fc1, x, routes)[0]), routes)[0]
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, cfg: OPTConfig, dtype, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.word_embed_proj_dim, params_dtype=dtype,
                                                   prefix=f"{prefix}.embed_tokens")
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                            dtype=dtype)
        if cfg.has_projections:
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False, dtype=dtype)
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False, dtype=dtype)
        else:
            self.project_in = self.project_out = None
        self.final_layer_norm = (nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine,
                                              dtype=dtype) if cfg.has_final_layer_norm else None)
        self.layers = nn.ModuleList([OPTDecoderLayer(cfg, i, dtype, f"{prefix}.layers.{i}")
                                     for i in range(cfg.num_hidden_layers)])


class OPTModel(nn.Module):
    def __init__(self, cfg: OPTConfig, dtype, prefix: str = "model"):
        super().__init__()
        self.decoder = OPTDecoder(cfg, dtype, f"{prefix}.decoder")


class OPTForCausalLM(nn.Module):
    """SGLang's entry class for OPT checkpoints (matched by the config's `architectures`)."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if quant_config is not None:
            raise ValueError("flashzo's SGLang OPT runs unquantized checkpoints only (quantization="
                             f"{type(quant_config).__name__})")
        if _tp_size() != 1:
            raise ValueError("flashzo's SGLang OPT runs on one device (tp_size 1): its projections are "
                             "ReplicatedLinear and its LoRA kernel is not tensor-parallel")
        self.config = config  # the HF config object SGLang reads (vocab_size, num_hidden_layers ...)
        self.zo_config = OPTConfig.from_hf(config)
        dtype = torch.get_default_dtype()
        self.model = OPTModel(self.zo_config, dtype)
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
            raise ValueError(f"flashzo's SGLang OPT adapts {', '.join(LORA_MODULES)} (q/k/v as qkv_proj); "
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
        x = d.embed_tokens(input_ids) if input_embeds is None else input_embeds
        if d.project_in is not None:
            x = d.project_in(x)
        x = x + d.embed_positions(positions + POSITION_OFFSET)
        for layer in d.layers:
            x = layer(x, forward_batch, routes)
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        if d.project_out is not None:
            x = d.project_out(x)
        if get_embedding:
            raise ValueError("flashzo's SGLang OPT is a causal LM; it does not serve embeddings")
        return self.logits_processor(input_ids, x, self.lm_head, forward_batch)

    # Weights ------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        cfg = self.zo_config
        for key, tensor in weights:
            name = key[len("model."):] if key.startswith("model.decoder.") else key
            if name == "lm_head.weight":
                expected = (cfg.vocab_size, cfg.word_embed_proj_dim)
                if tuple(tensor.shape) != expected:
                    raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                                     f"expects {expected}")
                continue  # tied to the token embedding
            if not name.startswith("decoder."):
                raise ValueError(f"unexpected checkpoint tensor {key!r}: the OPT config has no such parameter")
            name = "model." + name
            shard = None
            for i, proj in enumerate(QKV):
                if f".self_attn.{proj}." in name:
                    name, shard = name.replace(f".self_attn.{proj}.", ".self_attn.qkv_proj."), i
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected checkpoint tensor {key!r}: the OPT config has no such parameter")
            target = param.data
            if shard is not None:
                h = cfg.hidden_size
                target = target[shard * h:(shard + 1) * h]
                name = f"{name}#{QKV[shard]}"
            elif name.endswith("embed_tokens.weight"):
                target = target[:cfg.vocab_size]  # SGLang pads the vocabulary rows
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                                 f"expects {tuple(target.shape)}")
            if name in loaded:
                raise ValueError(f"checkpoint tensor {key!r} is given twice")
            target.copy_(tensor)
            loaded.add(name)
        expected = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                expected.update(f"{name}#{proj}" for proj in QKV)
            else:
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"checkpoint tensor for {missing[0]!r}{more} is missing")
        self.model.decoder.embed_tokens.weight.data[cfg.vocab_size:].zero_()  # SGLang's padding rows


EntryClass = OPTForCausalLM
