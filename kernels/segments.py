"""Segments: which rows of a batch use which adapter, seed and sign, and the tile map the kernels read.

Rows of ``x`` (tokens, no padding) are grouped in contiguous segments; segment ``s`` covers rows
``indptr[s]:indptr[s+1]`` and carries an adapter index, a seed and a sign in {-1, 0, +1}
(docs/design.md, "The kernels"). The Triton kernels never read the segment tensors: each program
reads one row of a tile map, a host-built int64 table with one row per tile of rows, laid out as
the ``TILE_*`` constants below say (the kernels use them as constexpr globals).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import triton.language as tl

from .checks import check_seed
from .errors import InputError

# A tile-map row: the rows [row_start, row_stop) of one tile, all in one segment, and that segment's
# adapter, seed and sign.
TILE_ROW_START = tl.constexpr(0)
TILE_ROW_STOP = tl.constexpr(1)
TILE_ADAPTER = tl.constexpr(2)
TILE_SEED = tl.constexpr(3)
TILE_SIGN = tl.constexpr(4)
TILE_FIELDS = tl.constexpr(5)  # the row width


@dataclass(eq=False)
class Segments:
    """Which rows of x use which adapter, seed and sign: S segments of contiguous rows.

    indptr: int [S+1], rows of segment s are indptr[s]:indptr[s+1] (non-decreasing, from 0 to T)
    adapter: int [S], index into lora_a/lora_b's first dimension
    seed: int64 [S], in [0, 2**63 - 1]
    sign: int [S], in {-1, 0, +1} (0: plain LoRA, no z)

    A host (CPU) copy of all four is kept: the launcher builds its grid and the tile -> segment map
    from it, so a call never waits on the GPU. Building Segments from CUDA tensors reads them back
    once (one sync), ``.to(device)`` copies the host copy along without a sync; prefer building on
    the CPU and moving. The kernels read only the host copy (through ``tile_map``), never the
    device tensors. Segments are immutable: editing the tensors in place is not seen.
    Values are checked against T and the number of adapters by the launcher.
    """

    indptr: torch.Tensor
    adapter: torch.Tensor
    seed: torch.Tensor
    sign: torch.Tensor
    _host: tuple = field(init=False, repr=False, compare=False)
    _tile_maps: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        host = []
        for name in ("indptr", "adapter", "seed", "sign"):
            tensor, values = _as_int_tensor(getattr(self, name), f"segments.{name}")
            setattr(self, name, tensor)
            host.append(values)
        if len(host[0]) < 1:
            raise InputError("segments.indptr must have S+1 >= 1 entries")
        num = len(host[0]) - 1
        for name, values in zip(("adapter", "seed", "sign"), host[1:], strict=True):
            if len(values) != num:
                raise InputError(
                    f"segments.{name} must have {num} entries (one per segment), got {len(values)}"
                )
        devices = {t.device for t in (self.indptr, self.adapter, self.seed, self.sign)}
        if len(devices) > 1:
            raise InputError(f"segments tensors must share a device, got {sorted(map(str, devices))}")
        self._host = tuple(host)
        self._tile_maps = {}

    @classmethod
    def single(cls, num_rows: int, adapter: int = 0, seed: int = 0, sign: int = 0, device=None) -> Segments:
        """One segment covering all ``num_rows`` rows."""
        return cls.from_lists([num_rows], [adapter], [seed], [sign], device=device)

    @classmethod
    def from_lists(cls, lengths, adapters, seeds, signs, device=None) -> Segments:
        """Segments from per-segment row counts (``lengths``) and per-segment adapter/seed/sign."""
        try:
            lengths = [operator.index(n) for n in lengths]
        except TypeError:
            raise InputError("lengths must be a sequence of ints") from None
        if any(n < 0 for n in lengths):
            raise InputError(f"lengths must be >= 0, got {lengths}")
        indptr = [0]
        for n in lengths:
            indptr.append(indptr[-1] + n)
        seg = cls(indptr, adapters, seeds, signs)  # built on the CPU
        return seg if device is None else seg.to(device)

    @property
    def num_segments(self) -> int:
        return len(self._host[0]) - 1

    @property
    def num_rows(self) -> int:
        return self._host[0][-1]

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def to(self, device) -> Segments:
        """The same segments with device tensors on ``device``; the host copy travels without a sync."""
        device = torch.device(device)
        new = object.__new__(Segments)
        for name in ("indptr", "adapter", "seed", "sign"):
            setattr(new, name, getattr(self, name).to(device))
        new._host = self._host
        new._tile_maps = {}
        return new

    def validate(self, num_rows: int, num_adapters: int) -> None:
        """InputError naming the field unless the segments fit x (num_rows) and the adapters."""
        indptr, adapter, seed, sign = self._host
        if indptr[0] != 0:
            raise InputError(f"segments.indptr must start at 0, got {indptr[0]}")
        if any(b < a for a, b in zip(indptr[:-1], indptr[1:], strict=True)):
            raise InputError(f"segments.indptr must be non-decreasing, got {indptr}")
        if indptr[-1] != num_rows:
            raise InputError(f"segments.indptr must end at T = x.shape[0] = {num_rows}, got {indptr[-1]}")
        bad = [a for a in adapter if not 0 <= a < num_adapters]
        if bad:
            raise InputError(f"segments.adapter must lie in [0, {num_adapters}), got {bad[0]}")
        bad = [s for s in sign if s not in (-1, 0, 1)]
        if bad:
            raise InputError(f"segments.sign must be -1, 0 or +1, got {bad[0]}")
        for s in seed:
            check_seed(s, "segments.seed")

    def tile_rows(self, rows_per_tile: int) -> list[tuple[int, int, int, int, int]]:
        """(row_start, row_stop, adapter, seed, sign) per tile of at most ``rows_per_tile`` rows, in
        row order; a tile never straddles two segments and empty segments have none."""
        indptr, adapter, seed, sign = self._host
        rows = []
        for s in range(self.num_segments):
            for start in range(indptr[s], indptr[s + 1], rows_per_tile):
                rows.append((start, min(start + rows_per_tile, indptr[s + 1]), adapter[s], seed[s], sign[s]))
        return rows

    def num_tiles(self, rows_per_tile: int) -> int:
        """len(tile_rows(rows_per_tile)), without building the rows."""
        indptr = self._host[0]
        return sum(-(-(b - a) // rows_per_tile) for a, b in zip(indptr[:-1], indptr[1:], strict=True))

    def tile_map(self, rows_per_tile: int, device: torch.device) -> torch.Tensor:
        """int64 [num_tiles, TILE_FIELDS], one ``tile_rows`` entry per row with its fields at the
        TILE_* columns; built on the host, copied to ``device`` without a sync, cached."""
        key = (rows_per_tile, str(device))
        if key not in self._tile_maps:
            tiles = torch.zeros((self.num_tiles(rows_per_tile), TILE_FIELDS.value), dtype=torch.int64)
            rows = self.tile_rows(rows_per_tile)
            if rows:
                columns = (TILE_ROW_START, TILE_ROW_STOP, TILE_ADAPTER, TILE_SEED, TILE_SIGN)
                tiles[:, [c.value for c in columns]] = torch.tensor(rows, dtype=torch.int64)
            if device.type == "cuda":  # pinned + non_blocking: no stream sync for the copy
                tiles = tiles.pin_memory().to(device, non_blocking=True)
            self._tile_maps[key] = tiles.to(device)
        return self._tile_maps[key]


def _as_int_tensor(value, name: str) -> tuple[torch.Tensor, list[int]]:
    """(1-D int64 tensor on the value's device, its values as a host list); InputError otherwise."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise InputError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() != 1:
            raise InputError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
        values = value.tolist()  # one device read-back if value is on a GPU
        device = value.device
    else:
        try:
            values = [operator.index(v) for v in value]
        except TypeError:
            raise InputError(f"{name} must be a 1-D sequence of ints or an integer tensor") from None
        device = torch.device("cpu")
    if any(not -(2**63) <= v < 2**63 for v in values):
        raise InputError(f"{name} values must fit int64 (seeds lie in [0, 2**63 - 1])")
    return torch.tensor(values, dtype=torch.int64, device=device), values
