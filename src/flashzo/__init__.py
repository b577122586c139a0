"""flashzo: fast, memory-light MeZO fine-tuning of LoRA adapters.

The public API (docs/design.md); kernels live in flashzo.kernels, the model families, batching and
the trainer in flashzo.engine, the data readers, training loop and the `flashzo` command here.

The names below are imported when first used (`flashzo.MeZOTrainer`, `from flashzo import
evaluate`): `import flashzo` alone imports neither torch nor triton, so the `flashzo` command starts
at once and a Ctrl-C during its imports is its own one-line message (src/flashzo/cli.py).
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static readers (type checkers, the API reference) see
    from flashzo.data import load_jsonl
    from flashzo.engine import (
        CausalLM,
        Example,
        LlamaConfig,
        LlamaModel,
        LoRAAdapter,
        LoRAConfig,
        OPTConfig,
        OPTModel,
        load_model,
        load_opt,
        save_model,
        save_opt,
    )
    from flashzo.engine.distributed import DistributedError, init_distributed
    from flashzo.engine.invariant import batch_invariant_mode, is_batch_invariant, set_batch_invariant
    from flashzo.engine.mezo import MeZOConfig, MeZOTrainer, NonFiniteLossError, StepResult, evaluate, step_together
    from flashzo.tasks import synthetic_task

from flashzo.errors import InputError as InputError  # the one error type: imported at once

__version__ = "0.1.0"
"""flashzo's version (pyproject.toml's)."""

_EXPORTS = {
    "flashzo.engine": ("CausalLM", "Example", "LlamaConfig", "LlamaModel", "LoRAAdapter", "LoRAConfig", "OPTConfig",
                       "OPTModel", "load_model", "load_opt", "save_model", "save_opt"),
    "flashzo.engine.distributed": ("DistributedError", "init_distributed"),
    "flashzo.engine.invariant": ("batch_invariant_mode", "is_batch_invariant", "set_batch_invariant"),
    "flashzo.engine.mezo": ("MeZOConfig", "MeZOTrainer", "NonFiniteLossError", "StepResult", "evaluate",
                            "step_together"),
    "flashzo.data": ("load_jsonl",),
    "flashzo.tasks": ("synthetic_task",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(["InputError", "__version__", *_WHERE])


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:  # a subpackage not imported yet (flashzo.engine, flashzo.kernels ...)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
