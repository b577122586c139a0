"""Argument checks shared by every flashzo kernel launcher, and the limits they enforce.

Each check returns the checked value (as a plain Python int where that applies) or raises
``InputError`` (kernels/errors.py, a ValueError) naming the argument. ``interpreting()`` says whether the
Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when flashzo was imported), which
is what lets them take CPU tensors.
"""

from __future__ import annotations

import operator

import torch
import triton

from .errors import InputError

MAX_INDEX = 2**31  # global z indices are int32: offset + numel must not exceed this
MAX_SEED = 2**63 - 1

# triton.jit picks the interpreter from this knob when it decorates a kernel, that is when flashzo's
# kernel modules are imported (they import this module first); read once so that a later change of
# the environment cannot make the launchers disagree with the kernels they hold.
_INTERPRETING = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """True when the Triton kernels run in Triton's interpreter (on CPU tensors)."""
    return _INTERPRETING


def check_int(value, name: str) -> int:
    """``value`` as a non-negative Python int."""
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}")
    return value


def check_seed(seed, name: str = "seed") -> int:
    """A seed as a Python int in [0, 2**63 - 1]."""
    if isinstance(seed, bool):
        raise InputError(f"{name} must be an int, got bool")
    seed = check_int(seed, name)
    if seed > MAX_SEED:
        raise InputError(f"{name} must be <= 2**63 - 1, got {seed}")
    return seed


def check_index_range(offset: int, numel: int) -> None:
    """Global indices [offset, offset + numel) must fit int32 (the kernels' index type)."""
    if offset + numel > MAX_INDEX:
        raise InputError(
            f"offset + numel must be <= 2**31 (int32 global indices), got offset={offset}, numel={numel}"
        )


def check_z_offset(value, name: str, size: int) -> int:
    """Where a parameter of ``size`` elements starts in the flat z index space: an int >= 0 with
    value + size <= 2**31 (the kernels' int32 global indices)."""
    try:
        offset = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        offset = None
    if offset is None:
        raise InputError(f"{name} must be an int, got {type(value).__name__}")
    if offset < 0 or offset + size > MAX_INDEX:
        raise InputError(f"{name} must be >= 0 with {name} + {size} <= 2**31 (int32 global indices), got {offset}")
    return offset


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """None -> "triton" on CUDA, "torch" elsewhere; otherwise "triton" or "torch" as asked."""
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in ("triton", "torch"):
        raise InputError(f"impl must be None, 'triton' or 'torch', got {impl!r}")
    return impl


def check_triton_device(device: torch.device) -> None:
    """A Triton kernel runs on CUDA, or on a CPU tensor only under TRITON_INTERPRET=1."""
    if device.type != "cuda" and not interpreting():
        raise InputError(
            f"impl='triton' on device {device} needs CUDA, or TRITON_INTERPRET=1 set before "
            "flashzo is imported"
        )


def check_block(block, name: str = "block") -> int:
    """A power of two >= 16 (elements per Triton program)."""
    block = check_int(block, name)
    if block < 16 or block & (block - 1):
        raise InputError(f"{name} must be a power of two >= 16, got {block}")
    return block
