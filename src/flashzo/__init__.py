"""flashzo: fast, memory-light MeZO fine-tuning of LoRA adapters.

The public API (docs/design.md); kernels live in flashzo.kernels, the model families, batching and
the trainer in flashzo.engine, the data readers, training loop and the `flashzo` command here.

Names load on first use (PEP 562): `import flashzo.kernels` imports this package first, and must
load the kernels only, never the engine or the application (tests/test_layers.py counts them).
`from flashzo import X`, `flashzo.X`, `dir(flashzo)` and `__all__` work as with eager imports.
"""

from __future__ import annotations

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
    from flashzo.engine.reward_calls import RewardError, RewardProblem
    from flashzo.engine.reward_objective import RewardConfig, RewardExample
    from flashzo.kernels.errors import InputError
    from flashzo.tasks import synthetic_task

__version__ = "0.1.0"
"""flashzo's version (pyproject.toml's)."""

# public name -> the module that defines it
_SOURCES = {
    **dict.fromkeys(("CausalLM", "Example", "LlamaConfig", "LlamaModel", "LoRAAdapter", "LoRAConfig", "OPTConfig",
                     "OPTModel", "load_model", "load_opt", "save_model", "save_opt"), "flashzo.engine"),
    **dict.fromkeys(("DistributedError", "init_distributed"), "flashzo.engine.distributed"),
    **dict.fromkeys(("batch_invariant_mode", "is_batch_invariant", "set_batch_invariant"), "flashzo.engine.invariant"),
    **dict.fromkeys(("MeZOConfig", "MeZOTrainer", "NonFiniteLossError", "StepResult", "evaluate", "step_together"),
                    "flashzo.engine.mezo"),
    **dict.fromkeys(("RewardError", "RewardProblem"), "flashzo.engine.reward_calls"),
    **dict.fromkeys(("RewardConfig", "RewardExample"), "flashzo.engine.reward_objective"),
    "InputError": "flashzo.kernels.errors",
    "load_jsonl": "flashzo.data",
    "synthetic_task": "flashzo.tasks",
}

__all__ = [
    "CausalLM", "DistributedError", "Example", "InputError", "LlamaConfig", "LlamaModel", "LoRAAdapter", "LoRAConfig",
    "MeZOConfig", "MeZOTrainer", "NonFiniteLossError", "OPTConfig", "OPTModel", "RewardConfig", "RewardError",
    "RewardExample", "RewardProblem", "StepResult", "batch_invariant_mode",
    "evaluate", "init_distributed", "is_batch_invariant", "load_jsonl", "load_model", "load_opt", "save_model",
    "save_opt", "set_batch_invariant", "step_together", "synthetic_task", "__version__",
]


# the subpackages an eager `import flashzo` used to load, reachable as attributes as before
_SUBMODULES = ("data", "engine", "errors", "kernels", "tasks")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'flashzo' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
