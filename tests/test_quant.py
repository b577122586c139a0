"""Tests for flashzo.kernels.quant (the int8 / int4 weight formats) and the torch path of
flashzo.kernels.quant_linear: the dequantization formula element by element, the int4 byte layout,
quantize's rounding, the torch path against the dequantize-then-F.linear reference (bit for bit),
the batch-invariant mode, the scratch buffer, and every refusal of bad input.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flashzo.kernels.quant as quant
from flashzo.errors import InputError
from flashzo.kernels import QuantizedWeight, cat_rows, mm_rows, quantize, quantized_linear, quantized_linear_ref
from flashzo.kernels.quant import bytes_per_param, dequantize_into, pack_int4, unpack_int4
from flashzo.kernels.quant_linear import scratch_weight

# (mode, group_size, symmetric, scale dtype): every kind of format
FORMATS = [
    ("int8", None, True, torch.float16),
    ("int8", None, False, torch.float32),
    ("int8", 16, True, torch.float32),
    ("int8", 32, False, torch.float16),
    ("int4", 32, True, torch.float16),
    ("int4", 32, False, torch.float32),
    ("int4", 64, True, torch.float32),
    ("int4", 128, False, torch.float16),
]
QMAX = {"int8": 127, "int4": 7}


def _name(fmt):
    mode, group, sym, sd = fmt
    return f"{mode}-{'pc' if group is None else f'g{group}'}-{'sym' if sym else 'asym'}-{str(sd)[-7:]}"


def _weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    w[0, : min(K, 5)] *= 40  # an outlier row: its groups' scales differ from the others'
    return w


def _k_for(fmt, odd=False):
    group = fmt[1]
    if group is None:
        return 70 if odd else 64
    return 3 * group if odd else 2 * max(group, 32)


def _formula(qw):
    """W from the fields, element by element in numpy float32 (independent of dequantize_into)."""
    N, K = qw.shape
    if qw.mode == "int4":
        q = unpack_int4(qw.data).numpy().astype(np.int64) - (8 if qw.symmetric else 0)
    else:
        q = qw.data.numpy().astype(np.int64)
    s = qw.scales.float().numpy()
    m = None if qw.symmetric else qw.mins.float().numpy()
    out = np.empty((N, K), dtype=np.float32)
    for n in range(N):
        for k in range(K):
            g = k // qw.group_size
            v = np.float32(s[n, g]) * np.float32(q[n, k])
            out[n, k] = v if m is None else v + np.float32(m[n, g])
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_dequantize_is_the_formula_bit_for_bit(fmt, monkeypatch):
    mode, group, sym, sd = fmt
    N, K = 13, _k_for(fmt, odd=True)
    qw = quantize(_weight(N, K), mode, group, symmetric=sym, scale_dtype=sd)
    want = _formula(qw)
    assert np.array_equal(qw.dequantize().numpy().view(np.int32), want.view(np.int32))
    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 2 * K)  # several row blocks, the last one short
    assert np.array_equal(qw.dequantize().numpy().view(np.int32), want.view(np.int32))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # one rounding from the fp32 values
        assert torch.equal(qw.dequantize(dtype), torch.from_numpy(want).to(dtype))
    rows = torch.tensor([12, 0, 5])
    assert torch.equal(qw.dequantize(rows=rows), torch.from_numpy(want)[rows])


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_quantize_rounds_to_nearest_with_the_standard_scale(fmt):
    mode, group, sym, sd = fmt
    N, K = 9, _k_for(fmt)
    w = _weight(N, K, seed=1)
    qw = quantize(w, mode, group, symmetric=sym, scale_dtype=sd)
    g = qw.group_size
    assert qw.shape == (N, K) and qw.group_size == (K if group is None else group) and qw.scales.dtype == sd
    assert qw.scales.shape == (N, K // g) and (qw.mins is None) == sym
    wg = w.view(N, K // g, g)
    bits = 8 if mode == "int8" else 4
    if sym:
        scale = wg.abs().amax(-1) / QMAX[mode]
    else:
        scale = (wg.amax(-1) - wg.amin(-1)) / (2**bits - 1)
        assert torch.equal(qw.mins, wg.amin(-1).to(sd))
    assert torch.equal(qw.scales, scale.to(sd))
    # every value is within half a step of the stored scale (plus the scale's and min's own rounding)
    s = qw.scales.float()[..., None]
    slack = (2.0**-10 if sd == torch.float16 else 2.0**-16) * wg.abs().amax(-1, keepdim=True)
    err = (qw.dequantize().view(N, K // g, g) - wg).abs()
    assert (err <= 0.5 * s + slack).all()
    q = (unpack_int4(qw.data).to(torch.int16) - (8 if sym else 0)) if mode == "int4" else qw.data.to(torch.int16)
    lo, hi = (-QMAX[mode] - 1, QMAX[mode]) if sym else (0, 2**bits - 1)
    assert q.min() >= lo and q.max() <= hi
    assert q.max() == hi  # the range is used: some value reaches the top


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_quantize_in_row_blocks_is_the_whole_matrix_bit_for_bit(fmt, monkeypatch):
    """quantize works a block of rows at a time (its fp32 temporaries are a block's): 4 rows per block,
    37 rows (a partial last block), the same bits as one block; a non-finite value in a later block
    is still refused."""
    mode, group, sym, sd = fmt
    N, K = 37, _k_for(fmt)
    w = _weight(N, K, seed=3)
    whole = quantize(w, mode, group, symmetric=sym, scale_dtype=sd)
    seen = []
    real = quant._quantize_rows

    def record(rows, *a):
        seen.append(rows.shape[0])
        return real(rows, *a)

    monkeypatch.setattr(quant, "_QUANT_BLOCK_ELEMENTS", 4 * K)
    monkeypatch.setattr(quant, "_quantize_rows", record)
    blocked = quantize(w, mode, group, symmetric=sym, scale_dtype=sd)
    assert seen == [4] * 9 + [1]
    for name in ("data", "scales", "mins"):
        a, b = getattr(whole, name), getattr(blocked, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    w[35, 1] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        quantize(w, mode, group, symmetric=sym, scale_dtype=sd)


QUANTIZE_MEMORY = r"""
import json, sys
import torch
from flashzo.kernels import quantize
torch.set_num_threads(1)

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

w = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0))  # 128 MiB in fp32
quantize(w[:64], "int4", 32, symmetric=False)  # the libraries' one-time set-up, before the measure
before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set
qw = quantize(w, "int4", 32, symmetric=False)
print(json.dumps({"growth": (kib("VmHWM") - before) * 1024, "weight": w.numel() * 4, "out": qw.nbytes}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_quantize_never_holds_a_float_copy_of_the_matrix():
    """Peak memory of quantize (the process's resident set, above what it was before the call): the
    quantized weight plus a block's temporaries, under a quarter of the fp32 matrix (whole-matrix
    temporaries, the fp32 w - min, its quotient, its rounding, are a matrix each)."""
    out = subprocess.run([sys.executable, "-c", QUANTIZE_MEMORY], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    m = json.loads(out.stdout)
    assert m["growth"] <= m["out"] + m["weight"] / 4, m


def test_int4_layout_and_pack_unpack():
    """Byte i of each 32-value unit holds value i (low nibble) and value i + 16 (high nibble)."""
    nib = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    nib = torch.stack([nib[0], nib[0].flip(0)])  # [2, 64]
    packed = pack_int4(nib)
    assert packed.shape == (2, 32) and packed.dtype == torch.uint8
    for unit in range(2):
        for i in range(16):
            byte = packed[1, 16 * unit + i].item()
            assert byte & 15 == nib[1, 32 * unit + i] and byte >> 4 == nib[1, 32 * unit + i + 16]
    assert torch.equal(unpack_int4(packed), nib)
    q = quantize(torch.tensor([[-1.0] * 16 + [1.0] * 16]), "int4", 32)  # symmetric: nibble = q + 8
    assert q.data[0, 0].item() == ((-7 + 8) | ((7 + 8) << 4))


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_nbytes_and_bytes_per_param(fmt):
    mode, group, sym, sd = fmt
    N, K = 6, _k_for(fmt)
    qw = quantize(_weight(N, K), mode, group, symmetric=sym, scale_dtype=sd)
    e = torch.empty((), dtype=sd).element_size()
    groups = K // qw.group_size
    want = N * K // (2 if mode == "int4" else 1) + N * groups * e * (1 if sym else 2)
    assert qw.nbytes == want
    assert bytes_per_param(mode, group, symmetric=sym, scale_dtype=sd, K=K) * N * K == pytest.approx(want)


def test_bytes_per_param_table():
    """The figures docs and the memory table use (fp16 scales)."""
    assert bytes_per_param("int8", None, K=4096) == 1 + 2 / 4096
    assert bytes_per_param("int8", 32) == 1.0625
    assert bytes_per_param("int4", 32) == 0.5625 and bytes_per_param("int4", 32, symmetric=False) == 0.625
    assert bytes_per_param("int4", 128) == 0.515625
    assert bytes_per_param("int4", 32, symmetric=False, scale_dtype=torch.float32) == 0.75


def test_select_rows_cat_rows_and_to():
    w = _weight(20, 64)
    qw = quantize(w, "int4", 32, symmetric=False)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(qw.select_rows(perm).dequantize(), qw.dequantize()[perm])
    parts = [qw.select_rows(slice(0, 7)), qw.select_rows(slice(7, 20))]
    both = cat_rows(parts)
    assert both.shape == (20, 64) and torch.equal(both.dequantize(), qw.dequantize())
    assert torch.equal(qw.to("cpu").dequantize(), qw.dequantize())
    with pytest.raises(InputError, match="cannot be stacked"):
        cat_rows([qw, quantize(w, "int4", 32)])  # symmetric under asymmetric
    with pytest.raises(InputError, match="non-empty"):
        cat_rows([])


# --- the torch path of quantized_linear ----------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
@pytest.mark.parametrize("T", [0, 1, 37])
def test_torch_path_is_the_reference_bit_for_bit(fmt, T):
    """CPU path = F.linear of the dequantized matrix (the reference), in fp32 and bf16; against
    fp64 within torch's own fp32 error."""
    mode, group, sym, sd = fmt
    K = _k_for(fmt, odd=True)
    qw = quantize(_weight(33, K), mode, group, symmetric=sym, scale_dtype=sd)
    g = torch.Generator().manual_seed(T)
    x, b = torch.randn(T, K, generator=g), torch.randn(33, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        xd, bd = x.to(dtype), b.to(dtype)
        for bias in (bd, None):
            y = quantized_linear(xd, qw, bias, impl="torch")
            assert y.dtype == dtype and y.shape == (T, 33)
            assert torch.equal(y, quantized_linear_ref(xd, qw, bias))
            assert torch.equal(y, F.linear(xd, qw.dequantize(dtype), bias))


def test_batch_invariant_torch_path_is_the_dense_invariant_linear():
    """In the mode: mm_rows of the dequantized matrix plus the bias (what a dense layer computes in
    the mode), and a row's bits do not depend on the rows beside it."""
    qw = quantize(_weight(40, 96), "int4", 32, symmetric=False)
    x, b = torch.randn(300, 96), torch.randn(40)
    y = quantized_linear(x, qw, b, batch_invariant=True)
    assert torch.equal(y, mm_rows(x, qw.dequantize().T).add_(b))
    for rows in (slice(0, 1), slice(5, 9), slice(250, 300)):
        assert torch.equal(quantized_linear(x[rows], qw, b, batch_invariant=True), y[rows])


def test_scratch_buffer_is_reused_and_grows():
    small, big = quantize(_weight(8, 64), "int8"), quantize(_weight(16, 64), "int8")
    first = scratch_weight(big)
    ptr = first.data_ptr()
    assert torch.equal(first, big.dequantize())
    again = scratch_weight(small)  # smaller: the same memory
    assert again.data_ptr() == ptr and torch.equal(again, small.dequantize())
    bigger = quantize(_weight(64, 64), "int8")
    assert torch.equal(scratch_weight(bigger), bigger.dequantize())
    half = scratch_weight(small, torch.bfloat16)  # another dtype: its own buffer
    assert half.dtype == torch.bfloat16 and torch.equal(half, small.dequantize(torch.bfloat16))


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, match", [
    (("int3", 32), {}, "mode must be one of int8, int4"),
    (("int8", 48), {}, "int8 group size must be one of 16, 32, 64, 128"),
    (("int4", 16), {}, "int4 group size must be one of 32, 64, 128"),
    (("int4", None), {}, "int4 needs a group size"),
    (("int4", True), {}, "group size"),
    (("int8", 32), {"symmetric": 1}, "symmetric must be a bool"),
    (("int8", 32), {"scale_dtype": torch.bfloat16}, "scale_dtype"),
])
def test_quantize_refuses_bad_formats(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        quantize(_weight(4, 128), *args, **kwargs)


def test_quantize_refuses_bad_weights():
    with pytest.raises(InputError, match="K = 96 .* not divisible by the int4 group size 64"):
        quantize(_weight(4, 96), "int4", 64)
    with pytest.raises(InputError, match="2-D"):
        quantize(torch.zeros(4), "int8")
    with pytest.raises(InputError, match="float32, bfloat16 or float16"):
        quantize(torch.zeros(4, 32, dtype=torch.int32), "int8")
    w = _weight(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        quantize(w, "int8")
    with pytest.raises(InputError, match="too large for torch.float16 scales"):
        quantize(torch.full((2, 32), 1e8), "int8", 32)
    big = quantize(torch.full((2, 32), 1e8), "int8", 32, scale_dtype=torch.float32)
    assert big.dequantize()[0, 0].item() == pytest.approx(1e8, rel=1e-6)


def test_quantized_weight_checks_its_fields():
    good = quantize(_weight(4, 64), "int4", 32, symmetric=False)
    fields = dict(shape=good.shape, mode="int4", group_size=32, symmetric=False, data=good.data,
                  scales=good.scales, mins=good.mins)
    for change, match in [
        (dict(shape=(4,)), "shape must be"),
        (dict(data=good.data.to(torch.int8)), "data of a int4 asym weight"),
        (dict(data=unpack_int4(good.data)), "must be torch.uint8 \\[4, 32\\]"),
        (dict(scales=good.scales[:, :1]), "scales must be"),
        (dict(mins=None), "mins must be"),
        (dict(mins=good.mins.float()), "mins must have scales' dtype"),
        (dict(symmetric=True), "a symmetric weight has no mins"),
        (dict(data=torch.empty(32, 4, dtype=torch.uint8).t()), "data must be contiguous"),  # the kernels take rows
    ]:
        with pytest.raises(InputError, match=match):
            QuantizedWeight(**dict(fields, **change))
    with pytest.raises(InputError, match="dtype must be a floating point dtype"):
        good.dequantize(torch.int32)


def test_quantized_linear_refuses_bad_arguments():
    qw = quantize(_weight(8, 64), "int8", 32)
    x = torch.randn(3, 64)
    for args, match in [
        ((x[None], qw), "x must be a 2-D tensor"),
        ((x.to(torch.int32), qw), "x must be float32, bfloat16 or float16"),
        ((x[:, :32], qw), "x must be \\[T, K=64\\]"),
        ((x, qw.dequantize()), "qw must be a QuantizedWeight"),
        ((x, qw, torch.zeros(7)), "bias must be a tensor \\[N=8\\]"),
        ((x, qw, torch.zeros(8, dtype=torch.float64)), "bias must have x's dtype"),
        ((x.to("meta"), qw), "qw must be on x's device"),
    ]:
        with pytest.raises(InputError, match=match):
            quantized_linear(*args)
        with pytest.raises(InputError, match=match):
            quantized_linear_ref(*args)
    with pytest.raises(InputError, match="impl must be"):
        quantized_linear(x, qw, impl="cuda")


def test_dequantize_into_and_empty_shapes():
    for shape in ((0, 64), (5, 0)):
        qw = quantize(torch.zeros(shape), "int8")
        assert qw.dequantize().shape == shape
        y = quantized_linear(torch.randn(3, shape[1]), qw)
        assert y.shape == (3, shape[0]) and not y.any()
    qw = quantize(_weight(3, 32), "int8", 32)
    out = torch.empty(3, 32)
    assert dequantize_into(qw, out) is out and torch.equal(out, qw.dequantize())
