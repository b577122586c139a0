"""flashzo: fast, memory-light MeZO fine-tuning of LoRA adapters.

The public API (docs/design.md); kernels live in flashzo.kernels, the model families, batching and
the trainer in flashzo.engine, the data readers, training loop and the `flashzo` command here.
"""

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
from flashzo.errors import InputError

from .data import load_jsonl
from .tasks import synthetic_task

__version__ = "0.1.0"
"""flashzo's version (pyproject.toml's)."""

__all__ = [
    "CausalLM", "DistributedError", "Example", "InputError", "LlamaConfig", "LlamaModel", "LoRAAdapter", "LoRAConfig",
    "MeZOConfig", "MeZOTrainer", "NonFiniteLossError", "OPTConfig", "OPTModel", "StepResult", "batch_invariant_mode",
    "evaluate", "init_distributed", "is_batch_invariant", "load_jsonl", "load_model", "load_opt", "save_model",
    "save_opt", "set_batch_invariant", "step_together", "synthetic_task", "__version__",
]
