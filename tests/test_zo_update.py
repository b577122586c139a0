"""Tests for flashzo.kernels.zo_update_: the fused in-place MeZO step against zo_update_ref.

Tolerance: exact. The Triton kernel (under TRITON_INTERPRET=1), the torch path and the reference
all compute g = g + c_i * z_i (i = 0..q-1) and p - lr * (g + wd * p) in fp32 with one rounding per
operation, from bit-identical z (test_randn.py), so the results must be bit-identical. With CUDA
the compiled kernel is compared within a bound derived from z's tolerance (see the GPU test).
"""

import pytest
import torch

from flashzo.errors import InputError
from flashzo.kernels import gaussian, zo_update_, zo_update_ref

SEEDS = [7, 2**40 + 3, 2**63 - 1]
COEFFS = [0.37, -1.5, 2.25e-3]


def _params(numel: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("numel", [1, 37, 1000, 4099])
@pytest.mark.parametrize("q", [1, 3])
def test_matches_ref(impl, numel, q):
    p0 = _params(numel)
    seeds, coeffs = SEEDS[:q], COEFFS[:q]
    kw = dict(lr=3e-2, weight_decay=0.1, offset=12345)
    expect = zo_update_ref(p0, seeds, coeffs, **kw)
    params = p0.clone()
    out = zo_update_(params, seeds, coeffs, impl=impl, **kw)
    assert out is params
    assert torch.equal(params, expect)
    assert not torch.equal(params, p0)


def test_ref_is_the_formula():
    # zo_update_ref against the DESIGN.md formula written out with gaussian() (in float64: close).
    p0 = _params(513, seed=1)
    seeds, coeffs, lr, wd, off = SEEDS, COEFFS, 0.05, 0.2, 100
    zs = [gaussian(s, 513, offset=off).double() for s in seeds]
    expect = p0.double() - lr * (sum(c * z for c, z in zip(coeffs, zs, strict=True)) + wd * p0.double())
    torch.testing.assert_close(
        zo_update_ref(p0, seeds, coeffs, lr=lr, weight_decay=wd, offset=off),
        expect.float(),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tensor_seeds_and_coeffs(impl):
    p0 = _params(130)
    kw = dict(lr=1e-2, weight_decay=0.0, offset=5)
    expect = zo_update_ref(p0, SEEDS, COEFFS, **kw)
    params = p0.clone()
    zo_update_(params, torch.tensor(SEEDS), torch.tensor(COEFFS, dtype=torch.float64), impl=impl, **kw)
    assert torch.equal(params, expect)


def test_triton_block_size_does_not_change_result():
    p0 = _params(301)
    a = zo_update_(p0.clone(), SEEDS, COEFFS, lr=0.1, weight_decay=0.01, offset=77, impl="triton", block=32)
    b = zo_update_(p0.clone(), SEEDS, COEFFS, lr=0.1, weight_decay=0.01, offset=77, impl="triton", block=256)
    assert torch.equal(a, b)


def test_torch_path_spans_chunks():
    # The torch path works in chunks of 2**18 elements; the chunk border must be seamless.
    numel = 2**18 + 10
    p0 = _params(numel)
    expect = zo_update_ref(p0, SEEDS[:2], COEFFS[:2], lr=0.01, weight_decay=0.5, offset=3)
    params = zo_update_(p0.clone(), SEEDS[:2], COEFFS[:2], lr=0.01, weight_decay=0.5, offset=3, impl="torch")
    assert torch.equal(params, expect)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_lr_zero_leaves_params_bit_identical(impl):
    p0 = _params(37)
    params = zo_update_(p0.clone(), SEEDS, COEFFS, lr=0.0, weight_decay=0.3, impl=impl)
    assert torch.equal(params, p0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_updates_only_its_own_slice(impl):
    # A view into a bigger buffer (as the trainer steps one parameter's slice) stays in its slice.
    buf = _params(300)
    before = buf.clone()
    zo_update_(buf[100:200], SEEDS[:1], COEFFS[:1], lr=0.5, offset=100, impl=impl)
    assert torch.equal(buf[:100], before[:100]) and torch.equal(buf[200:], before[200:])
    expect = zo_update_ref(before[100:200], SEEDS[:1], COEFFS[:1], lr=0.5, offset=100)
    assert torch.equal(buf[100:200], expect)


def test_default_impl_and_empty():
    p0 = _params(37)
    assert torch.equal(zo_update_(p0.clone(), [1], [0.5], lr=0.1), zo_update_ref(p0, [1], [0.5], lr=0.1))
    empty = torch.empty(0)
    assert zo_update_(empty, [1], [0.5], lr=0.1, offset=2**31, impl="triton") is empty


def _bad_calls():
    p = _params(8)
    ok = dict(params=p, seeds=[1, 2], coeffs=[0.5, -0.5], lr=0.1)
    meta = torch.device("meta")
    return [
        (dict(ok, params=p.double()), "params"),
        (dict(ok, params=p.view(2, 4)), "params"),
        (dict(ok, params=_params(16)[::2]), "params"),
        (dict(ok, params=p.tolist()), "params"),
        (dict(ok, seeds=[1]), "len\\(seeds\\)"),
        (dict(ok, seeds=[], coeffs=[]), "seeds"),
        (dict(ok, seeds=[-1, 2]), "seeds\\[0\\]"),
        (dict(ok, seeds=[1, 2**63]), "seeds\\[1\\]"),
        (dict(ok, seeds=[1, 2.5]), "seeds\\[1\\]"),
        (dict(ok, seeds=torch.tensor([1.0, 2.0])), "seeds"),
        (dict(ok, seeds=torch.tensor([-3, 2])), "seeds\\[0\\]"),
        (dict(ok, seeds=torch.tensor([1, 2], device=meta)), "seeds"),
        (dict(ok, seeds=5), "seeds"),
        (dict(ok, coeffs=[0.5, float("nan")]), "coeffs"),
        (dict(ok, coeffs=[0.5, float("inf")]), "coeffs"),
        (dict(ok, coeffs=[0.5, 1e39]), "coeffs"),  # overflows fp32
        (dict(ok, coeffs=torch.tensor([0.5, 0.5], device=meta)), "coeffs"),
        (dict(ok, coeffs=["a", "b"]), "coeffs"),
        (dict(ok, lr=-0.1), "lr"),
        (dict(ok, lr=float("nan")), "lr"),
        (dict(ok, weight_decay=-1.0), "weight_decay"),
        (dict(ok, weight_decay=float("inf")), "weight_decay"),
        (dict(ok, offset=-1), "offset"),
        (dict(ok, offset=2**31 - 7), "offset"),
        (dict(ok, impl="cuda"), "impl"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs(case):
    kwargs, match = _bad_calls()[case]
    params = kwargs["params"]
    before = params.clone() if isinstance(params, torch.Tensor) else None
    with pytest.raises(InputError, match=match):
        zo_update_(**kwargs)
    if before is not None:
        assert torch.equal(params, before)  # nothing written before the checks
    if "impl" not in kwargs:  # zo_update_ref checks the same arguments
        with pytest.raises(InputError, match=match):
            zo_update_ref(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("q", [1, 3])
def test_compiled_triton_matches_formula_with_device_z(q):
    # The compiled kernel regenerates the same z as the compiled gaussian kernel on that device;
    # given that z, the update is a few fp32 ops (an fma may fuse two): a few ulps of each term.
    numel, lr, wd, off = 2**20 + 3, 0.05, 0.1, 9
    p0 = _params(numel).cuda()
    seeds, coeffs = SEEDS[:q], COEFFS[:q]
    params = zo_update_(p0.clone(), seeds, coeffs, lr=lr, weight_decay=wd, offset=off)
    zs = [gaussian(s, numel, offset=off, device="cuda").double() for s in seeds]
    step = sum(c * z for c, z in zip(coeffs, zs, strict=True)) + wd * p0.double()
    expect = p0.double() - lr * step
    bound = (
        8
        * 2**-24
        * (
            p0.double().abs()
            + lr * (sum(abs(c) * z.abs() for c, z in zip(coeffs, zs, strict=True)) + wd * p0.double().abs())
        )
    )
    err = (params.double() - expect).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max().item():.3g}"
    # and the CPU torch path is close to it (its z differs from the GPU's in the last bits)
    cpu = zo_update_(p0.cpu(), seeds, coeffs, lr=lr, weight_decay=wd, offset=off)
    torch.testing.assert_close(params.cpu(), cpu, rtol=1e-6, atol=lr * sum(abs(c) for c in coeffs) * 1e-3)
