"""How the quantized GEMM (quant_linear.py) cuts its work.

``quant_plan`` picks the tiles, warps and stages from (K, N, the weight's format, x's dtype, device)
only, never from T: every output element is then the same sequence of dots whatever the number of
rows, so the kernel is batch-invariant as it stands (docs/design.md, "Batch invariance").
The traffic model of the launch it makes (bench/traffic.py: ``quant_launches``) is the benchmark's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .errors import InputError
from .launch_plan import DeviceInfo

__all__ = ["QuantKernelConfig", "QuantPlan", "quant_plan"]


@dataclass(frozen=True)
class QuantKernelConfig:
    """Overrides of the plan's choices; ``None`` keeps the plan's. The K step must divide the group
    size (one scale per column per step) and, for int4, be a multiple of 32 (the packing unit)."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    group_m: int | None = None  # row tiles per band of the program order (L2 reuse of the weight)
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            low = 1 if name == "num_warps" else 16
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low
                                      or value & (value - 1)):
                raise InputError(f"{name} must be a power of two >= {low}, got {value!r}")
        for name in ("group_m", "num_stages"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class QuantPlan:
    """Everything the launcher chooses for one (K, N, format, dtype, device)."""

    precision: str  # the dot's input precision: "ieee" for fp32 x (as torch's fp32 GEMM), else "tf32"
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def grid(self, M: int, N: int) -> tuple[int]:
        return (triton.cdiv(M, self.block_m) * triton.cdiv(N, self.block_n),)


def quant_plan(K: int, N: int, mode: str, group_size: int, dtype: torch.dtype, device: DeviceInfo,
               config: QuantKernelConfig | None = None) -> QuantPlan:
    """The plan for x: [T, K] of ``dtype`` times a ``mode`` weight [N, K] with ``group_size`` (K: per
    channel). T does not enter (see the module docstring); ``device`` neither, yet.

    NOTE (starting points chosen before any timing; what has been timed on a GPU:
    docs/benchmarks.md): 16-bit x: 64 x 128 output tiles, a K step of 64 (or the group, if smaller:
    Q6_K's 16), 8 warps, 3 stages; fp32 x ("ieee" dots on the FMA units, operands in registers):
    32 x 64 tiles, K step 32, 4 warps, 2 stages. Row tiles are banded by 8 so that the programs
    running together read the same weight columns. Every build compiles for sm_80 and sm_90 without
    spills (tests/test_compile.py checks them all). 8 warps for 16-bit x, because with 4 the int8
    builds need far more registers per thread; a K not a multiple of 16 (unaligned rows:
    element-wise loads) takes a K step of 32, because at 64 an odd int8 build spills. The registers
    and spills of the plan's builds and of these alternatives: bench/results/code_notes_cpu.md,
    "kernels/quant_plan.py quant_plan (triton ...)". A decode-sized T (1-16 rows) pays a 64-row
    tile; a split of K would help it and is left out so that the plan stays a function of (K, N)
    alone.
    """
    cfg = config if config is not None else QuantKernelConfig()
    fp32 = dtype == torch.float32
    grouped = group_size < K or mode == "int4"
    block_k = cfg.block_k
    if block_k is None:  # one scale per column per K step; int4: whole 32-value units
        block_k = 32 if fp32 or K % 16 else 64
        if grouped:
            block_k = min(block_k, group_size)
        if mode == "int4":
            block_k = max(block_k, 32)
    if (grouped and group_size % block_k) or (mode == "int4" and block_k % 32):
        raise InputError(f"block_k = {block_k} must divide the group size {group_size}"
                         f"{' and be a multiple of 32 (int4)' if mode == 'int4' else ''}")
    return QuantPlan(
        precision="ieee" if fp32 else "tf32",
        block_m=cfg.block_m or (32 if fp32 else 64),
        block_n=cfg.block_n or (64 if fp32 else 128),
        block_k=block_k,
        group_m=cfg.group_m or 8,
        num_warps=cfg.num_warps or (4 if fp32 else 8),
        num_stages=cfg.num_stages or (2 if fp32 else 3),
    )
