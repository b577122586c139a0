"""Weight-only quantized formats: int8 and int4 matrices with per-group scales (and mins).

A ``QuantizedWeight`` holds a float matrix W: [N, K] (a linear's weight, output rows) as integers q,
one scale per group of ``group_size`` consecutive k of a row, and for the asymmetric formats one min
per group:

    symmetric    W[n, k] = scale[n, g] * q[n, k]                  g = k // group_size
    asymmetric   W[n, k] = scale[n, g] * q[n, k] + min[n, g]

computed in fp32 (``dequantize``) as (scale * q) + min, the product rounded before the add (every
implementation does the same: the Triton kernel is compiled without FP contraction). For fp16
scales, and for every GGUF repack, the product is exact (a scale of at most 18 significant bits
times an integer of at most 8), so the add is the only rounding. The formats:

    mode   q range          data                        group_size
    int8   sym  [-128, 127] int8  [N, K]                K (per output channel) or 16, 32, 64, 128
           asym [0, 255]    uint8 [N, K]
    int4   sym  [-8, 7]     uint8 [N, K // 2], q + 8    32, 64, 128
           asym [0, 15]     uint8 [N, K // 2], q

int4 packs two values per byte in units of 32 consecutive k: byte i of a unit (i < 16) holds k = i in
its low nibble and k = i + 16 in its high nibble. That is llama.cpp's Q4_0/Q4_1 block layout, so
those blocks repack by copying their bytes (engine/gguf_quant.py), and a CPU dequantization writes
runs of 16 contiguous values.

Scales and mins are float16 or float32 (``scale_dtype``). Every GGUF type flashzo repacks has a
scale dtype that holds its dequantization exactly (engine/gguf_quant.py says which and why): fp16
for Q8_0, Q4_0 and Q4_1 (their block scales are fp16), fp32 for the K-quants (a sub-block scale is
an fp16 times a 6- or 8-bit integer: up to 18 significant bits). ``quantize`` rounds a float matrix
to nearest with the usual scale: absmax / qmax symmetric (qmax 127 or 7), (max - min) / (2**bits - 1)
asymmetric with the group's min as its min; q is computed from the stored (rounded) scale.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .errors import InputError

MODES = ("int8", "int4")
GROUP_SIZES = {"int8": (16, 32, 64, 128), "int4": (32, 64, 128)}  # int8 also takes group_size=None: per channel
SCALE_DTYPES = (torch.float16, torch.float32)
PACK = 32  # int4: k-units of this many values, byte i holding k = i and k = i + PACK // 2
_DATA_DTYPE = {("int8", True): torch.int8, ("int8", False): torch.uint8, ("int4", True): torch.uint8,
               ("int4", False): torch.uint8}
_QRANGE = {("int8", True): (-128, 127), ("int8", False): (0, 255), ("int4", True): (-8, 7),
           ("int4", False): (0, 15)}
_QUANT_BLOCK_ELEMENTS = 2**20  # quantize's rows per block: about this many values (4 MiB in fp32)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """W: [N, K] as q, scales and mins (see the module docstring). Built by ``quantize``, by
    engine/gguf_quant.py's repacking or from its fields (checked: ``InputError`` naming the field).

    Fields:
        shape: (N, K). mode: "int8" or "int4". group_size: k per scale (K: per output channel).
        symmetric: no mins. data: int8 [N, K], uint8 [N, K] or uint8 [N, K // 2] (the table above).
        scales: [N, K // group_size] float16 or float32. mins: like scales (asymmetric), else None.
    """

    shape: tuple[int, int]
    mode: str
    group_size: int
    symmetric: bool
    data: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.shape, (tuple, list)) or len(self.shape) != 2:
            raise InputError(f"shape must be (N, K), got {self.shape!r}")
        N, K = check_dim(self.shape[0], "shape[0]"), check_dim(self.shape[1], "shape[1]")
        object.__setattr__(self, "shape", (N, K))
        group = check_format(self.mode, self.group_size, K, self.symmetric)
        object.__setattr__(self, "group_size", group)
        want = (N, K // 2 if self.mode == "int4" else K)
        dtype = _DATA_DTYPE[(self.mode, bool(self.symmetric))]
        if not isinstance(self.data, torch.Tensor) or tuple(self.data.shape) != want or self.data.dtype != dtype:
            raise InputError(f"data of a {self.mode} {'sym' if self.symmetric else 'asym'} weight [{N}, {K}] must "
                             f"be {dtype} {list(want)}, got {_what(self.data)}")
        groups = (N, K // group if K else 0)
        for name in ("scales",) if self.symmetric else ("scales", "mins"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != groups or t.dtype not in SCALE_DTYPES:
                raise InputError(f"{name} must be float16 or float32 {list(groups)}, got {_what(t)}")
            if t.device != self.data.device:
                raise InputError(f"{name} must be on data's device {self.data.device}, got {t.device}")
        for name in ("data", "scales", "mins"):
            t = getattr(self, name)
            if t is not None and not t.is_contiguous():
                raise InputError(f"{name} must be contiguous (row-major)")
        if self.symmetric and self.mins is not None:
            raise InputError("a symmetric weight has no mins: pass mins=None")
        if not self.symmetric and self.mins.dtype != self.scales.dtype:
            raise InputError(f"mins must have scales' dtype {self.scales.dtype}, got {self.mins.dtype}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: data, scales and mins."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.mins) if t is not None)

    def describe(self) -> str:
        """E.g. "int4 g32 asym fp16" or "int8 per-channel sym fp32"."""
        group = "per-channel" if self.group_size == self.shape[1] and self.mode == "int8" else f"g{self.group_size}"
        scale = {torch.float16: "fp16", torch.float32: "fp32"}.get(self.scales.dtype, str(self.scales.dtype))
        return f"{self.mode} {group} {'sym' if self.symmetric else 'asym'} {scale}"

    def to(self, device) -> QuantizedWeight:
        def move(t):
            return None if t is None else t.to(device)

        return QuantizedWeight(self.shape, self.mode, self.group_size, self.symmetric, move(self.data),
                               move(self.scales), move(self.mins))

    def select_rows(self, index) -> QuantizedWeight:
        """The weight of rows ``index`` (a slice, or a 1-D index tensor: e.g. a row permutation)."""
        def take(t):
            return None if t is None else t[index].contiguous()

        data = take(self.data)
        return QuantizedWeight((data.shape[0], self.shape[1]), self.mode, self.group_size, self.symmetric, data,
                               take(self.scales), take(self.mins))

    def dequantize(self, dtype: torch.dtype = torch.float32, *, rows=None) -> torch.Tensor:
        """W: [N, K] (rows given: [len(rows), K], e.g. an embedding's looked-up rows) in ``dtype``:
        the fp32 values of the module docstring, rounded once to ``dtype``."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise InputError(f"dtype must be a floating point dtype, got {dtype}")
        qw = self if rows is None else self.select_rows(rows)
        return dequantize_into(qw, torch.empty(qw.shape, dtype=dtype, device=qw.device))


def cat_rows(weights) -> QuantizedWeight:
    """The weights' rows stacked (a stacked projection: q, k and v in one); they must share K and
    the format (mode, group size, symmetry, scale dtype)."""
    weights = list(weights)
    if not weights or not all(isinstance(w, QuantizedWeight) for w in weights):
        raise InputError("cat_rows takes a non-empty sequence of QuantizedWeight")
    first = weights[0]
    for w in weights[1:]:
        if w.shape[1] != first.shape[1] or w.describe() != first.describe():
            raise InputError(f"cat_rows: a {w.describe()} weight with K={w.shape[1]} cannot be stacked under a "
                             f"{first.describe()} one with K={first.shape[1]}")

    def cat(name):
        return None if first.symmetric and name == "mins" else torch.cat([getattr(w, name) for w in weights])

    data = cat("data")
    return QuantizedWeight((data.shape[0], first.shape[1]), first.mode, first.group_size, first.symmetric, data,
                           cat("scales"), cat("mins"))


def check_dim(value, name: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}")
    return value


def check_format(mode, group_size, K: int, symmetric=True) -> int:
    """The group size (K for int8's per-channel ``None``) of a valid format over rows of K; else
    InputError naming the mode, the group size or K."""
    if mode not in MODES:
        raise InputError(f"quantization mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(symmetric, bool):
        raise InputError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    allowed = GROUP_SIZES[mode]
    if group_size is None or (mode == "int8" and group_size == K and group_size not in allowed):
        if mode != "int8":
            raise InputError(f"int4 needs a group size (one of {', '.join(map(str, allowed))}); per-channel "
                             "scales are int8's")
        return K
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in allowed:
        raise InputError(f"{mode} group size must be one of {', '.join(map(str, allowed))}"
                         f"{' or None (per channel)' if mode == 'int8' else ''}, got {group_size!r}")
    if K % group_size:
        raise InputError(f"K = {K} (the rows' length) is not divisible by the {mode} group size {group_size}")
    return group_size


def quantize(weight: torch.Tensor, mode: str, group_size: int | None = None, *, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """W: [N, K] (fp32, bf16 or fp16, finite) rounded to nearest into ``mode`` with one scale per group
    of ``group_size`` k (None: per output channel, int8 only). Symmetric: scale = absmax / qmax,
    q = round(W / scale) in [-qmax - 1, qmax]; asymmetric: min = the group's min, scale = (max - min)
    / (2**bits - 1), q = round((W - min) / scale). q comes from the stored scale and min, rounded to
    ``scale_dtype`` (float16 or float32; a float16 scale too large for float16 is refused)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InputError(f"weight must be a 2-D tensor [N, K], got {_what(weight)}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if scale_dtype not in SCALE_DTYPES:
        raise InputError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    N, K = weight.shape
    group = check_format(mode, group_size, K, symmetric)
    lo, hi = _QRANGE[(mode, symmetric)]
    int4 = mode == "int4"
    data = torch.empty((N, K // 2 if int4 else K), dtype=_DATA_DTYPE[(mode, symmetric)], device=weight.device)
    groups = (N, K // group if K else 0)
    stored = torch.empty(groups, dtype=scale_dtype, device=weight.device)
    mins = None if symmetric else torch.empty(groups, dtype=scale_dtype, device=weight.device)
    # rows in blocks: every value depends on its own group only, so the blocks give the whole matrix's
    # bits, and the fp32 temporaries are a block's, not four copies of a 1 GiB embedding
    step = max(1, _QUANT_BLOCK_ELEMENTS // max(K, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        _quantize_rows(weight[r0:r1], group, symmetric, lo, hi, int4, data[r0:r1], stored[r0:r1],
                       None if mins is None else mins[r0:r1])
    return QuantizedWeight((N, K), mode, group, symmetric, data, stored, mins)


def _quantize_rows(weight, group, symmetric, lo, hi, int4, data, stored, mins) -> None:
    """quantize's rows [n, K] into their slices of data, stored (the scales) and mins."""
    if not torch.isfinite(weight).all():
        raise InputError("weight has non-finite values: it cannot be quantized")
    n, K = weight.shape
    w = weight.float().reshape(n, K // group if K else 0, group)  # [n, G, group]
    if symmetric:
        scale = w.abs().amax(-1) / hi if K else w.new_zeros(n, 0)  # [n, G]
    else:
        wmin = w.amin(-1) if K else w.new_zeros(n, 0)
        wmax = w.amax(-1) if K else w.new_zeros(n, 0)
        scale = (wmax - wmin) / (hi - lo)
        mins.copy_(wmin)
    stored.copy_(scale)
    if not torch.isfinite(stored).all():
        raise InputError(f"weight's values are too large for {stored.dtype} scales; quantize with "
                         "scale_dtype=torch.float32")
    s = stored.float()[..., None]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    shifted = w if symmetric else w - mins.float()[..., None]
    q = torch.round(shifted / safe).clamp_(lo, hi).reshape(n, K)
    data.copy_(pack_int4((q - lo).to(torch.uint8)) if int4 else q.to(data.dtype))


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in [0, 15] (K a multiple of 32) -> uint8 [N, K // 2] (the unit-32 layout)."""
    N, K = nibbles.shape
    u = nibbles.reshape(N, K // PACK, 2, PACK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] nibbles in [0, 15] (inverse of pack_int4)."""
    N, half = data.shape
    u = data.reshape(N, half // (PACK // 2), 1, PACK // 2)
    return torch.cat((u & 15, u >> 4), dim=2).reshape(N, 2 * half)


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor) -> torch.Tensor:
    """W written into ``out`` ([N, K], contiguous, on qw's device, any float dtype); returns out.

    On a CPU rows go in blocks of about ``_BLOCK_ELEMENTS`` values, each dequantized while it sits
    in cache: integers converted into fp32 (int4: each half of a 32-unit from its nibbles), times
    the scale, plus the min: the module docstring's (scale * q) + min, each op rounded as it says;
    another dtype is rounded once from those fp32 values.

    NOTE: a converting copy then in-place fp32 ops, because torch.mul of the int8 data by the
    broadcast fp32 scales runs a slower mixed-dtype loop; in blocks, because a block still in cache
    when its scales are applied saves a pass over memory (int4 most); mul_ then add_, because
    torch.addcmul is slower here. The times of each, for one [8192, 2048] matrix:
    bench/results/code_notes_cpu.md, "kernels/quant.py dequantize_into".
    """
    N, K = qw.shape
    if N == 0 or K == 0:
        return out
    rows = N if qw.device.type != "cpu" else max(1, _BLOCK_ELEMENTS // K)
    tmp = None if out.dtype == torch.float32 else torch.empty((min(rows, N), K), dtype=torch.float32,
                                                              device=out.device)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        block = out[r0:r1] if tmp is None else tmp[:r1 - r0]
        _dequantize_rows(qw, r0, r1, block)
        if tmp is not None:
            out[r0:r1].copy_(block)
    return out


_BLOCK_ELEMENTS = 2**19  # CPU dequantization block: 2 MiB of fp32


def _dequantize_rows(qw: QuantizedWeight, r0: int, r1: int, out: torch.Tensor) -> None:
    """Rows [r0, r1) of W into out: float32 [r1 - r0, K], contiguous."""
    n, (_, K), group = r1 - r0, qw.shape, qw.group_size
    if qw.mode == "int8":
        out.copy_(qw.data[r0:r1])
    else:  # nibbles back in k order: [n, units, (low, high), 16]
        d = qw.data[r0:r1].view(n, K // PACK, 1, PACK // 2)
        nibbles = torch.cat((d & 15, d >> 4), dim=2)
        if qw.symmetric:  # q = nibble - 8
            nibbles = nibbles.view(torch.int8).sub_(8)
        out.copy_(nibbles.view(n, K))
    o = out.view(n, K // group, group).mul_(qw.scales[r0:r1].float()[..., None])
    if not qw.symmetric:
        o.add_(qw.mins[r0:r1].float()[..., None])


def bytes_per_param(mode: str, group_size: int | None, *, symmetric: bool = True,
                    scale_dtype: torch.dtype = torch.float16, K: int = 4096) -> float:
    """Bytes a format holds per weight element, scales and mins included (per channel: at rows of K)."""
    group = check_format(mode, group_size, K, symmetric) if group_size is not None or mode == "int8" else None
    bits = 8 if mode == "int8" else 4
    per_group = (1 if symmetric else 2) * torch.empty((), dtype=scale_dtype).element_size()
    return bits / 8 + per_group / group


def _what(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


__all__ = ["GROUP_SIZES", "MODES", "PACK", "SCALE_DTYPES", "QuantizedWeight", "bytes_per_param", "cat_rows",
           "check_format", "dequantize_into", "pack_int4", "quantize", "unpack_int4"]
