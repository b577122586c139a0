"""load_opt / save_opt: every checkpoint layout loads, every bad checkpoint is refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from helpers import (  # noqa: E402
    LAYOUTS,
    TINY,
    assert_same_weights,
    edit_json,
    hf_opt,
    state_dict,
    write_checkpoint,
)

from flashzo.engine import OPTModel, load_opt, save_opt  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Every layout
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads(tmp_path, layout):
    hf = hf_opt(word_embed_proj_dim=16, do_layer_norm_before=False)
    model = load_opt(write_checkpoint(hf, tmp_path, layout))
    assert isinstance(model, OPTModel)
    assert model.config.word_embed_proj_dim == 16 and not model.config.do_layer_norm_before
    assert_same_weights(model, hf)
    assert model.device == torch.device("cpu")


def test_legacy_bin_format(tmp_path):
    """.bin files from torch < 1.6 (not zip archives, cannot be memory-mapped) still load."""
    hf = hf_opt()
    path = write_checkpoint(hf, tmp_path, "original")
    torch.save(state_dict(hf, prefix=False, lm_head=False), os.path.join(path, "pytorch_model.bin"),
               _use_new_zipfile_serialization=False)
    assert_same_weights(load_opt(path), hf)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_tensor_at_a_time(tmp_path, monkeypatch, layout):
    """The loader keeps no reference to a tensor it has read once the next one is read."""
    from flashzo.engine import loading

    read = loading._read_tensors
    alive: list[weakref.ref] = []

    def spy(file):
        for key, tensor in read(file):
            assert all(r() is None for r in alive), "an earlier tensor is still referenced"
            alive.append(weakref.ref(tensor))
            yield key, tensor
            del tensor

    monkeypatch.setattr(loading, "_read_tensors", spy)
    hf = hf_opt()
    assert_same_weights(load_opt(write_checkpoint(hf, tmp_path, layout)), hf)
    assert len(alive) == len(state_dict(hf, lm_head=layout in ("bin", "bin_sharded")))


def test_parameters_own_their_memory(tmp_path):
    """Loaded parameters neither alias the (memory-mapped) file nor each other."""
    path = write_checkpoint(hf_opt(), tmp_path, "bin")
    model = load_opt(path)
    before = {n: p.clone() for n, p in model.named_parameters()}
    torch.save({}, os.path.join(path, "pytorch_model.bin"))  # overwrite the mapped file
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# --------------------------------------------------------------------------------------------------
# dtype and device
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.float16"])
def test_dtype_argument(tmp_path, dtype):
    hf = hf_opt()
    model = load_opt(write_checkpoint(hf, tmp_path, "safetensors"), dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype.replace("torch.", ""))
    assert model.dtype == want
    assert_same_weights(model, hf, dtype=want)


def test_dtype_from_config(tmp_path):
    hf = hf_opt().to(torch.float16)
    path = write_checkpoint(hf, tmp_path, "safetensors")
    assert load_opt(path).dtype == torch.float16
    assert load_opt(path, dtype="auto").dtype == torch.float16
    assert load_opt(path, dtype=torch.float32).dtype == torch.float32
    edit_json(os.path.join(path, "config.json"), dtype=None, torch_dtype=None)
    model = load_opt(path)  # no dtype in the config: fp32
    assert model.dtype == torch.float32
    assert_same_weights(model, hf)


def test_bad_dtype(tmp_path):
    path = write_checkpoint(hf_opt(), tmp_path, "safetensors")
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_opt(path, dtype="float17")
    with pytest.raises(ValueError, match="not a floating-point"):
        load_opt(path, dtype=torch.int8)


def test_device_argument(tmp_path):
    model = load_opt(write_checkpoint(hf_opt(), tmp_path, "safetensors"), device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    hf = hf_opt()
    model = load_opt(write_checkpoint(hf, tmp_path, "bin_sharded"), device="cuda", dtype=torch.bfloat16)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert_same_weights(model.to("cpu"), hf, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Bad checkpoints: a ValueError that names the problem
# --------------------------------------------------------------------------------------------------

def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_opt(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    path = write_checkpoint(hf_opt(), tmp_path, "safetensors")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ValueError, match="no config.json"):
        load_opt(path)


def test_corrupt_config(tmp_path):
    path = write_checkpoint(hf_opt(), tmp_path, "safetensors")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "opt", ')
    with pytest.raises(ValueError, match="config.json: cannot be read"):
        load_opt(path)


def test_not_an_opt_config(tmp_path):
    path = write_checkpoint(hf_opt(), tmp_path, "safetensors")
    edit_json(os.path.join(path, "config.json"), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="not an OPT config"):
        load_opt(path)


def test_no_weights(tmp_path):
    path = write_checkpoint(hf_opt(), tmp_path, "safetensors")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="no weights"):
        load_opt(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_tensor(tmp_path, fmt):
    sd = state_dict(hf_opt())
    del sd["model.decoder.layers.1.fc2.bias"]
    path = _write_state_dict(tmp_path, sd, fmt)
    with pytest.raises(ValueError, match=r"tensor 'decoder\.layers\.1\.fc2\.bias' missing"):
        load_opt(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_unexpected_tensor(tmp_path, fmt):
    sd = state_dict(hf_opt())
    sd["model.decoder.layers.2.fc1.weight"] = torch.zeros(64, 32)  # the config has 2 layers
    path = _write_state_dict(tmp_path, sd, fmt)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.decoder\.layers\.2\.fc1\.weight'"):
        load_opt(path)


def test_tensor_given_twice(tmp_path):
    sd = state_dict(hf_opt())
    sd["decoder.embed_tokens.weight"] = sd["model.decoder.embed_tokens.weight"]
    path = _write_state_dict(tmp_path, sd, "bin")
    with pytest.raises(ValueError, match="embed_tokens.weight' is given twice"):
        load_opt(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_shape_mismatch(tmp_path, fmt):
    path = _write_state_dict(tmp_path, state_dict(hf_opt()), fmt)
    edit_json(os.path.join(path, "config.json"), ffn_dim=48)
    with pytest.raises(ValueError, match=r"tensor 'model\.decoder\.layers\.0\.fc1\.(weight|bias)' has shape "
                                         r"\((64, 32|64,)\), but the config expects \((48, 32|48,)\)"):
        load_opt(path)


def test_lm_head_shape_mismatch(tmp_path):
    sd = state_dict(hf_opt())
    sd["lm_head.weight"] = torch.zeros(95, 32)
    path = _write_state_dict(tmp_path, sd, "bin")
    msg = r"'lm_head\.weight' has shape \(95, 32\), but the config expects \(96, 32\)"
    with pytest.raises(ValueError, match=msg):
        load_opt(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_file(tmp_path, fmt, damage):
    path = _write_state_dict(tmp_path, state_dict(hf_opt()), fmt)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    file = os.path.join(path, name)
    data = open(file, "rb").read()
    data = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    with open(file, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=rf"{name}: cannot be read"):
        load_opt(path)


@pytest.mark.parametrize("layout", ["safetensors_sharded", "bin_sharded"])
def test_index_points_at_missing_shard(tmp_path, layout):
    path = write_checkpoint(hf_opt(), tmp_path, layout)
    index = [f for f in os.listdir(path) if f.endswith(".index.json")][0]
    with open(os.path.join(path, index)) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(ValueError, match=rf"points at shard '{shard}', which is missing"):
        load_opt(path)


@pytest.mark.parametrize("layout", ["safetensors_sharded", "bin_sharded"])
def test_corrupt_index(tmp_path, layout):
    path = write_checkpoint(hf_opt(), tmp_path, layout)
    index = [f for f in os.listdir(path) if f.endswith(".index.json")][0]
    with open(os.path.join(path, index), "w") as f:
        f.write('{"weight_map": ')
    with pytest.raises(ValueError, match=rf"{index}: cannot be read as a checkpoint index"):
        load_opt(path)


def test_index_lists_tensor_its_shard_lacks(tmp_path):
    path = write_checkpoint(hf_opt(), tmp_path, "safetensors_sharded")
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        d = json.load(f)
    shards = sorted(set(d["weight_map"].values()))
    key = next(k for k, s in d["weight_map"].items() if s == shards[0])
    d["weight_map"][key] = shards[1]
    with open(index, "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match=rf"lists tensor '{key}' in shard '{shards[1]}', which lacks it"):
        load_opt(path)


def _write_state_dict(tmp_path, sd: dict[str, torch.Tensor], fmt: str) -> str:
    path = str(tmp_path / "ckpt")
    os.makedirs(path)
    transformers.OPTConfig(**TINY).save_pretrained(path)
    if fmt == "safetensors":
        safetensors_torch.save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    return path


# --------------------------------------------------------------------------------------------------
# save_opt
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(word_embed_proj_dim=16, do_layer_norm_before=False),
                                       dict(enable_bias=False, layer_norm_elementwise_affine=False)])
def test_save_opt_round_trip(tmp_path, overrides):
    from flashzo.engine import OPTConfig

    model = OPTModel.from_config(OPTConfig(**{**TINY, **overrides}), seed=3)
    save_opt(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]

    again = load_opt(tmp_path / "out")
    assert again.config == dataclasses.replace(model.config, torch_dtype="float32")
    for (n, p), (m, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n

    hf, info = transformers.OPTForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_same_weights(model, hf)
    seq = [2, 17, 5, 60, 33, 9]
    with torch.no_grad():
        logits = hf.eval()(input_ids=torch.tensor([seq])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    torch.testing.assert_close(model.token_logprobs([seq])[0], ref, rtol=0, atol=1e-4)


def test_save_opt_dtype(tmp_path):
    model = OPTModel.from_config("opt-tiny", seed=1)
    save_opt(model, tmp_path, dtype=torch.bfloat16)
    loaded = load_opt(tmp_path)
    assert loaded.dtype == torch.bfloat16 and model.dtype == torch.float32
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q), n
    hf = transformers.OPTForCausalLM.from_pretrained(str(tmp_path))
    assert hf.model.decoder.embed_tokens.weight.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# quantize=: each tensor quantized as it is read
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int8", "int4-g32-sym", "int8-g16-asym"])
@pytest.mark.parametrize("layout", ["safetensors", "bin_sharded", "original"])
def test_a_checkpoint_loads_quantized_tensor_by_tensor(tmp_path, monkeypatch, layout, spec):
    """Every linear and the embedding quantized from the checkpoint's tensors as they are read (q, k and
    v into their rows of qkv_proj), the same as the dense model quantized afterwards; the loader still
    keeps no tensor alive once the next is read."""
    from flashzo.engine import loading
    from flashzo.engine.quantized import quantized_weights

    hf = hf_opt(hidden_size=64, ffn_dim=128, word_embed_proj_dim=32, do_layer_norm_before=False)
    path = write_checkpoint(hf, tmp_path, layout)
    read, alive = loading._read_tensors, []

    def spy(file):
        for key, tensor in read(file):
            assert sum(r() is not None for r in alive) <= 1, "the loader holds an earlier tensor"
            alive.append(weakref.ref(tensor))
            yield key, tensor

    monkeypatch.setattr(loading, "_read_tensors", spy)
    q = load_opt(path, quantize=spec)
    want = load_opt(path).quantize_(spec)
    assert set(quantized_weights(q)) == set(q.quantizable()) and "decoder.project_in.weight" in q.quantizable()
    for name, holder in quantized_weights(want).items():
        mine = quantized_weights(q)[name]
        assert mine.value.describe() == holder.value.describe() and all(
            torch.equal(getattr(mine, b), getattr(holder, b)) for b in ("data", "scales", "mins")
            if getattr(holder, b) is not None), name
    for (n1, p1), (n2, p2) in zip(q.named_parameters(), want.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert q.quantization["mode"] == spec[:4]


def test_a_weight_the_format_does_not_fit_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    from flashzo.engine import loading
    from flashzo.errors import InputError

    path = write_checkpoint(hf_opt(hidden_size=96, ffn_dim=96, num_attention_heads=4), tmp_path, "safetensors")
    monkeypatch.setattr(loading, "_read_tensors", lambda file: pytest.fail("a tensor was read"))
    with pytest.raises(InputError, match=r"tensor 'model.decoder.embed_tokens.weight': K = 96 .* int4 group size 64"):
        load_opt(path, quantize="int4", group_size=64)
    with pytest.raises(InputError, match="quantization 'int2' is not MODE"):
        load_opt(path, quantize="int2")
    with pytest.raises(InputError, match="int4 group size must be one of 32, 64, 128, got 16"):
        load_opt(path, quantize="int4", group_size=16)
