"""The MeZO update, fused: regenerate every z_i from its seed and step the flat parameters in place.

    params <- params - lr * (sum_i coeffs[i] * z_i + weight_decay * params)
    z_i[j]  = tl.randn(seeds[i], offset + j)        (docs/design.md, "The random numbers")

With MeZO's projected gradients g_i and q perturbations, the trainer passes coeffs[i] = g_i / q.
The Triton kernel reads ``params`` once and writes it once, whatever q is: each program loops over
the q seeds and regenerates its block of every z_i in registers. The torch path (CPU) does the same
arithmetic in the same order, chunk by chunk, so on a CPU it is bit-exact to the kernel run under
TRITON_INTERPRET=1 (and the compiled kernel, launched without FP contraction, rounds the same ops):

    g = 0;  for i in 0..q-1:  g = g + coeffs[i] * z_i      (fp32, one rounding per op, in order)
    p = p - lr * (g + weight_decay * p)                     (fp32; lr, weight_decay, coeffs as fp32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .checks import check_block, check_index_range, check_int, check_seed, check_triton_device, resolve_impl
from .errors import InputError
from .randn import DEFAULT_BLOCK, TORCH_CHUNK, gaussian, gaussian_torch


@triton.jit(do_not_specialize=["offset"])  # one compiled kernel for every parameter's offset
def _zo_update_kernel(
    p_ptr,
    seeds_ptr,
    coeffs_ptr,
    numel,
    q,
    offset,
    lr,
    weight_decay,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    gidx = offset + idx  # int32: the global index, independent of BLOCK
    tl.static_assert(gidx.dtype == tl.int32)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(q):
        seed = tl.load(seeds_ptr + i)  # int64 scalar
        c = tl.load(coeffs_ptr + i)  # fp32 scalar
        # the launch disables FP contraction: two roundings, as the interpreter and the torch path
        g = g + c * tl.randn(seed, gidx)
    p = p - lr * (g + weight_decay * p)
    tl.store(p_ptr + idx, p, mask=mask)


def zo_update_(
    params: torch.Tensor,
    seeds: Sequence[int] | torch.Tensor,
    coeffs: Sequence[float] | torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    offset: int = 0,
    impl: str | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """params -= lr * (sum_i coeffs[i] * gaussian(seeds[i], P, offset=offset) + weight_decay * params).

    In place, one pass; g accumulates in fp32 in the order i = 0..q-1 (see the module docstring).

    Args:
        params: [P] float32, contiguous: the flat trainable parameters, updated in place.
        seeds: [q] ints in [0, 2**63 - 1] (a sequence or an integer tensor on params' device), q >= 1.
        coeffs: [q] finite floats (a sequence or a tensor on params' device), rounded to fp32.
        lr: float >= 0, the learning rate (rounded to fp32).
        weight_decay: float >= 0 (rounded to fp32).
        offset: int >= 0, the global index of params[0]; offset + P <= 2**31.
        impl: None picks the Triton kernel on CUDA and the torch path elsewhere; "triton" forces the
            kernel (on a CPU tensor it needs TRITON_INTERPRET=1), "torch" the torch path.
        block: elements per Triton program (a power of two); the result does not depend on it.

    Returns:
        params (the same tensor).
    """
    numel = _check_params(params)
    seed_list, coeffs_f32 = _check_seeds_coeffs(seeds, coeffs, params.device)
    lr = _check_scalar(lr, "lr")
    weight_decay = _check_scalar(weight_decay, "weight_decay")
    offset = check_int(offset, "offset")
    check_index_range(offset, numel)
    impl = resolve_impl(impl, params.device)
    block = check_block(block)
    if numel == 0:
        return params
    if impl == "torch":
        _zo_update_torch(params, seed_list, coeffs_f32, lr, weight_decay, offset)
        return params
    check_triton_device(params.device)
    seeds_i64 = torch.tensor(seed_list, dtype=torch.int64, device=params.device)
    # NOTE: enable_fp_fusion=False: Triton 3.9 contracts g + c*z and p - lr*(...) into fmas by
    # default (one rounding instead of two) and announces the opposite default for 3.10; either way
    # the CPU path's bits would depend on the Triton version. Uncontracted, the compiled update
    # differs from the CPU path only through z's transcendental functions. The cost is nil: the
    # kernel is bound by Philox's integer work and by memory.
    _zo_update_kernel[(triton.cdiv(numel, block),)](
        params, seeds_i64, coeffs_f32, numel, len(seed_list), offset, lr, weight_decay,
        BLOCK=block, enable_fp_fusion=False,
    )  # fmt: skip
    return params


# ---------------------------------------------------------------------------------------------
# The launcher's argument checks (zo_update_ref makes the same).


def _check_params(params) -> int:
    if not isinstance(params, torch.Tensor):
        raise InputError(f"params must be a torch.Tensor, got {type(params).__name__}")
    if params.dtype != torch.float32:
        raise InputError(f"params must be float32, got {params.dtype}")
    if params.dim() != 1:
        raise InputError(f"params must be 1-D (the flat parameter buffer), got shape {tuple(params.shape)}")
    if not params.is_contiguous():
        raise InputError("params must be contiguous")
    return params.numel()


def _check_seeds_coeffs(seeds, coeffs, device: torch.device) -> tuple[list[int], torch.Tensor]:
    """seeds as a list of checked ints, coeffs as a finite [q] float32 tensor on ``device``."""
    if isinstance(seeds, torch.Tensor):
        if seeds.device != device:
            raise InputError(f"seeds is on {seeds.device} but params is on {device}")
        if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise InputError(f"seeds must be an integer tensor, got {seeds.dtype}")
        if seeds.dim() != 1:
            raise InputError(f"seeds must be 1-D, got shape {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    elif isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise InputError(f"seeds must be a sequence of ints or an integer tensor, got {type(seeds).__name__}")
    seed_list = [check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)]

    if isinstance(coeffs, torch.Tensor):
        if coeffs.device != device:
            raise InputError(f"coeffs is on {coeffs.device} but params is on {device}")
        if coeffs.dtype.is_complex or coeffs.dtype == torch.bool:
            raise InputError(f"coeffs must be a real tensor, got {coeffs.dtype}")
        if coeffs.dim() != 1:
            raise InputError(f"coeffs must be 1-D, got shape {tuple(coeffs.shape)}")
        coeffs_f32 = coeffs.to(torch.float32)
    elif isinstance(coeffs, (str, bytes)) or not isinstance(coeffs, Sequence):
        raise InputError(f"coeffs must be a sequence of floats or a tensor, got {type(coeffs).__name__}")
    else:
        try:
            coeffs_f32 = torch.tensor([float(c) for c in coeffs], dtype=torch.float32, device=device)
        except (TypeError, ValueError):
            raise InputError("coeffs must be a sequence of floats") from None

    if len(seed_list) == 0:
        raise InputError("seeds must hold at least one seed (q >= 1)")
    if len(seed_list) != coeffs_f32.numel():
        raise InputError(f"len(seeds) = {len(seed_list)} != len(coeffs) = {coeffs_f32.numel()}")
    if not bool(torch.isfinite(coeffs_f32).all()):
        raise InputError(f"coeffs must be finite (after rounding to fp32), got {coeffs_f32.tolist()}")
    return seed_list, coeffs_f32


def _check_scalar(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a float, got {type(value).__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be finite and >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Torch path and reference


def _zo_update_torch(
    params: torch.Tensor, seeds: list[int], coeffs: torch.Tensor, lr: float, weight_decay: float, offset: int
) -> None:
    """The torch path of zo_update_: the kernel's arithmetic, chunk by chunk, in place."""
    f32 = dict(dtype=torch.float32, device=params.device)
    lr_t, wd_t = torch.tensor(lr, **f32), torch.tensor(weight_decay, **f32)
    numel = params.numel()
    for start in range(0, numel, TORCH_CHUNK):
        stop = min(start + TORCH_CHUNK, numel)
        p = params[start:stop]  # p: [n], a view
        g = torch.zeros(stop - start, **f32)
        for i, seed in enumerate(seeds):
            z = gaussian_torch(seed, stop - start, offset=offset + start, device=params.device)
            g.add_(z.mul_(coeffs[i]))  # g = g + c_i * z_i
        g.add_(p * wd_t).mul_(lr_t)  # lr * (g + wd * p)
        p.sub_(g)


def zo_update_ref(
    params: torch.Tensor,
    seeds: Sequence[int] | torch.Tensor,
    coeffs: Sequence[float] | torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    offset: int = 0,
) -> torch.Tensor:
    """params - lr * (sum_i coeffs[i] * gaussian(seeds[i], P, offset=offset) + weight_decay * params).

    Pure torch, out of place: materializes every z_i. Arguments as in ``zo_update_``.
    """
    numel = _check_params(params)
    seed_list, coeffs_f32 = _check_seeds_coeffs(seeds, coeffs, params.device)
    f32 = dict(dtype=torch.float32, device=params.device)
    lr_t = torch.tensor(_check_scalar(lr, "lr"), **f32)
    wd_t = torch.tensor(_check_scalar(weight_decay, "weight_decay"), **f32)
    offset = check_int(offset, "offset")
    check_index_range(offset, numel)
    g = torch.zeros(numel, **f32)
    for seed, c in zip(seed_list, coeffs_f32, strict=True):
        g = g + c * gaussian(seed, numel, offset=offset, device=params.device, impl="torch")
    return params - lr_t * (g + wd_t * params)
