"""flashzo inside SGLang: the plugin, serving, LoRA serving and MeZO scoring through a running Engine.

Skipped (with the reason shown) where SGLang is not installed; on a CPU install it with
scripts/install_sglang_cpu.sh. One sglang.Engine serves the whole module (fp32, CPU,
attention_backend="torch_native", LoRA on); `python -m sglang.launch_server` gets one test of its own.
References are flashzo's own forward (`token_logprobs`) and trainer (`MeZOTrainer.step`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

# FLASHZO_REQUIRE_SGLANG=1 (CI's SGLang step) turns every "not set up" skip below into a failure.
REQUIRED = os.environ.get("FLASHZO_REQUIRE_SGLANG", "") == "1"
SETUP_HINT = "CPU: scripts/install_sglang_cpu.sh; GPU: pip install -e '.[sglang]'"


def _not_set_up(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} ({SETUP_HINT}); FLASHZO_REQUIRE_SGLANG=1 forbids skipping", pytrace=False)
    pytest.skip(f"{reason} ({SETUP_HINT})", allow_module_level=True)


try:
    import sglang  # noqa: F401
except ImportError as e:
    _not_set_up(f"SGLang is not installed ({e})")
pytest.importorskip("transformers")

from helpers import LAYOUTS, hf_opt, write_checkpoint  # noqa: E402

import flashzo.sglang as fzs  # noqa: E402  (before any sglang.srt import: installs the torchvision stand-in)
from flashzo import Example, LoRAAdapter, LoRAConfig, MeZOConfig, MeZOTrainer, load_opt  # noqa: E402
from flashzo.engine.batch import Copy  # noqa: E402
from flashzo.sglang import boot  # noqa: E402

pytestmark = pytest.mark.sglang

PLUGIN = "flashzo.sglang"
# vocab 70: SGLang pads the embedding to 128 rows; 3 layers: layers_to_transform can skip one; gelu_new:
# SGLang's own OPT runs it as the identity (sglang/srt/models/opt.py: get_activation), so matching
# flashzo also shows that the plugin, not SGLang's OPT, served the request
TINY = dict(vocab_size=70, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
            max_position_embeddings=96, activation_function="gelu_new")
ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native", dtype="float32", mem_fraction_static=0.05,
                   max_total_tokens=4096, log_level="warning")
SEQS = [[2, 5], [2, 9, 17, 33, 4, 61, 8], [2] + [(7 * i + 3) % 70 for i in range(36)]]  # 2, 7, 37 tokens
ATOL = 1e-5  # fp32 on a CPU: the bound


def _real_torchvision() -> bool:
    """Whether a real torchvision is installed (then SGLang needs no stand-in)."""
    import importlib.util

    tv = sys.modules.get("torchvision")
    if tv is not None:
        return not getattr(tv, "__flashzo_stub__", False)
    return importlib.util.find_spec("torchvision") is not None  # the stand-in's finder declines this caller


def _require_boot_pth():
    """SGLang's worker processes import sglang before the plugin: they need the .pth start-up shim."""
    if _real_torchvision():
        return
    path = boot.pth_path()
    text = open(path).read() if os.path.isfile(path) else ""
    if os.path.abspath(boot.__file__) not in text:
        state = "names another flashzo checkout" if text else "is missing"
        _not_set_up(f"SGLang's CPU start-up shim {path} {state}, so SGLang's workers cannot import without "
                    f"torchvision; `python -m flashzo.sglang install` writes it for this checkout")


def _tokenizer(path: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def _adapter(model, config: LoRAConfig, seed: int) -> LoRAAdapter:
    """An adapter as training leaves it: every A and B nonzero."""
    adapter = LoRAAdapter.empty(config, model.config)
    adapter.buffer.copy_(0.2 * torch.randn(adapter.buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    ckpt = write_checkpoint(hf_opt(seed=3, **TINY), root / "opt", "safetensors")
    _tokenizer(ckpt, TINY["vocab_size"])
    model = load_opt(ckpt)
    adapters = {
        "qv": _adapter(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "fc1")), 1),
        "all": _adapter(model, LoRAConfig(r=2, alpha=3, target_modules=("q_proj", "k_proj", "v_proj", "out_proj",
                                                                        "fc2"), layers=(0, 2)), 2),
    }
    paths = {}
    for name, adapter in adapters.items():
        paths[name] = str(root / f"adapter_{name}")
        adapter.save_pretrained(paths[name])
    return dict(root=root, ckpt=ckpt, model=model, adapters=adapters, paths=paths)


@pytest.fixture(scope="module")
def engine(setup):
    import sglang

    _require_boot_pth()
    old = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = PLUGIN  # inherited by SGLang's worker processes
    eng = sglang.Engine(model_path=setup["ckpt"], enable_lora=True, lora_backend="torch_native",
                        lora_paths=[f"{n}={p}" for n, p in setup["paths"].items()], max_loras_per_batch=3,
                        **ENGINE_ARGS)
    yield eng
    eng.shutdown()
    if old is None:
        os.environ.pop("SGLANG_EXTERNAL_MODEL_PACKAGE", None)
    else:
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = old


def _input_logprobs(out: dict) -> torch.Tensor:
    """log p(tok[i] | tok[:i]) for i >= 1 from a generate() output requested with logprob_start_len=0."""
    entries = out["meta_info"]["input_token_logprobs"]
    assert entries[0][0] is None
    return torch.tensor([e[0] for e in entries[1:]], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# The plugin, without an Engine
# --------------------------------------------------------------------------------------------------

def test_registry_finds_the_plugin_model():
    from sglang.srt.models.registry import import_model_classes

    assert import_model_classes.__wrapped__(PLUGIN) == {"OPTForCausalLM": fzs.OPTForCausalLM}


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

    if _real_torchvision():
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


# --------------------------------------------------------------------------------------------------
# python -m sglang.launch_server
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_launch_server_serves_the_plugin(setup, tmp_path):
    _require_boot_pth()
    port = _free_port()
    env = dict(os.environ, SGLANG_EXTERNAL_MODEL_PACKAGE=PLUGIN)
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", setup["ckpt"], "--port", str(port),
           "--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
           "--mem-fraction-static", "0.05", "--max-total-tokens", "4096"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                            start_new_session=True)
    try:
        deadline = time.time() + 480
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{open(tmp_path / 'server.log').read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not come up:\n{open(tmp_path / 'server.log').read()[-4000:]}")
            time.sleep(2)
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/get_model_info", timeout=30).read())
        assert info["model_path"] == setup["ckpt"]
        out = _post(f"http://127.0.0.1:{port}/generate",
                    {"input_ids": SEQS[2], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                     "logprob_start_len": 0})
        ref = setup["model"].token_logprobs([SEQS[2]])[0]
        torch.testing.assert_close(_input_logprobs(out), ref, atol=ATOL, rtol=0)
        # a MeZO request over HTTP: the perturbation rides in the request id
        adapter, eps = setup["adapters"]["qv"], 0.05
        p = fzs.Perturbation(adapter=setup["paths"]["qv"], version="v0", seed=123, sign=-1, eps=eps)
        out = _post(f"http://127.0.0.1:{port}/generate",
                    {"input_ids": SEQS[2], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                     "logprob_start_len": 0, **p.request_fields()})
        batch = setup["model"].build_batch([Example(prompt=SEQS[2][:1], target=SEQS[2][1:])],
                                           [Copy(0, 123, -1)], adapters=[adapter], eps=eps)
        torch.testing.assert_close(_input_logprobs(out), setup["model"].score(batch), atol=ATOL, rtol=0)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """End the server and the workers it spawned (its own process group)."""
    for sig, wait in ((15, 60), (9, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------------
# Serving through sglang.Engine
# --------------------------------------------------------------------------------------------------

def test_engine_logprobs_equal_flashzo(setup, engine):
    outs = engine.generate(input_ids=SEQS, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=0)
    for out, ref in zip(outs, setup["model"].token_logprobs(SEQS)):
        got = _input_logprobs(out)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_engine_generates_flashzos_greedy_continuation(setup, engine):
    """Decoding (SGLang's decode batches, one token per request) runs the same model."""
    seq = SEQS[1]
    out = engine.generate(input_ids=seq, sampling_params={"max_new_tokens": 3, "temperature": 0.0,
                                                          "ignore_eos": True})
    toks = list(seq)
    for _ in range(3):  # log p(t | toks) for every t, from flashzo: argmax
        scores = setup["model"].token_logprobs([toks + [t] for t in range(TINY["vocab_size"])])
        toks.append(int(torch.argmax(torch.stack([s[-1] for s in scores]))))
    assert out["output_ids"] == toks[len(seq):]


@pytest.mark.parametrize("names", [[None, "qv", "all"], ["all", "all", "qv"]])
def test_lora_serving_equals_flashzo(setup, engine, names):
    """Adapters served by SGLang's LoRA manager (per-request lora_path), several in one batch."""
    outs = engine.generate(input_ids=SEQS, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=0, lora_path=names)
    for seq, out, name in zip(SEQS, outs, names):
        adapter = setup["adapters"][name] if name is not None else None
        ref = setup["model"].token_logprobs([seq], adapter=adapter)[0]
        torch.testing.assert_close(_input_logprobs(out), ref, atol=ATOL, rtol=0)
    base = setup["model"].token_logprobs([SEQS[2]])[0]
    assert (_input_logprobs(outs[2]) - base).abs().max() > 100 * ATOL  # the adapter changes the result


CLASSIFICATION = [Example(prompt=[2, 5, 6], candidates=[[7], [8, 9]], label=1),
                  Example(prompt=[2, 11, 12, 13, 14], candidates=[[14, 15], [16], [17, 18, 19]], label=2),
                  Example(prompt=[2, 5, 6], candidates=[[30], [31]], label=0)]
LM = [Example(prompt=[2, 5], target=[6, 7, 8]), Example(prompt=[2, 30, 31, 32], target=[33])]


@pytest.mark.parametrize("examples", [CLASSIFICATION, LM], ids=["classification", "lm"])
def test_scorer_step_equals_mezo_step(setup, engine, examples):
    config = MeZOConfig(lr=0.05, eps=1e-2, num_perturbations=2, seed=11)
    ours = MeZOTrainer(setup["model"], setup["adapters"]["qv"].clone(), config)
    theirs = MeZOTrainer(setup["model"], setup["adapters"]["qv"].clone(), config)
    scorer = fzs.SGLangScorer(engine)
    try:
        for _ in range(2):  # the second step scores the updated adapter (a new version on the server)
            want, got = ours.step(examples), scorer.step(theirs, examples)
            torch.testing.assert_close(torch.tensor(got.loss_plus), torch.tensor(want.loss_plus), atol=ATOL, rtol=0)
            torch.testing.assert_close(torch.tensor(got.loss_minus), torch.tensor(want.loss_minus), atol=ATOL,
                                       rtol=0)
            # g = (l+ - l-) / (2 eps): the losses' error, amplified by 1 / (2 eps)
            torch.testing.assert_close(torch.tensor(got.projected_grads), torch.tensor(want.projected_grads),
                                       atol=ATOL / config.eps, rtol=0)
            assert min(abs(p - m) for p, m in zip(want.loss_plus, want.loss_minus)) > 100 * ATOL
        torch.testing.assert_close(theirs.adapter.buffer, ours.adapter.buffer, atol=1e-5, rtol=0)
    finally:
        scorer.close()


def test_perturbations_never_share_cached_kv(setup, engine):
    """+eps and -eps of the same tokens, scored in separate calls: the second must not read the first's
    K/V from SGLang's prefix cache (each request's cache_salt names its perturbation)."""
    adapter, eps = setup["adapters"]["all"], 0.05
    trainer = MeZOTrainer(setup["model"], adapter.clone(), MeZOConfig(lr=0.0, eps=eps, seed=1))
    want = setup["model"].build_batch(CLASSIFICATION, trainer.copies(), adapters=[trainer.adapter], eps=eps)
    from flashzo.engine.loss import copy_losses

    want = copy_losses(want.readout, setup["model"].score(want), CLASSIFICATION).loss
    scorer = fzs.SGLangScorer(engine)
    try:
        for copy, loss in zip(trainer.copies(), want):
            for _ in range(2):  # the repeat is served from the prefix cache
                got = scorer.copy_losses(CLASSIFICATION, trainer.adapter, [copy], eps)[0]
                assert abs(got - loss) < ATOL
        unperturbed = scorer.copy_losses(CLASSIFICATION, trainer.adapter, [Copy()], eps)[0]
        assert min(abs(unperturbed - w) for w in want) > 100 * ATOL
    finally:
        scorer.close()
