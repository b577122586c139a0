"""flashzo.sglang: flashzo's models (OPT, the Llama family) as SGLang external models, and MeZO scoring
through SGLang.

    SGLANG_EXTERNAL_MODEL_PACKAGE=flashzo.sglang python -m sglang.launch_server --model-path ...
    engine = sglang.Engine(model_path=...)          (same variable set)
    flashzo.sglang.SGLangScorer(engine).step(trainer, examples)

SGLang imports this package in its scheduler process and registers the `EntryClass` of its modules
(model.py: OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM). SGLang only logs
an error raised by a model module as a warning and then falls back to its own models, so this package
imports its models eagerly: a broken plugin fails the package import, which SGLang does not catch
(sglang/srt/models/registry.py: import_model_classes).

Files: boot.py (torchvision stand-in, installed before anything imports sglang), compat.py (CPU shim
for SGLang's LoRA batch preparation), request.py (a perturbation in a request id), routing.py (which
LoRA each token uses; the projection), model.py (the model), scorer.py (SGLangScorer), __main__.py
(`python -m flashzo.sglang install`: the start-up shim's .pth file).
"""

if __name__ != "flashzo.sglang":
    raise ImportError(f"flashzo's sglang_plugin/ folder was imported as '{__name__}'; import it as flashzo.sglang "
                      "after `pip install -e .`")

from . import boot

boot.install()  # before the first `import sglang` of this process

from . import compat  # noqa: E402
from .model import LlamaForCausalLM, OPTForCausalLM  # noqa: E402  (eager: a broken model fails the import)
from .request import Perturbation, parse_rid  # noqa: E402
from .scorer import SGLangScorer  # noqa: E402

compat.install_lora_cpu_shim()

__all__ = ["LlamaForCausalLM", "OPTForCausalLM", "Perturbation", "SGLangScorer", "parse_rid"]
