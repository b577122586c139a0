"""Batch-invariant numerics: a row's result never depends on the other rows of its forward.

docs/design.md, "Batch invariance", states the guarantee. This module holds the mode and the
row-invariant operations a family's block and the engine use:

    set_batch_invariant(on)           the process's mode (the default of every thread)
    is_batch_invariant()              the calling thread's mode
    batch_invariant_mode(on)          a `with` block running in another mode (this thread only)

    linear(x, W, b)                   x @ W.T + b; in the mode over fixed-size row chunks (kernels/rows.py)
    rowwise(fn, x)                    a row-wise fn (a norm, a log-sum-exp); in the mode over the same chunks
    logsumexp(x), layer_norm(...), rms_norm(...), and the modules LayerNorm, Linear, RMSNorm (drop-in
    for torch's, same parameters), for a family's block code

    exact_sum(values), exact_float(s) the loss reductions: a sum with no rounding (an integer count of
    to_limbs(s), from_limbs(limbs)    2**-1074), rounded once at the end; limbs carry it across ranks

Out of the mode every operation is the plain torch call. The perturbed LoRA kernels take the mode
as their `batch_invariant` argument (kernels/perturbed_lora.py), and the attention backends read it
when they plan a stage (engine/attention.py).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from flashzo.kernels import QuantizedWeight, apply_rows, mm_rows, quantized_linear
from flashzo.kernels.errors import InputError

from .quantized import weight_value

DEFAULT = False  # the process's mode until set_batch_invariant() changes it

_mode = {"process": DEFAULT}
_thread = threading.local()


# The mode -------------------------------------------------------------------------------------------
def _check(on) -> bool:
    if not isinstance(on, bool):
        raise InputError(f"batch_invariant must be True or False, got {on!r}")
    return on


def set_batch_invariant(on: bool) -> None:
    """Turn batch-invariant numerics on or off for the whole process (threads in a
    `batch_invariant_mode` block keep theirs)."""
    _mode["process"] = _check(on)


def is_batch_invariant() -> bool:
    """The calling thread's mode: its `batch_invariant_mode` block's, else the process's."""
    stack = getattr(_thread, "stack", None)
    return stack[-1] if stack else _mode["process"]


@contextlib.contextmanager
def batch_invariant_mode(on: bool):
    """Run a block in mode `on` on this thread only (a trainer's forwards run in its run's mode)."""
    _check(on)
    stack = _thread.__dict__.setdefault("stack", [])
    stack.append(on)
    try:
        yield
    finally:
        stack.pop()


# Row-invariant operations -------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None, *,
           chunk: int | None = None) -> torch.Tensor:
    """x @ W.T + bias in x's dtype. x: [..., K], weight: [N, K] (or a QuantizedWeight: kernels/quant_linear.py,
    the dense layer's bits on a CPU) -> [..., N]. chunk: rows per GEMM call in the mode (kernels/rows.py)."""
    if isinstance(weight, QuantizedWeight):
        y = quantized_linear(x.reshape(-1, x.shape[-1]), weight, bias, batch_invariant=is_batch_invariant(),
                             chunk=chunk)
        return y.view(*x.shape[:-1], weight.shape[0])
    if not is_batch_invariant():
        return F.linear(x, weight, bias)
    y = mm_rows(x.reshape(-1, x.shape[-1]), weight.T, chunk=chunk)  # [T, N]
    if bias is not None:
        y = y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an fn whose row i depends on row i of x only (x: [T, ...]); in the mode one call of
    fixed shape per chunk of rows, so a reduction inside fn cannot split a row by how many rows share it."""
    return apply_rows(fn, x) if is_batch_invariant() else fn(x)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x), -1)) per row: [T, V] -> [T]."""
    return rowwise(lambda t: torch.logsumexp(t, dim=-1), x)


def layer_norm(x: torch.Tensor, shape, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    return rowwise(lambda t: F.layer_norm(t, shape, weight, bias, eps), x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean in fp32 and the product in x's dtype (Hugging
    Face's Llama RMSNorm)."""

    def norm(t: torch.Tensor) -> torch.Tensor:
        h = t.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(t.dtype)

    return rowwise(norm, x)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (the same parameters and checkpoint names), row-invariant in the mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Linear(nn.Linear):
    """torch's Linear (the same parameters and checkpoint names), row-invariant in the mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, weight_value(self.weight), self.bias)  # its weight may be quantized (engine/quantized.py)


class RMSNorm(nn.Module):
    """rms_norm with a learned `weight` (ones at init), for a family's block code."""

    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# Exact sums -------------------------------------------------------------------------------------------
# Every finite double is an integer multiple of 2**-1074: a sum of doubles is held exactly as the
# integer count of that unit, whatever the order or grouping of its terms, and rounded once.
_UNIT_BITS = 1074
LIMB_BITS = 52  # a limb is an integer below 2**52 in magnitude: a float64 holds it exactly
LIMBS = 42  # 42 * 52 = 2184 bits: any sum of up to 2**64 finite doubles (2**1024 * 2**1074 * 2**64)


def _units(v: float) -> int:
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1: m * 2**53 is an integer
    shift = e - 53 + _UNIT_BITS
    mant = int(m * (1 << 53))
    return mant << shift if shift >= 0 else mant >> -shift  # exact: v * 2**1074 is an integer


def exact_sum(values: Iterable[float]) -> int | float:
    """The exact sum of `values` as an integer count of 2**-1074 (exact_float rounds it once); a NaN or
    an infinity among them gives their float sum (NaN or +-inf) instead."""
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        return sum(values)
    return sum(_units(v) for v in values)


def exact_float(total: int | float) -> float:
    """An exact sum rounded once to the nearest double (ties to even), like math.fsum."""
    if isinstance(total, float):
        return total
    try:
        return total / (1 << _UNIT_BITS)  # int / int: correctly rounded
    except OverflowError:
        return math.inf if total > 0 else -math.inf  # copysign would convert the int and overflow too


def add_exact(a: int | float, b: int | float) -> int | float:
    """Two exact sums added (a non-finite one makes the result its float)."""
    if isinstance(a, float) or isinstance(b, float):
        return exact_float(a) + exact_float(b)
    return a + b


def to_limbs(total: int | float) -> list[float]:
    """An exact sum as LIMBS float64 values (signed base-2**52 digits), for an exchange of floats."""
    if isinstance(total, float):
        return [total] + [0.0] * (LIMBS - 1)
    mag, sign = abs(total), -1.0 if total < 0 else 1.0
    if mag >> (LIMB_BITS * LIMBS):
        raise ValueError(f"an exact sum of {mag.bit_length()} bits does not fit {LIMBS} limbs")
    mask = (1 << LIMB_BITS) - 1
    return [sign * float((mag >> (LIMB_BITS * i)) & mask) for i in range(LIMBS)]


def from_limbs(limbs: Iterable[float]) -> int | float:
    """to_limbs' inverse."""
    limbs = [float(v) for v in limbs]
    if not all(math.isfinite(v) for v in limbs):
        return sum(limbs)
    return sum(int(v) << (LIMB_BITS * i) for i, v in enumerate(limbs))
