"""engine/model.py: the family interface both front ends implement, and the path from score to a kernel.

- LayerOps and BlockContext are implemented, method for method, by the engine (EngineOps,
  ForwardContext) and by the SGLang plugin (SGLangOps, SGLangContext: read from its source, so the
  check runs without SGLang installed).
- A layer's prefix (what SGLang names it) is its path in the model; a family that passes another is
  refused when the model is built.
- From `CausalLM.score` to the first kernel flashzo.kernels launches (a GEMM or a Triton kernel) is
  at most MAX_FRAMES frames of flashzo's code, none of them a pass-through (a function whose body only
  returns another call), for every registered family, with and without the fork, on the torch path
  and on the Triton path.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

from flashzo.engine import Copy, Example, LoRAAdapter, LoRAConfig
from flashzo.engine.family import FAMILIES
from flashzo.engine.model import BlockContext, EngineOps, ForwardContext, LayerOps
from flashzo.engine.opt import OPTDecoder, OPTModel
from flashzo.kernels import perturbed_lora
from flashzo.kernels.checks import interpreting

ROOT = Path(__file__).resolve().parent.parent
KERNELS = str(ROOT / "kernels") + os.sep
FLASHZO_DIRS = tuple(str(ROOT / d) + os.sep for d in ("kernels", "engine", "src", "sglang_plugin"))
MAX_FRAMES = 6
TINY = {"opt": "opt-tiny", "llama": "llama-tiny"}  # a small preset of every registered family

# --------------------------------------------------------------------------------------------------
# The protocols, implemented by both front ends
# --------------------------------------------------------------------------------------------------


def protocol_methods(proto) -> dict[str, list[str]]:
    """method -> its parameter names (self excluded), as the protocol declares them."""
    return {name: list(inspect.signature(fn).parameters)[1:] for name, fn in vars(proto).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def source_methods(path: Path, cls: str) -> tuple[dict[str, list[str]], list[str]]:
    """(method -> parameter names without self, base class names) of class `cls` in a source file."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    methods = {}
    for fn in node.body:
        if isinstance(fn, ast.FunctionDef):
            a = fn.args
            methods[fn.name] = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs][1:]
    return methods, [ast.unparse(b) for b in node.bases]


@pytest.mark.parametrize("proto,engine_cls,sglang_cls", [(LayerOps, EngineOps, "SGLangOps"),
                                                         (BlockContext, ForwardContext, "SGLangContext")])
def test_both_front_ends_implement_the_protocols(proto, engine_cls, sglang_cls):
    want = protocol_methods(proto)
    assert want, proto
    assert proto in engine_cls.__mro__, f"{engine_cls.__name__} does not declare {proto.__name__}"
    for name, params in want.items():
        assert name in vars(engine_cls), f"{engine_cls.__name__} does not define {name}"
        assert list(inspect.signature(getattr(engine_cls, name)).parameters)[1:] == params, (engine_cls, name)
    methods, bases = source_methods(ROOT / "sglang_plugin" / "model.py", sglang_cls)
    assert proto.__name__ in bases, f"{sglang_cls} does not declare {proto.__name__}"
    for name, params in want.items():
        assert methods.get(name) == params, f"{sglang_cls}.{name}: {methods.get(name)} instead of {params}"
    if proto is LayerOps:  # the engine's ops answer the protocol's attribute too
        assert set(typing.get_type_hints(proto, globals(), vars(sys.modules[proto.__module__]))) == {"dtype"}
        assert hasattr(engine_cls(), "dtype")


def test_a_layer_prefix_is_its_path():
    model = OPTModel.from_config("opt-tiny")
    named = {name: m for name, m in model.named_modules() if getattr(m, "prefix", None) is not None}
    assert "decoder.layers.1.self_attn.qkv_proj" in named and "decoder.embed_tokens" in named
    assert all(m.prefix == name for name, m in named.items())

    class Misnamed(OPTModel):  # the decoder built under another name than the one it tells its layers
        def __init__(self, config):
            super(OPTModel, self).__init__(config)
            self.decoder = OPTDecoder(config, EngineOps(), prefix="model.decoder")
            self._finish_init(None)

    with pytest.raises(RuntimeError, match="'decoder.embed_tokens' was made with prefix 'model.decoder.embed_tokens'"):
        Misnamed(model.config)


# --------------------------------------------------------------------------------------------------
# From score to the first launch
# --------------------------------------------------------------------------------------------------


class _Grid:
    """A Triton kernel whose launches are recorded: kernel[grid](...) calls `record(kernel[grid])`."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        return self.record(self.kernel[grid])


def first_launch(model, batch, monkeypatch) -> list[inspect.FrameInfo]:
    """The frames (innermost first) from the first launch that code in kernels/ makes while
    model.score(batch) runs (a torch GEMM, the row-chunked GEMM, or a Triton kernel) out to `score`."""
    found = []

    def record(real):
        def launch(*args, **kwargs):
            if not found and sys._getframe(1).f_code.co_filename.startswith(KERNELS):
                found.append(inspect.stack(0)[1:])
            return real(*args, **kwargs)

        return launch

    for owner, name in ((torch, "matmul"), (F, "linear"), (perturbed_lora, "mm_rows")):
        monkeypatch.setattr(owner, name, record(getattr(owner, name)))
    for name, obj in list(vars(perturbed_lora).items()):
        if isinstance(obj, triton.runtime.jit.KernelInterface):
            monkeypatch.setattr(perturbed_lora, name, _Grid(obj, record))
    model.score(batch)
    assert found, "score launched no kernel"
    stack = found[0]
    end = next(i for i, f in enumerate(stack) if f.function == "score" and f.filename.endswith("model.py"))
    return stack[:end + 1]


def is_pass_through(code) -> bool:
    """A function whose body (its docstring aside) is one statement that only returns or calls."""
    fn = ast.parse(textwrap.dedent(inspect.getsource(code))).body[0]
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], (ast.Return, ast.Expr)) and isinstance(body[0].value, ast.Call)


def flashzo_frames(stack) -> list[inspect.FrameInfo]:
    """The frames of flashzo's own code (torch's nn.Module.__call__ plumbing left out)."""
    return [f for f in stack if f.filename.startswith(FLASHZO_DIRS)]


def describe(frames) -> str:
    return "\n".join(f"  {os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.function}" for f in reversed(frames))


def test_pass_through_detector():
    def through(x, y):
        """A docstring."""
        return max(x, y)

    def work(x, y):
        z = x + y
        return max(z, y)

    assert is_pass_through(through.__code__) and not is_pass_through(work.__code__)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("copies", [2, 1], ids=["forked", "one_copy"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_reaches_a_kernel_in_a_few_frames(monkeypatch, family, copies, impl):
    assert set(TINY) == set(FAMILIES), "give every registered family a small preset here"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "triton" and device == "cpu":
        if not interpreting():
            pytest.skip("the Triton path on a CPU needs TRITON_INTERPRET=1")
        monkeypatch.setattr(perturbed_lora, "resolve_impl", lambda impl, device: "triton")
    elif impl == "torch" and device == "cuda":
        pytest.skip("the torch path runs on a CPU")
    model = FAMILIES[family].model_cls.from_config(TINY[family], device=device)
    model.set_attention_backend("torch")
    adapter = LoRAAdapter.init(LoRAConfig(r=4), model.config, device=device)
    examples = [Example([1, 2, 3], candidates=[[4], [5]], label=0), Example([1, 2, 6], target=[7, 8])]
    batch = model.build_batch(examples, [Copy(0, 7, 1), Copy(0, 7, -1)][:copies], adapters=[adapter], eps=1e-3)
    assert (batch.inputs.fork_index is not None) == (copies == 2)
    frames = flashzo_frames(first_launch(model, batch, monkeypatch))
    assert frames[0].filename.startswith(KERNELS), describe(frames)
    assert len(frames) <= MAX_FRAMES, f"{len(frames)} frames from score to the first launch:\n{describe(frames)}"
    through = [f for f in frames if is_pass_through(f.frame.f_code)]
    assert not through, f"pass-through frames on the way:\n{describe(through)}"
