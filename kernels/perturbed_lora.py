"""The perturbed LoRA linear: a linear layer plus LoRA, with z regenerated where it is used.

Rows of ``x`` (tokens, no padding) are grouped in contiguous segments; segment ``s`` covers rows
``indptr[s]:indptr[s+1]`` and carries an adapter index ``a``, a seed and a sign in {-1, 0, +1}:

    y[t] = x[t] @ W.T + bias + scaling * (x[t] @ (A_a + sign*eps*Z_A).T) @ (B_a + sign*eps*Z_B).T
    Z_A[i, k] = tl.randn(seed, a_offset + i*K + k)        Z_B[n, i] = tl.randn(seed, b_offset + n*r + i)

(docs/design.md, "The random numbers" and "The kernels"). The stored W, A and B are never modified
and z is never stored: the Triton kernels regenerate each z tile from (seed, global flat index)
inside their loops.

This file holds, in order: the limits and the kernel configuration, the shrink and expand kernels,
the launcher ``perturbed_lora_linear`` (Triton on CUDA, torch on CPU; ``impl`` forces either) and
the pure-torch reference ``perturbed_lora_linear_ref``. ``Segments`` lives in segments.py.

Rounding (what the tests' tolerances rely on):

- torch path: x, W and bias are upcast to fp32, everything is computed in fp32 and the result is
  rounded to ``x.dtype`` once.
- Triton path: the base ``x @ W.T + bias`` is cuBLAS in ``x.dtype`` (fp32 accumulation inside, the
  result rounded to ``x.dtype``); the LoRA delta is computed in fp32 and added to that rounded base
  in fp32, then rounded again. For bf16/fp16 that is one extra rounding (at most one more half ulp
  of y), the same as a user's ``F.linear(x, W, b) + lora(x).to(dtype)``. The LoRA dots use TF32
  tensor cores for bf16/fp16 inputs (x is exact in TF32; A_eff and B_eff lose bits below 2**-11
  relative, well under the output's own rounding) and full fp32 ("ieee") for fp32 inputs.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashzo.errors import InputError

from .checks import MAX_INDEX, check_triton_device, interpreting, resolve_impl
from .gaussian import gaussian
from .segments import TILE_ADAPTER, TILE_FIELDS, TILE_ROW_START, TILE_ROW_STOP, TILE_SEED, TILE_SIGN, Segments

MAX_RANK = 64  # the largest LoRA rank r the kernels take
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Block sizes of the Triton path. ``None`` picks a heuristic. z never depends on any of these;
    the fp32 summation order of the LoRA dots does (tile shapes, the K step, the K split).

    NOTE: the defaults are not timed yet (not yet run on a GPU). They are the
    largest tiles that compiled for sm_90 (triton 3.9) without register spills (cuobjdump
    -res-usage): shrink row tiles of 256 at r <= 32 and 128 at r = 64 for bf16/fp16 (64 and 32 for
    fp32), K step 32, 8 warps; expand 64x64, 8 warps. Large shrink row tiles matter: every row
    tile regenerates its own Z_A (r*K values).
    """

    shrink_block_m: int | None = None  # rows per shrink program; None: by r and dtype (NOTE above)
    shrink_block_k: int = 32  # K step of the shrink loop
    shrink_split_k: int | None = None  # K splits of the shrink; None: fill the GPU (1 on a CPU)
    expand_block_m: int = 64  # rows per expand step
    expand_block_n: int = 64  # output columns per expand program
    expand_rows: int | None = None  # rows per expand program (it loops); None: fill the GPU
    shrink_num_warps: int = 8
    expand_num_warps: int = 8
    shrink_num_stages: int = 3
    expand_num_stages: int = 2

    def __post_init__(self):
        for name in ("shrink_block_m", "shrink_block_k", "expand_block_m", "expand_block_n"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise InputError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        for name in (
            "shrink_split_k",
            "expand_rows",
            "shrink_num_warps",
            "expand_num_warps",
            "shrink_num_stages",
            "expand_num_stages",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1, got {value}")


DEFAULT_CONFIG = LoRAKernelConfig()


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    u_ptr,
    tiles_ptr,
    K,
    R,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_aa,
    stride_ar,
    stride_ak,
    stride_us,
    stride_um,
    eps,
    a_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """u_part[split, rows, :] = x[rows, ks] @ (A_a + sign*eps*Z_A)[:, ks].T for one row tile (one
    segment) and one K split ks; Z_A is regenerated tile by tile, indexed by its global position.

    NOTE: each row tile regenerates its Z_A slice, so the shrink evaluates ceil(T/BLOCK_M)*R_PAD*K
    Philox+Box-Muller draws (~100 integer/SFU instructions each), against a base GEMM of 2*T*N*K
    tensor-core FLOPs: estimated a few % of the GEMM's time at BLOCK_M >= 128, more at small T
    where the split-K keeps the SMs busy instead. An estimate, not a measurement (no GPU yet).
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    row_start = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ROW_START)
    row_stop = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ROW_STOP)
    adapter = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ADAPTER)
    seed = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_SEED)
    sign = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_SIGN)
    coef = sign.to(tl.float32) * eps

    rows = row_start + tl.arange(0, BLOCK_M)  # int64
    row_mask = rows < row_stop
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    a_base = a_ptr + adapter * stride_aa

    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        a_mask = k_mask[:, None] & r_mask[None, :]
        a = tl.load(
            a_base + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0
        )  # A^T tile: [BLOCK_K, R_PAD]
        if sign != 0:
            # global flat index of A[i, k] in the adapter's parameter space (int32, checked < 2**31)
            z = tl.randn(seed, a_offset + offs_r[None, :] * K + offs_k[:, None])
            a = tl.where(a_mask, a + coef * z, 0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    # every column of the R_PAD-wide tile is written (zeros past r), so the expand reads no garbage
    u_ptrs = u_ptr + split * stride_us + rows[:, None] * stride_um + offs_r[None, :]
    tl.store(u_ptrs, acc, mask=row_mask[:, None])


@triton.jit
def _lora_expand_kernel(
    u_ptr,
    b_ptr,
    y_ptr,
    tiles_ptr,
    N,
    R,
    SPLIT_K,
    stride_us,
    stride_um,
    stride_ba,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    eps,
    scaling,
    b_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """y[rows, cols] += scaling * u[rows] @ (B_a + sign*eps*Z_B)[cols].T for one row chunk (one
    segment) and one column block; the B_eff tile is regenerated once and reused over the chunk."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_start = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ROW_START)
    row_stop = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ROW_STOP)
    adapter = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ADAPTER)
    seed = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_SEED)
    sign = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_SIGN)
    coef = sign.to(tl.float32) * eps

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, R_PAD)
    b_mask = (offs_r < R)[:, None] & n_mask[None, :]
    b = tl.load(
        b_ptr + adapter * stride_ba + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=b_mask,
        other=0.0,
    )  # B^T tile: [R_PAD, BLOCK_N]
    if sign != 0:
        z = tl.randn(seed, b_offset + offs_n[None, :] * R + offs_r[:, None])
        b = tl.where(b_mask, b + coef * z, 0.0)

    for m0 in range(row_start, row_stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_stop
        u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :], mask=row_mask[:, None], other=0.0)
        for s in range(1, SPLIT_K):  # the K splits' partial sums, in a fixed order
            u += tl.load(
                u_ptr + s * stride_us + rows[:, None] * stride_um + offs_r[None, :],
                mask=row_mask[:, None],
                other=0.0,
            )
        delta = tl.dot(u, b, input_precision=PRECISION) * scaling  # [BLOCK_M, BLOCK_N] fp32
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = row_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32) + delta
        if BF16_BY_BITS:
            y = _bf16_round_to_nearest_even(y)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _bf16_round_to_nearest_even(v):
    """fp32 -> bf16 with round-to-nearest-even, by integer ops (finite values; NaN may become inf).

    NOTE: only used under TRITON_INTERPRET=1. Its fp32 -> bf16 cast (triton 3.9) truncates, and its
    explicit "rtne" mode drops the mantissa carry (values just below 2**e with e odd halve); a GPU
    compiles the ordinary cast to a correctly rounded cvt instruction.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


# ---------------------------------------------------------------------------------------------
# Launcher


def perturbed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    *,
    scaling: float,
    eps: float,
    a_offset: int,
    b_offset: int,
    impl: str | None = None,
    config: LoRAKernelConfig | None = None,
) -> torch.Tensor:
    """y[t] = x[t] @ W.T + bias + scaling * (x[t] @ (A_a + s*eps*Z_A).T) @ (B_a + s*eps*Z_B).T,
    with (a, seed, s) the adapter, seed and sign of t's segment.

    Args:
        x: [T, K] fp32, bf16 or fp16 (T may be 0).
        weight: [N, K], x's dtype. bias: [N], x's dtype, or None.
        lora_a: [n_adapters, r, K] fp32, 1 <= r <= 64. lora_b: [n_adapters, N, r] fp32.
            Every tensor may have any strides: the kernels take them all, nothing is copied.
        segments: ``Segments`` over the T rows (on the CPU or on x's device).
        scaling: the LoRA scale (alpha / r). eps: the perturbation size, >= 0.
        a_offset, b_offset: global index of Z_A[0, 0] and Z_B[0, 0] (see the module docstring);
            a_offset + r*K and b_offset + N*r must be <= 2**31.
        impl: None: Triton on CUDA, torch otherwise; "triton" (CPU tensors need TRITON_INTERPRET=1)
            or "torch" to force one. config: block sizes of the Triton path (default DEFAULT_CONFIG).

    Returns:
        y: [T, N] in x's dtype. Nothing is differentiable; W, A and B are never written.
    """
    T, K, N, r = _check_args(x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset)
    impl = resolve_impl(impl, x.device)
    if impl == "torch":
        y = _perturbed_lora_torch(
            x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset, torch.float32, None
        )
        return y.to(x.dtype)
    check_triton_device(x.device)

    # NOTE: the base GEMM is cuBLAS, and the LoRA part runs beside it in two small Triton kernels
    # (shrink, then an expand that adds into y), rather than one Triton GEMM with LoRA fused in its
    # epilogue. The base GEMM is ~99% of the FLOPs (2*T*N*K against 2*T*r*(K+N), r <= 64 << K, N)
    # and cuBLAS runs it near the H100's peak, where a Triton GEMM usually trails it by 10-30%; the
    # LoRA part is bound by memory (reading x, read-modify-write of y) and by regenerating z, so
    # fusing it into the GEMM would save little traffic and cost the faster GEMM. NOT YET MEASURED on a
    # GPU; bench/bench_perturbed_lora.py checks it: fused vs the unfused torch
    # code a user would write vs the bare base GEMM (the floor), on OPT q_proj shapes in bf16.
    y = F.linear(x, weight, bias)  # [T, N] in x.dtype, contiguous
    if T == 0 or N == 0:
        return y
    cfg = config if config is not None else DEFAULT_CONFIG
    u = _lora_shrink(x, lora_a, segments, eps=eps, a_offset=a_offset, cfg=cfg)
    _lora_expand(u, lora_b, y, segments, eps=eps, scaling=scaling, b_offset=b_offset, cfg=cfg)
    return y


def _lora_shrink(x, lora_a, segments, *, eps, a_offset, cfg) -> torch.Tensor:
    """Launch the shrink; returns u_part: [split_k, T, R_PAD] fp32 (sum over dim 0 = x @ A_eff.T)."""
    T, K = x.shape
    r = lora_a.shape[1]
    r_pad = _r_pad(r)
    block_m = cfg.shrink_block_m or _default_shrink_block_m(r_pad, x.dtype)
    block_k = cfg.shrink_block_k
    tiles = segments.tile_map(block_m, x.device)
    k_blocks = triton.cdiv(K, block_k)
    split = cfg.shrink_split_k
    if split is None:  # enough programs to fill the GPU twice over; the interpreter wants few
        target = 2 * _num_sms(x.device) if x.device.type == "cuda" else 1
        split = max(1, min(k_blocks, 32, triton.cdiv(target, max(1, tiles.shape[0]))))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(K, k_per_split)  # no empty split
    u = torch.empty((split, T, r_pad), dtype=torch.float32, device=x.device)
    grid = (tiles.shape[0], split)
    _lora_shrink_kernel[grid](
        x, lora_a, u, tiles,
        K, r, k_per_split,
        x.stride(0), x.stride(1), *lora_a.stride(), u.stride(0), u.stride(1),
        float(eps), int(a_offset),
        BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad, PRECISION=_precision(x.dtype),
        num_warps=cfg.shrink_num_warps, num_stages=cfg.shrink_num_stages,
    )  # fmt: skip
    return u


def _lora_expand(u, lora_b, y, segments, *, eps, scaling, b_offset, cfg) -> None:
    """Launch the expand: y += scaling * u_part.sum(0) @ B_eff.T, in place.

    u_part: [split_k, T, R_PAD] fp32 with unit stride in its last dim (as _lora_shrink returns it);
    y: [T, N], any float dtype and strides."""
    T, N = y.shape
    r = lora_b.shape[2]
    block_m, block_n = cfg.expand_block_m, cfg.expand_block_n
    n_blocks = triton.cdiv(N, block_n)
    rows = cfg.expand_rows
    if rows is None:  # long chunks reuse each B_eff tile; enough chunks to fill the GPU twice over
        rows = T * n_blocks // (2 * _num_sms(y.device))
        rows = min(max(rows // block_m * block_m, block_m), 1024)
    tiles = segments.tile_map(rows, y.device)
    grid = (tiles.shape[0], n_blocks)
    _lora_expand_kernel[grid](
        u, lora_b, y, tiles,
        N, r, u.shape[0],
        u.stride(0), u.stride(1), *lora_b.stride(), y.stride(0), y.stride(1),
        float(eps), float(scaling), int(b_offset),
        BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=u.shape[2], PRECISION=_precision(y.dtype),
        BF16_BY_BITS=y.dtype == torch.bfloat16 and interpreting(),
        num_warps=cfg.expand_num_warps, num_stages=cfg.expand_num_stages,
    )  # fmt: skip


def _default_shrink_block_m(r_pad: int, dtype: torch.dtype) -> int:
    # the largest row tiles without register spills on sm_90 (see LoRAKernelConfig's NOTE); fp32
    # ("ieee" dots run on the FMA units) needs far more registers per tile than TF32
    if dtype == torch.float32:
        return 64 if r_pad <= 16 else 32
    return 256 if r_pad <= 32 else 128


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products; bf16/fp16 x is exact in TF32 and A_eff/B_eff's TF32
    # rounding (2**-11 relative) stays below the 16-bit output's own rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms_cached(device_str: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device_str)).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: fewest programs is fastest
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _num_sms_cached(str(device))


def _check_args(x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset):
    """InputError naming the argument for anything the kernels cannot take; returns (T, K, N, r)."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise InputError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not isinstance(segments, Segments):
        raise InputError(f"segments must be a Segments, got {type(segments).__name__}")
    if x.dim() != 2:
        raise InputError(f"x must be 2-D [T, K], got shape {tuple(x.shape)}")
    T, K = x.shape
    if x.dtype not in _FLOAT_DTYPES:
        raise InputError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise InputError(f"weight must be [N, K={K}] to chain with x, got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    if weight.dtype != x.dtype:
        raise InputError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise InputError(f"bias must be [N={N}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise InputError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if lora_a.dim() != 3 or lora_a.shape[2] != K or lora_a.shape[0] < 1:
        raise InputError(f"lora_a must be [n_adapters >= 1, r, K={K}], got shape {tuple(lora_a.shape)}")
    n_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if not 1 <= r <= MAX_RANK:
        raise InputError(f"lora_a's rank r = lora_a.shape[1] must be in [1, {MAX_RANK}], got {r}")
    if tuple(lora_b.shape) != (n_adapters, N, r):
        raise InputError(
            f"lora_b must be [n_adapters={n_adapters}, N={N}, r={r}], got shape {tuple(lora_b.shape)}"
        )
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != torch.float32:
            raise InputError(f"{name} must be float32, got {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and t.device != x.device:
            raise InputError(f"{name} must be on x's device {x.device}, got {t.device}")
    if segments.device.type != "cpu" and segments.device != x.device:
        raise InputError(f"segments must be on the CPU or on x's device {x.device}, got {segments.device}")
    segments.validate(T, n_adapters)
    if not _is_real(scaling) or not math.isfinite(scaling):
        raise InputError(f"scaling must be a finite real number, got {scaling!r}")
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"eps must be a finite real number >= 0, got {eps!r}")
    for name, value, size in (("a_offset", a_offset, r * K), ("b_offset", b_offset, N * r)):
        try:
            offset = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            offset = None
        if offset is None:
            raise InputError(f"{name} must be an int, got {type(value).__name__}")
        if offset < 0 or offset + size > MAX_INDEX:
            raise InputError(
                f"{name} must be >= 0 with {name} + {size} <= 2**31 (int32 global indices), got {offset}"
            )
    return T, K, N, r


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Torch path and reference


def _perturbed_lora_torch(
    x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset, dtype, z_impl
) -> torch.Tensor:
    """The formula in ``dtype``, segment by segment, z materialized once per distinct seed.

    z_impl: gaussian's impl (None: its default for x's device; "torch": the CPU generator, bit-exact
    to the kernels under the interpreter). Returns y: [T, N] in ``dtype``.
    """
    T, K = x.shape
    N, r = weight.shape[0], lora_a.shape[1]
    indptr, adapters, seeds, signs = segments._host
    xc = x.to(dtype)
    y = xc @ weight.to(dtype).T  # [T, N]
    if bias is not None:
        y += bias.to(dtype)
    zs = {}  # seed -> (Z_A [r, K], Z_B [N, r])
    for s in range(segments.num_segments):
        start, stop, a, seed, sign = indptr[s], indptr[s + 1], adapters[s], seeds[s], signs[s]
        if start == stop:
            continue
        a_eff, b_eff = lora_a[a].to(dtype), lora_b[a].to(dtype)
        if sign != 0:
            if seed not in zs:
                z_device = "cpu" if z_impl == "torch" else x.device  # the CPU generator is bit-exact
                z_a = gaussian(seed, r * K, offset=a_offset, device=z_device, impl=z_impl)
                z_b = gaussian(seed, N * r, offset=b_offset, device=z_device, impl=z_impl)
                zs[seed] = (z_a.view(r, K).to(x.device, dtype), z_b.view(N, r).to(x.device, dtype))
            z_a, z_b = zs[seed]
            a_eff = a_eff + (sign * eps) * z_a
            b_eff = b_eff + (sign * eps) * z_b
        y[start:stop] += scaling * ((xc[start:stop] @ a_eff.T) @ b_eff.T)
    return y


def perturbed_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    *,
    scaling: float,
    eps: float,
    a_offset: int,
    b_offset: int,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The same y in plain torch: Z_A and Z_B materialized with the bit-exact CPU generator
    (gaussian(..., impl="torch")), every input upcast to ``compute_dtype`` (fp64 for an "exact"
    reference), a loop over segments. Returns y: [T, N] in ``out_dtype`` (default: x's dtype)."""
    _check_args(x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset)
    y = _perturbed_lora_torch(
        x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset, compute_dtype, "torch"
    )
    return y.to(out_dtype if out_dtype is not None else x.dtype)
