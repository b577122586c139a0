"""The seeded Gaussian perturbation z, materialized: z[j] = tl.randn(seed, offset + j).

Every flashzo kernel that perturbs or updates a parameter regenerates z from (seed, global index)
with Triton's Philox-4x32-10 generator and Box-Muller transform (docs/design.md, "The random
numbers"). This file holds, in order: the constants, the Triton kernel that writes those numbers
out, its launcher, and the pure-torch path that computes the same bits on a CPU (it is what the
engine's CPU path and the references use):

- ``gaussian``: the launcher (Triton kernel on CUDA, torch path on CPU; ``impl`` forces either);
- ``gaussian_torch``: z for a contiguous index range, in pure torch;
- ``gaussian_at``: z at arbitrary global indices (any shape), for other kernels' torch paths.

On a CPU the torch path is bit-exact to the Triton kernel run under TRITON_INTERPRET=1. Offsets are
always int32 in the kernels: with int64 offsets ``tl.randn`` switches to a 64-bit Philox variant, so
the global index space is [0, 2**31).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .checks import MAX_INDEX, check_block, check_index_range, check_int, check_seed, check_triton_device, resolve_impl
from .errors import InputError

# Philox-4x32 constants, as in triton/language/random.py.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF

# Box-Muller constants of tl.randn, each rounded to fp32 as the Triton frontend rounds them.
_UNIFORM_SCALE = np.float32(4.6566127342e-10)  # int32 -> [0, 1): largest scale with MAX_INT*scale < 1
_U1_MIN = np.float32(1.0e-7)
_TWO_PI = np.float32(6.283185307179586)
_MINUS_TWO = np.float32(-2.0)

# Elements per Triton program of the elementwise z kernels (this one and zo_update's); z and the
# update never depend on it.
DEFAULT_BLOCK = 1024
# NOTE: elements per chunk in the torch paths (here and in zo_update.py): it bounds the int64
# temporaries (48 bytes an element: 12 MB at 2**18) and the number of ops per call; z does not depend
# on it. Its throughput against 2**16 to 2**22: bench/results/code_notes_cpu.md, "kernels/randn.py
# TORCH_CHUNK" (python bench/code_notes.py --only chunk; time it on an idle machine before changing it).
TORCH_CHUNK = 2**18


# NOTE: seed and offset change from call to call (every step, every parameter): not specializing on
# them (divisibility by 16, == 1) keeps one compiled kernel per signature instead of one per
# residue class; z does not depend on it.
@triton.jit(do_not_specialize=["seed", "offset"])
def _gaussian_kernel(
    z_ptr,
    numel,
    seed,
    offset,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    gidx = offset + idx  # int32: the global index, independent of BLOCK
    tl.static_assert(gidx.dtype == tl.int32)
    z = tl.randn(seed, gidx)
    tl.store(z_ptr + idx, z, mask=mask)


def gaussian(
    seed: int,
    numel: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    impl: str | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """z[j] = tl.randn(seed, offset + j) for j in [0, numel): Philox-4x32-10 + Box-Muller, fp32.

    Args:
        seed: int in [0, 2**63 - 1]; tl.randn splits it into two 32-bit Philox keys (lo, hi).
        numel: int >= 0, the number of values (the length of the result).
        offset: int >= 0, the global index of z[0]; offset + numel <= 2**31 (int32 indices).
        device: where the result lives (default: torch's default device).
        impl: None picks the Triton kernel on CUDA and the torch path elsewhere; "triton" forces
            the kernel (on a CPU tensor it needs TRITON_INTERPRET=1), "torch" the torch path.
        block: elements per Triton program (a power of two); z does not depend on it.

    Returns:
        z: [numel] float32 on ``device``. The torch path on a CPU is bit-exact to the kernel under
        TRITON_INTERPRET=1; a compiled kernel's log/cos/sqrt may differ in the last bits.
    """
    seed = check_seed(seed, "seed")
    numel = check_int(numel, "numel")
    offset = check_int(offset, "offset")
    check_index_range(offset, numel)
    device = torch.device(device) if device is not None else torch.get_default_device()
    impl = resolve_impl(impl, device)
    block = check_block(block)
    if impl == "torch":
        return gaussian_torch(seed, numel, offset=offset, device=device)
    z = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return z
    check_triton_device(device)
    # compiled without FP contraction, as the interpreter and the torch path compute (see zo_update.py)
    _gaussian_kernel[(triton.cdiv(numel, block),)](z, numel, seed, offset, BLOCK=block, enable_fp_fusion=False)
    return z


# ---------------------------------------------------------------------------------------------
# Pure-torch path: the same Philox and Box-Muller, step by step.


def gaussian_torch(
    seed: int, numel: int, *, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """z[j] = tl.randn(seed, offset + j) for j in [0, numel), computed without Triton.

    Args as in ``gaussian``. Returns z: [numel] float32 on ``device``, computed in chunks of
    2**18 elements (memory stays bounded for any numel).
    """
    seed = check_seed(seed, "seed")
    numel = check_int(numel, "numel")
    offset = check_int(offset, "offset")
    check_index_range(offset, numel)
    device = torch.device(device) if device is not None else torch.get_default_device()
    z = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, TORCH_CHUNK):
        stop = min(start + TORCH_CHUNK, numel)
        index = torch.arange(offset + start, offset + stop, dtype=torch.int64, device=device)
        z[start:stop] = _gaussian_at_flat(seed, index)
    return z


def gaussian_at(seed: int, index: torch.Tensor) -> torch.Tensor:
    """z = tl.randn(seed, index) elementwise: the Gaussian at arbitrary global indices.

    Args:
        seed: int in [0, 2**63 - 1].
        index: integer tensor of global indices, any shape, every value in [0, 2**31).

    Returns:
        z: float32, the shape and device of ``index``; z[...] == gaussian(seed, n)[index[...]].
        On a CPU the bits are those of the Triton kernel under TRITON_INTERPRET=1; on another
        device the transcendental functions are torch's (near-identical, not bit-exact).
    """
    seed = check_seed(seed, "seed")
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype.is_complex:
        raise InputError(
            f"index must be an integer tensor, got {type(index).__name__} {getattr(index, 'dtype', '')}"
        )
    if index.numel() > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= MAX_INDEX:
            raise InputError(f"index values must lie in [0, 2**31), got [{lo}, {hi}]")
    flat = index.reshape(-1).to(torch.int64)  # flat: [n]
    z = torch.empty(flat.shape, dtype=torch.float32, device=index.device)
    for start in range(0, flat.numel(), TORCH_CHUNK):
        stop = min(start + TORCH_CHUNK, flat.numel())
        z[start:stop] = _gaussian_at_flat(seed, flat[start:stop])
    return z.reshape(index.shape)


def _gaussian_at_flat(seed: int, index: torch.Tensor) -> torch.Tensor:
    """z for a 1-D int64 ``index`` (values in [0, 2**31), already checked); one chunk."""
    i1, i2 = _philox_first_two(seed, index)
    x1, x2 = _uint_to_int31(i1), _uint_to_int31(i2)
    if index.device.type == "cpu":
        return torch.from_numpy(_box_muller_numpy(x1.numpy(), x2.numpy()))
    return _box_muller_torch(x1, x2)


def _philox_first_two(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs c0, c1 of Philox-4x32-10 on counters (counter, 0, 0, 0), key (seed lo, seed hi).

    This is triton's randint4x for an int32 offset (offset_hi = 0). 32-bit words live in int64
    tensors; a product of two words wraps in int64 but keeps its low 64 bits, so its high word
    (umulhi) is exactly ``(p >> 32) & 0xFFFFFFFF`` and its low word ``p & 0xFFFFFFFF``.
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = counter.clone()
    c1 = torch.zeros_like(counter)
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    pa = torch.empty_like(counter)
    pb = torch.empty_like(counter)
    for _ in range(_PHILOX_ROUNDS):
        torch.mul(c0, _PHILOX_ROUND_A, out=pa)  # A * c0, wrapped
        torch.mul(c2, _PHILOX_ROUND_B, out=pb)  # B * c2, wrapped
        # c0 <- umulhi(B, c2) ^ c1 ^ k0 ; c1 <- lo(B * c2)
        c0.copy_(pb).bitwise_right_shift_(32).bitwise_and_(_M32).bitwise_xor_(c1).bitwise_xor_(k0)
        c1.copy_(pb).bitwise_and_(_M32)
        # c2 <- umulhi(A, c0_old) ^ c3 ^ k1 ; c3 <- lo(A * c0_old)
        c2.copy_(pa).bitwise_right_shift_(32).bitwise_and_(_M32).bitwise_xor_(c3).bitwise_xor_(k1)
        c3.copy_(pa).bitwise_and_(_M32)
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1


def _uint_to_int31(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float before the scale: bitcast to int32, negative v -> ~v (= -v-1).

    x holds uint32 values in int64; the result is int32 in [0, 2**31).
    """
    return torch.where(x >= 2**31, x ^ _M32, x).to(torch.int32)


def _box_muller_numpy(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """tl.randn's float part, one numpy float32 op per Triton op (as the interpreter runs it).

    NOTE: done in numpy, not torch, to be bit-exact with TRITON_INTERPRET=1, which evaluates
    tl.math.log/cos/sqrt with numpy float32 ufuncs: torch's CPU log, cos and even sqrt (numpy's is
    correctly rounded) give other bits than numpy's on a large share of inputs, while the int->float
    conversion and the fp32 multiplies agree (bench/results/code_notes_cpu.md, "kernels/randn.py
    _box_muller_numpy": how many and by how many ulp).
    """
    u1 = x1.astype(np.float32)
    u1 *= _UNIFORM_SCALE
    u2 = x2.astype(np.float32)
    u2 *= _UNIFORM_SCALE
    np.maximum(_U1_MIN, u1, out=u1)  # u1 = max(1e-7, u1)
    th = _TWO_PI * u2
    r = np.sqrt(_MINUS_TWO * np.log(u1))
    return r * np.cos(th)


def _box_muller_torch(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The float part on a non-CPU device in torch (its log/cos/sqrt may differ in the last bits)."""
    f32 = dict(dtype=torch.float32, device=x1.device)
    scale = torch.tensor(float(_UNIFORM_SCALE), **f32)
    u1 = torch.clamp_min(x1.to(torch.float32) * scale, float(_U1_MIN))
    u2 = x2.to(torch.float32) * scale
    th = torch.tensor(float(_TWO_PI), **f32) * u2
    r = torch.sqrt(torch.tensor(-2.0, **f32) * torch.log(u1))
    return r * torch.cos(th)
