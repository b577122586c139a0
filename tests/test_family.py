"""engine/family.py: every registered family matches transformers and PEFT, and computes with the
row-invariant operations only.

Parity (on a CPU, fp32, small random models written by transformers; tests/helpers.py's
FAMILY_CONFIGS): each family's log-probabilities equal transformers' from every checkpoint layout the
family is read from, PEFT adapters load in flashzo and flashzo's in PEFT with the same tensors and
log-probs, the presets have transformers' shapes and parameter counts, and a perturbed forward leaves
the weights and the adapter untouched. The reference for a sequence is transformers' model run on it
alone (no padding). What only one family has is tested in tests/test_opt.py and tests/test_llama.py.

Row-invariant operations: the batch-invariant mode (docs/design.md, "Batch invariance") holds only
if a family's block runs every norm, linear, softmax and activation through engine/invariant.py
(LayerNorm, RMSNorm, Linear, linear, logsumexp) or inside `rowwise(...)`, and its projections and
attention through the ops and context it is given. A raw torch call (F.layer_norm, nn.Linear,
F.silu, torch.softmax, `x @ w` ...) would compute right and silently break the guarantee, so this
test reads the module of every family registered in engine/family.py and refuses one anywhere but
inside the first argument of a `rowwise` call. The mutation test adds each kind of raw call to a
family's source and expects it found.
"""

from __future__ import annotations

import ast
import copy
import inspect
import sys

import pytest
import torch
from helpers import (
    ATOL,
    FAMILY_CONFIGS,
    LAYOUTS,
    LONGEST,
    checkpoint_tensors,
    hf_family_model,
    hf_logprobs,
    make_sequences,
    max_diff,
    write_checkpoint,
)

from flashzo.engine import Copy, Example, LlamaConfig, LoRAAdapter, LoRAConfig, OPTConfig, load_model
from flashzo.engine.family import FAMILIES
from flashzo.engine.llama_config import PRESETS as LLAMA_PRESETS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

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


# --------------------------------------------------------------------------------------------------
# Log-probabilities equal transformers', from every checkpoint layout
# --------------------------------------------------------------------------------------------------

# the layouts each family's checkpoints come in (OPT: also the older .bin files and facebook's own)
FAMILY_LAYOUTS = {"opt": LAYOUTS, "llama": ("safetensors", "safetensors_sharded")}
PARITY_CASES = [(family, name, layout) for family in FAMILY_CONFIGS for name in FAMILY_CONFIGS[family]
                for layout in FAMILY_LAYOUTS[family]]


def test_every_family_is_compared():
    assert set(FAMILY_CONFIGS) == set(FAMILIES) == set(FAMILY_LAYOUTS) == set(LORA_CASES) == set(PRESET_NAMES)


@pytest.fixture(scope="module")
def reference():
    """(family, name) -> (transformers model, sequences, its log-probs of them), seed 1, built once."""
    pytest.importorskip("transformers")
    cache = {}

    def get(family, name):
        if (family, name) not in cache:
            hf = hf_family_model(family, name)
            seqs = make_sequences(hf.config.vocab_size, longest=LONGEST[family])
            cache[family, name] = hf, seqs, hf_logprobs(hf, seqs)
        return cache[family, name]

    return get


@pytest.mark.parametrize("family,name,layout", PARITY_CASES)
def test_logprobs_match_transformers(tmp_path, reference, family, name, layout):
    hf, seqs, ref = reference(family, name)
    model = load_model(write_checkpoint(hf, tmp_path, layout))
    assert isinstance(model, FAMILIES[family].model_cls)
    assert model.config.to_hf()["model_type"] == hf.config.model_type
    lp = model.token_logprobs(seqs)
    assert [t.shape[0] for t in lp] == [len(s) - 1 for s in seqs]
    assert max_diff(lp, ref) < ATOL


# --------------------------------------------------------------------------------------------------
# LoRA adapters: PEFT -> flashzo and flashzo -> PEFT
# --------------------------------------------------------------------------------------------------

OPT_ALL = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# family -> (config name, target modules, layers): every module, some, some layers, each head kind
LORA_CASES = {
    "opt": [("pre_ln", ("q_proj", "v_proj"), None), ("pre_ln", OPT_ALL, None), ("pre_ln", OPT_ALL, (0, 2)),
            ("pre_ln", ("v_proj", "fc2"), (1,)), ("post_ln_proj", OPT_ALL, (2,))],
    "llama": [("gqa", LLAMA_ALL, None), ("gqa", ("k_proj", "v_proj", "down_proj"), (0, 2)),
              ("qwen2", LLAMA_ALL, (1,)), ("mqa_tied", ("q_proj", "o_proj", "gate_proj"), None)],
}
LORA_PARAMS = [(family, *case) for family, cases in LORA_CASES.items() for case in cases]


def _lora_id(case) -> str:
    family, name, targets, layers = case
    return f"{family}-{name}-{'+'.join(targets)}-layers{'all' if layers is None else ''.join(map(str, layers))}"


@pytest.mark.parametrize("case", LORA_PARAMS, ids=_lora_id)
def test_peft_adapter_loads_in_flashzo(tmp_path, family_models, case):
    peft = pytest.importorskip("peft")
    family, name, targets, layers = case
    hf, model = family_models(family, name)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                          layers_to_transform=list(layers) if layers is not None else None)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT initialises B to zero: the adapter would be a no-op
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(str(tmp_path))

    adapter = LoRAAdapter.from_pretrained(str(tmp_path), model.config)
    assert set(adapter.config.target_modules) == set(targets)
    # PEFT writes target_modules in set order: the structure must not depend on it
    same = LoRAConfig(r=4, alpha=8, target_modules=tuple(reversed(targets)), layers=layers)
    assert adapter.structure() == LoRAAdapter.empty(same, model.config).structure()
    assert adapter.config.layers == layers and adapter.config.scaling == 2.0
    peft_sd = peft.get_peft_model_state_dict(pm)
    assert set(adapter.named_tensors()) == set(peft_sd)
    for k, v in adapter.named_tensors().items():
        assert torch.equal(v, peft_sd[k]), k

    seqs = make_sequences(model.config.vocab_size, seed=3, longest=LONGEST[family])
    with_adapter = model.token_logprobs(seqs, adapter=adapter)
    assert max_diff(with_adapter, hf_logprobs(pm, seqs)) < ATOL
    assert max_diff(with_adapter, model.token_logprobs(seqs)) > 1e-3  # the adapter matters


@pytest.mark.parametrize("case", LORA_PARAMS, ids=_lora_id)
def test_flashzo_adapter_loads_in_peft(tmp_path, family_models, case):
    peft = pytest.importorskip("peft")
    family, name, targets, layers = case
    hf, model = family_models(family, name)
    adapter = LoRAAdapter.init(LoRAConfig(r=4, alpha=8, target_modules=targets, layers=layers, seed=5), model.config)
    gen = torch.Generator().manual_seed(11)
    for slot in adapter.slots.values():
        slot.b.copy_(0.2 * torch.randn(slot.b.shape, generator=gen))
    adapter.save_pretrained(str(tmp_path))

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    peft_sd = peft.get_peft_model_state_dict(pm)
    assert set(peft_sd) == set(adapter.named_tensors())
    for k, v in adapter.named_tensors().items():
        assert torch.equal(v, peft_sd[k]), k
    seqs = make_sequences(model.config.vocab_size, seed=4, longest=LONGEST[family])
    assert max_diff(model.token_logprobs(seqs, adapter=adapter), hf_logprobs(pm, seqs)) < ATOL


# --------------------------------------------------------------------------------------------------
# Presets: transformers' shapes and parameter counts (built on the meta device only)
# --------------------------------------------------------------------------------------------------

PRESET_NAMES = {"opt": ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-13b", "opt-tiny"],
                "llama": list(LLAMA_PRESETS)}
HF_PARAMETERS = {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "opt-1.3b": 1_315_758_080,
                 "smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248,
                 "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_241_732_096}


@pytest.mark.parametrize("family,name", [(f, n) for f, names in PRESET_NAMES.items() for n in names])
def test_preset_shapes_match_transformers(family, name):
    transformers = pytest.importorskip("transformers")
    fam = FAMILIES[family]
    cfg = fam.config_cls.from_name(name)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()))
    assert fam.config_cls.from_hf(hf.config) == cfg
    tied = hf.config.tie_word_embeddings
    theirs = {fam.checkpoint_key(k): tuple(v.shape) for k, v in hf.state_dict().items()
              if not (k == fam.tied_head and tied)}
    ours = fam.model_cls(cfg, device="meta")
    assert {k: tuple(v.shape) for k, v in checkpoint_tensors(ours).items()} == theirs
    n_hf = sum(p.numel() for p in hf.parameters())  # a tied head is counted once
    assert cfg.num_parameters == n_hf == sum(p.numel() for p in ours.parameters())
    if name in HF_PARAMETERS:
        assert cfg.num_parameters == HF_PARAMETERS[name]


# --------------------------------------------------------------------------------------------------
# A perturbed forward writes nothing
# --------------------------------------------------------------------------------------------------

SMALL = {"opt": lambda: OPTConfig.from_name("opt-tiny"), "llama": lambda: LlamaConfig.from_name("llama-tiny")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weights_untouched_by_adapter_forward(family):
    fam = FAMILIES[family]
    model = fam.model_cls.from_config(SMALL[family](), seed=0)
    adapter = LoRAAdapter.init(LoRAConfig(r=4, target_modules=tuple(model.config.lora_modules), layers=(1, 2)),
                               model.config)
    for slot in adapter.slots.values():
        slot.b.normal_(0.0, 0.1)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    lora = adapter.buffer.clone()

    seqs = make_sequences(model.config.vocab_size, seed=9)
    plain = model.token_logprobs(seqs, adapter=adapter)
    examples = [Example(prompt=s[:1], target=s[1:]) for s in seqs if len(s) > 1]
    copies = [Copy(0, seed=123, sign=+1), Copy(0, seed=123, sign=-1), Copy(0, seed=0, sign=0)]
    batch = model.build_batch(examples, copies, adapters=[adapter], eps=1e-2)
    scores = model.score(batch)

    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), f"{n} changed"
    assert torch.equal(adapter.buffer, lora), "adapter changed"
    # the perturbed copies did run a different forward (so the check above could have failed)
    per_copy = scores.view(len(copies), -1)
    assert not torch.equal(per_copy[0], per_copy[2]) and not torch.equal(per_copy[1], per_copy[2])
    torch.testing.assert_close(per_copy[2], torch.cat([t for t in plain if t.numel()]), rtol=0, atol=1e-5)
