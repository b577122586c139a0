"""`flashzo merge`: fold a LoRA adapter into its base model's weights, for a plain Hugging Face checkpoint.

    W' = W + scaling * B A        for every adapted linear (scaling = alpha / r)

computed in fp32 and cast to the model's dtype. Family-agnostic: an adapted linear is found through
PEFT's key for it (the family config's `peft_prefix`), the family's checkpoint naming and
`checkpoint_names` (engine/model.py), the same map loading and saving use, so a stacked projection's
rows (q_proj inside qkv_proj) get their own update. The merged model is written by `save_model`.

A merged checkpoint names what it was made of and every file merge wrote in `MERGE_INFO`; `flashzo
merge --overwrite` replaces only a directory that holds such a list and nothing else
(`not_merged_files`).

A quantized base (`quantized_base`: the adapter was trained on a quantized model, or the model is a
GGUF file of quantized tensors) cannot hold W + scaling B A in its format: `flashzo merge` refuses it
unless `--dequantize` asks for the dense model of the base's dequantized weights (loaded with the
adapter's recorded quantization, so the weights are those it was trained on) with the adapter merged.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from flashzo.engine.family import family_of
from flashzo.engine.gguf import find_gguf, gguf_quantized_types
from flashzo.engine.lora import ADAPTER_CONFIG, BASE_QUANTIZATION_KEY, LoRAAdapter
from flashzo.engine.model import checkpoint_names
from flashzo.engine.quantized import QuantSpec
from flashzo.errors import InputError

MERGE_INFO = "flashzo_merge.json"  # {"model", "adapter", "dtype", "files"}: what made it, what merge wrote
PEFT_MODEL_PREFIX = "base_model.model."  # PEFT's keys are the base model's module paths behind this
# Files of a checkpoint directory that are not its config or weights (tokenizer, generation settings ...)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".index.json")


@torch.no_grad()
def merge_adapter(model, adapter: LoRAAdapter) -> None:
    """Add every adapted linear's `scaling * B @ A` to `model`'s weights, in place."""
    if not adapter.fits(model.config):
        raise InputError("the adapter was made for a model of another shape")
    fam = family_of(model)
    names = checkpoint_names(model)
    params = dict(model.named_parameters())
    scaling = adapter.config.scaling
    for (layer, module), slot in adapter.slots.items():
        prefix = model.config.peft_prefix(layer, module)
        if not prefix.startswith(PEFT_MODEL_PREFIX):
            raise InputError(f"cannot place the adapter's {prefix}: not a PEFT key of the base model")
        key = fam.checkpoint_key(prefix[len(PEFT_MODEL_PREFIX):] + ".weight")
        if key not in names:
            raise InputError(f"the adapter's {prefix} has no weight {key!r} in the model")
        pname, rows = names[key]
        weight = params[pname]
        view = weight.data if rows is None else weight.data[rows[0]:rows[1]]
        delta = scaling * (slot.b.to(device=view.device, dtype=torch.float32) @
                           slot.a.to(device=view.device, dtype=torch.float32))  # [out, in]
        if tuple(delta.shape) != tuple(view.shape):
            raise InputError(f"the adapter's {prefix} is {tuple(delta.shape)}, the model's weight {tuple(view.shape)}")
        view.copy_(view.float() + delta)


def quantized_base(model: str, adapter: str) -> tuple[str | None, QuantSpec | None]:
    """(why the base is quantized, in words, or None; the quantization the adapter was trained on, to load
    the base with, or None), from the adapter's config and the model's tensor table: nothing is loaded."""
    cfg_path = os.path.join(adapter, ADAPTER_CONFIG)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            recorded = json.load(f).get(BASE_QUANTIZATION_KEY)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        recorded = None  # LoRAAdapter.from_pretrained refuses an unreadable config with its reason
    if recorded is not None:
        spec = QuantSpec.from_dict(recorded, where=f"{cfg_path}: {BASE_QUANTIZATION_KEY}")
        return f"{adapter} was trained on a base quantized as {spec.name}", spec
    if find_gguf(model) is not None:
        types = gguf_quantized_types(model)
        if types:
            return f"{model} holds quantized tensors ({', '.join(f'{t} x{n}' for t, n in types.items())})", None
    return None, None


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy what a checkpoint directory holds besides its config and weights (tokenizer files,
    generation_config.json ...) from `src` to `dst`; returns the names copied."""
    copied = []
    if not os.path.isdir(src):
        return copied
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name == "config.json" or name.endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def write_merge_info(out: str, *, model: str, adapter: str, dtype: str, dequantized: str | None = None) -> None:
    """MERGE_INFO in `out`, listing every file there (written last: the list is complete); `dequantized`:
    why the base was quantized (quantized_base), when the merge wrote its dequantized weights."""
    files = sorted(n for n in os.listdir(out) if n != MERGE_INFO)
    with open(os.path.join(out, MERGE_INFO), "w") as f:
        json.dump({"model": os.path.abspath(model), "adapter": os.path.abspath(adapter), "dtype": dtype,
                   "dequantized": dequantized, "files": files}, f, indent=1)


def not_merged_files(out: str) -> list[str]:
    """The entries of directory `out` that `flashzo merge` did not write there (all of them when it holds
    no MERGE_INFO, or one that cannot be read)."""
    names = sorted(os.listdir(out))
    try:
        with open(os.path.join(out, MERGE_INFO), encoding="utf-8") as f:
            written = json.load(f)["files"]
        written = set(written) | {MERGE_INFO}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return names
    return [n for n in names if n not in written or not os.path.isfile(os.path.join(out, n))]
