"""The model families flashzo runs, and how a Hugging Face config picks one.

A family is a config class (the Hugging Face fields, presets, and what engine/lora.py and
engine/model.py ask of any model) and a model class (a CausalLM subclass, engine/model.py), plus how
its checkpoints name their tensors. Adding a family is adding its module and one `register` call
here; the trainer, batcher, losses and CLI do not change (docs/design.md, "Model families").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flashzo.errors import InputError


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json's `architectures` entries this family reads
    model_types: tuple[str, ...]  # config.json's `model_type` values
    config_cls: type  # from_hf(dict), from_name(preset), to_hf()
    model_cls: type  # a CausalLM subclass: Model(config, dtype=, device=), Model.from_config(...)
    checkpoint_key: Callable[[str], str]  # a checkpoint tensor name -> the model's naming
    hf_key: Callable[[str], str]  # the model's naming -> the name transformers writes
    tied_head: str | None  # a checkpoint tensor that is tied to another (only its shape is checked)


FAMILIES: dict[str, Family] = {}
"""The registered model families by name ("opt", "llama"); `register` adds one."""


def register(family: Family) -> None:
    FAMILIES[family.name] = family


def family_for(hf_config: dict, *, where: str = "config.json") -> Family:
    """The family of a Hugging Face config dict (by `architectures`, else `model_type`)."""
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(a for fam in FAMILIES.values() for a in fam.architectures)
    raise InputError(f"{where}: architectures={archs!r}, model_type={model_type!r} is not a model flashzo runs "
                     f"(supported: {', '.join(known)})")


def family_of(model) -> Family:
    return FAMILIES[model.family]


def _register_builtin() -> None:
    from .config import OPTConfig
    from .opt import TIED_HEAD, OPTModel, checkpoint_key, hf_key

    register(Family("opt", ("OPTForCausalLM",), ("opt",), OPTConfig, OPTModel, checkpoint_key, hf_key, TIED_HEAD))

    from . import llama
    from .llama_config import MODEL_TYPES, LlamaConfig

    register(Family("llama", tuple(MODEL_TYPES.values()), tuple(MODEL_TYPES), LlamaConfig, llama.LlamaModel,
                    llama.checkpoint_key, llama.hf_key, llama.TIED_HEAD))


_register_builtin()
