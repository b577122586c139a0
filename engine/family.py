"""The model families flashzo runs, and how a Hugging Face config picks one.

A family is a model class (a CausalLM subclass, engine/model.py: its config class, how its
checkpoints name their tensors, its block written against engine/model.py's LayerOps and
BlockContext) and the Hugging Face configs it reads. Adding a family is adding its module and one
`register` call here; the trainer, batcher, losses and CLI do not change (docs/design.md, "Model
families"). tests/test_family_ops.py checks every registered family's module for raw torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashzo.kernels.errors import InputError


@dataclass(frozen=True)
class Family:
    """A registered model family: its model class and the Hugging Face configs it reads."""

    architectures: tuple[str, ...]  # config.json's `architectures` entries this family reads
    model_types: tuple[str, ...]  # config.json's `model_type` values
    model_cls: type  # a CausalLM subclass: Model(config, dtype=, device=), Model.from_config(...)

    @property
    def name(self) -> str:
        return self.model_cls.family

    @property
    def config_cls(self) -> type:
        """from_hf(dict), from_name(preset), to_hf()."""
        return self.model_cls.config_class

    def checkpoint_key(self, key: str) -> str:
        """A checkpoint tensor name -> the model's naming."""
        return self.model_cls.checkpoint_key(key)

    def hf_key(self, name: str) -> str:
        """The model's naming -> the name transformers writes."""
        return self.model_cls.hf_key(name)

    @property
    def tied_head(self) -> str | None:
        """A checkpoint tensor that is tied to another (only its shape is checked)."""
        return self.model_cls.tied_head


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
    from .llama import LlamaModel
    from .llama_config import MODEL_TYPES
    from .opt import OPTModel

    register(Family(("OPTForCausalLM",), ("opt",), OPTModel))
    register(Family(tuple(MODEL_TYPES.values()), tuple(MODEL_TYPES), LlamaModel))


_register_builtin()
