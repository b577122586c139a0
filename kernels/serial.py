"""Single-threaded pieces, run in parallel: the batch-invariant mode's CPU work (docs/design.md).

A CPU library partitions an op by its thread count, and that changes the op's bits: MKL's AVX-512
path (an Intel CPU) sums the K = 3072 products of one [256, 3072] x [3072, 768] GEMM in another
order at 2 threads than at 1, and at 2 threads rounds a GEMM of a batched call otherwise when the
call holds more GEMMs; ATen cuts an element-wise op into one range of elements per thread, and the
end of each range runs through scalar code, which rounds some transcendental functions (silu among
them) differently from the vector code, so silu over [256, 3072] differs at 7 threads from 1. How
many elements each differs by: bench/results/code_notes_cpu.md, "kernels/serial.py" (and, for the
scalar code, "kernels/rows.py (module docstring)"). So in the mode every piece of CPU work (one
row chunk of a GEMM or of a row-wise op, one sequence's attention) runs on a thread whose ATen,
OpenMP and MKL use one thread, and the pieces run in parallel on `torch.get_num_threads()` such
threads: a piece's bits are then a function of its inputs, its shape and the machine's instruction
set, never of the thread count (tests/test_isa.py checks that in subprocesses at 1, 2 and 7 threads).

    run_serial(fn, items)    fn(item) for every item, each call single-threaded, the calls in parallel
    serial_supported()       whether this torch lets a thread be set to one thread (an OpenMP build)

The caller's thread takes the first share of the items itself (its OpenMP and MKL thread counts
are set to 1 for that and restored: both are per-thread settings, nothing global changes).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable

import torch

_local = threading.local()  # .serial: this thread runs pieces (a worker, or the caller's own share)
_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _symbol(lib: ctypes.CDLL | None, name: str):
    try:
        return getattr(lib, name) if lib is not None else None
    except AttributeError:
        return None


def _load(path: str | None) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


# OpenMP (torch's intra-op threads) is in the process's global namespace; MKL is linked into libtorch_cpu
# (its C entry point: the lowercase name is the Fortran one, which takes a pointer).
_OMP = _load(None)
_omp_set = _symbol(_OMP, "omp_set_num_threads")
_omp_get = _symbol(_OMP, "omp_get_max_threads")
_mkl_set = _symbol(_load(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")),
                   "MKL_Set_Num_Threads_Local")


def serial_supported() -> bool:
    """Whether a thread's OpenMP thread count can be set to 1 (torch built with OpenMP: the x86 wheels)."""
    return _omp_set is not None and _omp_get is not None


@contextlib.contextmanager
def _one_thread_here():
    """This thread's OpenMP and MKL at one thread for a block (per-thread settings; restored after)."""
    if getattr(_local, "serial", False):
        yield
        return
    torch.get_num_threads()  # ATen's per-thread first-use setup would reset what follows: run it first
    omp_prev = _omp_get() if _omp_get is not None else None
    mkl_prev = _mkl_set(1) if _mkl_set is not None else None
    if _omp_set is not None:
        _omp_set(1)
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = False
        if _omp_set is not None:
            _omp_set(omp_prev)
        if _mkl_set is not None:
            _mkl_set(mkl_prev)  # 0: back to MKL's process-wide setting


def _worker_init() -> None:
    torch.get_num_threads()  # as in _one_thread_here
    if _omp_set is not None:
        _omp_set(1)
    if _mkl_set is not None:
        _mkl_set(1)
    _local.serial = True


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="flashzo-serial",
                                                 initializer=_worker_init)
        return _pools[workers]


def _forget_pools() -> None:  # a forked child has none of the parent's threads
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools)


def run_serial(fn: Callable[[object], None], items: Iterable) -> None:
    """fn(item) for every item, each call on a thread whose intra-op work runs on one thread; the
    items are split into `torch.get_num_threads()` contiguous shares run in parallel (the caller runs
    the first). fn writes its own results (disjoint outputs). Returns when every call is done; raises
    the first error."""
    items = list(items)
    n = min(torch.get_num_threads(), len(items)) if not getattr(_local, "serial", False) else 1
    if n <= 1 or not serial_supported():
        with _one_thread_here():
            for it in items:
                fn(it)
        return
    bounds = [len(items) * k // n for k in range(n + 1)]
    shares = [items[bounds[k]:bounds[k + 1]] for k in range(n)]

    def run(share):
        for it in share:
            fn(it)

    futures = [_pool(n - 1).submit(run, share) for share in shares[1:]]
    try:
        with _one_thread_here():
            run(shares[0])
    finally:
        wait(futures)  # never return (or raise) while a worker still writes
    for f in futures:
        f.result()
