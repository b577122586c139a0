"""Reading and writing Hugging Face OPT checkpoints without a second copy of the weights.

`load_opt` accepts every layout the OPT checkpoints in the wild use:

    model.safetensors                                  transformers' default
    model.safetensors.index.json + model-0000k-of-n    sharded (opt-13b and up)
    pytorch_model.bin                                  older transformers, facebook/opt-*
    pytorch_model.bin.index.json + shards              sharded .bin

with keys named `model.decoder.*` (OPTForCausalLM) or `decoder.*` (the original facebook/opt-*
files), with or without `lm_head.weight` (tied to the token embedding: only its shape is checked).
The model is built on the meta device and every tensor is read, checked, and copied into its own
final-dtype, final-device parameter one at a time, so peak memory is the model plus one tensor.
A checkpoint that does not fit the config is refused with a ValueError that names the file or the
tensor at fault, before a half-loaded model can be used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Iterator

import torch
from torch import nn

from .config import OPTConfig
from .opt import OPTModel

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
LM_HEAD = "lm_head.weight"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def load_opt(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device=None) -> OPTModel:
    """An OPTModel with the weights of the Hugging Face OPT checkpoint directory `path`.

    dtype: the parameters' dtype (a torch.dtype or its name); None or "auto" keeps the checkpoint's
    (config.json's `torch_dtype`/`dtype`), float32 when the config names none.
    device: where the parameters live (default CPU); tensors are copied there one at a time.
    """
    path = os.fspath(path)
    config = read_config(path)
    dtype = _resolve_dtype(dtype if dtype not in (None, "auto") else config.torch_dtype, "dtype")
    device = torch.device(device if device is not None else "cpu")

    model = OPTModel(config, device="meta")  # shapes only: no memory, no random init
    params = dict(model.named_parameters())
    shards = _weight_files(path)

    # Every name (and, for safetensors, every shape) is known up front for safetensors and indexed
    # .bin files: refuse a checkpoint that does not fit before reading gigabytes of it.
    seen: dict[str, str] = {}
    for file, header in shards:
        for key, shape in (header or {}).items():
            name = _check_name(key, file, params, seen)
            if shape is not None:
                _check_shape(file, key, name, shape, config, params)

    for file, header in shards:
        for key, tensor in _read_tensors(file):
            name = _param_name(key) if key in (header or {}) else _check_name(key, file, params, seen)
            _check_shape(file, key, name, tuple(tensor.shape), config, params)
            if name != LM_HEAD:  # lm_head.weight is tied to decoder.embed_tokens.weight
                _assign(model, name, tensor, dtype, device)
            del tensor  # one tensor resident at a time

    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{path}: tensor {missing[0]!r}{more} missing from the checkpoint")
    return model


def read_config(path: str) -> OPTConfig:
    """The OPTConfig of a checkpoint directory (ValueError if there is none or it is not OPT)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a checkpoint directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no {CONFIG_NAME}, not a Hugging Face checkpoint directory")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot be read: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    try:
        return OPTConfig.from_hf(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e


def _resolve_dtype(dtype, what: str) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"{what} {dtype!r} is not a torch dtype")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what} {dtype!r} is not a floating-point torch dtype")
    return dtype


Header = dict[str, tuple[int, ...] | None]  # tensor name -> shape (None: known only once read)


def _weight_files(path: str) -> list[tuple[str, Header | None]]:
    """(file, its header, or None when only reading the file tells) for every weight file, in order."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_NAME), (BIN_INDEX, BIN_NAME)):
        single = os.path.join(path, single_name)
        if os.path.isfile(single):
            return [(single, _safetensors_header(single) if single.endswith(".safetensors") else None)]
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            return _read_index(index)
    raise ValueError(f"{path}: no weights: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {BIN_NAME} "
                     f"or {BIN_INDEX}")


def _read_index(index: str) -> list[tuple[str, Header]]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{index}: cannot be read as a checkpoint index: {e!r}") from e
    base = os.path.dirname(index)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise ValueError(f"{index}: tensor {key!r} points at {shard!r}, not a file name in {base}")
        by_shard.setdefault(shard, []).append(key)
    out = []
    for shard in sorted(by_shard):
        file = os.path.join(base, shard)
        if not os.path.isfile(file):
            raise ValueError(f"{index}: points at shard {shard!r}, which is missing")
        if file.endswith(".safetensors"):
            header = _safetensors_header(file)
            absent = sorted(set(by_shard[shard]) - set(header))
            if absent:
                raise ValueError(f"{index}: lists tensor {absent[0]!r} in shard {shard!r}, which lacks it")
            # a tensor the index does not list is still read (and checked like any other)
        else:
            header = dict.fromkeys(by_shard[shard])
        out.append((file, header))
    return out


def _safetensors_header(file: str) -> Header:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # SafetensorError, OSError: truncated, corrupt or foreign file
        raise ValueError(f"{file}: cannot be read as safetensors: {e}") from e


def _read_tensors(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in one weight file, one tensor resident at a time."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{file}: cannot be read as safetensors: {e}") from e
        return
    # mmap: tensors stay on disk until copied into their parameter. Files from torch < 1.6 (not zip
    # archives) cannot be mapped and are read whole.
    mmap = zipfile.is_zipfile(file)
    try:
        state = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle of more than tensors
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{file}: cannot be read as a torch checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {reason}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
    for key in list(state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{file}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor


def _param_name(key: str) -> str:
    """Checkpoint key -> flashzo parameter name (`model.decoder.x` and `decoder.x` -> `decoder.x`)."""
    return key[len("model."):] if key.startswith("model.decoder.") else key


def _check_name(key: str, file: str, params: dict, seen: dict[str, str]) -> str:
    name = _param_name(key)
    if name != LM_HEAD and name not in params:
        raise ValueError(f"{file}: unexpected tensor {key!r}: the OPT config has no such parameter")
    if name in seen:
        raise ValueError(f"{file}: tensor {key!r} is given twice (also as {seen[name]!r})")
    seen[name] = key
    return name


def _check_shape(file: str, key: str, name: str, shape: tuple[int, ...], config: OPTConfig,
                 params: dict) -> None:
    if name == LM_HEAD:
        expected = (config.vocab_size, config.word_embed_proj_dim)
    else:
        expected = tuple(params[name].shape)
    if tuple(shape) != expected:
        raise ValueError(f"{file}: tensor {key!r} has shape {tuple(shape)}, but the config expects "
                         f"{expected}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype, device) -> None:
    """Replace the meta parameter `name` with a fresh tensor holding `tensor` in dtype, on device."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = torch.empty(tensor.shape, dtype=dtype, device=device)
    value.copy_(tensor)  # casts; never aliases the file's (possibly memory-mapped) storage
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------

def save_opt(model: OPTModel, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint (config.json + model.safetensors, `model.decoder.*`
    names, lm_head tied) that transformers' OPTForCausalLM and load_opt both read.

    dtype: the saved dtype (default: the model's). Tensors already in that dtype on the CPU are written
    without a copy; others are converted for the write.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    dtype = _resolve_dtype(dtype, "dtype") if dtype is not None else model.dtype
    os.makedirs(path, exist_ok=True)
    tensors = {f"model.{name}": p.detach().to(device="cpu", dtype=dtype).contiguous()
               for name, p in model.named_parameters()}
    tmp = os.path.join(path, f".{SAFETENSORS_NAME}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, SAFETENSORS_NAME))
    config = dataclasses.replace(model.config, torch_dtype=str(dtype).replace("torch.", ""))
    tmp = os.path.join(path, f".{CONFIG_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(config.to_hf(), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(path, CONFIG_NAME))
