"""GGUF quantized tensors repacked into flashzo's weight formats (kernels/quant.py), exactly.

    qw = repack_gguf(t.data, t.tensor_type, (N, K), "int4", name=t.name)   # a gguf ReaderTensor's blocks
    qw.dequantize()  ==  gguf.quants.dequantize(t.data, t.tensor_type)    bit for bit, in fp32

Each GGUF block type is read block by block, from its bytes: its integers become the format's q
(int4 nibbles copied or re-ordered, or widened to int8) and its scales the format's scales and
mins; no tensor passes through a dense fp32 copy. What repacks into what (REPACKS), and why it is
exact (llama.cpp's dequantization, as gguf-py computes it in fp32, against kernels/quant.py's
``scale * q + min`` in fp32):

    type  block      GGUF value (fp32)              repacked into            scales
    Q8_0  32         d * q, q in [-128, 127]        int8 g32 sym             fp16 (d)
    Q4_0  32         d * (q - 8), q in [0, 15]      int4 g32 sym, int8 g32   fp16 (d)
    Q4_1  32         d * q + m                      int4 g32 asym, int8 g32  fp16 (d, m)
    Q4_K  256 = 8x32 (d*sc) * q - (dmin*mn)         int4 g32 asym, int8 g32  fp32
    Q5_K  256 = 8x32 (d*sc) * q - (dmin*mn), 5 bits int8 g32 asym            fp32
    Q6_K  256 = 16x16 (d*sc) * (q - 32), 6 bits     int8 g16 sym             fp32

d, m, dmin are fp16 (11 significant bits), sc and mn 6-bit integers (Q6_K: sc an int8), q at most 8
bits. Every product is exact in fp32's 24 bits: d*q (19 bits); d*sc (17 bits; Q6_K 18) and
(d*sc)*q (at most 23 bits: Q6_K's |q - 32| <= 32 adds 5); dmin*mn (17). So GGUF's value is one
fp32 rounding of (exact product) + m or - dmin*mn, and the format's, with scale = d*sc and min =
-(dmin*mn) stored exactly (fp16 holds d and m, only fp32 holds a 17-bit d*sc), is the same rounding
of the same exact numbers: equal bit for bit. A type whose integers need more bits than the mode
holds (Q8_0, Q5_K, Q6_K into int4) is refused by name, as are the types not listed.
"""

from __future__ import annotations

import numpy as np
import torch

from flashzo.kernels.checks import InputError
from flashzo.kernels.quant import QuantizedWeight

# GGUF type -> (values per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210)}
# GGUF type -> {mode: (group size, symmetric, scale dtype)}: the formats it repacks into exactly
REPACKS = {
    "Q8_0": {"int8": (32, True, torch.float16)},
    "Q4_0": {"int4": (32, True, torch.float16), "int8": (32, True, torch.float16)},
    "Q4_1": {"int4": (32, False, torch.float16), "int8": (32, False, torch.float16)},
    "Q4_K": {"int4": (32, False, torch.float32), "int8": (32, False, torch.float32)},
    "Q5_K": {"int8": (32, False, torch.float32)},
    "Q6_K": {"int8": (16, True, torch.float32)},
}


def _type_name(qtype) -> str:
    return getattr(qtype, "name", qtype) if not isinstance(qtype, str) else qtype


def repack_targets(qtype) -> tuple[str, ...]:
    """The modes a GGUF tensor type (a name or gguf's GGMLQuantizationType) repacks into exactly."""
    return tuple(REPACKS.get(_type_name(qtype), ()))


def check_repack(qtype, mode: str, name: str = "tensor") -> tuple[int, bool, torch.dtype]:
    """(group size, symmetric, scale dtype) of repacking a ``qtype`` tensor into ``mode``; else
    InputError naming the tensor, its type and what it does repack into. Check every tensor of a
    file with this before reading any."""
    t = _type_name(qtype)
    if mode not in ("int8", "int4"):
        raise InputError(f"quantization mode must be int8 or int4, got {mode!r}")
    if t not in REPACKS:
        raise InputError(f"{name}: GGUF type {t} is not one flashzo repacks (repacked: {', '.join(REPACKS)})")
    if mode not in REPACKS[t]:
        raise InputError(f"{name}: GGUF type {t} cannot be repacked exactly into {mode} (its values need more "
                         f"bits); it repacks into {', '.join(REPACKS[t])}")
    return REPACKS[t][mode]


FLOAT_TYPES = ("F32", "F16", "BF16")  # stored as floats: quantized (kernels/quant.py: quantize), not repacked


def stack_format(parts, mode: str, *, group_size: int | None = None,
                 symmetric: bool | None = None) -> tuple[str, int, bool, torch.dtype] | None:
    """The one format a weight stored as GGUF tensors `parts` ((name, type), ...: a stacked projection's
    q, k, v) is held in when ``mode`` is asked: (mode, group size, symmetric, scale dtype), or None
    when every part is a float type (quantized as asked, not repacked).

    Every quantized part must repack exactly into one format: ``mode``'s if they all do (and it is the
    ``group_size`` and ``symmetric`` given, when given), else int8's (a Q8_0, Q5_K or Q6_K tensor when
    int4 is asked: exact, at 8 bits). Float parts are quantized into that format. Anything else (a
    type not repacked, parts whose formats differ: Q4_K beside Q6_K) is an InputError naming a tensor.
    """
    quantized = [(n, _type_name(t)) for n, t in parts if _type_name(t) not in FLOAT_TYPES]
    if not quantized:
        return None
    for name, t in quantized:
        if t not in REPACKS:
            check_repack(t, mode, name)  # raises, naming the type
    for candidate in dict.fromkeys((mode, "int8")):
        formats = {REPACKS[t].get(candidate) for _, t in quantized}
        if None in formats or len(formats) != 1:
            continue
        group, sym, scale_dtype = formats.pop()
        if candidate == mode:
            for asked, have, what in ((group_size, group, "group size"), (symmetric, sym, "symmetry")):
                if asked is not None and asked != have:
                    name, t = quantized[0]
                    raise InputError(f"{name}: GGUF type {t} repacks exactly into {mode} g{group} "
                                     f"{'sym' if sym else 'asym'} only, not the {what} asked for ({asked}); "
                                     f"leave it out to take the file's")
        return candidate, group, sym, scale_dtype
    for name, t in quantized:
        if "int8" not in REPACKS[t]:
            check_repack(t, mode, name)  # raises
    names = ", ".join(f"{n} ({t})" for n, t in quantized)
    raise InputError(f"{names}: one weight stored in GGUF types whose exact formats differ "
                     f"({', '.join(sorted({_describe(REPACKS[t]['int8']) for _, t in quantized}))} in int8); "
                     "flashzo holds a weight in one format")


def _describe(fmt) -> str:
    group, sym, scale_dtype = fmt
    return f"g{group} {'sym' if sym else 'asym'} {'fp16' if scale_dtype == torch.float16 else 'fp32'}"


def repack_gguf(raw, qtype, shape: tuple[int, int], mode: str, *, name: str = "tensor") -> QuantizedWeight:
    """A GGUF tensor's blocks as a QuantizedWeight in ``mode``, dequantizing to GGUF's values exactly.

    Args:
        raw: the tensor's bytes (numpy uint8, e.g. a gguf ReaderTensor's ``data``: [N, bytes per
            row], or flat), row-major: row n holds the K // block blocks of W[n].
        qtype: the GGUF type, a name ("Q4_1") or gguf's GGMLQuantizationType.
        shape: (N, K), the matrix in PyTorch's order (GGUF lists K first).
        mode: "int8" or "int4". name: the tensor's name, for errors.

    Returns:
        A QuantizedWeight on the CPU (its tensors own their memory; ``raw`` is not kept).
    """
    t = _type_name(qtype)
    group, symmetric, scale_dtype = check_repack(t, mode, name)
    N, K = (int(d) for d in shape)
    block, size = BLOCKS[t]
    if K % block:
        raise InputError(f"{name}: rows of {K} values are not whole {t} blocks of {block}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != N * (K // block) * size:
        raise InputError(f"{name}: {t} [{N}, {K}] must be {N * (K // block) * size} bytes (uint8), got "
                         f"{raw.size} {raw.dtype}")
    blocks = raw.reshape(N, K // block, size)
    sd = np.float16 if scale_dtype == torch.float16 else np.float32
    data = np.empty((N, K // 2 if mode == "int4" else K), dtype=np.int8 if symmetric and mode == "int8" else np.uint8)
    scales = np.empty((N, K // group), dtype=sd)
    mins = None if symmetric else np.empty((N, K // group), dtype=sd)
    rows = max(1, _CHUNK_VALUES // max(K, 1))
    for r0 in range(0, N, rows):  # a chunk of rows at a time: temporaries stay small
        b = blocks[r0:r0 + rows]
        n = b.shape[0]
        s, m = _SCALES[t](b)  # [n, K // block, block // group] each (m: None if symmetric)
        for what, v in (("scales", s), ("mins", m)):
            if v is not None and not np.isfinite(v).all():
                raise InputError(f"{name}: {t} block {what} are not all finite")
        scales[r0:r0 + n] = s.reshape(n, -1)
        if m is not None:
            mins[r0:r0 + n] = m.reshape(n, -1)
        # int4: straight from the bytes; int8: the integers in k order
        data[r0:r0 + n] = (_INT4[t](b) if mode == "int4" else _Q[t](b)).reshape(n, -1)
    return QuantizedWeight((N, K), mode, group, symmetric, torch.from_numpy(data), torch.from_numpy(scales),
                           None if mins is None else torch.from_numpy(mins))


_CHUNK_VALUES = 2**20  # weight values repacked per step


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of every block: [N, blocks]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32 values (byte i: value i low, value i + 16 high) -> [..., 32] in [0, 15]."""
    return np.concatenate((qs & 15, qs >> 4), axis=-1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and mins, [..., 8] each.
    Bytes 0-3: scales 0-3 (low 6 bits), 4-7: mins 0-3 (low 6 bits), 8-11: scales 4-7 (low 4 bits)
    and mins 4-7 (high 4 bits); the top 2 bits of bytes 0-3 / 4-7 are the high bits of scales /
    mins 4-7."""
    lo_s, lo_m, mixed = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate((lo_s & 63, (mixed & 15) | ((lo_s >> 6) << 4)), axis=-1)
    mn = np.concatenate((lo_m & 63, (mixed >> 4) | ((lo_m >> 6) << 4)), axis=-1)
    return sc, mn


def _k_quant_scales(blocks):
    """Q4_K/Q5_K: scale = d * sc (exact: 11 x 6 bits), min = -(dmin * mn), per sub-block of 32."""
    d, dmin = _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)
    sc, mn = _k_scales(blocks[..., 4:16])
    return d[..., None] * sc.astype(np.float32), -(dmin[..., None] * mn.astype(np.float32))


def _q6_k_scales(blocks):
    """Q6_K: scale = d * sc (exact: 11 x 8 bits) per sub-block of 16."""
    d = _f16(blocks, 208).astype(np.float32)
    return d[..., None] * blocks[..., 192:208].view(np.int8).astype(np.float32), None


_SCALES = {
    "Q8_0": lambda b: (_f16(b, 0), None),
    "Q4_0": lambda b: (_f16(b, 0), None),
    "Q4_1": lambda b: (_f16(b, 0), _f16(b, 2)),
    "Q4_K": _k_quant_scales,
    "Q5_K": _k_quant_scales,
    "Q6_K": _q6_k_scales,
}


def _q4_k_low(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> [..., 8, 32]: bytes 32p..32p+31 hold sub-block 2p (low nibbles) and 2p+1 (high)."""
    pairs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate((pairs & 15, pairs >> 4), axis=-2).reshape(*qs.shape[:-1], 8, 32)


def _q5_k(blocks):
    qh = blocks[..., 16:48]  # bit j of byte i: the fifth bit of value i of sub-block j
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., 8, 32]
    return _q4_k_low(blocks[..., 48:176]) | (high << 4)


def _q6_k(blocks):
    # each half of 128 values: 64 bytes of low nibbles (values 0-63 low, 64-127 high), 32 bytes of
    # 2-bit highs (value 32t + i at bits 2t of byte i)
    ql = blocks[..., 0:128].reshape(*blocks.shape[:-1], 2, 1, 64)
    low = np.concatenate((ql & 15, ql >> 4), axis=-2).reshape(*blocks.shape[:-1], 2, 128)
    qh = blocks[..., 128:192].reshape(*blocks.shape[:-1], 2, 1, 32)
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3).reshape(*blocks.shape[:-1], 2, 128)
    return (low | (high << 4)).view(np.int8) - np.int8(32)


# the integers q, in k order per block (int8 targets)
_Q = {
    "Q8_0": lambda b: b[..., 2:].view(np.int8),
    "Q4_0": lambda b: _nibbles_32(b[..., 2:]).view(np.int8) - np.int8(8),
    "Q4_1": lambda b: _nibbles_32(b[..., 4:]),
    "Q4_K": lambda b: _q4_k_low(b[..., 16:144]),
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def _q4_k_int4(blocks):
    """Q4_K's 128 bytes per super-block in kernels/quant.py's unit layout, byte by byte: a pair of
    sub-blocks (2p low nibbles, 2p+1 high) becomes two units, byte i of a unit holding values i and
    i + 16."""
    pairs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    first, second = pairs[..., :16], pairs[..., 16:]  # values 0-15 and 16-31 of both sub-blocks
    even = (first & 15) | ((second & 15) << 4)
    odd = (first >> 4) | (second & 0xF0)
    return np.stack((even, odd), axis=-2)  # [..., 4, 2, 16]


# int4 targets: the bytes in kernels/quant.py's layout (Q4_0, Q4_1: already so, a 32-value block = a unit)
_INT4 = {"Q4_0": lambda b: b[..., 2:], "Q4_1": lambda b: b[..., 4:], "Q4_K": _q4_k_int4}
