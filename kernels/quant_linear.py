"""The quantized linear: y = x @ dequantize(W).T + bias, W an int8 or int4 ``QuantizedWeight`` (quant.py).

On a GPU one Triton kernel (W8A16 / W4A16 for bf16 and fp16 x; fp32 x too): each program owns a
tile of y, and inside its K loop loads the packed weight tile with its scales (and mins),
dequantizes it in registers (q * scale + min in fp32, rounded to x's dtype as torch would round the
dequantized matrix), and feeds it to the tile's dot; the dequantized matrix never exists in memory.
On a CPU (and with ``impl="torch"``) the weight is dequantized into a scratch buffer reused across
calls and multiplied by torch: the same bits as ``quantized_linear_ref``, and as the dense layer of
the dequantized matrix (``F.linear``, or kernels/rows.py's row chunks in the batch-invariant mode).

This file holds, in order: the kernel, the launcher ``quantized_linear``, the scratch buffer, and
the pure-torch reference ``quantized_linear_ref``. The plan and traffic model are in quant_plan.py.

Rounding: fp32 x: "ieee" dots (full fp32 products, as torch's fp32 GEMM), accumulated in fp32, y
rounded once. bf16/fp16 x: the weight tile rounded to x's dtype, dots accumulated in fp32, plus
the bias in fp32, y rounded once to x's dtype. Compiled without FP contraction, as every flashzo
kernel: (scale * q) + min rounds the product before the add, as quant.py defines it (a fused
multiply-add would differ when the product is not exact: an fp32 scale from ``quantize``).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check_triton_device, interpreting, resolve_impl
from .errors import InputError
from .launch_plan import DeviceInfo
from .perturbed_lora import _bf16_round_to_nearest_even
from .quant import QuantizedWeight, dequantize_into
from .quant_plan import QuantKernelConfig, quant_plan
from .rows import mm_rows

__all__ = ["quantized_linear", "quantized_linear_ref", "scratch_weight"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _quant_linear_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    m_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_sn,
    stride_ym,
    stride_yn,
    INT4: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """y[rows, cols] = x[rows] @ W[cols].T (+ bias[cols]) for one BLOCK_M x BLOCK_N tile, W dequantized
    tile by tile. Every K step lies in one group (the plan's BLOCK_K divides the group size, or the
    scales are per channel), so a step loads one scale (and min) per column. int4: a step covers
    BLOCK_K // 32 packing units; byte i of a unit holds k = i (low nibble) and k = i + 16 (high), so
    the step is two dots, over the units' low halves and their high halves."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n  # programs of GROUP_M row tiles walk the columns together (L2 reuse of W)
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    q_cols = q_ptr + offs_n[None, :].to(tl.int64) * stride_qn
    s_cols = offs_n.to(tl.int64) * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // group_size
        scale = tl.load(s_ptr + s_cols + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_N]
        if not SYMMETRIC:
            low = tl.load(m_ptr + s_cols + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if INT4:
            j = tl.arange(0, BLOCK_K // 2)
            k_lo = k0 + (j // 16) * 32 + (j % 16)  # the low nibbles' k; the high ones' are k_lo + 16
            b = tl.load(q_cols + (k0 // 2 + j)[:, None], mask=n_mask[None, :], other=0)  # uint8 [BLOCK_K/2, BLOCK_N]
            for half in tl.static_range(2):
                nib = (b & 15) if half == 0 else (b >> 4)
                w = nib.to(tl.float32)
                if SYMMETRIC:
                    w = w - 8.0
                w = w * scale
                if not SYMMETRIC:
                    w = w + low
                k = k_lo + 16 * half
                x = tl.load(x_rows + k[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K/2]
                acc = _dot(x, w, acc, PRECISION, BF16_BY_BITS)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            q = tl.load(q_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)  # [BLOCK_K, BLOCK_N]
            w = q.to(tl.float32) * scale
            if not SYMMETRIC:
                w = tl.where(k_mask[:, None], w + low, 0.0)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _dot(x, w, acc, PRECISION, BF16_BY_BITS)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if BF16_BY_BITS:
        acc = _bf16_round_to_nearest_even(acc)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dot(x, w, acc, PRECISION: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """acc + x @ w with the fp32 weight tile w rounded to x's dtype first (round to nearest even).

    NOTE: BF16_BY_BITS (the interpreter, bf16 x) rounds w by integer ops and runs the dot on the
    fp32 values of both bf16 operands: triton 3.9's interpreter truncates an fp32 -> bf16 cast
    (perturbed_lora.py) and returns garbage from a tl.dot of bf16 operands. Products of two bf16
    values are exact in fp32, so this is the dot a GPU's bf16 tensor cores compute, up to the
    order of the fp32 additions."""
    if BF16_BY_BITS:
        w = _bf16_round_to_nearest_even(w).to(tl.float32)
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# Launcher


def quantized_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    impl: str | None = None,
    config: QuantKernelConfig | None = None,
    batch_invariant: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias, W = qw.dequantize() (quant.py: scale * q + min per group).

    Args:
        x: [T, K] fp32, bf16 or fp16, any strides (T and K may be 0).
        qw: a QuantizedWeight [N, K] on x's device. bias: [N] in x's dtype, or None.
        impl: None: Triton on CUDA, torch elsewhere; "triton" (CPU tensors need TRITON_INTERPRET=1)
            or "torch" to force one. config: overrides of the plan's tiles (quant_plan.py).
        batch_invariant: the torch path's GEMM over fixed-size row chunks (rows.py; ``chunk`` rows
            per call, default ``row_chunk``); the Triton kernel is row-invariant as it is (its plan
            never depends on T).

    Returns:
        y: [T, N] in x's dtype. The torch path gives ``quantized_linear_ref(x, qw, bias)``'s bits
        (``F.linear`` of the dequantized matrix in x's dtype), or in the batch-invariant mode
        ``mm_rows(x, W.T) + bias``: what the dense layer of the same matrix computes.
    """
    T, K, N = _check(x, qw, bias)
    if resolve_impl(impl, x.device) == "torch":
        w = scratch_weight(qw, x.dtype)
        if not batch_invariant:
            return F.linear(x, w, bias)
        y = mm_rows(x, w.T, chunk=chunk)
        return y.add_(bias) if bias is not None else y
    check_triton_device(x.device)
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(T, N)) if bias is not None else y.zero_()
    plan = quant_plan(K, N, qw.mode, qw.group_size, x.dtype, DeviceInfo.of(x.device), config)
    mins = qw.mins if qw.mins is not None else qw.scales  # not read when symmetric
    _quant_linear_kernel[plan.grid(T, N)](
        x, qw.data, qw.scales, mins, bias if bias is not None else qw.scales, y,
        T, N, K, qw.group_size,
        x.stride(0), x.stride(1), qw.data.stride(0), qw.scales.stride(0), y.stride(0), y.stride(1),
        INT4=qw.mode == "int4", SYMMETRIC=qw.symmetric, HAS_BIAS=bias is not None,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, GROUP_M=plan.group_m,
        PRECISION=plan.precision, BF16_BY_BITS=x.dtype == torch.bfloat16 and interpreting(),
        num_warps=plan.num_warps, num_stages=plan.num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    return y


def _check(x, qw, bias) -> tuple[int, int, int]:
    """InputError naming the argument for anything the launcher cannot take; returns (T, K, N)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"x must be a 2-D tensor [T, K], got {_what(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise InputError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not isinstance(qw, QuantizedWeight):
        raise InputError(f"qw must be a QuantizedWeight (kernels/quant.py), got {type(qw).__name__}")
    N, K = qw.shape
    if x.shape[1] != K:
        raise InputError(f"x must be [T, K={K}] to chain with the weight [{N}, {K}], got {_what(x)}")
    if qw.device != x.device:
        raise InputError(f"qw must be on x's device {x.device}, got {qw.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
            raise InputError(f"bias must be a tensor [N={N}] or None, got {_what(bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise InputError(f"bias must have x's dtype {x.dtype} and device {x.device}, got {bias.dtype} on "
                             f"{bias.device}")
    return x.shape[0], K, N


def _what(t) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ---------------------------------------------------------------------------------------------
# The scratch buffer of the torch path

_scratch = threading.local()


def scratch_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qw dequantized into ``dtype`` ([N, K]) in a buffer this thread reuses: valid until its next
    call on this thread with the same device and dtype. The buffer grows to the largest matrix seen
    (one per thread, device and dtype), so a model costs its packed weights plus one dense matrix.

    NOTE (the CPU path): dequantizing the whole matrix into this buffer, then one F.linear, is
    bit-exact against the reference (quantized_linear_ref: the same F.linear of the same values); on
    the 1b shapes it costs about fp32's time at large T, and at T = 1 (a decode step, bound by
    reading the weight) several times fp32's (the most where the dense fp32 matrix stays in cache
    between the benchmark's calls, as in a model it would not). Dequantizing and multiplying block
    of rows by block (the block stays in cache) is faster at T = 1 on those shapes but not always
    exact: MKL rounds a column of a narrower GEMM differently. torch's packed CPU kernels for fp32 x
    (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) are neither exact nor fast. Every variant's
    time against the fp32 F.linear in the same cell, and whether it is exact:
    bench/results/quant_cpu.md (python bench/bench_quant.py --threads 1; the "flashzo", "blocked",
    "int8pack" and "int4pack" rows).
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (qw.device, dtype)
    numel = qw.shape[0] * qw.shape[1]
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=qw.device)
    return dequantize_into(qw, buf[:numel].view(qw.shape))


# ---------------------------------------------------------------------------------------------
# Reference


def quantized_linear_ref(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize, then F.linear, in plain torch: W = qw.dequantize(compute_dtype), x and bias cast to
    ``compute_dtype`` (default x's dtype; fp64 for an "exact" reference). Returns [T, N] in
    ``out_dtype`` (default x's dtype)."""
    _check(x, qw, bias)
    cd = compute_dtype or x.dtype
    y = F.linear(x.to(cd), qw.dequantize(cd), None if bias is None else bias.to(cd))
    return y.to(out_dtype or x.dtype)
