"""kernels/serial.py: every piece runs once, on a thread whose torch uses one thread; the caller's
thread count is left as it was; an error comes back once every piece has stopped."""

import threading

import pytest
import torch

from flashzo.kernels.serial import run_serial, serial_supported

pytestmark = pytest.mark.skipif(not serial_supported(), reason="torch without OpenMP")


@pytest.fixture(params=[1, 2, 7])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_every_item_once_each_on_one_thread_in_parallel(threads):
    # The shares run at the same time: the first piece each thread runs waits until min(threads, 23)
    # threads are inside one (a run that ran two shares one after the other on one thread would time
    # out here instead of depending on which thread happened to be free first).
    seen, lock, entered = [], threading.Lock(), set()
    barrier = threading.Barrier(min(threads, 23), timeout=60)

    def piece(i):
        with lock:
            first = threading.get_ident() not in entered
            entered.add(threading.get_ident())
        if first:
            barrier.wait()
        x = torch.randn(300, 300) @ torch.randn(300, 300)  # intra-op work inside the piece
        with lock:
            seen.append((i, torch.get_num_threads(), threading.get_ident(), x.shape))

    run_serial(piece, range(23))
    assert sorted(i for i, *_ in seen) == list(range(23))
    assert {n for _, n, _, _ in seen} == {1}
    assert len({t for _, _, t, _ in seen}) == min(threads, 23)  # one share per thread, the caller's included
    assert torch.get_num_threads() == threads  # restored in the caller


def test_nested_calls_run_inline(threads):
    inner = []

    def piece(i):
        run_serial(lambda j: inner.append((i, j, threading.get_ident(), torch.get_num_threads())), range(3))

    run_serial(piece, range(4))
    assert sorted((i, j) for i, j, _, _ in inner) == [(i, j) for i in range(4) for j in range(3)]
    assert {n for *_, n in inner} == {1}


def test_an_error_comes_back_after_every_piece_stopped(threads):
    done = []

    def piece(i):
        if i == 0:
            raise ValueError("piece 0 failed")
        done.append(i)

    with pytest.raises(ValueError, match="piece 0 failed"):
        run_serial(piece, range(9))
    # the caller's share (items 0 .. 9 // threads - 1) stops at its error; every other share ran to its
    # end before run_serial returned
    assert sorted(done) == list(range(9 // threads, 9))
    assert torch.get_num_threads() == threads
    run_serial(lambda i: None, range(3))  # still usable
