"""flashzo.kernels: Triton kernels that regenerate the seeded MeZO perturbation where it is used.

Every kernel has a pure-torch reference (``*_ref``) and a CPU path that gives the same numbers, so
the whole engine runs (and is tested) on machines without a GPU.
"""

if __name__ != "flashzo.kernels":
    # The checkout's root is on sys.path (python -c / python -m run from it): this folder would shadow
    # the PyPI package named `kernels` that transformers probes for. Fail with the fix, not deep inside.
    raise ImportError(
        f"flashzo's kernels/ folder was imported as '{__name__}'; import it as flashzo.kernels after "
        "`pip install -e .`, and do not put the flashzo checkout's root on sys.path"
    )

from .gaussian import gaussian
from .perturbed_lora import MAX_RANK, perturbed_lora_linear, perturbed_lora_linear_ref
from .segments import Segments
from .zo_update import zo_update_, zo_update_ref

__all__ = [
    "MAX_RANK",
    "Segments",
    "gaussian",
    "perturbed_lora_linear",
    "perturbed_lora_linear_ref",
    "zo_update_",
    "zo_update_ref",
]
