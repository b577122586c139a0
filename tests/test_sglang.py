"""flashzo inside SGLang, without a running Engine: registration, start-up shims, request ids, the
plugin model's weight loading, and the routing of each request's rows to its LoRA.

Skipped (with the reason shown) where SGLang is not installed; on a CPU install it with
scripts/install_sglang_cpu.sh. tests/test_sglang_engine.py runs a real Engine and server.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import require_sglang

require_sglang()  # skips (or, under FLASHZO_REQUIRE_SGLANG=1, fails) the module where SGLang is not set up

from helpers import LAYOUTS, hf_llama, hf_opt, real_torchvision, sglang_setup, write_checkpoint  # noqa: E402
from helpers import SGLANG_PLUGIN as PLUGIN  # noqa: E402
from helpers import SGLANG_TINY as TINY  # noqa: E402

import flashzo.sglang as fzs  # noqa: E402  (before any sglang.srt import: installs the torchvision stand-in)
from flashzo import load_model, load_opt  # noqa: E402
from flashzo.sglang import boot  # noqa: E402

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sglang_setup(tmp_path_factory.mktemp("sglang"))


# --------------------------------------------------------------------------------------------------
# The plugin, without an Engine
# --------------------------------------------------------------------------------------------------

def test_registry_finds_the_plugin_model():
    from sglang.srt.models.registry import import_model_classes

    from flashzo.sglang import model

    assert import_model_classes.__wrapped__(PLUGIN) == {
        "OPTForCausalLM": fzs.OPTForCausalLM, "LlamaForCausalLM": fzs.LlamaForCausalLM,
        "MistralForCausalLM": model.MistralForCausalLM, "Qwen2ForCausalLM": model.Qwen2ForCausalLM}


def test_broken_plugin_fails_loudly(monkeypatch):
    """SGLang swallows (logs) errors of a plugin's model modules and would then serve its own OPT; ours
    imports its model in the package, whose import error SGLang lets through."""
    from sglang.srt.models.registry import import_model_classes

    for name in [m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, f"{PLUGIN}.model", None)  # the model module fails to import
    with pytest.raises(ImportError, match=f"{PLUGIN}.model"):
        import_model_classes.__wrapped__(PLUGIN)


def test_torchvision_stand_in_is_invisible_outside_sglang():
    import importlib.util

    from transformers.utils import import_utils

    if real_torchvision():
        pytest.skip("torchvision is installed: the stand-in is never used")
    assert not import_utils.is_torchvision_available()
    tv = sys.modules["torchvision"]  # imported by sglang.srt.configs through the plugin's import
    assert getattr(tv, "__flashzo_stub__", False)
    with pytest.raises(ImportError, match="needs torchvision"):
        tv.transforms.Resize(4)
    del sys.modules["torchvision"]
    try:  # asked from outside sglang, the finder declines
        assert importlib.util.find_spec("torchvision") is None
    finally:
        sys.modules["torchvision"] = tv


def test_shim_install_status_uninstall(tmp_path, capsys):
    pth = str(tmp_path / boot.PTH_NAME)
    assert boot.main(["status", "--pth", pth]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert boot.main(["install", "--pth", pth]) == 0
    assert boot.main(["status", "--pth", pth]) == 0
    assert capsys.readouterr().out.rstrip().endswith("up to date")
    with open(pth, "w") as f:  # as left by a checkout that has moved since
        f.write(boot.pth_line("/elsewhere/flashzo/sglang/boot.py"))
    assert boot.main(["status", "--pth", pth]) == 1
    assert "stale" in capsys.readouterr().out
    assert boot.main(["uninstall", "--pth", pth]) == 0 and not os.path.exists(pth)


def test_pinning_shim_only_where_pinning_is_impossible():
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend

    shimmed = getattr(TorchNativeLoRABackend.prepare_lora_batch, "_flashzo_unpinned", False)
    assert shimmed == (not fzs.compat.pinning_available())
    with fzs.compat.pinning_disabled():
        t = torch.tensor([1, 2], pin_memory=True).pin_memory()
    assert t.tolist() == [1, 2]
    if not fzs.compat.pinning_available():
        with pytest.raises(RuntimeError):
            torch.zeros(1).pin_memory()  # restored after the block


def test_perturbation_round_trips_through_a_request_id():
    p = fzs.Perturbation(adapter="/a/b c", version="v1", seed=2**63 - 1, sign=-1, eps=1e-3 / 3)
    assert fzs.parse_rid(p.rid()) == p
    assert p.rid() != p.rid()  # unique per request
    assert fzs.parse_rid("an-ordinary-rid") is None
    with pytest.raises(ValueError, match="malformed"):
        fzs.parse_rid("flashzo-zo:bm90IGpzb24:x")
    with pytest.raises(ValueError, match="sign"):
        fzs.Perturbation(adapter="a", version="", seed=0, sign=2, eps=0.1)


@pytest.fixture
def sglang_topology():
    """SGLang's layers read a published parallel topology (one CPU rank)."""
    from sglang.srt.runtime_context import reset_context
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish

    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test")
    yield
    reset_context()


def _plugin_model(path):
    from transformers import AutoConfig

    return fzs.OPTForCausalLM(AutoConfig.from_pretrained(path))


def _sglang_weights(path):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader

    source = DefaultModelLoader.Source(str(path), revision=None, fall_back_to_pt=True)
    return DefaultModelLoader(LoadConfig())._get_weights_iterator(source)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_through_sglangs_loader(tmp_path, sglang_topology, layout):
    path = write_checkpoint(hf_opt(seed=4, **TINY), tmp_path / layout, layout)
    ref = dict(load_opt(path).named_parameters())
    model = _plugin_model(path)
    model.load_weights(_sglang_weights(path))
    got = dict(model.named_parameters())
    assert set(got) == {"model." + name for name in ref}  # one block, one set of parameters (q/k/v stacked)
    for name, p in ref.items():
        mine = got["model." + name]
        assert torch.equal(mine[:p.shape[0]], p), name
        assert not mine[p.shape[0]:].any()  # SGLang's vocabulary padding rows


@pytest.mark.parametrize("model_type,overrides", [("llama", dict(tie_word_embeddings=False)),
                                                   ("qwen2", dict(num_attention_heads=4, tie_word_embeddings=True))])
def test_llama_family_loads_through_sglangs_loader(tmp_path, sglang_topology, model_type, overrides):
    from transformers import AutoConfig

    from flashzo.sglang import model as plugin

    path = write_checkpoint(hf_llama(seed=4, model_type=model_type, vocab_size=70, **overrides), tmp_path,
                            "safetensors_sharded")
    ref = dict(load_model(path).named_parameters())
    cls = {"llama": plugin.LlamaForCausalLM, "qwen2": plugin.Qwen2ForCausalLM}[model_type]
    model = cls(AutoConfig.from_pretrained(path))
    assert model.get_hidden_dim("qkv_proj") == (64, 64 + 2 * 2 * 64 // overrides.get("num_attention_heads", 8))
    assert model.get_hidden_dim("gate_up_proj") == (64, 160)
    model.load_weights(_sglang_weights(path))
    got = dict(model.named_parameters())
    assert set(got) == set(ref)  # one block, one set of parameters (q/k/v and gate/up stacked)
    for name, p in ref.items():
        assert torch.equal(got[name][:p.shape[0]], p), name
        assert not got[name][p.shape[0]:].any()  # SGLang's vocabulary padding rows
    assert (model.lm_head is model.model.embed_tokens) == overrides["tie_word_embeddings"]


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_bad_checkpoints_are_refused_by_name(tmp_path, sglang_topology, fault):
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(hf_opt(seed=4, **TINY), tmp_path, "safetensors")
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    key = "model.decoder.layers.1.self_attn.k_proj.weight"
    if fault == "missing":
        del sd[key]
        match = r"tensor 'decoder.layers.1.self_attn.k_proj.weight' missing"
    elif fault == "unexpected":
        sd["model.decoder.layers.1.extra.weight"] = torch.zeros(2)
        match = "unexpected tensor 'model.decoder.layers.1.extra.weight'"
    else:
        sd[key] = torch.zeros(3, 3)
        match = rf"'{key}' has shape \(3, 3\)"
    save_file(sd, file)
    with pytest.raises(ValueError, match=match):
        _plugin_model(path).load_weights(_sglang_weights(path))


# --------------------------------------------------------------------------------------------------
# Routing: which LoRA each request's rows use (fake batches, no Engine)
# --------------------------------------------------------------------------------------------------

def _fake_batch(lens, rids):
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_seq_lens=torch.tensor(lens, dtype=torch.int32),
                           extend_seq_lens_cpu=list(lens), batch_size=len(lens), rids=rids)


def _batch_infos():
    """Request slots [1, 0, 0, 2] as two SGLang LoRA backends describe them (ranks 0, 4, 2 by slot)."""
    from types import SimpleNamespace

    common = dict(lora_ranks=torch.tensor([0, 4, 2]), scalings=torch.tensor([0.0, 2.0, 1.5]))
    merged = SimpleNamespace(weight_indices_cpu=torch.tensor([1, 0, 2]), seg_lens_cpu=torch.tensor([3, 6, 1]),
                             num_segments=3, permutation=None, **common)  # torch_native: runs merged
    per_request = SimpleNamespace(req_weight_indices=torch.tensor([1, 0, 0, 2]), **common)  # csgmv
    return {"merged": merged, "per_request": per_request}


@pytest.mark.parametrize("style", ["merged", "per_request"])
def test_routes_and_projection_per_request(setup, style):
    from types import SimpleNamespace

    from flashzo.kernels import Segments, perturbed_lora_linear_ref
    from flashzo.sglang.routing import AdapterCache, build_routes, zo_linear

    model, adapter, eps = setup["model"], setup["adapters"]["qv"], 0.25
    p = [fzs.Perturbation(adapter=setup["paths"]["qv"], version="v", seed=5, sign=s, eps=eps) for s in (1, -1)]
    lens = [3, 2, 4, 1]
    batch = _fake_batch(lens, ["plain-1", p[0].rid(), p[1].rid(), "plain-2"])
    backend = SimpleNamespace(batch_info=_batch_infos()[style])
    routes = build_routes(batch, sum(lens) + 2, lora_backend=backend,  # 2 padding rows
                          adapters=AdapterCache(model.config, "cpu"), device="cpu")
    assert [(g.kind, g.num_rows) for g in routes.groups] == [("lora", 3), ("perturbed", 6), ("lora", 1), ("base", 2)]

    h = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lens) + 2, h, generator=gen)
    weight, bias = torch.randn(3 * h, h, generator=gen), torch.randn(3 * h, generator=gen)
    pool = (torch.randn(3, 3 * 4, h, generator=gen), torch.randn(3, 3 * h, 4, generator=gen))  # A, B by slot
    y = zo_linear(x, weight[:h], bias[:h], routes, layer_id=0, name="q_proj", part=0, out=(0, h), pool=pool)

    slot = adapter.slots[(0, "q_proj")]
    want = []
    for rows, kind, arg in [((0, 3), "lora", 1), ((3, 5), "zo", 1), ((5, 9), "zo", -1), ((9, 10), "lora", 2),
                            ((10, 12), "base", None)]:
        xr = x[rows[0]:rows[1]]
        if kind == "base":
            want.append(xr @ weight[:h].T + bias[:h])
        elif kind == "lora":
            r, scaling = [0, 4, 2][arg], [0.0, 2.0, 1.5][arg]
            a, b = pool[0][arg, :r], pool[1][arg, :h, :r]
            want.append(xr @ weight[:h].T + bias[:h] + scaling * (xr @ a.T) @ b.T)
        else:
            want.append(perturbed_lora_linear_ref(
                xr, weight[:h], bias[:h], slot.a.unsqueeze(0), slot.b.unsqueeze(0), Segments.single(len(xr), 0, 5, arg),
                scaling=adapter.config.scaling, eps=eps, a_offset=slot.a_offset, b_offset=slot.b_offset))
    torch.testing.assert_close(y, torch.cat(want), atol=1e-5, rtol=1e-5)

    plain = SimpleNamespace(rids=["a", "b"], forward_mode=None)  # no forward mode: its lengths are never read
    for info in (None, SimpleNamespace(has_active_lora=False)):
        routes = build_routes(plain, 7, lora_backend=SimpleNamespace(batch_info=info),
                              adapters=AdapterCache(model.config, "cpu"), device="cpu")
        assert routes.plain and routes.groups[0].rows is None

    both = _fake_batch([3], [p[0].rid()])  # request 0 also has a LoRA slot (rank 4)
    with pytest.raises(ValueError, match="both a LoRA adapter"):
        build_routes(both, 3, lora_backend=SimpleNamespace(batch_info=_batch_infos()["per_request"]),
                     adapters=AdapterCache(model.config, "cpu"), device="cpu")


