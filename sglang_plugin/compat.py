"""CPU shim for SGLang's LoRA batch preparation: pinned host buffers on a machine that cannot pin.

`TorchNativeLoRABackend.prepare_lora_batch` (sglang/srt/lora/backend/torch_backend.py) builds its
per-batch segment tables in page-locked ("pinned") host memory to overlap the host-to-device copy.
Without CUDA (or another accelerator) torch has no pinned allocator and raises. On such a machine
"pinned" has no meaning, so during that one method, and only when pinning is impossible, requests
for pinned memory return ordinary memory: `Tensor.pin_memory()` returns the tensor and
`pin_memory=True` is dropped from torch's factory functions. Nothing changes where pinning works.

The plugin's OPT avoids SGLang's other pinned allocations by construction: its adapted projections
are `ReplicatedLinear`s, whose LoRA wrapper (`ReplicatedLinearWithLoRA`) allocates none, unlike the
column/row/QKV-parallel wrappers in sglang/srt/lora/layers.py.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

_FACTORIES = ("tensor", "zeros", "empty", "ones", "full", "arange")
_lock = threading.RLock()
_SHIMMED = "_flashzo_unpinned"


@functools.lru_cache(maxsize=None)
def pinning_available() -> bool:
    """Whether this torch can allocate pinned host memory (needs CUDA or another accelerator)."""
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError:
        return False
    return True


def _drop_pin(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def pinning_disabled():
    """Within the block, pinned-memory requests give ordinary host memory (a no-op where pinning works)."""
    if pinning_available():
        yield
        return
    with _lock:
        saved = {name: getattr(torch, name) for name in _FACTORIES}
        saved_method = torch.Tensor.pin_memory
        try:
            for name, fn in saved.items():
                setattr(torch, name, _drop_pin(fn))
            torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch, name, fn)
            torch.Tensor.pin_memory = saved_method


def without_pinning(method):
    """Wrap a method so it runs under pinning_disabled() (marked, so wrapping twice is a no-op)."""
    if getattr(method, _SHIMMED, False):
        return method

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with pinning_disabled():
            return method(*args, **kwargs)

    setattr(wrapper, _SHIMMED, True)
    return wrapper


def install_lora_cpu_shim() -> bool:
    """On a machine that cannot pin memory, let SGLang's torch_native LoRA backend prepare its batches.

    Returns whether the shim is in place (False where pinning works: nothing to do).
    """
    if pinning_available():
        return False
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend

    TorchNativeLoRABackend.prepare_lora_batch = without_pinning(TorchNativeLoRABackend.prepare_lora_batch)
    return True
