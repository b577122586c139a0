"""engine/family.py: every registered family computes with the row-invariant operations only.

The batch-invariant mode (docs/design.md, "Batch invariance") holds only if a family's block runs
every norm, linear, softmax and activation through engine/invariant.py (LayerNorm, RMSNorm, Linear,
linear, logsumexp) or inside `rowwise(...)`, and its projections and attention through the ops and
context it is given. A raw torch call (F.layer_norm, nn.Linear, F.silu, torch.softmax, `x @ w` ...)
would compute right and silently break the guarantee, so this test reads the module of every family
registered in engine/family.py and refuses one anywhere but inside the first argument of a
`rowwise` call. The mutation test adds each kind of raw call to a family's source and expects it
found.
"""

from __future__ import annotations

import ast
import inspect
import sys

import pytest

from flashzo.engine.family import FAMILIES

# Raw operations a family must not call (names as torch defines them).
FUNCTIONAL = "torch.nn.functional"  # every function in it: norms, linear, softmax, activations, attention
TORCH_OPS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "tensordot", "inner", "linear", "bilinear",
             "layer_norm", "rms_norm", "group_norm", "batch_norm", "softmax", "log_softmax", "logsumexp",
             "relu", "gelu", "silu", "sigmoid", "tanh", "celu", "selu", "rrelu", "hardtanh", "prelu",
             "scaled_dot_product_attention"}
NN_MODULES = {"Linear", "Bilinear", "LazyLinear", "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d",
              "Softmax", "LogSoftmax", "Softmin", "ReLU", "ReLU6", "GELU", "SiLU", "Mish", "Tanh", "Sigmoid", "ELU",
              "SELU", "CELU", "LeakyReLU", "Hardswish", "Hardsigmoid", "Softplus", "GLU", "MultiheadAttention"}
TENSOR_METHODS = {"matmul", "mm", "bmm", "softmax", "log_softmax", "logsumexp", "relu", "sigmoid", "tanh"}


def family_modules() -> dict[str, str]:
    """family name -> the source file of the module that defines its model class (and its block)."""
    return {name: inspect.getsourcefile(sys.modules[fam.model_cls.__module__]) for name, fam in FAMILIES.items()}


def aliases(tree: ast.Module) -> dict[str, str]:
    """Every name the module binds by import -> the dotted thing it is (F -> torch.nn.functional)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """torch.nn.functional.silu for `F.silu` (through the module's imports); None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def is_raw(path: str) -> bool:
    if path.startswith(FUNCTIONAL + "."):
        return True
    head, _, leaf = path.rpartition(".")
    return (head == "torch" and leaf in TORCH_OPS) or (head == "torch.nn" and leaf in NN_MODULES)


def raw_ops(source: str) -> list[tuple[int, str]]:
    """(line, what) of every raw torch norm, linear, softmax, activation or GEMM in a family's source,
    outside the first argument of a `rowwise(...)` call."""
    tree = ast.parse(source)
    names = aliases(tree)
    allowed = set()  # the nodes inside rowwise's first argument
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and (
                getattr(node.func, "id", None) == "rowwise" or getattr(node.func, "attr", None) == "rowwise"):
            allowed.update(id(n) for n in ast.walk(node.args[0]))
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed or isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Load):
            path = dotted(node, names)
            if path is not None and is_raw(path):
                found.append((node.lineno, path))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            found.append((node.lineno, "the @ operator"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in TENSOR_METHODS and dotted(node.func, names) is None:
            found.append((node.lineno, f"Tensor.{node.func.attr}"))
    # `F.silu` is an Attribute over the Name `F`: report the longest path once per place
    return sorted({(line, what) for line, what in found
                   if not any(other != what and other.startswith(what + ".") and ln == line for ln, other in found)})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_uses_row_invariant_ops_only(family):
    path = family_modules()[family]
    found = raw_ops(open(path).read())
    assert not found, f"{path} computes with raw torch ops (use engine/invariant.py's, or rowwise):\n" + \
        "\n".join(f"  line {line}: {what}" for line, what in found)


def test_every_family_module_is_read():
    modules = family_modules()
    assert set(modules) == set(FAMILIES) and all(p.endswith(f"engine/{n}.py") for n, p in modules.items())
    for path in modules.values():  # each really holds a block that uses the allowed forms
        source = open(path).read()
        assert "rowwise(" in source and "ctx.project(" in source, path


MUTATIONS = [
    "y = F.silu(x)",
    "norm = nn.LayerNorm(8)",
    "head = nn.Linear(8, 8)",
    "p = torch.softmax(s, dim=-1)",
    "y = F.linear(x, w)",
    "y = x @ w.T",
    "act = F.gelu",
    "y = x.softmax(-1)",
    "y = torch.matmul(x, w)",
    "y = rowwise(F.relu, x) + F.relu(x)",
    "from torch.nn.functional import layer_norm\ny = layer_norm(x, (8,))",
    "import torch.nn.functional as G\ny = G.gelu(x)",
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_scan_finds_an_added_raw_op(family, mutation):
    source = open(family_modules()[family]).read()
    assert raw_ops(source) == []
    assert len(raw_ops(source + "\n\ndef _added(x, w, s):\n" + "\n".join("    " + line for line in
                                                                        mutation.splitlines()))) == 1, mutation
