"""`flashzo merge`: fold a LoRA adapter into its base model's weights, for a plain Hugging Face checkpoint.

    W' = W + scaling * B A        for every adapted linear (scaling = alpha / r)

computed in fp32 and cast to the model's dtype. Family-agnostic: an adapted linear is found through
PEFT's key for it (the family config's `peft_prefix`), the family's checkpoint naming and
`checkpoint_names` (engine/model.py), the same map loading and saving use, so a stacked projection's
rows (q_proj inside qkv_proj) get their own update. The merged model is written by `save_model`.
"""

from __future__ import annotations

import os
import shutil

import torch

from flashzo.engine.family import family_of
from flashzo.engine.lora import LoRAAdapter
from flashzo.engine.model import checkpoint_names
from flashzo.errors import InputError

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
