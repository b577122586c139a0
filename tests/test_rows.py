"""kernels/rows.py: a row's bits never depend on the other rows of the call (every chunk one shape),
and the perturbed LoRA torch path with batch_invariant=True inherits it."""

import pytest
import torch
import torch.nn.functional as F

from flashzo.kernels import (
    LoRAPart,
    Segments,
    apply_rows,
    base_linear,
    mm_rows,
    perturbed_lora_add_,
    perturbed_lora_linear_parts,
    row_chunk,
)
from flashzo.kernels.rows import NARROW

SHAPES = [(32, 96), (64, 32), (37, 130), (8, 200)]  # (K, N): tiny model widths, odd sizes, a LoRA-like K


def _rows_alone_vs_in_batches(fn, K, row, sizes, threads, seed=0):
    """fn's bits for `row` alone and at the first, middle and last position of batches of `sizes` rows."""
    g = torch.Generator().manual_seed(seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = fn(row[None])[0]
        out = []
        for T in sizes:
            for p in sorted({0, T // 2, T - 1}):
                x = torch.randn(T, K, generator=g)
                x[p] = row
                out.append(((T, p), fn(x)[p]))
        return ref, out
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K,N", SHAPES)
def test_mm_rows_row_bits_never_depend_on_the_batch(K, N, threads):
    g = torch.Generator().manual_seed(K * N)
    W, row = torch.randn(N, K, generator=g), torch.randn(K, generator=g)
    C = row_chunk("cpu", N)
    sizes = [2, 3, 5, 7, 9, C - 1, C, C + 1, 3 * C + 5]
    ref, out = _rows_alone_vs_in_batches(lambda x: mm_rows(x, W.T), K, row, sizes, threads)
    for where, got in out:
        assert torch.equal(got, ref), where
    assert torch.allclose(ref, W @ row, rtol=1e-5, atol=1e-5)  # and it is the product


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("K,N", SHAPES + [(32, 8), (24, 1)])
def test_mm_rows_runs_one_single_threaded_gemm_shape_per_chunk(K, N, threads, monkeypatch):
    """What makes a row's bits independent of the batch and of the thread count, seen in the calls
    mm_rows makes: every GEMM has the shape [C, K] x [K, max(N, NARROW)] whatever T is, and runs where
    torch (hence MKL and oneDNN) uses one thread (kernels/serial.py), whatever the caller's count."""
    calls = []
    mm = torch.mm

    def spy(a, b, *, out=None):
        calls.append((tuple(a.shape), tuple(b.shape), torch.get_num_threads()))
        return mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", spy)
    W = torch.randn(N, K)
    C = row_chunk("cpu", N)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T in (1, C - 1, C, 2 * C + 3):
            calls.clear()
            y = mm_rows(torch.randn(T, K), W.T)
            assert y.shape == (T, N) and y.is_contiguous()
            assert calls == [((C, K), (K, max(N, NARROW)), 1)] * -(-T // C), T
        assert torch.get_num_threads() == threads  # the caller's count is untouched
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_apply_rows_is_row_invariant(threads):
    """A long-row reduction (torch's sum splits a lone row between two threads, not a row among
    others): through apply_rows every call is [C, V], single-threaded."""
    V = 50272
    g = torch.Generator().manual_seed(1)
    row = torch.randn(V, generator=g)
    fn = lambda x: torch.logsumexp(x, dim=-1)  # noqa: E731
    ref, out = _rows_alone_vs_in_batches(lambda x: apply_rows(fn, x), V, row, [2, 3, 5, 70], threads)
    for where, got in out:
        assert torch.equal(got, ref), where
    s_ref, s_out = _rows_alone_vs_in_batches(lambda x: apply_rows(lambda t: t.sum(-1), x), V, row, [2, 3], threads)
    assert all(torch.equal(got, s_ref) for _, got in s_out)


def test_empty_and_degenerate_shapes():
    W = torch.randn(5, 3)
    assert mm_rows(torch.empty(0, 3), W.T).shape == (0, 5)
    assert torch.equal(mm_rows(torch.empty(4, 0), torch.empty(0, 5)), torch.zeros(4, 5))
    x = torch.randn(70, 3)
    torch.testing.assert_close(mm_rows(x[::2], W.T), x[::2] @ W.T)  # strided input
    assert torch.equal(apply_rows(lambda t: F.layer_norm(t, (3,)), torch.empty(0, 3)), torch.empty(0, 3))


def _stack(K, N, n_adapters, g):
    a = torch.randn(n_adapters, 4, K, generator=g) * 0.1
    b = torch.randn(n_adapters, N // 2, 4, generator=g) * 0.1
    return [LoRAPart(0, N // 2, a, b, 0, 4 * K)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_lora_rows_never_depend_on_the_batch(dtype):
    """One segment's rows (adapter 0, sign +1) alone, then behind other segments of other adapters and
    signs and beside rows of their own segment: the same bits with batch_invariant=True, through
    perturbed_lora_linear_parts and through base_linear + perturbed_lora_add_ (the fork's path)."""
    K, N = 37, 24
    g = torch.Generator().manual_seed(3)
    W, bias = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    parts = _stack(K, N, 3, g)
    mine = torch.randn(5, K, generator=g).to(dtype)

    def run(x, lens, adapters, signs, path):
        seg = Segments.from_lists(lens, adapters, [11] * len(lens), signs)
        if path == "parts":
            return perturbed_lora_linear_parts(x, W, bias, parts, seg, scaling=2.0, eps=1e-2, impl="torch",
                                               batch_invariant=True)
        y = base_linear(x, W, bias, impl="torch", batch_invariant=True)
        return perturbed_lora_add_(y, x.to(y.dtype), parts, seg, scaling=2.0, eps=1e-2, impl="torch",
                                   batch_invariant=True).to(dtype)

    for path in ("parts", "fork"):
        ref = run(mine, [5], [0], [1], path)
        other = torch.randn(70, K, generator=g).to(dtype)
        got = run(torch.cat([other, mine]), [30, 40, 5], [1, 2, 0], [-1, 0, 1], path)[70:]
        assert torch.equal(got, ref), path
        more = torch.cat([mine, torch.randn(90, K, generator=g).to(dtype)])  # the segment holds more rows
        assert torch.equal(run(more, [95], [0], [1], path)[:5], ref), path
    assert torch.equal(run(mine, [5], [0], [1], "parts"), run(mine, [5], [0], [1], "fork"))
