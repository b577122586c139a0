"""Tests for flashzo.kernels.perturbed_lora: the Triton path (under TRITON_INTERPRET=1 on a CPU) and
the torch path against an fp64 reference, the in-kernel z against gaussian(), and the invariants.

Tolerances: an implementation's max error against the fp64 reference must be within twice the
error of plain torch in the same dtype (F.linear in that dtype plus the LoRA delta in fp32, cast:
helpers.torch_in_dtype), plus a small atol. The problems' shared pieces (device, atols, the
37-row segment table) are in tests/helpers.py.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_ATOL as ATOL
from helpers import KERNEL_DEVICE as DEVICE
from helpers import ROWS_37, SEEDS_37, SIGNS_37, max_err, torch_in_dtype

from flashzo.errors import InputError
from flashzo.kernels import LoRAPart, Segments, gaussian, perturbed_lora_linear, perturbed_lora_linear_ref
from flashzo.kernels.launch_plan import DeviceInfo, lora_plan
from flashzo.kernels.lora_parts import single_part_stack
from flashzo.kernels.perturbed_lora import LoRAKernelConfig, _lora_expand, _lora_shrink
from flashzo.kernels.randn import gaussian_at
from flashzo.kernels.segments import TILE_ADAPTER, TILE_FIELDS, TILE_ROW_START, TILE_ROW_STOP, TILE_SEED, TILE_SIGN

# Two configurations with different tiles, K steps and K splits (both differ from the default).
CONFIGS = [
    LoRAKernelConfig(
        shrink_block_m=16, shrink_block_k=16, expand_block_m=16, expand_block_n=16, expand_rows=16
    ),
    LoRAKernelConfig(
        shrink_block_m=64,
        shrink_block_k=32,
        shrink_split_k=2,
        expand_block_m=32,
        expand_block_n=64,
        expand_rows=64,
    ),
]


def _problem(T, K, N, r, dtype, *, bias=True, lengths=None, signs=None, seed=0, n_adapters=2):
    """Random inputs of realistic scale (|y| of a few units) and a multi-segment layout."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    lora_a = (torch.randn(n_adapters, r, K, generator=g) / K**0.5).to(DEVICE)
    lora_b = (0.5 * torch.randn(n_adapters, N, r, generator=g)).to(DEVICE)
    if lengths is None:  # T=37: the 37-row table of tests/helpers.py, mixed adapters
        lengths = ROWS_37 if T == 37 else [T]
    n = len(lengths)
    adapters = [s % n_adapters for s in range(n)]
    seeds = SEEDS_37[:n] if n <= 4 else list(range(n))
    signs = signs if signs is not None else SIGNS_37[:n]
    segments = Segments.from_lists(lengths, adapters, seeds, signs, device=DEVICE)
    return x, w, b, lora_a, lora_b, segments


KW = dict(scaling=2.0, eps=0.1, a_offset=3, b_offset=1000)


def _torch_in_dtype(x, w, b, lora_a, lora_b, segments, *, scaling, eps, a_offset, b_offset):
    """What plain torch gives in x's dtype (helpers.torch_in_dtype with the one part)."""
    part = LoRAPart(0, w.shape[0], lora_a, lora_b, a_offset, b_offset)
    return torch_in_dtype(x, w, b, [part], segments, scaling=scaling, eps=eps)


# (T, K, N, r, bias): odd K and N (not multiples of any block), r from 1 to 64, T = 0 and 1.
SHAPES = [
    (0, 17, 70, 4, True),
    (1, 70, 17, 1, False),
    (37, 17, 70, 8, True),
    (37, 70, 17, 16, False),
    (37, 70, 17, 64, True),
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,N,r,bias", SHAPES)
def test_matches_fp64_reference(T, K, N, r, bias, dtype, impl):
    args = _problem(T, K, N, r, dtype, bias=bias)
    y = perturbed_lora_linear(*args, impl=impl, **KW)
    assert y.shape == (T, args[1].shape[0]) and y.dtype == dtype and y.device == args[0].device
    ref = perturbed_lora_linear_ref(*args, compute_dtype=torch.float64, out_dtype=torch.float64, **KW)
    err = max_err(y, ref)
    err_torch = max_err(_torch_in_dtype(*args, **KW), ref)
    assert err <= 2 * err_torch + ATOL[dtype], f"{impl} err {err:.3g} vs torch's own {err_torch:.3g}"


def test_reference_is_the_formula():
    """The fp64 reference against the contract written out by hand, z from gaussian_at's indices."""
    T, K, N, r = 37, 17, 70, 8
    x, w, b, lora_a, lora_b, segments = _problem(T, K, N, r, torch.float32)
    ref = perturbed_lora_linear_ref(
        x, w, b, lora_a, lora_b, segments, compute_dtype=torch.float64, out_dtype=torch.float64, **KW
    )
    eps, scaling, a_off, b_off = KW["eps"], KW["scaling"], KW["a_offset"], KW["b_offset"]
    i, k = torch.meshgrid(torch.arange(r), torch.arange(K), indexing="ij")
    n, j = torch.meshgrid(torch.arange(N), torch.arange(r), indexing="ij")
    indptr = segments.indptr.tolist()
    for s in range(segments.num_segments):
        rows = slice(indptr[s], indptr[s + 1])
        a, seed, sign = int(segments.adapter[s]), int(segments.seed[s]), int(segments.sign[s])
        z_a = gaussian_at(seed, a_off + i * K + k).double().to(DEVICE)  # Z_A[i, k]
        z_b = gaussian_at(seed, b_off + n * r + j).double().to(DEVICE)  # Z_B[n, i]
        a_eff = lora_a[a].double() + sign * eps * z_a
        b_eff = lora_b[a].double() + sign * eps * z_b
        want = x[rows].double() @ w.double().T + b.double() + scaling * (x[rows].double() @ a_eff.T) @ b_eff.T
        torch.testing.assert_close(ref[rows], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS + [None], ids=["config0", "config1", "default"])
@pytest.mark.parametrize("r", [5, 16])
def test_kernel_z_is_gaussian_bit_for_bit(config, r):
    """One-hot inputs make every dot exact, so the kernels' outputs are A_eff and B_eff themselves:
    z regenerated in-kernel equals gaussian() at every global index, whatever the blocks."""
    T, K, N = 37, 70, 21
    eps = 0.5
    cfg = config or LoRAKernelConfig()
    g = torch.Generator().manual_seed(1)
    lora_a = torch.randn(2, r, K, generator=g).to(DEVICE)
    lora_b = torch.randn(2, N, r, generator=g).to(DEVICE)
    segments = Segments.from_lists([10, 0, 20, 7], [1, 0, 0, 1], [9, 9, 2**33 + 1, 9], [1, -1, -1, 0], DEVICE)
    rows = torch.arange(T)
    want_a = torch.empty(T, r)  # want_a[t, i] = A_eff[i, t % K]
    want_b = torch.empty(T, N)  # want_b[t, n] = B_eff[n, t % r]
    indptr = segments.indptr.tolist()
    for s in range(segments.num_segments):
        sl = slice(indptr[s], indptr[s + 1])
        a, seed, sign = int(segments.adapter[s]), int(segments.seed[s]), int(segments.sign[s])
        z_a = gaussian(seed, r * K, offset=KW["a_offset"], impl="torch").view(r, K)
        z_b = gaussian(seed, N * r, offset=KW["b_offset"], impl="torch").view(N, r)
        a_eff = lora_a[a].cpu() + (sign * eps) * z_a
        b_eff = lora_b[a].cpu() + (sign * eps) * z_b
        want_a[sl] = a_eff[:, rows[sl] % K].T
        want_b[sl] = b_eff[:, rows[sl] % r].T

    x = F.one_hot(rows % K, K).float().to(DEVICE)  # x[t] = e_{t % K}
    stack = single_part_stack(lora_a, lora_b, KW["a_offset"], KW["b_offset"])
    plan = lora_plan(K, N, [r], torch.float32, DeviceInfo.of(x.device), cfg)
    u = _lora_shrink(x, stack, segments, plan, eps)
    got_a = u.sum(0)[:, :r].cpu()  # each split holds the value or exact zeros
    u_onehot = F.one_hot(rows % r, u.shape[2]).float().to(DEVICE)  # u[t] = e_{t % r}
    y = torch.zeros(T, N, device=DEVICE)
    _lora_expand(u_onehot, stack, y, segments, plan, eps, 1.0)
    if DEVICE == "cpu":
        assert torch.equal(got_a, want_a) and torch.equal(y.cpu(), want_b)
    else:  # compiled log/cos and FMA contraction may move the last bit
        torch.testing.assert_close(got_a, want_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y.cpu(), want_b, rtol=1e-6, atol=1e-6)


def test_rank_one_output_bit_identical_across_configs():
    """With r = 1, one-hot x and W = 0 every sum has one non-zero term: the whole output is exact,
    so every configuration and the torch path must agree bit for bit (and sign must matter)."""
    T, K, N = 37, 70, 21
    x = F.one_hot(torch.arange(T) % K, K).float().to(DEVICE)
    w = torch.zeros(N, K, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    lora_a = torch.randn(2, 1, K, generator=g).to(DEVICE)
    lora_b = torch.randn(2, N, 1, generator=g).to(DEVICE)
    segments = Segments.from_lists([10, 0, 20, 7], [1, 0, 0, 1], [9, 9, 2**33 + 1, 9], [1, -1, -1, 0], DEVICE)
    kw = dict(KW, scaling=0.5, eps=0.25)  # powers of two: scaling and eps*z are exact
    outs = [
        perturbed_lora_linear(x, w, None, lora_a, lora_b, segments, impl="triton", config=c, **kw)
        for c in CONFIGS + [None]
    ]
    outs.append(perturbed_lora_linear(x, w, None, lora_a, lora_b, segments, impl="torch", **kw))
    if DEVICE == "cpu":
        assert all(torch.equal(outs[0], y) for y in outs[1:])
    flipped = Segments.from_lists([10, 0, 20, 7], [1, 0, 0, 1], [9, 9, 2**33 + 1, 9], [-1, -1, -1, 0], DEVICE)
    y_flip = perturbed_lora_linear(x, w, None, lora_a, lora_b, flipped, impl="triton", **kw)
    assert not torch.equal(y_flip[:10], outs[0][:10]) and torch.equal(y_flip[10:], outs[0][10:])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_configs_agree_at_rank_eight(impl):
    """Full outputs under two block configurations: the same numbers up to fp32 summation order."""
    args = _problem(37, 70, 17, 8, torch.float32)
    ref = perturbed_lora_linear_ref(*args, compute_dtype=torch.float64, out_dtype=torch.float64, **KW)
    err_torch = max_err(_torch_in_dtype(*args, **KW), ref)
    for cfg in CONFIGS:
        y = perturbed_lora_linear(*args, impl=impl, config=cfg, **KW)
        assert max_err(y, ref) <= 2 * err_torch + ATOL[torch.float32]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_stored_tensors_unchanged(impl):
    args = _problem(37, 17, 70, 8, torch.bfloat16)
    before = [t.clone() for t in args[:5]]
    perturbed_lora_linear(*args, impl=impl, **KW)
    assert all(torch.equal(a, b) for a, b in zip(args[:5], before, strict=True))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_sign_zero_is_plain_lora(impl):
    x, w, b, lora_a, lora_b, _ = _problem(37, 70, 17, 8, torch.float32)
    plain = Segments.from_lists([10, 27], [1, 0], [3, 4], [0, 0], DEVICE)
    y = perturbed_lora_linear(x, w, b, lora_a, lora_b, plain, impl=impl, **KW)
    xd = x.double()
    want = F.linear(xd, w.double(), b.double())
    want[:10] += KW["scaling"] * (xd[:10] @ lora_a[1].double().T) @ lora_b[1].double().T
    want[10:] += KW["scaling"] * (xd[10:] @ lora_a[0].double().T) @ lora_b[0].double().T
    by_hand_fp32 = F.linear(x, w, b)
    by_hand_fp32[:10] += KW["scaling"] * (x[:10] @ lora_a[1].T) @ lora_b[1].T
    by_hand_fp32[10:] += KW["scaling"] * (x[10:] @ lora_a[0].T) @ lora_b[0].T
    assert max_err(y, want) <= 2 * max_err(by_hand_fp32, want) + ATOL[torch.float32]
    # sign 0 draws no z: other seeds and eps give the same bits
    other = Segments.from_lists([10, 27], [1, 0], [11, 2**62], [0, 0], DEVICE)
    y_other = perturbed_lora_linear(x, w, b, lora_a, lora_b, other, impl=impl, **dict(KW, eps=0.7))
    assert torch.equal(y, y_other)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_second_order_identity(impl):
    """y(+1) + y(-1) - 2*y(0) = 2*scaling*eps^2 * (x @ Z_A.T) @ Z_B.T exactly in real arithmetic.

    The three passes run as three segments of one call. Each fp32 output is within
    gamma * M of the exact value, M = |x||W|^T + |b| + scaling*(|x||A_eff|^T)|B_eff|^T and
    gamma = (K + r + 4) * 2**-24 (any summation order), so the left side (formed in fp64) is within
    gamma * (M+ + M- + 2*M0) of the right side.
    """
    T, K, N, r = 12, 70, 17, 8
    scaling, eps, seed = 2.0, 0.25, 77
    x, w, b, lora_a, lora_b, _ = _problem(T, K, N, r, torch.float32)
    segments = Segments.from_lists([T, T, T], [1, 1, 1], [seed] * 3, [1, -1, 0], DEVICE)
    kw = dict(KW, scaling=scaling, eps=eps)
    y = perturbed_lora_linear(torch.cat([x, x, x]), w, b, lora_a, lora_b, segments, impl=impl, **kw).double()
    lhs = y[:T] + y[T : 2 * T] - 2 * y[2 * T :]
    z_a = gaussian(seed, r * K, offset=kw["a_offset"], impl="torch").view(r, K).double().to(DEVICE)
    z_b = gaussian(seed, N * r, offset=kw["b_offset"], impl="torch").view(N, r).double().to(DEVICE)
    xd = x.double()
    rhs = 2 * scaling * eps**2 * (xd @ z_a.T) @ z_b.T

    def bound(sign):  # M for one sign
        a_eff = (lora_a[1].double() + sign * eps * z_a).abs()
        b_eff = (lora_b[1].double() + sign * eps * z_b).abs()
        return xd.abs() @ w.double().abs().T + b.double().abs() + scaling * (xd.abs() @ a_eff.T) @ b_eff.T

    tol = (K + r + 4) * 2.0**-24 * (bound(1) + bound(-1) + 2 * bound(0))
    assert rhs.abs().max() > 100 * tol.max()  # the identity is far above the rounding noise
    assert ((lhs - rhs).abs() <= tol).all(), f"max excess {((lhs - rhs).abs() - tol).max().item():.3g}"


def test_noncontiguous_inputs():
    x, w, b, lora_a, lora_b, segments = _problem(37, 17, 70, 8, torch.float32)
    x_t = x.T.contiguous().T  # same values, column-major
    lora_a_s = torch.cat([lora_a, lora_a], dim=2)[:, :, ::2]  # strided view, same values
    lora_a_s.copy_(lora_a)
    lora_b_t = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_t.is_contiguous() or lora_a_s.is_contiguous() or lora_b_t.is_contiguous())
    for impl in ("triton", "torch"):
        y = perturbed_lora_linear(x, w, b, lora_a, lora_b, segments, impl=impl, **KW)
        y_s = perturbed_lora_linear(x_t, w, b, lora_a_s, lora_b_t, segments, impl=impl, **KW)
        torch.testing.assert_close(y_s, y, rtol=1e-5, atol=1e-5)


def test_segments_helpers():
    seg = Segments.from_lists([3, 0, 4], [0, 1, 0], [1, 2**63 - 1, 3], [1, 0, -1])
    assert seg.num_segments == 3 and seg.num_rows == 7 and seg.device.type == "cpu"
    assert seg.indptr.tolist() == [0, 3, 3, 7] and seg.seed.dtype == torch.int64
    one = Segments.single(5, adapter=1, seed=9, sign=-1)
    assert one.indptr.tolist() == [0, 5] and one.adapter.tolist() == [1] and one.sign.tolist() == [-1]
    moved = seg.to("meta")  # the host copy travels, so the launcher never reads the device tensors
    assert moved.device.type == "meta" and moved.num_rows == 7
    tiles = seg.tile_map(2, torch.device("cpu"))  # no tile straddles a segment
    assert tiles.shape == (4, TILE_FIELDS.value)
    rows = [TILE_ROW_START.value, TILE_ROW_STOP.value]
    fields = [TILE_ADAPTER.value, TILE_SEED.value, TILE_SIGN.value]
    assert tiles[:, rows].tolist() == [[0, 2], [2, 3], [3, 5], [5, 7]]
    assert tiles[:, fields].tolist() == [[0, 1, 1], [0, 1, 1], [0, 3, -1], [0, 3, -1]]
    assert seg.tile_rows(2) == [tuple(t) for t in tiles[:, rows + fields].tolist()]
    assert seg.num_tiles(2) == 4 and seg.num_tiles(3) == 3 and seg.num_tiles(100) == 2


def _bad_cases():
    """(name the InputError must mention, function that makes the bad call)."""

    def call(**over):  # builds the inputs and the bad one only when called, inside pytest.raises
        def run():
            names = ["x", "weight", "bias", "lora_a", "lora_b", "segments"]
            args = dict(zip(names, _problem(37, 17, 70, 8, torch.float32), strict=True))
            kw = dict(KW)
            for key, value in over.items():
                value = value(args) if callable(value) else value
                (args if key in names else kw)[key] = value
            return perturbed_lora_linear(*args.values(), **kw)

        return run

    def segs(lengths=(10, 0, 20, 7), adapters=(0, 1, 0, 1), seeds=(1, 2, 3, 4), signs=(1, -1, 0, 1)):
        return lambda a: Segments.from_lists(list(lengths), list(adapters), list(seeds), list(signs))

    def raw_segs(indptr):
        return lambda a: Segments(indptr, [0, 0], [1, 1], [1, 1])

    return [
        ("x", call(x=lambda a: a["x"][None])),
        ("x", call(x=lambda a: a["x"].double(), weight=lambda a: a["weight"].double())),
        ("x", call(x=lambda a: a["x"].long())),
        ("weight", call(weight=lambda a: a["weight"][:, :-1])),
        ("weight", call(weight=lambda a: a["weight"].half())),
        ("bias", call(bias=lambda a: a["bias"][:-1])),
        ("bias", call(bias=lambda a: a["bias"].half())),
        ("lora_a", call(lora_a=lambda a: a["lora_a"][0])),
        ("lora_a", call(lora_a=lambda a: a["lora_a"][..., :-1])),
        ("lora_a", call(lora_a=lambda a: a["lora_a"][:, :0], lora_b=lambda a: a["lora_b"][..., :0])),
        ("lora_a", call(lora_a=lambda a: torch.zeros(2, 65, 17), lora_b=lambda a: torch.zeros(2, 70, 65))),
        ("lora_a", call(lora_a=lambda a: a["lora_a"].bfloat16())),
        ("lora_b", call(lora_b=lambda a: a["lora_b"].bfloat16())),
        ("lora_b", call(lora_b=lambda a: a["lora_b"][:, :-1])),
        ("lora_b", call(lora_b=lambda a: a["lora_b"][..., :-1])),
        ("lora_b", call(lora_b=lambda a: a["lora_b"][:1])),
        ("lora_a", call(lora_a=lambda a: a["lora_a"].to("meta"))),
        ("segments", call(segments=lambda a: a["segments"].to("meta"))),
        ("segments.indptr", call(segments=raw_segs([1, 20, 37]))),
        ("segments.indptr", call(segments=raw_segs([0, 20, 10]))),
        ("segments.indptr", call(segments=raw_segs([0, 20, 36]))),
        ("segments.indptr", call(segments=lambda a: Segments(torch.tensor([0.0, 37.0]), [0], [1], [1]))),
        ("segments.adapter", call(segments=segs(adapters=(0, 2, 0, 1)))),
        ("segments.adapter", call(segments=segs(adapters=(0, -1, 0, 1)))),
        ("segments.adapter", call(segments=lambda a: Segments([0, 37], [0, 0], [1], [1]))),
        ("segments.sign", call(segments=segs(signs=(1, 2, 0, 1)))),
        ("segments.seed", call(segments=segs(seeds=(1, -1, 3, 4)))),
        ("segments.seed", call(segments=segs(seeds=(1, 2**63, 3, 4)))),
        ("scaling", call(scaling=float("nan"))),
        ("eps", call(eps=-0.1)),
        ("eps", call(eps=float("inf"))),
        ("a_offset", call(a_offset=-1)),
        ("a_offset", call(a_offset=2**31 - 8 * 17 + 1)),
        ("b_offset", call(b_offset=2**31 - 70 * 8 + 1)),
        ("b_offset", call(b_offset=1.5)),
        ("impl", call(impl="cuda")),
    ]


@pytest.mark.parametrize("name,make_call", _bad_cases())
def test_bad_input_raises_input_error(name, make_call):
    with pytest.raises(InputError, match=re.escape(name)):
        make_call()


def test_offsets_at_the_top_are_accepted():
    args = _problem(5, 17, 70, 8, torch.float32)
    y = perturbed_lora_linear(*args, **dict(KW, a_offset=2**31 - 8 * 17, b_offset=2**31 - 70 * 8))
    assert y.shape == (5, 70)


@pytest.mark.gpu
def test_gpu_realistic_bf16_matches_torch_path():
    T, K, N, r = 1000, 2048, 2048, 16
    args = _problem(T, K, N, r, torch.bfloat16, lengths=[300, 200, 500], signs=[1, -1, 0])
    y = perturbed_lora_linear(*args, **KW)  # compiled Triton path
    ref = perturbed_lora_linear_ref(*args, compute_dtype=torch.float64, out_dtype=torch.float64, **KW)
    err_torch = max_err(_torch_in_dtype(*args, **KW), ref)
    assert max_err(y, ref) <= 2 * err_torch + ATOL[torch.bfloat16]
    y_torch = perturbed_lora_linear(*args, impl="torch", **KW)
    assert max_err(y_torch, ref) <= 2 * err_torch + ATOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_fused_not_slower_than_3x_base_gemm():
    T, K, N, r = 2048, 4096, 4096, 16
    args = _problem(T, K, N, r, torch.bfloat16, lengths=[1024, 1024], signs=[1, -1])
    x, w, b = args[:3]

    def median_ms(fn, reps=20):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        return sorted(times)[reps // 2]

    fused = median_ms(lambda: perturbed_lora_linear(*args, **KW))
    base = median_ms(lambda: F.linear(x, w, b))
    assert fused < 3 * base, f"fused {fused:.3f} ms vs base GEMM {base:.3f} ms"
