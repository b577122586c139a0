"""flashzo: fast, memory-light MeZO fine-tuning of OPT LoRA adapters.

The public API (DESIGN.md section 7); kernels live in flashzo.kernels, the model, batching and the
trainer in flashzo.engine.
"""

from flashzo.engine import (
    Example,
    LoRAAdapter,
    LoRAConfig,
    OPTConfig,
    OPTModel,
    load_opt,
    save_opt,
)
from flashzo.engine.data import load_jsonl, synthetic_task
from flashzo.engine.distributed import DistributedError, init_distributed
from flashzo.errors import InputError
from flashzo.engine.mezo import MeZOConfig, MeZOTrainer, NonFiniteLossError, StepResult, evaluate, step_together

__version__ = "0.1.0"

__all__ = [
    "DistributedError", "Example", "InputError", "LoRAAdapter", "LoRAConfig", "MeZOConfig", "MeZOTrainer", "NonFiniteLossError",
    "OPTConfig", "OPTModel", "StepResult", "evaluate", "init_distributed", "load_jsonl", "load_opt", "save_opt",
    "step_together", "synthetic_task", "__version__",
]
