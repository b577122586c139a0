"""The perturbed LoRA linear: a linear layer plus LoRA, with z regenerated where it is used.

Rows of ``x`` (tokens, no padding) are grouped in contiguous segments; segment ``s`` covers rows
``indptr[s]:indptr[s+1]`` and carries an adapter index ``a``, a seed and a sign in {-1, 0, +1}:

    y[t] = x[t] @ W.T + bias + scaling * (x[t] @ (A_a + sign*eps*Z_A).T) @ (B_a + sign*eps*Z_B).T
    Z_A[i, k] = tl.randn(seed, a_offset + i*K + k)        Z_B[n, i] = tl.randn(seed, b_offset + n*r + i)

(docs/design.md, "The random numbers" and "The kernels"). The stored W, A and B are never modified
and z is never stored: the Triton kernels regenerate each z tile from (seed, global flat index)
inside their loops. A stacked projection (q, k and v in one weight) adds the formula once per
adapted part, each part with its own A, B and offsets (lora_parts.py); the LoRA term of all parts
is one shrink launch and one expand launch, with a reduction between them when K is split.

This file holds, in order: the kernels (shrink, split-K reduction, expand), the launchers
``perturbed_lora_linear`` (one projection), ``perturbed_lora_linear_parts`` (a stacked projection)
and ``perturbed_lora_add_`` (the LoRA term alone, added into a given y) - Triton on CUDA, torch on
CPU, ``impl`` forces either - and the pure-torch references. The plan (tiles, split) is in
launch_plan.py, the parts in lora_parts.py, ``Segments`` in segments.py; the traffic model of these
launches, for the benchmark and the tests, in bench/traffic.py.

Rounding (what the tests' tolerances rely on):

- torch path: x, W and bias are upcast to fp32, everything is computed in fp32 and the result is
  rounded to ``x.dtype`` once (``perturbed_lora_add_``: y + delta in fp32, rounded once).
- Triton path: the base ``x @ W.T + bias`` is cuBLAS in ``x.dtype`` (fp32 accumulation inside, the
  result rounded to ``x.dtype``); the LoRA delta is computed in fp32 and added to that rounded base
  in fp32, then rounded again. For bf16/fp16 that is one extra rounding (at most one more half ulp
  of y), the same as a user's ``F.linear(x, W, b) + lora(x).to(dtype)``. The LoRA dots use TF32
  tensor cores for bf16/fp16 inputs (x is exact in TF32; A_eff and B_eff lose bits below 2**-11
  relative, well under the output's own rounding) and full fp32 ("ieee") for fp32 inputs. Every
  kernel is compiled without FP contraction (``enable_fp_fusion=False``): ``a + coef*z`` and
  ``y + delta`` round twice, as the interpreter and the torch path do, whatever Triton's default.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check_triton_device, check_z_offset, interpreting, resolve_impl
from .errors import InputError
from .launch_plan import (
    COL_B_OFFSET,
    COL_B_ROW,
    COL_FIELDS,
    COL_PART_START,
    COL_RANK,
    COL_START,
    COL_STOP,
    COL_U,
    DEFAULT_CONFIG,
    DeviceInfo,
    LoRAKernelConfig,
    LoRAPlan,
    column_blocks,
    lora_plan,
    z_rows,
)
from .lora_parts import MAX_RANK, LoRAPart, LoRAStack, single_part_stack, stack_lora_parts
from .quant import QuantizedWeight
from .randn import gaussian
from .rows import mm_rows
from .segments import TILE_ADAPTER, TILE_FIELDS, TILE_ROW_START, TILE_ROW_STOP, TILE_SEED, TILE_SIGN, Segments

__all__ = [
    "DEFAULT_CONFIG",
    "MAX_RANK",
    "LoRAKernelConfig",
    "LoRAPart",
    "LoRAStack",
    "base_linear",
    "perturbed_lora_add_",
    "perturbed_lora_add_ref",
    "perturbed_lora_linear",
    "perturbed_lora_linear_parts",
    "perturbed_lora_linear_parts_ref",
    "perturbed_lora_linear_ref",
    "stack_lora_parts",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    zrow_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    U_COLS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """u_part[split, rows, :] = x[rows, ks] @ (A_a + sign*eps*Z_A)[:, ks].T for one row tile (one
    segment) and one K split ks, all parts' u columns at once (A: the parts' A side by side).
    Z_A is regenerated tile by tile at global indices zrow[j] + k (zrow: each u column's A row).

    NOTE: each row tile regenerates its Z_A slice, so the shrink evaluates ceil(T/BLOCK_M)*U_COLS*K
    Philox+Box-Muller draws (~100 integer/SFU instructions each); the traffic model counts them.
    Estimated from that count, they cost a few % of the base GEMM's time at BLOCK_M >= 128 and
    r <= 16; bench/bench_perturbed_lora.py times the whole call.
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
    offs_r = tl.arange(0, U_COLS)
    r_mask = offs_r < R
    zrow = tl.load(zrow_ptr + offs_r)  # int32 [U_COLS]
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    a_base = a_ptr + adapter * stride_aa

    acc = tl.zeros((BLOCK_M, U_COLS), dtype=tl.float32)
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
        )  # A^T tile: [BLOCK_K, U_COLS]
        if sign != 0:
            # global flat index of A_p[i, k] in the adapter's parameter space (int32, checked < 2**31)
            gidx = zrow[None, :] + offs_k[:, None]
            tl.static_assert(gidx.dtype == tl.int32)
            z = tl.randn(seed, gidx)
            a = tl.where(a_mask, a + coef * z, 0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    # every column of the U_COLS-wide tile is written (zeros past R), so no reader sees garbage
    u_ptrs = u_ptr + split * stride_us + rows[:, None] * stride_um + offs_r[None, :]
    tl.store(u_ptrs, acc, mask=row_mask[:, None])


@triton.jit
def _lora_reduce_kernel(
    u_ptr,
    numel,
    split_k,
    stride_us,
    BLOCK: tl.constexpr,
):
    """u_part[0] = u_part[0] + u_part[1] + ... + u_part[split_k - 1], in that order, elementwise
    over the numel = T * U_COLS values of one split (each split contiguous)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ptrs = u_ptr + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, split_k):
        ptrs += stride_us  # pointer arithmetic: no int32 product s * stride_us to overflow
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(u_ptr + offs, acc, mask=mask)


@triton.jit
def _lora_expand_kernel(
    u_ptr,
    b_ptr,
    y_ptr,
    tiles_ptr,
    cols_ptr,
    stride_um,
    stride_ba,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    eps,
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """y[rows, cols] += scaling * u[rows, part's columns] @ (B_a + sign*eps*Z_B)[cols].T for one
    row chunk (one segment) and one column block (one part); the B_eff tile is regenerated once
    and reused over the chunk. Z_B of column n, rank i of the part is at b_offset + (n - start)*r + i.
    """
    tile = tl.program_id(0)
    block = tl.program_id(1)
    row_start = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ROW_START)
    row_stop = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ROW_STOP)
    adapter = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_ADAPTER)
    seed = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_SEED)
    sign = tl.load(tiles_ptr + tile * TILE_FIELDS + TILE_SIGN)
    coef = sign.to(tl.float32) * eps
    col_start = tl.load(cols_ptr + block * COL_FIELDS + COL_START)  # int32, like every column field
    col_stop = tl.load(cols_ptr + block * COL_FIELDS + COL_STOP)
    part_start = tl.load(cols_ptr + block * COL_FIELDS + COL_PART_START)
    u_col = tl.load(cols_ptr + block * COL_FIELDS + COL_U)
    rank = tl.load(cols_ptr + block * COL_FIELDS + COL_RANK)
    b_offset = tl.load(cols_ptr + block * COL_FIELDS + COL_B_OFFSET)
    b_row = tl.load(cols_ptr + block * COL_FIELDS + COL_B_ROW)

    offs_n = col_start + tl.arange(0, BLOCK_N)  # y columns
    n_mask = offs_n < col_stop
    n_part = offs_n - part_start  # the part's own column index
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < rank
    b_mask = r_mask[:, None] & n_mask[None, :]
    b = tl.load(
        b_ptr + adapter * stride_ba + (b_row + n_part)[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=b_mask,
        other=0.0,
    )  # B^T tile: [R_PAD, BLOCK_N]
    if sign != 0:
        gidx = b_offset + n_part[None, :] * rank + offs_r[:, None]
        tl.static_assert(gidx.dtype == tl.int32)
        z = tl.randn(seed, gidx)
        b = tl.where(b_mask, b + coef * z, 0.0)

    for m0 in range(row_start, row_stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_stop
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + (u_col + offs_r)[None, :],
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, R_PAD]: this part's u columns
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
# Launchers


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
    batch_invariant: bool = False,
) -> torch.Tensor:
    """y[t] = x[t] @ W.T + bias + scaling * (x[t] @ (A_a + s*eps*Z_A).T) @ (B_a + s*eps*Z_B).T,
    with (a, seed, s) the adapter, seed and sign of t's segment.

    Args:
        x: [T, K] fp32, bf16 or fp16 (T and K may be 0).
        weight: [N, K], x's dtype. bias: [N], x's dtype, or None.
        lora_a: [n_adapters, r, K] fp32, 1 <= r <= 64. lora_b: [n_adapters, N, r] fp32.
            Every tensor may have any strides: the kernels take them all, nothing is copied.
        segments: ``Segments`` over the T rows (on the CPU or on x's device).
        scaling: the LoRA scale (alpha / r). eps: the perturbation size, >= 0.
        a_offset, b_offset: global index of Z_A[0, 0] and Z_B[0, 0] (see the module docstring);
            a_offset + r*K and b_offset + N*r must be <= 2**31.
        impl: None: Triton on CUDA, torch otherwise; "triton" (CPU tensors need TRITON_INTERPRET=1)
            or "torch" to force one. config: overrides of the plan's tiles (launch_plan.py).
        batch_invariant: every GEMM over fixed-size row chunks (rows.py), so that a row's bits never
            depend on the other rows (the Triton LoRA kernels are so already: launch_plan.py).

    Returns:
        y: [T, N] in x's dtype. Nothing is differentiable; W, A and B are never written.
    """
    _check_args(x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset)
    return perturbed_lora_linear_parts(x, weight, bias, single_part_stack(lora_a, lora_b, a_offset, b_offset),
                                       segments, scaling=scaling, eps=eps, impl=impl, config=config,
                                       batch_invariant=batch_invariant)


def perturbed_lora_linear_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    parts: Sequence[LoRAPart] | LoRAStack,
    segments: Segments,
    *,
    scaling: float,
    eps: float,
    impl: str | None = None,
    config: LoRAKernelConfig | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias, then for every part p: y[t, p.start:p.stop] += scaling *
    (x[t] @ (A_p,a + s*eps*Z_A,p).T) @ (B_p,a + s*eps*Z_B,p).T, with each part's z at its own
    offsets (as ``perturbed_lora_linear`` on weight[p.start:p.stop] alone). One base GEMM, one
    shrink and one expand launch for all parts.

    Args:
        x: [T, K] fp32, bf16 or fp16. weight: [N_total, K], x's dtype (the parts' rows stacked), or a
            ``QuantizedWeight`` [N_total, K] (quant.py): the base is then ``quantized_linear``'s, of the
            same bits on the torch path as this call with the dense ``weight.dequantize(x.dtype)``.
        bias: [N_total], x's dtype, or None.
        parts: ``LoRAPart``s in column order, not overlapping (columns outside every part get the
            base only; parts may differ in width and rank), or a ``LoRAStack`` packed from them
            once (``stack_lora_parts``; lora_parts.py says what packing costs).
        segments, scaling, eps, impl, config, batch_invariant: as in ``perturbed_lora_linear``.

    Returns:
        y: [T, N_total] in x's dtype. W, A and B are never written.
    """
    stack = _check_parts_call(x, weight, bias, None, parts, segments, scaling, eps)
    mm = mm_rows if batch_invariant else torch.matmul
    quantized = isinstance(weight, QuantizedWeight)
    if resolve_impl(impl, x.device) == "torch":  # fp32 throughout, rounded to x's dtype once
        xc = x.to(torch.float32)
        if quantized:  # the dense matrix in x's dtype, in this thread's scratch (quant_linear.py)
            weight = quant_linear.scratch_weight(weight, x.dtype)
        y = _plus_bias(mm(xc, weight.to(torch.float32).T), bias)  # [T, N]: the base, as base_linear's
        _add_lora_torch(y, xc, stack.parts, segments, scaling, eps, torch.float32, None, mm)
        return y.to(x.dtype)
    check_triton_device(x.device)
    # NOTE: the base GEMM is cuBLAS, and the LoRA part runs beside it in small Triton kernels
    # (shrink, a split-K reduction when K is split, then an expand that adds into y), rather than
    # one Triton GEMM with LoRA fused in its epilogue. The base GEMM is ~99% of the FLOPs (2*T*N*K
    # against 2*T*r*(K+N), r <= 64 << K, N) and cuBLAS runs it near the GPU's peak, where a Triton
    # GEMM usually trails it; the LoRA part is bound by memory (reading x, read-modify-write of y)
    # and by regenerating z, so fusing it into the GEMM would save little traffic and cost the
    # faster GEMM. bench/bench_perturbed_lora.py times the choice (docs/benchmarks.md, "The kernel
    # microbenchmark"): fused vs the unfused torch code a user would write vs the bare base GEMM.
    if quantized:  # the dequantize-in-the-GEMM kernel, row-invariant as it is (as base_linear)
        y = quant_linear.quantized_linear(x, weight, bias, impl="triton")
    elif batch_invariant:  # as base_linear
        y = _plus_bias(mm_rows(x, weight.T), bias)
    else:
        y = F.linear(x, weight, bias)
    _add_lora_triton(y, x, stack, segments, scaling, eps, config)
    return y


def perturbed_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    parts: Sequence[LoRAPart] | LoRAStack,
    segments: Segments,
    *,
    scaling: float,
    eps: float,
    impl: str | None = None,
    config: LoRAKernelConfig | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """y[t, p.start:p.stop] += scaling * (x[t] @ (A_p,a + s*eps*Z_A,p).T) @ (B_p,a + s*eps*Z_B,p).T
    for every part p, in place: the LoRA term alone, for a y whose base GEMM ran elsewhere.

    Args:
        y: [T, N_total], x's dtype, any strides; updated in place (y + delta formed in fp32,
            rounded once). x: [T, K]. parts, segments, scaling, eps, impl, config, batch_invariant: as in
            ``perturbed_lora_linear_parts``.

    Returns:
        y (the same tensor).
    """
    stack = _check_parts_call(x, None, None, y, parts, segments, scaling, eps)
    impl = resolve_impl(impl, x.device)
    mm = mm_rows if batch_invariant else torch.matmul
    if impl == "torch":
        if y.dtype == torch.float32:
            _add_lora_torch(y, x.to(torch.float32), stack.parts, segments, scaling, eps, torch.float32, None, mm)
        else:
            y32 = y.to(torch.float32)
            _add_lora_torch(y32, x.to(torch.float32), stack.parts, segments, scaling, eps, torch.float32, None, mm)
            y.copy_(y32)
        return y
    check_triton_device(x.device)
    _add_lora_triton(y, x, stack, segments, scaling, eps, config)
    return y


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, impl: str | None = None,
                batch_invariant: bool = False) -> torch.Tensor:
    """y = x @ W.T + bias exactly as ``perturbed_lora_linear_parts`` computes its base for ``impl``, so
    that ``perturbed_lora_add_(y[rows], x[rows].to(y.dtype), ...)`` then ``.to(x.dtype)`` gives its bits: fp32
    on the torch path (the LoRA term is added before the one rounding), x's dtype on the Triton path.

    Args:
        x: [T, K]. weight: [N, K], x's dtype, or a ``QuantizedWeight`` (as in
            ``perturbed_lora_linear_parts``). bias: [N] or None. impl, batch_invariant: as in
            ``perturbed_lora_linear``.

    Returns:
        y: [T, N], fp32 (torch path) or x's dtype (Triton path).
    """
    mm = mm_rows if batch_invariant else torch.matmul
    quantized = isinstance(weight, QuantizedWeight)
    if resolve_impl(impl, x.device) == "torch":
        if quantized:
            weight = quant_linear.scratch_weight(weight, x.dtype)
        return _plus_bias(mm(x.to(torch.float32), weight.to(torch.float32).T), bias)
    if quantized:
        return quant_linear.quantized_linear(x, weight, bias, impl="triton")
    return F.linear(x, weight, bias) if not batch_invariant else _plus_bias(mm_rows(x, weight.T), bias)


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y + bias in place, in y's dtype (the base GEMM's epilogue)."""
    return y.add_(bias.to(y.dtype)) if bias is not None else y


def _add_lora_triton(y, x, stack, segments, scaling, eps, config) -> None:
    """The three LoRA launches (shrink, reduction if K is split, expand) into y, in place."""
    T, K = x.shape
    if T == 0 or K == 0 or y.shape[1] == 0:  # K == 0: x @ A_eff.T is empty, the LoRA term is zero
        return
    plan = lora_plan(K, y.shape[1], stack.ranks, x.dtype, DeviceInfo.of(x.device), config)
    u = _lora_shrink(x, stack, segments, plan, eps)
    u = _lora_reduce(u, plan)
    _lora_expand(u, stack, y, segments, plan, eps, scaling)


def _lora_shrink(x, stack: LoRAStack, segments: Segments, plan: LoRAPlan, eps: float) -> torch.Tensor:
    """Launch the shrink; returns u_part: [split_k, T, U_COLS] fp32 (sum over dim 0 = x @ A_eff.T,
    all parts side by side, zeros past their ranks)."""
    T, K = x.shape
    tiles = segments.tile_map(plan.shrink_block_m, x.device)
    zrow = _zrow_table(stack.layouts, K, plan.u_cols, str(x.device))
    u = torch.empty((plan.split_k, T, plan.u_cols), dtype=torch.float32, device=x.device)
    a = stack.a
    _lora_shrink_kernel[plan.shrink_grid(tiles.shape[0])](
        x, a, zrow, u, tiles,
        K, a.shape[1], plan.k_per_split,
        x.stride(0), x.stride(1), *a.stride(), u.stride(0), u.stride(1),
        float(eps),
        BLOCK_M=plan.shrink_block_m, BLOCK_K=plan.shrink_block_k, U_COLS=plan.u_cols, PRECISION=plan.precision,
        num_warps=plan.shrink_num_warps, num_stages=plan.shrink_num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    return u


def _lora_reduce(u_part: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
    """Sum the K splits once, in order, into u_part[0]; returns u: [T, U_COLS] fp32 (a view)."""
    split, T, cols = u_part.shape
    if split > 1:
        _lora_reduce_kernel[plan.reduce_grid(T)](
            u_part, T * cols, split, u_part.stride(0),
            BLOCK=plan.reduce_block, num_warps=plan.reduce_num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return u_part[0]


def _lora_expand(u, stack: LoRAStack, y, segments: Segments, plan: LoRAPlan, eps: float, scaling: float) -> None:
    """Launch the expand: y[:, part] += scaling * u[:, part's columns] @ B_eff.T for every part.

    u: [T, >= U_COLS] fp32 with unit stride in its last dim; y: [T, N_total], any float dtype and
    strides."""
    T = y.shape[0]
    cols = _column_table(stack.layouts, plan.expand_block_n, str(y.device))
    rows = plan.expand_rows_for(T, cols.shape[0])
    tiles = segments.tile_map(rows, y.device)
    b = stack.b
    _lora_expand_kernel[(tiles.shape[0], cols.shape[0])](
        u, b, y, tiles, cols,
        u.stride(0), *b.stride(), y.stride(0), y.stride(1),
        float(eps), float(scaling),
        BLOCK_M=plan.expand_block_m, BLOCK_N=plan.expand_block_n, R_PAD=plan.r_pad, PRECISION=plan.precision,
        BF16_BY_BITS=y.dtype == torch.bfloat16 and interpreting(),
        num_warps=plan.expand_num_warps, num_stages=plan.expand_num_stages, enable_fp_fusion=False,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _zrow_table(layouts, K: int, u_cols: int, device: str) -> torch.Tensor:
    return _to_device(torch.tensor(z_rows(layouts, K, u_cols), dtype=torch.int32), torch.device(device))


@functools.lru_cache(maxsize=1024)
def _column_table(layouts, block_n: int, device: str) -> torch.Tensor:
    rows = column_blocks(layouts, block_n)
    table = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), COL_FIELDS.value)
    return _to_device(table, torch.device(device))


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: no stream sync for the copy
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


# ---------------------------------------------------------------------------------------------
# The launchers' argument checks (the references make the same)


def _check_args(x, weight, bias, lora_a, lora_b, segments, scaling, eps, a_offset, b_offset):
    """InputError naming the argument for anything the kernels cannot take; returns (T, K, N, r)."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise InputError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not isinstance(segments, Segments):
        raise InputError(f"segments must be a Segments, got {type(segments).__name__}")
    T, K = _check_x(x)
    N = _check_weight_bias(x, weight, bias)
    if lora_a.dim() != 3 or lora_a.shape[2] != K or lora_a.shape[0] < 1:
        raise InputError(f"lora_a must be [n_adapters >= 1, r, K={K}], got shape {tuple(lora_a.shape)}")
    n_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if not 1 <= r <= MAX_RANK:
        raise InputError(f"lora_a's rank r = lora_a.shape[1] must be in [1, {MAX_RANK}], got {r}")
    if tuple(lora_b.shape) != (n_adapters, N, r):
        raise InputError(f"lora_b must be [n_adapters={n_adapters}, N={N}, r={r}], got shape {tuple(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != torch.float32:
            raise InputError(f"{name} must be float32, got {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and t.device != x.device:
            raise InputError(f"{name} must be on x's device {x.device}, got {t.device}")
    _check_segments_scalars(x, segments, n_adapters, scaling, eps)
    check_z_offset(a_offset, "a_offset", r * K)
    check_z_offset(b_offset, "b_offset", N * r)
    return T, K, N, r


def _check_parts_call(x, weight, bias, y, parts, segments, scaling, eps) -> LoRAStack:
    """The checks of the stacked-projection launchers (weight/bias, or y for the add); returns the
    packed parts."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(segments, Segments):
        raise InputError(f"segments must be a Segments, got {type(segments).__name__}")
    T, K = _check_x(x)
    if y is None:
        if not isinstance(weight, (torch.Tensor, QuantizedWeight)):
            raise InputError(f"weight must be a torch.Tensor or a QuantizedWeight, got {type(weight).__name__}")
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise InputError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        N = _check_weight_bias(x, weight, bias)
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.device != x.device:
                raise InputError(f"{name} must be on x's device {x.device}, got {t.device}")
    else:
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != T:
            raise InputError(f"y must be a 2-D tensor [T={T}, N], got {_shape(y)}")
        if y.dtype != x.dtype or y.device != x.device:
            raise InputError(f"y must have x's dtype {x.dtype} and device {x.device}, got {y.dtype} on {y.device}")
        N = y.shape[1]
    stack = stack_lora_parts(parts)
    if stack.K != K:
        raise InputError(f"parts' lora_a must be [n_adapters, r, K={K}] to chain with x, got K={stack.K}")
    if stack.stop > N:
        raise InputError(f"parts cover columns up to {stack.stop}, past N = {N} output columns")
    if stack.a.device != x.device:
        raise InputError(f"parts' tensors must be on x's device {x.device}, got {stack.a.device}")
    _check_segments_scalars(x, segments, stack.num_adapters, scaling, eps)
    return stack


def _check_x(x) -> tuple[int, int]:
    if x.dim() != 2:
        raise InputError(f"x must be 2-D [T, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise InputError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.shape[0], x.shape[1]


def _check_weight_bias(x, weight, bias) -> int:
    K = x.shape[1]
    if len(weight.shape) != 2 or weight.shape[1] != K:
        raise InputError(f"weight must be [N, K={K}] to chain with x, got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    if not isinstance(weight, QuantizedWeight) and weight.dtype != x.dtype:
        raise InputError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise InputError(f"bias must be [N={N}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise InputError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    return N


def _check_segments_scalars(x, segments, n_adapters, scaling, eps) -> None:
    if segments.device.type != "cpu" and segments.device != x.device:
        raise InputError(f"segments must be on the CPU or on x's device {x.device}, got {segments.device}")
    segments.validate(x.shape[0], n_adapters)
    if not _is_real(scaling) or not math.isfinite(scaling):
        raise InputError(f"scaling must be a finite real number, got {scaling!r}")
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"eps must be a finite real number >= 0, got {eps!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ---------------------------------------------------------------------------------------------
# Torch path and references


def _add_lora_torch(y, xc, parts, segments, scaling, eps, dtype, z_impl, mm=torch.matmul) -> None:
    """y[rows, part] += scaling * (x[rows] @ A_eff.T) @ B_eff.T in ``dtype``, part by part and
    segment by segment, z materialized once per (part, seed). y and xc: already in ``dtype``.

    z_impl: gaussian's impl (None: its default for x's device; "torch": the CPU generator, bit-exact
    to the kernels under the interpreter). mm: the GEMM (``mm_rows`` for batch-invariant rows)."""
    K = xc.shape[1]
    indptr, adapters, seeds, signs = segments._host
    for part in parts:
        lora_a, lora_b = part.lora_a, part.lora_b
        N, r = lora_b.shape[1], lora_b.shape[2]
        zs = {}  # seed -> (Z_A [r, K], Z_B [N, r])
        for s in range(segments.num_segments):
            start, stop, a, seed, sign = indptr[s], indptr[s + 1], adapters[s], seeds[s], signs[s]
            if start == stop:
                continue
            a_eff, b_eff = lora_a[a].to(dtype), lora_b[a].to(dtype)
            if sign != 0:
                if seed not in zs:
                    z_device = "cpu" if z_impl == "torch" else xc.device  # the CPU generator is bit-exact
                    z_a = gaussian(seed, r * K, offset=part.a_offset, device=z_device, impl=z_impl)
                    z_b = gaussian(seed, N * r, offset=part.b_offset, device=z_device, impl=z_impl)
                    zs[seed] = (z_a.view(r, K).to(xc.device, dtype), z_b.view(N, r).to(xc.device, dtype))
                z_a, z_b = zs[seed]
                a_eff = a_eff + (sign * eps) * z_a
                b_eff = b_eff + (sign * eps) * z_b
            y[start:stop, part.start : part.stop] += scaling * mm(mm(xc[start:stop], a_eff.T), b_eff.T)


def _perturbed_lora_torch(x, weight, bias, parts, segments, scaling, eps, dtype, z_impl,
                          mm=torch.matmul) -> torch.Tensor:
    """The formula in ``dtype``: the base, then every part's LoRA term. Returns y: [T, N] in ``dtype``."""
    xc = x.to(dtype)
    y = _plus_bias(mm(xc, weight.to(dtype).T), bias)  # [T, N]
    _add_lora_torch(y, xc, parts, segments, scaling, eps, dtype, z_impl, mm)
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
    parts = single_part_stack(lora_a, lora_b, a_offset, b_offset).parts
    y = _perturbed_lora_torch(x, weight, bias, parts, segments, scaling, eps, compute_dtype, "torch")
    return y.to(out_dtype if out_dtype is not None else x.dtype)


def perturbed_lora_linear_parts_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    parts: Sequence[LoRAPart] | LoRAStack,
    segments: Segments,
    *,
    scaling: float,
    eps: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``perturbed_lora_linear_parts`` in plain torch (z materialized per part, as in
    ``perturbed_lora_linear_ref``). Returns y: [T, N_total] in ``out_dtype`` (default: x's dtype)."""
    stack = _check_parts_call(x, weight, bias, None, parts, segments, scaling, eps)
    y = _perturbed_lora_torch(x, weight, bias, stack.parts, segments, scaling, eps, compute_dtype, "torch")
    return y.to(out_dtype if out_dtype is not None else x.dtype)


def perturbed_lora_add_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    parts: Sequence[LoRAPart] | LoRAStack,
    segments: Segments,
    *,
    scaling: float,
    eps: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y + the LoRA term of every part, out of place, in ``compute_dtype``; returns [T, N_total]
    in ``out_dtype`` (default: y's dtype). y is not written."""
    stack = _check_parts_call(x, None, None, y, parts, segments, scaling, eps)
    out = y.to(compute_dtype, copy=True)
    _add_lora_torch(out, x.to(compute_dtype), stack.parts, segments, scaling, eps, compute_dtype, "torch")
    return out.to(out_dtype if out_dtype is not None else y.dtype)


# quant_linear.py imports this module (its bf16 rounding), so it is imported once this one is complete
from . import quant_linear  # noqa: E402
