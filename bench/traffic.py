"""The perturbed LoRA kernels' traffic model: what each launch of one call moves, computes and draws.

``lora_launches`` describes every launch of one ``perturbed_lora_linear_parts`` (or
``perturbed_lora_add_``) call as the launchers in kernels/perturbed_lora.py make it: grid, tiles,
bytes read and written per operand, FLOPs and Philox+Box-Muller draws. It is built from the kernels'
own plan (``lora_plan``) and their grid and column-table functions (kernels/launch_plan.py), so the
model and the launches cannot drift apart; tests/test_launch_plan.py checks that the launchers launch
what it describes. bench/bench_perturbed_lora.py prints it next to the measured times; nothing in the
library uses it.

``quant_launches`` does the same for the quantized GEMM (kernels/quant_linear.py, its plan
``quant_plan``), with the two things a user would run instead: the unfused dequantize then GEMM, and
a dense GEMM of the same shape in x's dtype (bench/bench_quant.py prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from flashzo.kernels.launch_plan import (
    COL_RANK,
    COL_START,
    COL_STOP,
    DeviceInfo,
    LoRAKernelConfig,
    PartLayout,
    column_blocks,
    lora_plan,
)
from flashzo.kernels.quant_plan import QuantKernelConfig, quant_plan


def parts_layouts(parts) -> tuple[PartLayout, ...]:
    """PartLayouts from (start, stop, rank) triples (u columns and B rows packed in order, zero
    offsets: what the traffic model needs); PartLayouts pass through."""
    layouts, u_col, b_row = [], 0, 0
    for p in parts:
        if isinstance(p, PartLayout):
            layouts.append(p)
            continue
        start, stop, rank = p
        layouts.append(PartLayout(start, stop, rank, u_col, b_row, 0, 0))
        u_col, b_row = u_col + rank, b_row + stop - start
    return tuple(layouts)


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of a call, as the launcher makes it: what it reads and writes in global memory
    per operand (every request counted, cache hits included), its FLOPs (as executed, padding
    included) and its Philox+Box-Muller draws. ``math`` names the units its FLOPs run on."""

    name: str
    grid: tuple
    tiles: dict
    reads: dict  # operand -> bytes
    writes: dict  # operand -> bytes
    flops: int
    z_draws: int
    math: str  # "bf16", "fp16", "fp32" (a GEMM in x's dtype), "tf32" or "ieee" (LoRA dots), "none"

    @property
    def bytes_read(self) -> int:
        return sum(self.reads.values())

    @property
    def bytes_written(self) -> int:
        return sum(self.writes.values())

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def lora_launches(
    segments,
    K: int,
    N: int,
    parts,
    dtype: torch.dtype,
    *,
    device: DeviceInfo,
    config: LoRAKernelConfig | None = None,
    bias: bool = True,
    base: bool = True,
) -> list[KernelLaunch]:
    """Every launch of one ``perturbed_lora_linear_parts`` call (``base=False``: of
    ``perturbed_lora_add_``) on x: [T, K] of ``dtype`` with T = segments.num_rows, y: [T, N].

    parts: the adapted parts as (start, stop, rank) in column order, or their ``PartLayout``s;
    ``perturbed_lora_linear`` is the one part (0, N, r). device: e.g. DeviceInfo("cuda", 132)."""
    T = segments.num_rows
    layouts = parts_layouts(parts)
    e = torch.empty((), dtype=dtype).element_size()
    plan = lora_plan(K, N, [p.rank for p in layouts], dtype, device, config)
    launches = []
    if base:
        launches.append(
            KernelLaunch(
                name="base GEMM",
                grid=(),
                tiles={},
                reads=dict(x=T * K * e, W=N * K * e, bias=N * e if bias else 0),
                writes=dict(y=T * N * e),
                flops=2 * T * N * K,
                z_draws=0,
                math={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
            )
        )
    if T == 0 or K == 0 or not layouts:
        return launches
    r_total = sum(p.rank for p in layouts)
    n_adapted = sum(p.stop - p.start for p in layouts)
    tiles = segments.tile_rows(plan.shrink_block_m)
    signed = sum(1 for *_, sign in tiles if sign != 0)
    # every lane of a K step draws, masked or not: whole BLOCK_K steps over each split's range
    k_drawn = sum(
        triton.cdiv(min(plan.k_per_split, K - k0), plan.shrink_block_k) * plan.shrink_block_k
        for k0 in range(0, K, plan.k_per_split)
    )
    u_part = plan.split_k * T * plan.u_cols * 4
    launches.append(
        KernelLaunch(
            name="shrink",
            grid=plan.shrink_grid(len(tiles)),
            tiles=dict(BLOCK_M=plan.shrink_block_m, BLOCK_K=plan.shrink_block_k, U_COLS=plan.u_cols),
            reads=dict(x=T * K * e, A=len(tiles) * r_total * K * 4),
            writes=dict(u_part=u_part),
            flops=2 * T * K * plan.u_cols,
            z_draws=signed * plan.u_cols * k_drawn,
            math=plan.precision,
        )
    )
    if plan.split_k > 1:
        launches.append(
            KernelLaunch(
                name="reduce",
                grid=plan.reduce_grid(T),
                tiles=dict(BLOCK=plan.reduce_block, SPLIT=plan.split_k),
                reads=dict(u_part=u_part),
                writes=dict(u=T * plan.u_cols * 4),
                flops=(plan.split_k - 1) * T * plan.u_cols,
                z_draws=0,
                math="none",
            )
        )
    blocks = column_blocks(layouts, plan.expand_block_n)
    rows = plan.expand_rows_for(T, len(blocks))
    chunks = segments.tile_rows(rows)
    signed = sum(1 for *_, sign in chunks if sign != 0)
    u_read = sum(T * b[COL_RANK.value] * 4 for b in blocks)  # each column block reads its part's u
    b_read = len(chunks) * sum((b[COL_STOP.value] - b[COL_START.value]) * b[COL_RANK.value] * 4 for b in blocks)
    launches.append(
        KernelLaunch(
            name="expand",
            grid=(len(chunks), len(blocks)),
            tiles=dict(BLOCK_M=plan.expand_block_m, BLOCK_N=plan.expand_block_n, R_PAD=plan.r_pad, ROWS=rows),
            reads=dict(y=T * n_adapted * e, u=u_read, B=b_read),
            writes=dict(y=T * n_adapted * e),
            flops=2 * T * n_adapted * plan.r_pad,
            z_draws=signed * len(blocks) * plan.expand_block_n * plan.r_pad,
            math=plan.precision,
        )
    )
    return launches


def quant_launches(T: int, K: int, N: int, mode: str, group_size: int, dtype: torch.dtype, *,
                   symmetric: bool = True, scale_dtype: torch.dtype = torch.float16, bias: bool = True,
                   device: DeviceInfo, config: QuantKernelConfig | None = None,
                   requests: bool = False) -> dict[str, list[KernelLaunch]]:
    """The launches of ``quantized_linear`` on x: [T, K] of ``dtype`` (its Triton path), and of the
    two alternatives, as {"fused": [...], "unfused": [dequantize, GEMM], "dense": [GEMM]}.

    Bytes are each operand's compulsory traffic (read or written once), for every path alike, so
    the three compare: the fused kernel never writes or reads a dense weight. ``requests=True``
    counts the fused kernel's requests instead (a tile re-read by another program counts again:
    x once per column block, the packed weight, scales and mins once per row block), which the
    L2 cache serves in part."""
    plan = quant_plan(K, N, mode, group_size, dtype, device, config)
    e = torch.empty((), dtype=dtype).element_size()
    se = torch.empty((), dtype=scale_dtype).element_size()
    packed = N * K // (2 if mode == "int4" else 1)
    scales = N * (K // group_size) * se * (1 if symmetric else 2)
    row_tiles, col_tiles = triton.cdiv(T, plan.block_m), triton.cdiv(N, plan.block_n)
    x_reads, w_reads = (col_tiles, row_tiles) if requests else (1, 1)
    math = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    fused = KernelLaunch(
        name="quant GEMM",
        grid=plan.grid(T, N),
        tiles=dict(BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, GROUP_M=plan.group_m),
        reads=dict(x=x_reads * T * K * e, W=w_reads * packed, scales=w_reads * scales,
                   bias=w_reads * N * e if bias else 0),
        writes=dict(y=T * N * e),
        flops=2 * row_tiles * plan.block_m * col_tiles * plan.block_n * K,  # as executed: whole tiles
        z_draws=0,
        math=plan.precision if dtype == torch.float32 else math,
    )
    dequant = KernelLaunch(name="dequantize", grid=(), tiles={}, reads=dict(W=packed, scales=scales),
                           writes=dict(W_dense=N * K * e), flops=N * K * (1 if symmetric else 2), z_draws=0,
                           math="none")

    def gemm(name):
        return KernelLaunch(name=name, grid=(), tiles={},
                            reads=dict(x=T * K * e, W_dense=N * K * e, bias=N * e if bias else 0),
                            writes=dict(y=T * N * e), flops=2 * T * N * K, z_draws=0, math=math)

    return {"fused": [fused], "unfused": [dequant, gemm("GEMM")], "dense": [gemm("dense GEMM")]}
