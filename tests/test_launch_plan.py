"""Tests for flashzo.kernels.launch_plan: the plan is a function of (K, N, ranks, dtype, device) only,
the launchers launch exactly what the traffic model (bench/traffic.py) describes, and the model's figures.
"""

import os
import sys

import pytest
import torch
import triton

from flashzo.errors import InputError
from flashzo.kernels import LoRAKernelConfig, LoRAPart, Segments, perturbed_lora_linear, perturbed_lora_linear_parts
from flashzo.kernels import perturbed_lora as pl
from flashzo.kernels.launch_plan import DeviceInfo, lora_plan, min_dot_inner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from traffic import lora_launches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H100 = DeviceInfo("cuda", 132)
KERNELS = {"shrink": "_lora_shrink_kernel", "reduce": "_lora_reduce_kernel", "expand": "_lora_expand_kernel"}


def _layout(T, lengths=None, signs=None):
    lengths = lengths or [T // 2, T - T // 2]
    signs = signs or [1, -1][: len(lengths)] + [0] * (len(lengths) - 2)
    return Segments.from_lists(lengths, [0] * len(lengths), [7] * len(lengths), signs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [[(0, 2048, 8)], [(0, 2048, 16), (2048, 2560, 16), (2560, 3072, 16)]])
def test_tiles_and_split_do_not_depend_on_the_rows(parts, dtype):
    """Whatever T and however the rows fall into segments, every tile and the K split are the same:
    one row's result never depends on the other rows of the call (only grids change)."""
    N = parts[-1][1]
    layouts = [_layout(1), _layout(37, [10, 0, 20, 7]), _layout(2048), _layout(8192, [100] * 81 + [92])]
    seen = set()
    for segments in layouts:
        launches = {ln.name: ln for ln in lora_launches(segments, 2048, N, parts, dtype, device=H100)}
        expand = dict(launches["expand"].tiles)
        expand.pop("ROWS")  # rows per program: the grid's shape, not a tile
        seen.add((str(launches["shrink"].tiles), launches["shrink"].grid[1], str(expand)))
    assert len(seen) == 1, seen


def test_one_row_gives_the_same_bits_in_any_batch():
    """Rows computed alone and inside a bigger call (other segments before them, another T) are
    bit-identical, on the Triton path with the default plan (K split into 2 here). W = 0 keeps the
    LoRA term alone: the base GEMM is cuBLAS's business."""
    T, K, N, r = 37, 300, 40, 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, K, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.zeros(N, K, dtype=torch.bfloat16, device=DEVICE)  # cuBLAS may sum a base differently per T
    lora_a = (torch.randn(2, r, K, generator=g) / K**0.5).to(DEVICE)
    lora_b = torch.randn(2, N, r, generator=g).to(DEVICE)
    kw = dict(scaling=2.0, eps=0.1, a_offset=5, b_offset=9999, impl="triton")
    assert lora_plan(K, N, [r], torch.bfloat16, DeviceInfo.of(x.device)).split_k == 2
    together = Segments.from_lists([9, 21, 7], [1, 0, 1], [3, 11, 3], [1, -1, 0], device=DEVICE)
    y = perturbed_lora_linear(x, w, None, lora_a, lora_b, together, **kw)
    alone = Segments.from_lists([21], [0], [11], [-1], device=DEVICE)
    y_alone = perturbed_lora_linear(x[9:30], w, None, lora_a, lora_b, alone, **kw)
    assert torch.equal(y[9:30], y_alone)


@pytest.mark.parametrize(
    "config", [None, LoRAKernelConfig(shrink_block_m=16, shrink_block_k=16, shrink_split_k=3, expand_rows=32)]
)
def test_launchers_launch_what_the_model_describes(monkeypatch, config):
    """Every kernel launch of a stacked call (grid and tile meta-parameters), recorded at the
    launch, is the one lora_launches describes for the same call."""
    launched = []
    for name in KERNELS.values():
        kernel = getattr(pl, name)
        run = kernel.run

        def record(*args, grid, warmup, _name=name, _run=run, **kwargs):
            launched.append((_name, tuple(grid), kwargs))
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", record)
    T, K = 37, 70
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=g).to(DEVICE)
    w = torch.randn(30, K, generator=g).to(DEVICE)
    parts = [
        LoRAPart(0, 12, torch.randn(2, 4, K).to(DEVICE), torch.randn(2, 12, 4).to(DEVICE), 0, 1000),
        LoRAPart(15, 30, torch.randn(2, 8, K).to(DEVICE), torch.randn(2, 15, 8).to(DEVICE), 5000, 9000),
    ]
    segments = Segments.from_lists([10, 0, 20, 7], [0, 1, 1, 0], [5, 7, 9, 5], [1, -1, 0, -1], device=DEVICE)
    perturbed_lora_linear_parts(x, w, None, parts, segments, scaling=1.0, eps=0.1, impl="triton", config=config)
    model = lora_launches(
        segments, K, 30, [(0, 12, 4), (15, 30, 8)], torch.float32, device=DeviceInfo.of(x.device), config=config
    )
    assert [ln.name for ln in model] == ["base GEMM", "shrink"] + (["reduce"] if config else []) + ["expand"]
    assert [name for name, _, _ in launched] == [KERNELS[ln.name] for ln in model[1:]]
    for (name, grid, kwargs), ln in zip(launched, model[1:], strict=True):
        assert grid == ln.grid, name
        assert kwargs["enable_fp_fusion"] is False, name
        for key, value in ln.tiles.items():
            if key in kwargs:
                assert kwargs[key] == value, (name, key)


def test_expand_traffic_is_a_small_multiple_of_y():
    """The figures of the reduction-once design at the shape the old expand was worst at:
    T = 2048, K = N = 2048, r = 8, bf16, 132 SMs (MeZO's layout: half +eps, half -eps); there the
    old expand read 134 MB of u partials against y's 16.8 MB read-modify-write."""
    T, H, r, e = 2048, 2048, 8, 2
    launches = {ln.name: ln for ln in lora_launches(_layout(T), H, H, [(0, H, r)], torch.bfloat16, device=H100)}
    y_rmw = 2 * T * H * e  # 16.8 MB
    expand, shrink, reduce = launches["expand"], launches["shrink"], launches["reduce"]
    assert expand.reads["y"] + expand.writes["y"] == y_rmw
    assert expand.bytes <= 1.2 * y_rmw, expand  # u 2.1 MB and B 0.8 MB on top
    assert expand.reads["u"] <= 0.15 * y_rmw
    assert shrink.grid == (8, 8) and shrink.tiles["U_COLS"] == max(8, min_dot_inner())
    assert reduce.bytes <= 0.1 * y_rmw  # 0.6 MB (1.2 MB where u is padded to 16 columns: triton 3.6)
    # at every rank and part count, whatever T: u is read at most half as much as y moves, and the
    # partials the reduction reads are at most half of the shrink's read of x
    for parts in ([(0, H, 64)], [(0, H, 16), (H, H + 512, 16), (H + 512, H + 1024, 16)], [(0, H, 1)]):
        n = parts[-1][1]
        for T in (1, 256, 8192):
            ln = {ln.name: ln for ln in lora_launches(_layout(T), H, n, parts, torch.bfloat16, device=H100)}
            assert ln["expand"].reads["u"] <= 0.5 * 2 * T * n * e, (parts, T, ln["expand"])
            assert ln["reduce"].reads["u_part"] <= 0.5 * ln["shrink"].reads["x"], (parts, T, ln["reduce"])


def test_k_zero_and_empty_calls_launch_only_the_base():
    assert [ln.name for ln in lora_launches(_layout(16), 0, 64, [(0, 64, 8)], torch.bfloat16, device=H100)] == [
        "base GEMM"
    ]
    assert len(lora_launches(Segments.single(0), 64, 64, [(0, 64, 8)], torch.bfloat16, device=H100)) == 1


def test_min_dot_inner_is_the_installed_tritons():
    assert min_dot_inner() in (8, 16)
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9):
        assert min_dot_inner() == 8  # fp32 tl.dot with an inner size of 8 compiles
    plan = lora_plan(64, 64, [8], torch.bfloat16, H100)
    assert plan.u_cols == plan.r_pad == max(8, min_dot_inner())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shrink_block_m=8),
        dict(expand_block_n=48),
        dict(shrink_split_k=0),
        dict(expand_rows=0),
        dict(shrink_num_warps=3),
        dict(expand_num_stages=0),
    ],
)
def test_bad_config_raises_input_error(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        LoRAKernelConfig(**kwargs)
