"""Tests for the stacked projection: perturbed_lora_linear_parts and perturbed_lora_add_ (Triton under
TRITON_INTERPRET=1 on a CPU, and the torch path) against the per-part single-projection reference.

Every part must give what ``perturbed_lora_linear_ref`` gives for that part's rows of the weight
alone (its own A, B and z offsets), columns outside every part the plain base. Tolerances, per
part: within twice the error of plain torch in the same dtype, plus a small atol.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_ATOL as ATOL
from helpers import KERNEL_DEVICE as DEVICE
from helpers import max_err, segments_37, torch_in_dtype

from flashzo.errors import InputError
from flashzo.kernels import (
    LoRAKernelConfig,
    LoRAPart,
    LoRAStack,
    Segments,
    base_linear,
    gaussian,
    perturbed_lora_add_,
    perturbed_lora_add_ref,
    perturbed_lora_linear,
    perturbed_lora_linear_parts,
    perturbed_lora_linear_parts_ref,
    perturbed_lora_linear_ref,
    quantize,
    quantized_linear,
    stack_lora_parts,
)
from flashzo.kernels.launch_plan import DeviceInfo, lora_plan
from flashzo.kernels.perturbed_lora import _lora_expand, _lora_shrink

SCALING, EPS = 2.0, 0.1
# Column layouts of the stacked weight: (start, stop, rank) per adapted part, N_total.
LAYOUTS = {
    "one": ([(0, 21, None)], 21),
    "gaps": ([(0, 13, None), (16, 22, None)], 24),  # q, an unadapted k, v, two trailing columns
    "gqa": ([(0, 20, None), (20, 27, None), (27, 34, None)], 34),  # q wider than k and v
    "mixed": ([(3, 20, 16), (25, 31, 4)], 33),  # ranks differ, gaps at both ends
}
CASES = [("one", 16), ("gaps", 1), ("gqa", 4), ("gqa", 8), ("mixed", None)]
CONFIGS = [
    LoRAKernelConfig(
        shrink_block_m=16, shrink_block_k=16, shrink_split_k=3, expand_block_m=16, expand_block_n=16, expand_rows=16
    ),
    LoRAKernelConfig(shrink_block_m=64, shrink_block_k=32, expand_block_m=32, expand_block_n=32, expand_rows=64),
]


def _segments():
    """helpers' 37-row table (three seeds, all three signs), adapters 0, 1, 1, 0."""
    return segments_37([0, 1, 1, 0])


def _problem(layout, r, dtype, *, T=37, K=70, bias=True, seed=0, n_adapters=2):
    spans, n_total = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n_total, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(n_total, generator=g).to(DEVICE, dtype) if bias else None
    parts, offset = [], 11
    for start, stop, rank in spans:
        rank = rank or r
        lora_a = (torch.randn(n_adapters, rank, K, generator=g) / K**0.5).to(DEVICE)
        lora_b = (0.5 * torch.randn(n_adapters, stop - start, rank, generator=g)).to(DEVICE)
        parts.append(LoRAPart(start, stop, lora_a, lora_b, offset, offset + rank * K))  # own flat offsets
        offset += rank * K + (stop - start) * rank + 5
    return x, w, b, parts


def _per_part_reference(x, w, b, parts, segments, dtype):
    """fp64 y from the single-projection reference, part by part; the base elsewhere."""
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    for p in parts:
        rows = slice(p.start, p.stop)
        y[:, rows] = perturbed_lora_linear_ref(
            x, w[rows], None if b is None else b[rows], p.lora_a, p.lora_b, segments, scaling=SCALING, eps=EPS,
            a_offset=p.a_offset, b_offset=p.b_offset, compute_dtype=torch.float64, out_dtype=torch.float64,
        )  # fmt: skip
    return y


def _torch_in_dtype(x, w, b, parts, segments):
    """Plain torch in x's dtype: F.linear in that dtype, each part's LoRA delta in fp32, cast."""
    return torch_in_dtype(x, w, b, parts, segments, scaling=SCALING, eps=EPS)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,r", CASES)
def test_parts_match_per_part_reference(layout, r, dtype, impl):
    x, w, b, parts = _problem(layout, r, dtype)
    segments = _segments()
    y = perturbed_lora_linear_parts(x, w, b, parts, segments, scaling=SCALING, eps=EPS, impl=impl)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == dtype
    ref = _per_part_reference(x, w, b, parts, segments, dtype)
    err_torch = max_err(_torch_in_dtype(x, w, b, parts, segments), ref)
    err = max_err(y, ref)
    assert err <= 2 * err_torch + ATOL[dtype], f"{impl} err {err:.3g} vs torch's own {err_torch:.3g}"
    adapted = torch.zeros(w.shape[0], dtype=torch.bool)
    for p in parts:
        adapted[p.start : p.stop] = True
    # unadapted columns are the base itself, bit for bit: F.linear in x's dtype on the Triton
    # path, the fp32 product rounded once on the torch path
    if impl == "triton":
        base = F.linear(x, w, b)
    else:
        base = (x.float() @ w.float().T + (0 if b is None else b.float())).to(dtype)
    plain = ~adapted.to(y.device)
    assert torch.equal(y[:, plain], base[:, plain])
    # the reference of the stack is the per-part reference
    ref_stack = perturbed_lora_linear_parts_ref(
        x, w, b, parts, segments, scaling=SCALING, eps=EPS, compute_dtype=torch.float64, out_dtype=torch.float64
    )
    torch.testing.assert_close(ref_stack, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_one_part_is_perturbed_lora_linear_bit_for_bit(impl):
    x, w, b, parts = _problem("one", 8, torch.bfloat16)
    p, segments = parts[0], _segments()
    kw = dict(scaling=SCALING, eps=EPS, impl=impl)
    y_parts = perturbed_lora_linear_parts(x, w, b, parts, segments, **kw)
    y_one = perturbed_lora_linear(x, w, b, p.lora_a, p.lora_b, segments, a_offset=p.a_offset, b_offset=p.b_offset, **kw)
    assert torch.equal(y_parts, y_one)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_is_the_lora_term_of_linear_parts(impl, dtype):
    """perturbed_lora_add_ into a given y: the reference y + term, and on the Triton path the same
    bits as perturbed_lora_linear_parts (which is F.linear followed by exactly this add)."""
    x, w, b, parts = _problem("gqa", 4, dtype)
    segments = _segments()
    y0 = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    y = y0.clone()
    out = perturbed_lora_add_(y, x, parts, segments, scaling=SCALING, eps=EPS, impl=impl)
    assert out is y
    ref = perturbed_lora_add_ref(
        y0, x, parts, segments, scaling=SCALING, eps=EPS, compute_dtype=torch.float64, out_dtype=torch.float64
    )
    own = perturbed_lora_add_ref(y0, x, parts, segments, scaling=SCALING, eps=EPS)  # fp32 torch, cast once
    assert max_err(y, ref) <= 2 * max_err(own, ref) + ATOL[dtype]
    base = F.linear(x, w, b)
    added = perturbed_lora_add_(base.clone(), x, parts, segments, scaling=SCALING, eps=EPS, impl=impl)
    linear = perturbed_lora_linear_parts(x, w, b, parts, segments, scaling=SCALING, eps=EPS, impl=impl)
    if impl == "triton":
        assert torch.equal(added, linear)
    else:  # the torch linear rounds once, the add rounds the base first
        assert max_err(added, linear) <= 2 * max_err(_torch_in_dtype(x, w, b, parts, segments), linear) + ATOL[dtype]


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("fmt", [("int8", None, True), ("int4", 32, False)], ids=["int8", "int4_g32_asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_quantized_weight_is_its_dequantized_matrix(impl, dtype, fmt, batch_invariant):
    """weight a QuantizedWeight: the torch path gives the bits of the same call with the dense matrix
    (dequantized in x's dtype); the Triton path is quantized_linear's base plus the LoRA term, within
    twice torch's own error of the fp64 reference of the dequantized matrix."""
    x, w, b, parts = _problem("gqa", 4, dtype, K=64)
    mode, group, sym = fmt
    qw = quantize(w.float(), mode, group, symmetric=sym)
    dense = qw.dequantize(dtype)
    segments = _segments()
    kw = dict(scaling=SCALING, eps=EPS, impl=impl, batch_invariant=batch_invariant)
    y = perturbed_lora_linear_parts(x, qw, b, parts, segments, **kw)
    base = base_linear(x, qw, b, impl=impl, batch_invariant=batch_invariant)
    if impl == "torch":
        assert torch.equal(y, perturbed_lora_linear_parts(x, dense, b, parts, segments, **kw))
        assert torch.equal(base, base_linear(x, dense, b, impl=impl, batch_invariant=batch_invariant))
        return
    assert torch.equal(base, quantized_linear(x, qw, b, impl="triton"))
    assert torch.equal(y, perturbed_lora_add_(base.clone(), x, parts, segments, scaling=SCALING, eps=EPS, impl=impl))
    ref = _per_part_reference(x, dense, b, parts, segments, dtype)
    err_torch = max_err(_torch_in_dtype(x, dense, b, parts, segments), ref)
    assert max_err(y, ref) <= 2 * err_torch + ATOL[dtype]


def test_add_into_strided_y():
    x, w, b, parts = _problem("gaps", 4, torch.float32)
    segments = _segments()
    y0 = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(4)).to(DEVICE)
    big = torch.zeros(w.shape[0], 2 * x.shape[0], device=DEVICE)
    y_t = big[:, ::2].T  # [T, N] with strides (2, 2T)
    y_t.copy_(y0)
    perturbed_lora_add_(y_t, x, parts, segments, scaling=SCALING, eps=EPS, impl="triton")
    y = perturbed_lora_add_(y0.clone(), x, parts, segments, scaling=SCALING, eps=EPS, impl="triton")
    assert torch.equal(y_t, y) and torch.equal(big[:, 1::2], torch.zeros_like(big[:, 1::2]))


@pytest.mark.parametrize("config", CONFIGS + [None], ids=["config0", "config1", "default"])
def test_parts_z_is_gaussian_bit_for_bit(config):
    """One-hot x and one-hot u make every dot exact: the shrink's u columns are each part's A_eff
    and the expand's output each part's B_eff, z regenerated at every part's own global indices."""
    layout = "mixed"
    x_unused, w, b, parts = _problem(layout, None, torch.float32)
    stack = stack_lora_parts(parts)
    T, K, N = 37, x_unused.shape[1], w.shape[0]
    segments = _segments()
    plan = lora_plan(K, N, stack.ranks, torch.float32, DeviceInfo.of(x_unused.device), config)
    rows = torch.arange(T)
    x = F.one_hot(rows % K, K).float().to(DEVICE)  # x[t] = e_{t % K}
    u = _lora_shrink(x, stack, segments, plan, EPS).sum(0).cpu()  # every split holds the value or zeros
    r_total = sum(p.lora_a.shape[1] for p in parts)
    u_onehot = F.one_hot(rows % r_total, plan.u_cols).float().to(DEVICE)  # u[t] = e_{t % R_total}
    y = torch.zeros(T, N, device=DEVICE)
    _lora_expand(u_onehot, stack, y, segments, plan, EPS, 1.0)
    want_u = torch.zeros(T, plan.u_cols)
    want_y = torch.zeros(T, N)
    indptr = segments.indptr.tolist()
    for s in range(segments.num_segments):
        sl = slice(indptr[s], indptr[s + 1])
        a, seed, sign = int(segments.adapter[s]), int(segments.seed[s]), int(segments.sign[s])
        col = 0
        for p in parts:
            r, n_p = p.lora_a.shape[1], p.stop - p.start
            z_a = gaussian(seed, r * K, offset=p.a_offset, impl="torch").view(r, K)
            z_b = gaussian(seed, n_p * r, offset=p.b_offset, impl="torch").view(n_p, r)
            a_eff = p.lora_a[a].cpu() + (sign * EPS) * z_a
            b_eff = p.lora_b[a].cpu() + (sign * EPS) * z_b
            want_u[sl, col : col + r] = a_eff[:, rows[sl] % K].T
            j = rows[sl] % r_total - col  # the one-hot u column, as this part's rank index
            mine = (j >= 0) & (j < r)
            want_y[sl, p.start : p.stop] = torch.where(mine[:, None], b_eff[:, j.clamp(0, r - 1)].T, 0.0)
            col += r
    if DEVICE == "cpu":
        assert torch.equal(u, want_u) and torch.equal(y.cpu(), want_y)
    else:  # compiled log/cos may move the last bit
        torch.testing.assert_close(u, want_u, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y.cpu(), want_y, rtol=1e-6, atol=1e-6)


def test_stack_packing_and_adjacent_views():
    """A pre-packed LoRAStack gives the same bits as the parts; parts that are adjacent slices of
    one buffer are used in place (no copy), others are copied into one buffer."""
    x, w, b, parts = _problem("gqa", 4, torch.float32)
    segments = _segments()
    kw = dict(scaling=SCALING, eps=EPS, impl="triton")
    stack = stack_lora_parts(parts)
    assert isinstance(stack, LoRAStack) and stack_lora_parts(stack) is stack
    assert stack.a.shape == (2, 12, x.shape[1]) and stack.b.shape == (2, 34, 4)
    y = perturbed_lora_linear_parts(x, w, b, parts, segments, **kw)
    assert torch.equal(perturbed_lora_linear_parts(x, w, b, stack, segments, **kw), y)
    a_buf = torch.cat([p.lora_a for p in parts], dim=1)  # [n_adapters, 12, K]
    b_buf = torch.cat([p.lora_b for p in parts], dim=1)  # [n_adapters, 34, 4]
    views, col, row = [], 0, 0
    for p in parts:
        r, n_p = p.lora_a.shape[1], p.stop - p.start
        a_view, b_view = a_buf[:, col : col + r], b_buf[:, row : row + n_p]
        views.append(LoRAPart(p.start, p.stop, a_view, b_view, p.a_offset, p.b_offset))
        col, row = col + r, row + n_p
    in_place = stack_lora_parts(views)
    assert in_place.a.data_ptr() == a_buf.data_ptr() and in_place.b.data_ptr() == b_buf.data_ptr()
    assert torch.equal(perturbed_lora_linear_parts(x, w, b, in_place, segments, **kw), y)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_stored_tensors_unchanged(impl):
    x, w, b, parts = _problem("gaps", 8, torch.bfloat16)
    tensors = [x, w, b] + [t for p in parts for t in (p.lora_a, p.lora_b)]
    before = [t.clone() for t in tensors]
    perturbed_lora_linear_parts(x, w, b, parts, _segments(), scaling=SCALING, eps=EPS, impl=impl)
    perturbed_lora_add_(torch.zeros(37, w.shape[0], dtype=x.dtype), x, parts, _segments(), scaling=SCALING, eps=EPS)
    assert all(torch.equal(t, t0) for t, t0 in zip(tensors, before, strict=True))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_k_zero_is_the_base(impl):
    """K = 0: x @ A_eff.T is empty, so y is the base (the bias) for one projection and for parts."""
    T, N = 5, 9
    x = torch.zeros(T, 0, device=DEVICE)
    w = torch.zeros(N, 0, device=DEVICE)
    b = torch.arange(N, dtype=torch.float32, device=DEVICE)
    lora_a, lora_b = torch.zeros(1, 4, 0, device=DEVICE), torch.ones(1, N, 4, device=DEVICE)
    seg = Segments.single(T, 0, 3, 1, device=DEVICE)
    kw = dict(scaling=SCALING, eps=EPS, impl=impl)
    y = perturbed_lora_linear(x, w, b, lora_a, lora_b, seg, a_offset=0, b_offset=0, **kw)
    assert torch.equal(y, b.expand(T, N))
    parts = [LoRAPart(0, 4, lora_a, lora_b[:, :4], 0, 0), LoRAPart(6, 9, lora_a, lora_b[:, :3], 0, 100)]
    assert torch.equal(perturbed_lora_linear_parts(x, w, b, parts, seg, **kw), b.expand(T, N))
    y0 = torch.ones(T, N, device=DEVICE)
    assert torch.equal(perturbed_lora_add_(y0.clone(), x, parts, seg, **kw), y0)


def _bad_parts_cases():
    """(text the InputError must mention, function that makes the bad call)."""

    def call(mutate, *, add=False):
        def run():
            x, w, b, parts = _problem("gqa", 4, torch.float32)
            args = dict(x=x, w=w, b=b, parts=list(parts), segments=_segments(), y=torch.zeros(37, 34), kw={})
            mutate(args)
            if add:
                return perturbed_lora_add_(
                    args["y"], args["x"], args["parts"], args["segments"], scaling=SCALING, eps=EPS, **args["kw"]
                )
            return perturbed_lora_linear_parts(
                args["x"], args["w"], args["b"], args["parts"], args["segments"], scaling=SCALING, eps=EPS, **args["kw"]
            )

        return run

    def part(i, **over):
        def mutate(args):
            p = args["parts"][i]
            fields = dict(start=p.start, stop=p.stop, lora_a=p.lora_a, lora_b=p.lora_b, a_offset=p.a_offset)
            fields.update(b_offset=p.b_offset)
            fields.update({k: v(p) if callable(v) else v for k, v in over.items()})
            args["parts"][i] = LoRAPart(**fields)

        return mutate

    def set_(key, value):
        return lambda args: args.update({key: value(args) if callable(value) else value})

    return [
        ("parts must be a non-empty sequence", call(set_("parts", []))),
        ("parts must be a non-empty sequence", call(set_("parts", lambda a: a["parts"][0]))),
        ("parts[1] must be a LoRAPart", call(lambda a: a["parts"].__setitem__(1, "k_proj"))),
        ("parts[1] covers columns [10, 27)", call(part(1, start=10))),  # overlaps q
        ("parts[2] covers columns [27, 27)", call(part(2, stop=27))),  # empty
        ("past N = 34", call(part(2, stop=35, lora_b=lambda p: torch.zeros(2, 8, 4)))),
        ("parts[1].lora_a must be [n_adapters=2, r, K=70]", call(part(1, lora_a=lambda p: p.lora_a[:1]))),
        ("parts[0].lora_a must be [n_adapters >= 1", call(part(0, lora_a=lambda p: p.lora_a[:0]))),
        ("parts' lora_a must be [n_adapters, r, K=69]", call(set_("x", lambda a: a["x"][:, :-1]), add=True)),
        ("parts[0].lora_a must be float32", call(part(0, lora_a=lambda p: p.lora_a.double()))),
        ("parts[2].lora_b must be float32", call(part(2, lora_b=lambda p: p.lora_b.half()))),
        ("parts[0].lora_a's rank", call(part(0, lora_a=torch.zeros(2, 65, 70), lora_b=torch.zeros(2, 20, 65)))),
        ("parts[1].lora_b must be [n_adapters=2, stop - start=7", call(part(1, lora_b=lambda p: p.lora_b[:, 1:]))),
        ("parts[1].lora_b must be a 3-D", call(part(1, lora_b=lambda p: p.lora_b[0]))),
        ("parts[1].a_offset", call(part(1, a_offset=-1))),
        ("parts[1].b_offset", call(part(1, b_offset=2**31 - 7 * 4 + 1))),
        ("parts[0].start must be an int", call(part(0, start=0.0))),
        ("parts[1]'s tensors must be on", call(part(1, lora_b=lambda p: p.lora_b.to("meta")))),
        ("segments.adapter", call(set_("segments", Segments.from_lists([37], [2], [1], [1])))),
        ("weight must be [N, K=70]", call(set_("w", lambda a: a["w"][:, 1:]))),
        ("bias must be [N=34]", call(set_("b", lambda a: a["b"][1:]))),
        ("y must be a 2-D tensor [T=37, N]", call(set_("y", lambda a: a["y"][1:]), add=True)),
        ("y must have x's dtype", call(set_("y", lambda a: a["y"].half()), add=True)),
        ("past N = 30", call(set_("y", lambda a: a["y"][:, :30]), add=True)),
        ("impl", call(set_("kw", {"impl": "cuda"}), add=True)),
    ]


@pytest.mark.parametrize("text,make_call", _bad_parts_cases())
def test_bad_parts_input_raises_input_error(text, make_call):
    with pytest.raises(InputError, match=re.escape(text)):
        make_call()


def test_bad_scalars_raise_input_error():
    x, w, b, parts = _problem("gqa", 4, torch.float32)
    for kw, name in ((dict(scaling=SCALING, eps=-1.0), "eps"), (dict(scaling=float("inf"), eps=EPS), "scaling")):
        with pytest.raises(InputError, match=name):
            perturbed_lora_linear_parts(x, w, b, parts, _segments(), **kw)
        with pytest.raises(InputError, match=name):
            perturbed_lora_add_(torch.zeros(37, 34), x, parts, _segments(), **kw)
