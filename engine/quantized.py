"""Quantized base weights inside a model: the requested format, and the modules that hold the weights.

    spec = QuantSpec.parse("int4")                 int4, groups of 32 with a min each (the CLI's spelling)
    model = load_model(path, quantize="int4")      engine/loading.py (float checkpoints), engine/gguf.py
    model.quantize_(spec); model.dequantize_()     engine/model.py: in place, one weight at a time

What is quantized (CausalLM.quantizable, engine/model.py): every linear of the base model (each
stacked projection's weight, OPT's project_in/out, an untied LM head) and the token embedding (which
a tied LM head reads). What stays in the compute dtype: norms, biases, OPT's learned position
embedding (at most 2050 rows; 0.3% of opt-1.3b) and the LoRA adapters (fp32, as always). The
embedding is quantized because it is a large part of a small model (28M of SmolLM2-135M's 135M
parameters) and, tied, is its LM head too.

A weight lives in a `QuantizedParameter`: the QuantizedWeight's tensors (kernels/quant.py) as
buffers, so `model.to(device)` moves them; a change of dtype (`model.to(torch.bfloat16)`) leaves
them as they are and changes the compute dtype only. It takes the place of the parameter it
replaces (a ZOProjection's `weight` becomes a submodule of that name), and a quantized token
embedding is a `QuantizedEmbedding`, whose lookup dequantizes the rows it returns. Everything a
forward computes from it is the dense model's of the dequantized weights: the same bits on a
CPU (docs/design.md, "Quantized weights").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from flashzo.kernels.errors import InputError
from flashzo.kernels.quant import GROUP_SIZES, MODES, QuantizedWeight, check_format

# mode -> (group size, symmetric) when not given: int8 per output channel, symmetric; int4 groups of 32
# with a min per group (llama.cpp's Q4_1; quantized weights of the real model's file are Q4_1)
DEFAULTS = {"int8": (None, True), "int4": (32, False)}
_SPELLING = re.compile(r"(int8|int4)(?:-(?:g(\d+)|(channel)))?(?:-(sym|asym))?")


@dataclass(frozen=True)
class QuantSpec:
    """What a user asks for: a mode and, optionally, a group size and symmetry (None: the mode's
    default, or for a GGUF file the format its blocks repack into exactly)."""

    mode: str
    group_size: int | None = None  # int8: None is per output channel
    symmetric: bool | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"quantization must be one of {', '.join(MODES)}, got {self.mode!r}")
        allowed = GROUP_SIZES[self.mode]
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g not in allowed):
            raise InputError(f"{self.mode} group size must be one of {', '.join(map(str, allowed))}"
                             f"{' or None (per output channel)' if self.mode == 'int8' else ''}, got {g!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise InputError(f"symmetric must be True, False or None, got {self.symmetric!r}")

    @classmethod
    def of(cls, quantize, group_size=None, symmetric=None) -> QuantSpec | None:
        """load_model's arguments as a spec: quantize None (then group_size and symmetric must be None),
        a mode, a QuantSpec or its CLI spelling."""
        if quantize is None:
            if group_size is not None or symmetric is not None:
                raise InputError("group_size and symmetric need quantize='int8' or 'int4'")
            return None
        if isinstance(quantize, QuantSpec):
            spec = quantize
        elif isinstance(quantize, str):
            spec = cls.parse(quantize)
        else:
            raise InputError(f"quantize must be 'int8', 'int4' or None, got {quantize!r}")
        if group_size is not None or symmetric is not None:
            spec = cls(spec.mode, group_size if group_size is not None else spec.group_size,
                       symmetric if symmetric is not None else spec.symmetric)
        return spec

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """MODE[-gN|-channel][-sym|-asym]: int8, int4, int4-g64, int8-g32-asym, int8-channel-sym."""
        m = _SPELLING.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise InputError(f"quantization {text!r} is not MODE[-gN][-sym|-asym] with MODE int8 or int4 (e.g. int8, "
                             "int4, int4-g64, int4-g128-sym)")
        mode, group, channel, sym = m.groups()
        if channel and mode != "int8":
            raise InputError(f"quantization {text!r}: per-channel scales are int8's; int4 needs groups")
        return cls(mode, int(group) if group else None, None if sym is None else sym == "sym")

    @property
    def group(self) -> int | None:
        return self.group_size if self.group_size is not None else DEFAULTS[self.mode][0]

    @property
    def sym(self) -> bool:
        return self.symmetric if self.symmetric is not None else DEFAULTS[self.mode][1]

    @property
    def name(self) -> str:
        """The spelling parse() reads back, defaults resolved: int8-channel-sym, int4-g32-asym."""
        return f"{self.mode}-{'channel' if self.group is None else f'g{self.group}'}-{'sym' if self.sym else 'asym'}"

    def weight_format(self, K: int, what: str, scale_dtype: torch.dtype = torch.float16) -> WeightFormat:
        """The format of a weight with rows of K: InputError naming `what` if K does not fit it."""
        try:
            group = check_format(self.mode, self.group, K, self.sym)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None
        return WeightFormat(self.mode, group, self.sym, scale_dtype)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d, *, where: str) -> QuantSpec:
        if not isinstance(d, dict) or "mode" not in d:
            raise InputError(f"{where}: a quantization must be an object with a mode, got {d!r}")
        try:
            return cls(d["mode"], d.get("group_size"), d.get("symmetric"))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


@dataclass(frozen=True)
class WeightFormat:
    """One weight's format: what QuantizedWeight.describe() prints ("int4 g32 asym fp16")."""

    mode: str
    group_size: int  # K for int8 per output channel
    symmetric: bool
    scale_dtype: torch.dtype

    @classmethod
    def of(cls, qw: QuantizedWeight) -> WeightFormat:
        return cls(qw.mode, qw.group_size, qw.symmetric, qw.scale_dtype)

    def empty(self, N: int, K: int, device=None) -> QuantizedWeight:
        """An uninitialised [N, K] weight in this format (rows are filled in place)."""
        int4 = self.mode == "int4"
        data = torch.empty((N, K // 2 if int4 else K),
                           dtype=torch.int8 if self.symmetric and not int4 else torch.uint8, device=device)
        groups = (N, K // self.group_size)
        mins = None if self.symmetric else torch.empty(groups, dtype=self.scale_dtype, device=device)
        return QuantizedWeight((N, K), self.mode, self.group_size, self.symmetric, data,
                               torch.empty(groups, dtype=self.scale_dtype, device=device), mins)


def copy_rows_(dst: QuantizedWeight, start: int, src: QuantizedWeight) -> None:
    """dst's rows [start, start + len(src)) = src's (the same format: one part of a stacked weight)."""
    if WeightFormat.of(dst) != WeightFormat.of(src) or dst.shape[1] != src.shape[1]:
        raise InputError(f"a {src.describe()} part [{src.shape[0]}, {src.shape[1]}] cannot fill rows of a "
                         f"{dst.describe()} weight [{dst.shape[0]}, {dst.shape[1]}]")
    stop = start + src.shape[0]
    for name in ("data", "scales", "mins"):
        t = getattr(dst, name)
        if t is not None:
            t[start:stop].copy_(getattr(src, name))


class QuantizedParameter(nn.Module):
    """A QuantizedWeight held as buffers `data`, `scales` and `mins` (see the module docstring).

    `value` is the QuantizedWeight over the buffers; `compute_dtype` the model's dtype (what an
    embedding lookup returns, and what a dequantized model's parameters take)."""

    def __init__(self, qw: QuantizedWeight, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shape, self.mode, self.group_size, self.symmetric = qw.shape, qw.mode, qw.group_size, qw.symmetric
        self.register_buffer("data", qw.data)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("mins", qw.mins)
        self.compute_dtype = compute_dtype
        self._value = qw

    @property
    def value(self) -> QuantizedWeight:
        v = self._value
        if v.data is not self.data or v.scales is not self.scales or v.mins is not self.mins:  # moved, loaded
            v = self._value = QuantizedWeight(self.shape, self.mode, self.group_size, self.symmetric, self.data,
                                              self.scales, self.mins)
        return v

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def nbytes(self) -> int:
        return self.value.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.value.dequantize(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # A float probe tells what fn does: its device is where the buffers go, its dtype (a cast of
        # floating tensors: model.to(dtype), .half()) the new compute dtype. The integers, scales and
        # mins keep their dtypes: casting the scales would change the weight.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.data.device))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        for name, t in self._buffers.items():
            if t is not None:
                self._buffers[name] = t.to(probe.device)
        return self

    def extra_repr(self) -> str:
        return f"{list(self.shape)}, {self.value.describe()}, compute_dtype={self.compute_dtype}"


class TokenEmbedding(nn.Embedding):
    """The token embedding a LayerOps makes (engine/model.py's EngineOps): torch's Embedding with its
    prefix, so that a model can tell it from other embeddings (OPT's positions stay dense)."""

    def __init__(self, num: int, dim: int, prefix: str = "", **kw):
        super().__init__(num, dim, **kw)
        self.prefix = prefix


class QuantizedEmbedding(nn.Module):
    """A token embedding over a QuantizedParameter: ids [T] -> [T, dim] in the compute dtype, each row
    dequantized as the dense embedding of the dequantized matrix holds it (the same bits)."""

    def __init__(self, weight: QuantizedParameter, prefix: str = ""):
        super().__init__()
        self.weight = weight
        self.prefix = prefix
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.value.dequantize(self.weight.compute_dtype, rows=input_ids)


def weight_value(w):
    """What a kernel takes for a layer's weight: a tensor, or a QuantizedParameter's QuantizedWeight."""
    return w.value if isinstance(w, QuantizedParameter) else w


def install_quantized_(root: nn.Module, name: str, qw: QuantizedWeight, compute_dtype: torch.dtype) -> None:
    """Parameter `name` of `root` (a linear's weight, or a TokenEmbedding's) replaced by `qw`."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    holder = QuantizedParameter(qw, compute_dtype)
    if isinstance(module, TokenEmbedding):
        _replace_module(root, module_name, QuantizedEmbedding(holder, module.prefix))
        return
    delattr(module, leaf)
    setattr(module, leaf, holder)


def install_dense_(root: nn.Module, name: str, weight: torch.Tensor) -> None:
    """The weight `name` (a QuantizedParameter) replaced by a parameter holding `weight`."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    param = nn.Parameter(weight, requires_grad=False)
    if isinstance(module, QuantizedEmbedding):
        emb = TokenEmbedding(*weight.shape, prefix=module.prefix, device="meta")
        emb.weight = param
        _replace_module(root, module_name, emb)
        return
    delattr(module, leaf)
    setattr(module, leaf, param)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)


def quantized_weights(root: nn.Module) -> dict[str, QuantizedParameter]:
    """Every quantized weight of `root` by the name of the parameter it replaced."""
    return {name: m for name, m in root.named_modules() if isinstance(m, QuantizedParameter)}
