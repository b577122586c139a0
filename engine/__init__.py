"""flashzo.engine: the model families on a paged KV cache, LoRA adapters, batching and the MeZO trainer."""

if __name__ != "flashzo.engine":
    raise ImportError(
        f"flashzo's engine/ folder was imported as '{__name__}'; import it as flashzo.engine after "
        "`pip install -e .`, and do not put the flashzo checkout's root on sys.path"
    )

from .attention import KVPool, force_backend, resolve_backend
from .batch import Copy, ModelInputs, Readout, SignedPair, StepBatch, build_batch
from .config import PRESETS, OPTConfig
from .example import Example, Limits
from .family import FAMILIES
from .llama import LlamaModel
from .llama_config import LlamaConfig
from .loading import load_model, load_opt, save_model, save_opt
from .lora import LoRAAdapter, LoRAConfig
from .model import CausalLM
from .opt import OPTModel

__all__ = [
    "FAMILIES", "CausalLM", "Copy", "Example", "KVPool", "Limits", "LlamaConfig", "LlamaModel", "LoRAAdapter",
    "LoRAConfig", "ModelInputs",
    "OPTConfig", "OPTModel", "PRESETS", "Readout", "SignedPair", "StepBatch", "build_batch", "force_backend",
    "load_model", "load_opt", "resolve_backend", "save_model", "save_opt",
]
