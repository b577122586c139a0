"""flashzo.kernels: Triton kernels that regenerate the seeded MeZO perturbation where it is used.

Every kernel has a pure-torch reference (``*_ref``) and a CPU path that gives the same numbers, so
the whole engine runs (and is tested) on machines without a GPU.

Names load on first use (PEP 562): `flashzo.kernels.errors` (InputError, which every layer raises)
imports without torch or triton, so `import flashzo` and the `flashzo` command start at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if __name__ != "flashzo.kernels":
    # The checkout's root is on sys.path (python -c / python -m run from it): this folder would shadow
    # the PyPI package named `kernels` that transformers probes for. Fail with the fix, not deep inside.
    raise ImportError(
        f"flashzo's kernels/ folder was imported as '{__name__}'; import it as flashzo.kernels after "
        "`pip install -e .`, and do not put the flashzo checkout's root on sys.path"
    )


if TYPE_CHECKING:  # what static readers (type checkers, the API reference) see
    from .launch_plan import DeviceInfo, LoRAKernelConfig, lora_plan
    from .lora_parts import MAX_RANK, LoRAPart, LoRAStack, stack_lora_parts
    from .perturbed_lora import (
        base_linear,
        perturbed_lora_add_,
        perturbed_lora_add_ref,
        perturbed_lora_linear,
        perturbed_lora_linear_parts,
        perturbed_lora_linear_parts_ref,
        perturbed_lora_linear_ref,
    )
    from .quant import QuantizedWeight, cat_rows, quantize
    from .quant_linear import quantized_linear, quantized_linear_ref
    from .quant_plan import QuantKernelConfig
    from .randn import gaussian
    from .rows import apply_rows, mm_rows, row_chunk
    from .segments import Segments
    from .zo_update import zo_update_, zo_update_ref

# public name -> the module that defines it
_SOURCES = {
    "gaussian": "randn",
    **dict.fromkeys(("DeviceInfo", "LoRAKernelConfig", "lora_plan"), "launch_plan"),
    **dict.fromkeys(("MAX_RANK", "LoRAPart", "LoRAStack", "stack_lora_parts"), "lora_parts"),
    **dict.fromkeys(("base_linear", "perturbed_lora_add_", "perturbed_lora_add_ref", "perturbed_lora_linear",
                     "perturbed_lora_linear_parts", "perturbed_lora_linear_parts_ref", "perturbed_lora_linear_ref"),
                    "perturbed_lora"),
    **dict.fromkeys(("QuantizedWeight", "cat_rows", "quantize"), "quant"),
    **dict.fromkeys(("quantized_linear", "quantized_linear_ref"), "quant_linear"),
    "QuantKernelConfig": "quant_plan",
    **dict.fromkeys(("apply_rows", "mm_rows", "row_chunk"), "rows"),
    "Segments": "segments",
    **dict.fromkeys(("zo_update_", "zo_update_ref"), "zo_update"),
}

__all__ = [
    "MAX_RANK",
    "DeviceInfo",
    "LoRAKernelConfig",
    "LoRAPart",
    "LoRAStack",
    "QuantKernelConfig",
    "QuantizedWeight",
    "Segments",
    "apply_rows",
    "base_linear",
    "cat_rows",
    "gaussian",
    "lora_plan",
    "mm_rows",
    "perturbed_lora_add_",
    "perturbed_lora_add_ref",
    "perturbed_lora_linear",
    "perturbed_lora_linear_parts",
    "perturbed_lora_linear_parts_ref",
    "perturbed_lora_linear_ref",
    "quantize",
    "quantized_linear",
    "quantized_linear_ref",
    "row_chunk",
    "stack_lora_parts",
    "zo_update_",
    "zo_update_ref",
]


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:  # a kernel module not imported yet (flashzo.kernels.rows ...)
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'flashzo.kernels' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
