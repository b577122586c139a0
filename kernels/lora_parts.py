"""The adapted parts of a stacked projection (q, k and v in one weight), packed for one launch each.

A stacked projection has one weight [N_total, K] whose output columns are the parts' rows stacked
(q's, then k's, then v's ...). ``LoRAPart`` names one adapted part: its output columns [start, stop),
its A [n_adapters, r, K] and B [n_adapters, stop - start, r] (fp32, any strides) and where its Z_A
and Z_B start in the adapter's flat parameter space (a_offset, b_offset): each part keeps its own
flat offsets, so z is the same as when the part runs as a projection of its own. Columns outside
every part are not adapted.

``stack_lora_parts`` packs the parts for the kernels: one A buffer [n_adapters, R_total, K] with the
parts' A side by side along r (the shrink computes all parts' u in one dot) and one B buffer
[n_adapters, N_adapted, R_max] with the parts' B stacked along rows (zero-padded in r). Packing
copies A and B unless they already lie side by side in one tensor (views of one buffer laid out that
way cost nothing); a ``LoRAStack`` can be built once per step and passed to every call of that step.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import check_z_offset
from .errors import InputError
from .launch_plan import PartLayout

MAX_RANK = 64
"""The largest LoRA rank r the kernels take (per part)."""


@dataclass(frozen=True, eq=False)
class LoRAPart:
    """One adapted part of a stacked projection (see the module docstring)."""

    start: int
    stop: int
    lora_a: torch.Tensor  # [n_adapters, r, K] fp32
    lora_b: torch.Tensor  # [n_adapters, stop - start, r] fp32
    a_offset: int
    b_offset: int


@dataclass(frozen=True, eq=False)
class LoRAStack:
    """Parts packed for the kernels (``stack_lora_parts``); the tensors are the kernels' inputs.

    a: [n_adapters, R_total, K] fp32, the parts' A side by side along r.
    b: [n_adapters, N_adapted, R_max] fp32, the parts' B stacked along rows, zeros past a part's r.
    layouts: where each part lives in y, u and b (``PartLayout``), in column order.
    parts: the parts as given (the torch path and the references read them).
    """

    a: torch.Tensor
    b: torch.Tensor
    layouts: tuple[PartLayout, ...]
    parts: tuple[LoRAPart, ...]

    @property
    def num_adapters(self) -> int:
        return self.a.shape[0]

    @property
    def K(self) -> int:
        return self.a.shape[2]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(p.rank for p in self.layouts)

    @property
    def stop(self) -> int:
        """One past the last adapted output column."""
        return max(p.stop for p in self.layouts)


def stack_lora_parts(parts: Sequence[LoRAPart] | LoRAStack) -> LoRAStack:
    """Check the parts and pack them (a LoRAStack is returned as it is).

    Cost: unless the parts' A (and B) are already adjacent slices of one tensor, A and B are copied
    once: n_adapters * (R_total*K + N_adapted*R_max) fp32 values read and written, e.g. 1.6 MB each
    way for q, k, v of OPT-6.7b (K = N = 4096) at r = 8 with 2 adapters, next to a call's 67 MB read
    of x at T = 8192 in bf16. Build the stack once per step (A and B change only between steps) and
    pass it to that step's calls; rebuild it after the parameters change.
    """
    if isinstance(parts, LoRAStack):
        return parts
    if isinstance(parts, LoRAPart) or not isinstance(parts, Sequence) or len(parts) == 0:
        raise InputError(f"parts must be a non-empty sequence of LoRAPart or a LoRAStack, got {type(parts).__name__}")
    parts = tuple(parts)
    first = None
    layouts = []
    u_col = b_row = 0
    prev_stop = 0
    for i, p in enumerate(parts):
        name = f"parts[{i}]"
        if not isinstance(p, LoRAPart):
            raise InputError(f"{name} must be a LoRAPart, got {type(p).__name__}")
        start, stop = _index(p.start, f"{name}.start"), _index(p.stop, f"{name}.stop")
        if start < prev_stop or stop <= start:
            raise InputError(
                f"{name} covers columns [{start}, {stop}): parts must be non-empty, in column order and "
                f"must not overlap (the previous part ends at {prev_stop})"
            )
        a, b = p.lora_a, p.lora_b
        for what, t in (("lora_a", a), ("lora_b", b)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise InputError(f"{name}.{what} must be a 3-D torch.Tensor, got {_describe(t)}")
            if t.dtype != torch.float32:
                raise InputError(f"{name}.{what} must be float32, got {t.dtype}")
        if a.shape[0] < 1:
            raise InputError(f"{name}.lora_a must be [n_adapters >= 1, r, K], got shape {tuple(a.shape)}")
        if first is None:
            first = a
        if a.shape[0] != first.shape[0] or a.shape[2] != first.shape[2]:
            raise InputError(
                f"{name}.lora_a must be [n_adapters={first.shape[0]}, r, K={first.shape[2]}] like parts[0]'s, "
                f"got shape {tuple(a.shape)}"
            )
        if a.device != first.device or b.device != first.device:
            raise InputError(f"{name}'s tensors must be on parts[0]'s device {first.device}")
        r = a.shape[1]
        if not 1 <= r <= MAX_RANK:
            raise InputError(f"{name}.lora_a's rank r = lora_a.shape[1] must be in [1, {MAX_RANK}], got {r}")
        if tuple(b.shape) != (a.shape[0], stop - start, r):
            raise InputError(
                f"{name}.lora_b must be [n_adapters={a.shape[0]}, stop - start={stop - start}, r={r}], "
                f"got shape {tuple(b.shape)}"
            )
        K = a.shape[2]
        a_offset = check_z_offset(p.a_offset, f"{name}.a_offset", r * K)
        b_offset = check_z_offset(p.b_offset, f"{name}.b_offset", (stop - start) * r)
        layouts.append(PartLayout(start, stop, r, u_col, b_row, a_offset, b_offset))
        u_col += r
        b_row += stop - start
        prev_stop = stop
    a_all = _adjacent([p.lora_a for p in parts], dim=1)
    if a_all is None:
        a_all = torch.cat([p.lora_a for p in parts], dim=1)  # [n_adapters, R_total, K]
    r_max = max(p.rank for p in layouts)
    b_all = _adjacent([p.lora_b for p in parts], dim=1) if all(p.rank == r_max for p in layouts) else None
    if b_all is None:
        b_all = first.new_zeros((first.shape[0], b_row, r_max))  # [n_adapters, N_adapted, R_max]
        for p, lay in zip(parts, layouts, strict=True):
            b_all[:, lay.b_row : lay.b_row + lay.stop - lay.start, : lay.rank] = p.lora_b
    return LoRAStack(a_all, b_all, tuple(layouts), parts)


def single_part_stack(lora_a, lora_b, a_offset: int, b_offset: int) -> LoRAStack:
    """The one-part stack of a plain projection (arguments already checked): nothing is copied."""
    N, r = lora_b.shape[1], lora_b.shape[2]
    part = LoRAPart(0, N, lora_a, lora_b, a_offset, b_offset)
    return LoRAStack(lora_a, lora_b, (PartLayout(0, N, r, 0, 0, int(a_offset), int(b_offset)),), (part,))


def _adjacent(tensors: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """One view spanning ``tensors`` along ``dim`` if they are consecutive slices of one tensor
    (same storage and strides, each starting where the previous ends); None otherwise."""
    if len(tensors) == 1:
        return tensors[0]
    t0 = tensors[0]
    try:
        storage = t0.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    offset = t0.storage_offset()
    for t in tensors:
        same_layout = t.stride() == t0.stride() and all(
            t.shape[d] == t0.shape[d] for d in range(t0.dim()) if d != dim
        )
        if not same_layout or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        offset += t.shape[dim] * t.stride(dim)
    shape = list(t0.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return t0.as_strided(shape, t0.stride(), t0.storage_offset())


def _index(value, name: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}")
    return value


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

