"""How the perturbed LoRA launchers cut their work, and what each launch moves: one plan for both.

``lora_plan`` picks every tile, the K split, warps and stages of the shrink, reduction and expand
kernels from (K, N, the parts' ranks, dtype, device) only, never from T or from how the rows fall
into segments: a row's result then never depends on which other rows share the call. The launchers
in perturbed_lora.py launch exactly what the plan says; the traffic model (bench/traffic.py:
``lora_launches``) describes the same launches (grid, tiles, bytes, FLOPs, z draws) for the benchmark
and the tests, from the same plan and the same grid functions, so the two cannot drift apart.

The stacked projection (several adapted parts side by side in one weight, e.g. q, k and v) is laid
out by ``PartLayout``: part p owns output columns [start, stop) of y, u columns [u_col, u_col + rank)
of the shrink's output, and rows [b_row, b_row + stop - start) of the B buffer the expand reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from .errors import InputError

# The expand's column table: one int32 row per BLOCK_N-wide column block, never straddling two parts:
# the block's y columns [start, stop), its part's first y column, first u column, rank, Z_B offset
# and the B row of the part's first column.
COL_START = tl.constexpr(0)
COL_STOP = tl.constexpr(1)
COL_PART_START = tl.constexpr(2)
COL_U = tl.constexpr(3)
COL_RANK = tl.constexpr(4)
COL_B_OFFSET = tl.constexpr(5)
COL_B_ROW = tl.constexpr(6)
COL_FIELDS = tl.constexpr(7)  # the row width

_REDUCE_BLOCK = 1024  # u elements per program of the split-K reduction
_MAX_EXPAND_ROWS = 1024


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Overrides of the plan's choices; ``None`` keeps the plan's. z never depends on any of these;
    the fp32 summation order of the LoRA dots does (tile shapes, the K step, the K split), the
    grid shape (``expand_rows``) does not.

    NOTE: the defaults are ``lora_plan``'s, and its NOTEs say what they are and why: starting
    points that compile without spills for sm_80 and sm_90, chosen before any timing (what has been
    timed on a GPU: docs/benchmarks.md).
    """

    shrink_block_m: int | None = None  # rows per shrink program
    shrink_block_k: int | None = None  # K step of the shrink loop
    shrink_split_k: int | None = None  # K splits of the shrink (a reduction kernel sums them)
    expand_block_m: int | None = None  # rows per expand step
    expand_block_n: int | None = None  # output columns per expand program
    expand_rows: int | None = None  # rows per expand program (it loops); None: fill the GPU
    shrink_num_warps: int | None = None
    expand_num_warps: int | None = None
    shrink_num_stages: int | None = None
    expand_num_stages: int | None = None

    def __post_init__(self):
        for name in ("shrink_block_m", "shrink_block_k", "expand_block_m", "expand_block_n"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise InputError(f"{name} must be a power of two >= 16, got {value}")
        for name in ("shrink_num_warps", "expand_num_warps"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise InputError(f"{name} must be a power of two >= 1, got {value}")
        for name in ("shrink_split_k", "expand_rows", "shrink_num_stages", "expand_num_stages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1, got {value}")


DEFAULT_CONFIG = LoRAKernelConfig()


@dataclass(frozen=True)
class DeviceInfo:
    """What the plan may depend on about the device: its kind and how many programs fill it."""

    kind: str  # "cuda" or "interpreter"
    num_sms: int  # streaming multiprocessors (1 for the interpreter: it runs programs one by one)

    @staticmethod
    def of(device: torch.device) -> DeviceInfo:
        if device.type != "cuda":
            return DeviceInfo("interpreter", 1)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return DeviceInfo("cuda", _num_sms(str(device)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


@dataclass(frozen=True)
class PartLayout:
    """Where one adapted part of a stacked projection lives (see the module docstring)."""

    start: int
    stop: int
    rank: int
    u_col: int
    b_row: int
    a_offset: int
    b_offset: int


@dataclass(frozen=True)
class LoRAPlan:
    """Everything the launchers choose for one (K, N, ranks, dtype, device)."""

    precision: str  # the LoRA dots' input precision: "tf32" for bf16/fp16 x, "ieee" for fp32
    u_cols: int  # u's padded width: the shrink dot's N (all parts' ranks side by side)
    r_pad: int  # the expand dot's inner size (the largest part rank, padded)
    shrink_block_m: int
    shrink_block_k: int
    k_per_split: int
    split_k: int  # number of K splits, cdiv(K, k_per_split); 0 when K == 0
    shrink_num_warps: int
    shrink_num_stages: int
    reduce_block: int
    reduce_num_warps: int
    expand_block_m: int
    expand_block_n: int
    expand_num_warps: int
    expand_num_stages: int
    expand_rows: int | None  # None: by T (grid shape only, see expand_rows_for)
    num_sms: int

    def shrink_grid(self, num_row_tiles: int) -> tuple[int, int]:
        return (num_row_tiles, self.split_k)

    def reduce_grid(self, num_rows: int) -> tuple[int]:
        return (triton.cdiv(num_rows * self.u_cols, self.reduce_block),)

    def expand_rows_for(self, num_rows: int, num_col_blocks: int) -> int:
        """Rows per expand program. Long row chunks reuse each regenerated B_eff tile; enough
        chunks fill the GPU twice over. Only the grid's shape depends on T: every y element is one
        dot of fixed shape, whatever chunk its row falls in."""
        if self.expand_rows is not None:
            return self.expand_rows
        rows = num_rows * num_col_blocks // (2 * self.num_sms)
        return min(max(rows // self.expand_block_m * self.expand_block_m, self.expand_block_m), _MAX_EXPAND_ROWS)


def lora_plan(
    K: int, N: int, ranks, dtype: torch.dtype, device: DeviceInfo, config: LoRAKernelConfig | None = None
) -> LoRAPlan:
    """The plan for x: [T, K] of ``dtype`` times parts of output widths summing to N and ranks
    ``ranks`` (one per part), on ``device``. T does not enter (see the module docstring).

    NOTE (the K split and the traffic it costs, from the traffic model: bench/traffic.py): the
    shrink splits K into chunks of ``k_per_split`` (256 up to 32 u columns, 512 at 64, 1024 beyond)
    so that the few row tiles of a small T still spread over many SMs; a reduction kernel then sums
    the splits once, in a fixed order, and the expand reads one u. Had every expand column block
    re-read and summed all splits itself (a runtime loop, so no software pipelining), with the split
    chosen from the number of row tiles, the expand of one bf16 call at T=2048, K=N=2048, r=8 on 132
    SMs would read 32 splits x 32 column blocks x 2048 rows x 16 u columns x 4 B = 134 MB of
    partials against y's 16.8 MB read-modify-write; with this plan its traffic is a small multiple
    of y's own (bench/results/code_notes_cpu.md, "kernels/launch_plan.py lora_plan"). Written and
    read back, the partials cost 4*u_cols/k_per_split of x's bf16 read whatever T is: 1/8 at r=8,
    1/2 up to 128 u columns, 1 at 256 (three parts of r=64); the split is a function of K and the u
    width only.

    NOTE (tiles; starting points chosen before any timing): every row tile of the shrink
    regenerates Z_A for its K range (u_cols * K draws per tile, ~100 instructions each), so its row
    tiles are large for bf16/fp16: 256 rows up to 32 u columns, 128 at 64, 64 beyond (with a K step
    of 16); fp32 ("ieee" dots on the FMA units hold their operands in registers) 64 rows up to 16
    columns, 32 up to 64, 16 beyond. K step 32 otherwise, 8 warps, 3 stages. Expand 64x64
    (bf16/fp16 at r_pad 64: 32x128, so that u, re-read once per column block, stays at half of y's
    traffic; fp32 from r_pad 32 on: 32x64), 8 warps, 2 stages. Every choice compiles for sm_80 and
    sm_90 without register spills (tests/test_compile.py checks them all; the registers of each
    build: bench/results/code_notes_cpu.md, "kernels/launch_plan.py lora_plan (triton ...)").
    """
    cfg = config if config is not None else DEFAULT_CONFIG
    ranks = tuple(int(r) for r in ranks)
    min_k = min_dot_inner()
    u_cols = max(min_k, triton.next_power_of_2(sum(ranks)))
    r_pad = max(min_k, triton.next_power_of_2(max(ranks)))
    fp32 = dtype == torch.float32
    if fp32:  # "ieee" dots run on the FMA units, from registers: far smaller tiles
        block_m = 64 if u_cols <= 16 else 32 if u_cols <= 64 else 16
        expand_m, expand_n = (64 if r_pad <= 16 else 32), 64
    else:
        block_m = 256 if u_cols <= 32 else 128 if u_cols <= 64 else 64
        expand_m, expand_n = (64, 64) if r_pad <= 32 else (32, 128)
    block_m = cfg.shrink_block_m or block_m
    block_k = cfg.shrink_block_k or (32 if u_cols <= 64 or (fp32 and u_cols <= 128) else 16)
    k_per_split = 256 if u_cols <= 32 else 512 if u_cols <= 64 else 1024
    if cfg.shrink_split_k is not None:  # that many splits (fewer if K is short), each whole K steps
        k_per_split = triton.cdiv(triton.cdiv(K, block_k), cfg.shrink_split_k) * block_k
    k_per_split = max(block_k, k_per_split // block_k * block_k)
    return LoRAPlan(
        precision="ieee" if fp32 else "tf32",
        u_cols=u_cols,
        r_pad=r_pad,
        shrink_block_m=block_m,
        shrink_block_k=block_k,
        k_per_split=k_per_split,
        split_k=triton.cdiv(K, k_per_split),
        shrink_num_warps=cfg.shrink_num_warps or 8,
        shrink_num_stages=cfg.shrink_num_stages or 3,
        reduce_block=_REDUCE_BLOCK,
        reduce_num_warps=4,
        expand_block_m=cfg.expand_block_m or expand_m,
        expand_block_n=cfg.expand_block_n or expand_n,
        expand_num_warps=cfg.expand_num_warps or 8,
        expand_num_stages=cfg.expand_num_stages or 2,
        expand_rows=cfg.expand_rows,
        num_sms=device.num_sms,
    )


@functools.lru_cache(maxsize=None)
def min_dot_inner() -> int:
    """The smallest inner (K) size of a tl.dot on fp32 operands that the installed Triton compiles
    for NVIDIA GPUs: 8 in triton 3.9 (mma m16n8k8 / wgmma m64nNk8 in TF32), 16 in triton 3.6.
    Padding u's columns to it instead of 16 halves the expand's work and Z_A draws at r <= 8."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size

        return max(8, int(min_dot_size(GPUTarget("cuda", 80, 32))(tl.float32, tl.float32)[2]))
    except Exception:  # a Triton without the NVIDIA backend's table: its long-standing minimum
        return 16


def column_blocks(layouts: tuple[PartLayout, ...], block_n: int) -> list[tuple[int, ...]]:
    """The expand's column table rows (fields at the COL_* positions), part by part."""
    rows = []
    for p in layouts:
        for start in range(p.start, p.stop, block_n):
            row = [0] * COL_FIELDS.value
            row[COL_START.value], row[COL_STOP.value] = start, min(start + block_n, p.stop)
            row[COL_PART_START.value], row[COL_U.value], row[COL_RANK.value] = p.start, p.u_col, p.rank
            row[COL_B_OFFSET.value], row[COL_B_ROW.value] = p.b_offset, p.b_row
            rows.append(tuple(row))
    return rows


def z_rows(layouts: tuple[PartLayout, ...], K: int, u_cols: int) -> list[int]:
    """Per u column j, the global Z_A index of its A row at k = 0: a_offset_p + i*K for column
    u_col_p + i of part p; 0 for the padding columns (masked in the kernel)."""
    rows = [0] * u_cols
    for p in layouts:
        for i in range(p.rank):
            rows[p.u_col + i] = p.a_offset + i * K
    return rows
