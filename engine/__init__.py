"""flashzo.engine: OPT on a paged KV cache, LoRA adapters, batching and the MeZO trainer."""

if __name__ != "flashzo.engine":
    raise ImportError(
        f"flashzo's engine/ folder was imported as '{__name__}'; import it as flashzo.engine after "
        "`pip install -e .`, and do not put the flashzo checkout's root on sys.path"
    )

from .attention import KVPool, force_backend, resolve_backend
from .batch import Copy, Example, ForwardBatch, build_batch
from .config import PRESETS, OPTConfig
from .loading import load_opt, save_opt
from .lora import LoRAAdapter, LoRAConfig
from .opt import OPTModel

__all__ = [
    "Copy", "Example", "ForwardBatch", "KVPool", "LoRAAdapter", "LoRAConfig", "OPTConfig", "OPTModel",
    "PRESETS", "build_batch", "force_backend", "load_opt", "resolve_backend", "save_opt",
]
