"""Row-invariant GEMMs and row-wise ops: every call has one shape, whatever the number of rows.

A GEMM library picks its kernel, its blocking and sometimes a split of K from the shape of the call,
so the bits of one row of ``x @ w`` change with the rows beside it: with torch's MKL on a CPU a row
of ``x @ W.T`` rounds one way alone, another beside one or two rows and a third beside more, at
every (K, N) tried (bench/results/code_notes_cpu.md, "kernels/rows.py (module docstring)"). Torch's
CPU loops do the same to element-wise ops: the elements past the last whole vector of a call run
through scalar code, which rounds some transcendental functions (silu, sigmoid, tanh-GELU)
differently from the vector code (the same section: how many elements, alone against in a long call).

Here ``x`` is cut into chunks of ``row_chunk(device, N)`` rows, copied into one fresh contiguous
buffer (every chunk then starts at the same alignment) whose last chunk is zero-padded, and every
chunk is computed by a GEMM of one shape, [C, K] x [K, N]: a row's bits are then a function of the
row, of ``w`` and of that shape only, never of T, of the other rows or of where the row sits in its
chunk (tests/test_rows.py checks the first, middle and last position of batches of many sizes).

On a CPU every chunk is its own ``torch.mm`` call, run single-threaded, the chunks in parallel
(kernels/serial.py): a library's split of one call between threads, or its choice of kernel for a
batched call by the number of GEMMs in it, would make the bits depend on the thread count or on T
(MKL's AVX-512 path does both: bench/results/code_notes_cpu.md, "kernels/serial.py";
tests/test_isa.py runs the checks under it). On CUDA the chunks are separate cuBLAS calls.

    mm_rows(x, w_t)      x @ w_t, row-invariant
    apply_rows(fn, x)    fn(x) for a row-wise fn (a norm, a log-sum-exp), one [C, ...] call per chunk
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .serial import run_serial

WIDE = 16384  # output columns from which a GEMM counts as wide (an LM head over the vocabulary)
# Output columns below which a GEMM is computed with zero columns added up to this many. MKL's AVX2
# kernels (an Intel CPU) compute a narrow output (a LoRA shrink to r columns, a tiny model's
# projection) in blocks of 6 rows, and a block of 2 rows left over at the end of a panel rounds
# differently, so a row's bits would depend on where the batch puts it in its chunk; a wide enough
# output has no such position. Which positions, by width: bench/results/code_notes_cpu.md,
# "kernels/rows.py NARROW"; tests/test_isa.py checks every position of a call under that code path.
NARROW = 64


def row_chunk(device: torch.device | str, width: int | None = None) -> int:
    """Rows per call: of a GEMM with `width` output columns, or of a row-wise op over rows of `width`
    elements (apply_rows passes it; None: a wide row). A function of the device type and the
    weights' or rows' shape only, never of the batch.

    NOTE (the sizes): a projection GEMM runs 256 rows per call, which costs little over one call
    over all rows; a wide one (an LM head over the vocabulary) 64: its weight is re-read from memory
    per call, but a readout holds few rows, and padding them to 256 would multiply its work. A
    row-wise op follows the same rule: 256 rows of a hidden-size row, 64 of a vocabulary-wide one (a
    readout's log-sum-exp). The CPU time of each against one plain call:
    bench/results/code_notes_cpu.md, "kernels/rows.py row_chunk". CUDA: 256 rows everywhere, chosen
    before any timing (what has run on a GPU: docs/benchmarks.md).
    """
    if torch.device(device).type == "cuda":
        return 256
    return 256 if width is not None and width < WIDE else 64


def _padded(x: torch.Tensor, chunk: int) -> torch.Tensor:
    # x: [T, ...] -> [n * chunk, ...], a fresh contiguous buffer, rows past T zero
    T = x.shape[0]
    n = -(-T // chunk)
    buf = x.new_empty((n * chunk,) + tuple(x.shape[1:]))
    buf[:T] = x
    buf[T:] = 0
    return buf


def mm_rows(x: torch.Tensor, w_t: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
    """x @ w_t, every row computed by a call of shape [chunk, K] x [K, N].

    Args:
        x: [T, K] (any strides; T and K may be 0). w_t: [K, N], x's dtype (any strides, e.g. W.T).
        chunk: rows per call (default ``row_chunk(x.device, N)``).

    Returns:
        [T, N] in x's dtype, contiguous.
    """
    T, K = x.shape
    N = w_t.shape[1]
    c = chunk or row_chunk(x.device, N)
    if T == 0:
        return x.new_empty((0, N))
    if N < NARROW:  # NOTE: zero columns up to NARROW, see NARROW
        w_t = torch.cat([w_t, w_t.new_zeros((K, NARROW - N))], dim=1)  # [K, NARROW]
    buf = _padded(x, c)  # [n*c, K]
    out = x.new_empty((buf.shape[0], w_t.shape[1]))

    def chunk_mm(r0: int) -> None:  # one [c, K] x [K, N] GEMM
        torch.mm(buf[r0:r0 + c], w_t, out=out[r0:r0 + c])

    if x.device.type == "cpu":
        run_serial(chunk_mm, range(0, buf.shape[0], c))
    else:
        for r0 in range(0, buf.shape[0], c):
            chunk_mm(r0)
    return out[:T] if out.shape[1] == N else out[:T, :N].contiguous()


def apply_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
               chunk: int | None = None) -> torch.Tensor:
    """fn(x) for a row-wise fn (row i of the result depends on row i of x only), one call of shape
    [chunk, ...] per chunk. Padding rows are zeros: fn must give them something finite or not (they are
    dropped), never an error.

    Args:
        fn: [chunk, ...] -> [chunk, ...'] (same number of rows). x: [T, ...].

    Returns:
        fn's rows for the T rows of x, [T, ...'].
    """
    T = x.shape[0]
    c = chunk or row_chunk(x.device, math.prod(x.shape[1:]))
    if T == 0:
        return fn(x)
    # NOTE: full chunks are read in place (a contiguous [c, ...] view of x, or a contiguous copy of a
    # strided one), only the last partial chunk is copied and zero-padded. torch's CPU element-wise
    # and row-reduction loops read with unaligned vector loads, so a view's offset does not change a
    # chunk's bits (tests/test_rows.py checks rows at the first, middle and last position of batches
    # of many sizes). A chunk of row_chunk's 64 or 256 rows holds a multiple of 64 elements, so the
    # single-threaded loop of an element-wise op over it (ATen's CPU loops step two vectors, at most
    # 64 elements) ends on whole vectors: no element runs through the scalar code.
    starts = range(0, T, c)
    ys: list = [None] * len(starts)

    def chunk_fn(k: int) -> None:  # one [c, ...] call
        ys[k] = fn(_chunk(x, starts[k], c))

    if x.device.type == "cpu":
        run_serial(chunk_fn, range(len(starts)))
    else:
        for k in range(len(starts)):
            chunk_fn(k)
    out = ys[0].new_empty((T,) + tuple(ys[0].shape[1:]))
    for r0, y in zip(starts, ys):
        out[r0:r0 + c] = y[:min(c, T - r0)]
    return out


def _chunk(x: torch.Tensor, r0: int, c: int) -> torch.Tensor:
    # rows r0 .. r0+c of x as a contiguous [c, ...]: a view of a full chunk (or its contiguous copy),
    # the last partial chunk copied and zero-padded
    return x[r0:r0 + c].contiguous() if x.shape[0] - r0 >= c else _padded(x[r0:], c)
