"""The Triton quantized GEMM (flashzo.kernels.quant_linear) under TRITON_INTERPRET=1 on small odd
shapes, against the fp64 dequantize-then-matmul reference, and its plan and traffic model.

Tolerances: the kernel's max error against the fp64 reference must be within
twice the error of plain torch in the same dtype (F.linear of the dequantized matrix rounded to
that dtype, the torch path), plus a small atol.
"""

import os
import sys

import pytest
import torch

from flashzo.errors import InputError
from flashzo.kernels import QuantKernelConfig, quantize, quantized_linear, quantized_linear_ref
from flashzo.kernels.launch_plan import DeviceInfo
from flashzo.kernels.quant_plan import quant_plan

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from traffic import quant_launches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
# (mode, group, symmetric, scale dtype): each kernel branch (int8/int4, sym/asym, per channel,
# a group smaller than the K step, fp16/fp32 scales)
FORMATS = [
    ("int8", None, True, torch.float16),
    ("int8", None, False, torch.float32),
    ("int8", 16, True, torch.float32),
    ("int4", 32, True, torch.float16),
    ("int4", 32, False, torch.float32),
    ("int4", 64, False, torch.float16),
]


def _name(fmt):
    mode, group, sym, sd = fmt
    return f"{mode}-{'pc' if group is None else f'g{group}'}-{'sym' if sym else 'asym'}-{str(sd)[-7:]}"


def _problem(T, K, N, fmt, dtype, bias=True, seed=0):
    mode, group, sym, sd = fmt
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    qw = quantize(w, mode, group, symmetric=sym, scale_dtype=sd).to(DEVICE)
    x = torch.randn(T, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    return x, qw, b


def _err(y, ref):
    return (y.double() - ref.double()).abs().max().item() if y.numel() else 0.0


def _check(x, qw, b, **kw):
    y = quantized_linear(x, qw, b, impl="triton", **kw)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], qw.shape[0])
    ref = quantized_linear_ref(x, qw, b, compute_dtype=torch.float64, out_dtype=torch.float64)
    err_torch = _err(quantized_linear(x, qw, b, impl="torch"), ref)
    assert _err(y, ref) <= 2 * err_torch + ATOL[x.dtype], (_err(y, ref), err_torch)
    return y


def _k(fmt, odd):
    group = fmt[1]
    if group is None:
        return 70 if odd else 64
    return 3 * max(group, 32) if odd else 2 * max(group, 32)


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_odd_shapes(fmt, dtype):
    """T = 1 and 37 (not a multiple of any tile), N = 33; K odd for per-channel, else a multiple of
    the group that is not one of the K step; with and without bias."""
    x, qw, b = _problem(37, _k(fmt, odd=True), 33, fmt, dtype)
    _check(x, qw, b)
    _check(x[:1], qw, None)


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[4]], ids=_name)
def test_other_tiles_and_strided_x(fmt):
    """Other tiles (several K steps per group, a band of row tiles) and a strided x give the same
    agreement."""
    x, qw, b = _problem(40, 128, 50, fmt, torch.float32, seed=2)
    cfg = QuantKernelConfig(block_m=16, block_n=16, block_k=32, group_m=2)
    y = _check(x, qw, b, config=cfg)
    wide = torch.randn(40, 256, dtype=torch.float32, device=DEVICE)
    wide[:, ::2] = x
    _check(wide[:, ::2], qw, b, config=cfg)
    assert torch.equal(quantized_linear(wide[:, ::2], qw, b, impl="triton", config=cfg), y)


def test_rows_do_not_depend_on_the_batch():
    """The plan never depends on T: a row computed alone or beside others gets the same bits."""
    x, qw, b = _problem(37, 96, 33, FORMATS[4], torch.bfloat16, seed=3)
    y = quantized_linear(x, qw, b, impl="triton")
    for rows in (slice(0, 1), slice(0, 5), slice(0, 20)):
        assert torch.equal(quantized_linear(x[rows], qw, b, impl="triton"), y[rows])


def test_empty_shapes():
    x, qw, b = _problem(0, 64, 8, FORMATS[0], torch.float32)
    assert quantized_linear(x, qw, b, impl="triton").shape == (0, 8)
    x, qw, _ = _problem(3, 0, 8, FORMATS[0], torch.float32)
    b = torch.randn(8, device=DEVICE)
    assert torch.equal(quantized_linear(x, qw, b, impl="triton"), b.expand(3, 8))
    assert not quantized_linear(x, qw, None, impl="triton").any()


def test_plan_and_refusals():
    cuda = DeviceInfo("cuda", 132)
    p = quant_plan(2048, 8192, "int4", 32, torch.bfloat16, cuda)
    assert (p.block_m, p.block_n, p.block_k, p.precision) == (64, 128, 32, "tf32")
    assert quant_plan(2048, 8192, "int8", 16, torch.bfloat16, cuda).block_k == 16  # Q6_K's group
    assert quant_plan(70, 33, "int8", 70, torch.bfloat16, cuda).block_k == 32  # unaligned rows
    assert quant_plan(2048, 8192, "int8", 2048, torch.float32, cuda).precision == "ieee"
    with pytest.raises(InputError, match="block_k = 64 must divide the group size 32"):
        quant_plan(2048, 8192, "int8", 32, torch.bfloat16, cuda, QuantKernelConfig(block_k=64))
    with pytest.raises(InputError, match="block_m must be a power of two >= 16"):
        QuantKernelConfig(block_m=24)
    with pytest.raises(InputError, match="group_m must be an int >= 1"):
        QuantKernelConfig(group_m=0)


def test_traffic_model_counts_each_operand():
    """llama-3.2-1b's gate_proj at T = 2048, int4 g32 asymmetric fp16, bf16: the fused kernel reads the
    packed weight and never writes a dense copy; the unfused path writes and reads one. With
    requests=True, x is read once per column block and the weight once per row block."""
    T, K, N = 2048, 2048, 8192
    kw = dict(symmetric=False, device=DeviceInfo("cuda", 132))
    launches = quant_launches(T, K, N, "int4", 32, torch.bfloat16, **kw)
    (fused,) = launches["fused"]
    row_tiles, col_tiles = T // 64, N // 128
    scales = N * (K // 32) * 2 * 2  # fp16 scales and mins
    assert fused.reads == {"x": T * K * 2, "W": N * K // 2, "scales": scales, "bias": N * 2}
    assert fused.writes == {"y": T * N * 2}
    assert fused.flops == 2 * T * N * K and fused.grid == (row_tiles * col_tiles,)
    dequant, gemm = launches["unfused"]
    assert dequant.writes["W_dense"] == gemm.reads["W_dense"] == N * K * 2
    assert launches["dense"][0].bytes == T * K * 2 + N * K * 2 + N * 2 + T * N * 2
    assert fused.bytes < launches["dense"][0].bytes < dequant.bytes + gemm.bytes
    (req,) = quant_launches(T, K, N, "int4", 32, torch.bfloat16, requests=True, **kw)["fused"]
    assert req.reads == {"x": col_tiles * T * K * 2, "W": row_tiles * N * K // 2, "scales": row_tiles * scales,
                         "bias": row_tiles * N * 2}


@pytest.mark.gpu
def test_gpu_realistic_bf16():
    """On a GPU: llama-3.2-1b's gate_proj shape, bf16, every format kind."""
    for fmt in FORMATS:
        x, qw, b = _problem(512, 2048, 8192, fmt, torch.bfloat16)
        _check(x, qw, b)
