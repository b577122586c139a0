"""Reading and writing Hugging Face checkpoints without a second copy of the weights.

`load_model` reads a checkpoint directory of any family flashzo runs (engine/family.py picks it
from config.json); `load_opt` is the same for OPT only. Every layout checkpoints in the wild use:

    model.safetensors                                  transformers' default
    model.safetensors.index.json + model-0000k-of-n    sharded (opt-13b and up)
    pytorch_model.bin                                  older transformers, facebook/opt-*
    pytorch_model.bin.index.json + shards              sharded .bin

with the family's key names (OPT: `model.decoder.*` as OPTForCausalLM writes them, or `decoder.*`
as the original facebook/opt-* files do, with or without the tied `lm_head.weight`, of which only
the shape is checked). Checkpoint tensors map to the model's parameters through
`checkpoint_names` (engine/model.py): q_proj, k_proj and v_proj land in their rows of the stacked
qkv_proj. The model is built on the meta device and every tensor is read, checked, and copied into
its final-dtype, final-device parameter one at a time, so peak memory is the model plus one tensor.
With `quantize` ("int8", "int4": engine/quantized.py) every linear's and the token embedding's tensor
is quantized as it is read, into its rows of the weight's packed buffers: peak memory is the
quantized model plus one tensor in the checkpoint's dtype. A checkpoint that does not fit the
config, or a weight that does not fit the format, is refused with an InputError that names the
file or the tensor at fault, before a half-loaded model can be used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Iterator

import torch
from torch import nn

from flashzo.kernels.errors import InputError
from flashzo.kernels.quant import QuantizedWeight, quantize

from .family import FAMILIES, Family, family_for, family_of
from .gguf import find_gguf, load_gguf
from .model import CausalLM, checkpoint_names
from .opt import OPTModel
from .quantized import QuantSpec, WeightFormat, copy_rows_, install_quantized_, quantized_weights

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device=None,
               family: str | None = None, quantize: str | QuantSpec | None = None, group_size: int | None = None,
               symmetric: bool | None = None) -> CausalLM:
    """The model of the Hugging Face checkpoint directory `path`, of whichever family its config names, or
    of a GGUF file (a `.gguf` path, or a directory holding one and no config.json; engine/gguf.py).

    dtype: the compute dtype (a torch.dtype or its name); None or "auto" keeps the checkpoint's
    (config.json's `torch_dtype`/`dtype`), float32 when the config names none.
    device: where the parameters live (default CPU); tensors are copied there one at a time.
    family: insist on one family ("opt"); None: the one config.json names.
    quantize: None (every weight in `dtype`), "int8" or "int4" (or a QuantSpec / its spelling,
    "int4-g64-sym"): every linear's weight and the token embedding held quantized (engine/quantized.py
    says which layers stay in `dtype` and why). group_size: int8: None (per output channel) or 16,
    32, 64, 128; int4: 32 (None), 64 or 128. symmetric: None (int8: True, int4: False: a min per
    group). A GGUF file's quantized tensors are repacked exactly into the format their blocks hold
    (engine/gguf_quant.py), never through fp32. A weight whose rows are not a whole number of groups
    is refused by name before anything is read.
    """
    path = os.fspath(path)
    spec = QuantSpec.of(quantize, group_size, symmetric)
    gguf_file = find_gguf(path)
    if gguf_file is not None:  # llama.cpp's format (engine/gguf.py)
        if family not in (None, "llama"):
            raise InputError(f"{path}: a GGUF file holds a Llama-family model, not {family!r}")
        return load_gguf(gguf_file, dtype=_resolve_dtype(dtype if dtype != "auto" else None, "dtype"), device=device,
                         quantize=spec)
    fam, config = read_config(path, family=family)
    dtype = _resolve_dtype(dtype if dtype not in (None, "auto") else config.torch_dtype, "dtype")
    device = torch.device(device if device is not None else "cpu")

    model = fam.model_cls(config, device="meta")  # shapes only: no memory, no random init
    formats = {}
    if spec is not None:
        try:  # every weight's format checked before anything is read
            formats = model.weight_formats(spec)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
    fill = CheckpointFill(model, fam, dtype=dtype, device=device,
                          tied_shape=tuple(model.lm_head_weight.shape) if fam.tied_head else None, quant=formats)
    shards = _weight_files(path)

    # Every name (and, for safetensors, every shape) is known up front for safetensors and indexed
    # .bin files: refuse a checkpoint that does not fit before reading gigabytes of it.
    for file, header in shards:
        for key, shape in (header or {}).items():
            name = fill.check_name(key, file)
            if shape is not None:
                fill.check_shape(key, name, shape, file)

    for file, header in shards:
        for key, tensor in _read_tensors(file):
            fill.put(key, tensor, file, named=key in (header or {}))
            del tensor  # one tensor resident at a time
    fill.finish(path)
    model.quant_spec = spec
    return model


class CheckpointFill:
    """Fills a module's parameters from checkpoint tensors: each once, by the family's names, checked.

    root: the module whose parameters `checkpoint_names` maps (an engine model, or the SGLang
    plugin's model). Meta parameters are replaced by tensors in `dtype` on `device`; others are
    written in place. row_limits: parameter -> the rows the checkpoint fills (SGLang pads the
    vocabulary rows of its embedding). tied_shape: the shape of the family's tied head, if any.
    quant: parameter -> the format it is held in (engine/quantized.py); such a parameter's tensors
    (floats, quantized here, or a QuantizedWeight already in the format: a repacked GGUF tensor) fill
    its rows of one packed weight, installed by `finish`.
    """

    def __init__(self, root: nn.Module, fam: Family, *, dtype=None, device=None,
                 tied_shape: tuple[int, ...] | None = None, row_limits: dict[str, int] | None = None,
                 quant: dict[str, WeightFormat] | None = None):
        self.root, self.fam, self.dtype, self.device = root, fam, dtype, device
        self.names = checkpoint_names(root)  # checkpoint name -> (parameter, rows)
        self.params = dict(root.named_parameters())
        self.tied_shape, self.row_limits = tied_shape, row_limits or {}
        self.seen: dict[str, str] = {}
        self.filled: set[str] = set()
        self.quant = quant or {}
        self._packed: dict[str, QuantizedWeight] = {}  # quantized parameters being filled

    def check_name(self, key: str, where: str) -> str:
        name = self.fam.checkpoint_key(key)
        if not self._tied(name) and name not in self.names:
            raise InputError(f"{where}: unexpected tensor {key!r}: the {self.fam.name.upper()} config has no such "
                             "parameter")
        if name in self.seen:
            raise InputError(f"{where}: tensor {key!r} is given twice (also as {self.seen[name]!r})")
        self.seen[name] = key
        return name

    def _tied(self, name: str) -> bool:
        """A tied head listed by the checkpoint (a model with its own head has it among its parameters)."""
        return name == self.fam.tied_head and name not in self.names

    def check_shape(self, key: str, name: str, shape, where: str) -> None:
        if self._tied(name):
            expected = self.tied_shape
        else:
            pname, rows = self.names[name]
            expected = tuple(self.params[pname].shape)
            n = rows[1] - rows[0] if rows is not None else self.row_limits.get(pname, expected[0])
            expected = (n,) + expected[1:]
        if tuple(shape) != expected:
            raise InputError(f"{where}: tensor {key!r} has shape {tuple(shape)}, but the config expects {expected}")

    def put(self, key: str, tensor: torch.Tensor, where: str, *, named: bool = False) -> None:
        """Check one checkpoint tensor and copy it into place (named: check_name already saw it)."""
        name = self.fam.checkpoint_key(key) if named else self.check_name(key, where)
        self.check_shape(key, name, tuple(tensor.shape), where)
        if self._tied(name):
            return
        pname, rows = self.names[name]
        if pname in self.quant:
            self._put_quantized(key, pname, rows, tensor, where)
            self.filled.add(name)
            return
        module_name, _, leaf = pname.rpartition(".")
        module = self.root.get_submodule(module_name)
        param = getattr(module, leaf)
        if param.is_meta:  # a fresh tensor in dtype on device; never aliases the file's (memory-mapped) storage
            param = nn.Parameter(torch.empty(param.shape, dtype=self.dtype, device=self.device), requires_grad=False)
            setattr(module, leaf, param)
        if rows is None:
            rows = (0, self.row_limits.get(pname, param.shape[0]))
        param.data[rows[0]:rows[1]].copy_(tensor)  # casts
        self.filled.add(name)

    def _put_quantized(self, key: str, pname: str, rows, tensor, where: str) -> None:
        fmt = self.quant[pname]
        packed = self._packed.get(pname)
        if packed is None:
            packed = self._packed[pname] = fmt.empty(*self.params[pname].shape, device=self.device)
        if not isinstance(tensor, QuantizedWeight):
            if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                tensor = tensor.float()
            try:
                tensor = quantize(tensor, fmt.mode, fmt.group_size, symmetric=fmt.symmetric,
                                  scale_dtype=fmt.scale_dtype)
            except InputError as e:
                raise InputError(f"{where}: tensor {key!r}: {e}") from None
        copy_rows_(packed, rows[0] if rows is not None else 0, tensor.to(packed.device))

    def finish(self, where: str) -> None:
        missing = [n for n in self.names if n not in self.filled]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(f"{where}: tensor {missing[0]!r}{more} missing from the checkpoint")
        for pname, packed in self._packed.items():
            install_quantized_(self.root, pname, packed, self.dtype)
        self._packed.clear()


def load_opt(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device=None,
             **quantization) -> OPTModel:
    """An OPTModel with the weights of the Hugging Face OPT checkpoint directory `path` (see load_model; its
    quantize, group_size and symmetric too)."""
    return load_model(path, dtype=dtype, device=device, family="opt", **quantization)


def read_config(path: str, *, family: str | None = None) -> tuple[Family, object]:
    """(family, config) of a checkpoint directory (InputError if there is none or it is not supported)."""
    if not os.path.isdir(path):
        raise InputError(f"{path}: not a checkpoint directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise InputError(f"{path}: no {CONFIG_NAME}, not a Hugging Face checkpoint directory")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot be read: {e}") from e
    if not isinstance(d, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    fam = FAMILIES[family] if family is not None else family_for(d, where=cfg_path)
    try:
        return fam, fam.config_cls.from_hf(d)
    except (TypeError, ValueError) as e:
        raise InputError(f"{cfg_path}: {e}") from e


def _resolve_dtype(dtype, what: str) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise InputError(f"{what} {dtype!r} is not a torch dtype")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"{what} {dtype!r} is not a floating-point torch dtype")
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
    raise InputError(f"{path}: no weights: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {BIN_NAME} "
                     f"or {BIN_INDEX}")


def _read_index(index: str) -> list[tuple[str, Header]]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError("weight_map is empty or not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{index}: cannot be read as a checkpoint index: {e!r}") from e
    base = os.path.dirname(index)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise InputError(f"{index}: tensor {key!r} points at {shard!r}, not a file name in {base}")
        by_shard.setdefault(shard, []).append(key)
    out = []
    for shard in sorted(by_shard):
        file = os.path.join(base, shard)
        if not os.path.isfile(file):
            raise InputError(f"{index}: points at shard {shard!r}, which is missing")
        if file.endswith(".safetensors"):
            header = _safetensors_header(file)
            absent = sorted(set(by_shard[shard]) - set(header))
            if absent:
                raise InputError(f"{index}: lists tensor {absent[0]!r} in shard {shard!r}, which lacks it")
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
        raise InputError(f"{file}: cannot be read as safetensors: {e}") from e


def _read_tensors(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in one weight file, one tensor resident at a time."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:
            raise InputError(f"{file}: cannot be read as safetensors: {e}") from e
        return
    # mmap: tensors stay on disk until copied into their parameter. Files from torch < 1.6 (not zip
    # archives) cannot be mapped and are read whole.
    mmap = zipfile.is_zipfile(file)
    try:
        state = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle of more than tensors
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{file}: cannot be read as a torch checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {reason}") from e
    if not isinstance(state, dict):
        raise InputError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
    for key in list(state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{file}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------

def save_model(model: CausalLM, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint (config.json + model.safetensors, the family's key
    names, a tied head left out) that transformers and load_model both read.

    dtype: the saved dtype (default: the model's). Tensors already in that dtype on the CPU are written
    without a copy; others are converted for the write.
    """
    from safetensors.torch import save_file

    if quantized_weights(model):
        raise InputError("save_model writes dense checkpoints, and this model's weights are quantized: "
                         "model.dequantize_() first writes its dequantized weights")
    path = os.fspath(path)
    dtype = _resolve_dtype(dtype, "dtype") if dtype is not None else model.dtype
    os.makedirs(path, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {}
    for key, (pname, rows) in checkpoint_names(model).items():
        t = params[pname].detach()
        t = t if rows is None else t[rows[0]:rows[1]]
        tensors[family_of(model).hf_key(key)] = t.to(device="cpu", dtype=dtype).contiguous()
    tmp = os.path.join(path, f".{SAFETENSORS_NAME}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, SAFETENSORS_NAME))
    config = dataclasses.replace(model.config, torch_dtype=str(dtype).replace("torch.", ""))
    tmp = os.path.join(path, f".{CONFIG_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(config.to_hf(), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(path, CONFIG_NAME))


def save_opt(model: OPTModel, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> None:
    """Write an OPTModel as a Hugging Face checkpoint (`model.decoder.*` names, lm_head tied); see save_model."""
    save_model(model, path, dtype=dtype)

