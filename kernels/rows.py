"""Row-invariant GEMMs and row-wise ops: every call has one shape, whatever the number of rows.

A GEMM library picks its kernel, its blocking and sometimes a split of K from the shape of the call,
so the bits of one row of ``x @ w`` change with the rows beside it. Measured with torch 2.13's MKL
(AVX2, fp32), for every (K, N) tried from 32x96 to 8192x2048: a row of ``x @ W.T`` rounds one way
at T = 1, another at T = 2-3 and a third at T >= 4 (with two threads, some rows of T = 5, 7 and 9
round as at T = 2-3: a thread's share of the rows is that small). Torch's CPU reductions do the
same over long rows: ``x.sum(-1)`` over 50272 columns rounds a row differently at T = 1 and at
T = 2-3 with two threads.

Here ``x`` is cut into chunks of ``row_chunk(device, N)`` rows, copied into one fresh contiguous
buffer (every chunk then starts at the same alignment) whose last chunk is zero-padded, and every
chunk is computed by a GEMM of one shape, [C, K] x [K, N]: a row's bits are then a function of the
row, of ``w`` and of that shape only, never of T, of the other rows or of where the row sits in its
chunk (measured: every position of a 64-, 128- or 256-row call gives the same bits).

On a CPU the chunks go to MKL in one batched call (``torch.bmm`` over [n, C, K]). One call per
chunk costs 3-8x one call over all rows with two threads on a loaded machine (a fork/join of the
thread pool per call); the batched call costs 1.2-1.5x at 64-row chunks, 1.0-1.25x at 256 (MKL
runs a 64- or 256-row GEMM below its large-T rate), measured at T = 954 and 5280, K, N = 768..3072.
Each chunk of a batched call rounds exactly as a call of that chunk alone (measured for n = 1 to
40 chunks of 64 rows at three shapes, and n up to 13 chunks of 64 or 256 rows at (K, N) from 8x768
to 2048x50272, one and two threads; tests/test_rows.py checks it on every run). On CUDA the chunks
are separate cuBLAS calls: cuBLAS may pick a batched kernel by the batch count.

    mm_rows(x, w_t)      x @ w_t, row-invariant
    apply_rows(fn, x)    fn(x) for a row-wise fn (a norm, a log-sum-exp), one [C, ...] call per chunk
"""

from __future__ import annotations

import math
from typing import Callable

import torch

WIDE = 16384  # output columns from which a GEMM counts as wide (an LM head over the vocabulary)


def row_chunk(device: torch.device | str, width: int | None = None) -> int:
    """Rows per call: of a GEMM with `width` output columns, or of a row-wise op over rows of `width`
    elements (apply_rows passes it; None: a wide row). A function of the device type and the
    weights' or rows' shape only, never of the batch.

    NOTE (the sizes, measured on a CPU with torch 2.13's MKL, two threads): a projection
    GEMM runs 256 rows per call (MKL at 256 rows is within 1.0-1.2x of one call over all rows, at
    64 rows 1.1-1.6x), a wide one (an LM head) 64 (it is re-read from memory per call, but a
    readout holds few rows: padding 32 rows to 256 costs 4.6x, to 64 1.5x). A row-wise op follows
    the same rule: 256 rows of a hidden-size row (a layer norm over [954, 768]: 0.82 ms against
    0.32 ms for one plain call, 1.21 ms at 64 rows; medians of 300 interleaved calls), 64 of a
    vocabulary-wide one (a readout's log-sum-exp). CUDA:
    256 rows everywhere, not yet timed on a GPU.
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
    buf = _padded(x, c)  # [n*c, K]
    n = buf.shape[0] // c
    if x.device.type == "cpu":  # one batched MKL call, every chunk its own [c, K] x [K, N] GEMM
        return torch.bmm(buf.view(n, c, K), w_t.unsqueeze(0).expand(n, K, N)).view(n * c, N)[:T]
    out = x.new_empty((n * c, N))
    for r0 in range(0, n * c, c):
        torch.mm(buf[r0 : r0 + c], w_t, out=out[r0 : r0 + c])
    return out[:T]


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
    # strided one), only the last partial chunk is copied and zero-padded, and every chunk's result
    # goes straight into one output. Padding all of x and concatenating the chunks' results instead
    # cost 28x one plain call for a ReLU over [954, 3072] on 2 threads (19 ms against 0.67 ms); this
    # way 2-3x. torch's CPU element-wise and row-reduction loops read with unaligned vector loads,
    # so a view's offset does not change a chunk's bits (tests/test_rows.py checks rows at the first,
    # middle and last position of batches of many sizes).
    out = None
    for r0 in range(0, T, c):
        n = min(c, T - r0)
        part = x[r0:r0 + c].contiguous() if n == c else _padded(x[r0:], c)
        y = fn(part)  # [c, ...']
        if out is None:
            out = y.new_empty((T,) + tuple(y.shape[1:]))
        out[r0:r0 + n] = y[:n]
    return out
