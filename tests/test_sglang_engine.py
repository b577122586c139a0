"""flashzo inside a running SGLang: serving, LoRA serving and MeZO scoring through sglang.Engine,
and `python -m sglang.launch_server`.

Skipped (with the reason shown) where SGLang or its CPU start-up shim is not set up; on a CPU
install it with scripts/install_sglang_cpu.sh. One sglang.Engine serves the whole module (fp32, CPU,
attention_backend="torch_native", LoRA on); launch_server gets one test of its own. References are
flashzo's own forward (`token_logprobs`) and trainer (`MeZOTrainer.step`).
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
from helpers import require_sglang

require_sglang()  # skips (or, under FLASHZO_REQUIRE_SGLANG=1, fails) the module where SGLang is not set up

from helpers import SGLANG_PLUGIN as PLUGIN  # noqa: E402
from helpers import SGLANG_TINY as TINY  # noqa: E402
from helpers import require_boot_pth, sglang_setup  # noqa: E402

import flashzo.sglang as fzs  # noqa: E402  (before any sglang.srt import: installs the torchvision stand-in)
from flashzo import Example, MeZOConfig, MeZOTrainer  # noqa: E402
from flashzo.engine.batch import Copy  # noqa: E402

pytestmark = pytest.mark.sglang

ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native", dtype="float32", mem_fraction_static=0.05,
                   max_total_tokens=4096, log_level="warning")
SEQS = [[2, 5], [2, 9, 17, 33, 4, 61, 8], [2] + [(7 * i + 3) % 70 for i in range(36)]]  # 2, 7, 37 tokens
ATOL = 1e-5  # fp32 on a CPU


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sglang_setup(tmp_path_factory.mktemp("sglang"))


@pytest.fixture(scope="module")
def engine(setup):
    import sglang

    require_boot_pth()
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
    require_boot_pth()
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


# --------------------------------------------------------------------------------------------------
# The Llama family (GQA, untied head, rotary embeddings) through sglang.Engine
# --------------------------------------------------------------------------------------------------

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    from helpers import hf_llama, nonzero_adapter, write_checkpoint, write_word_tokenizer

    from flashzo import LoRAConfig, load_model

    root = tmp_path_factory.mktemp("sglang_llama")
    ckpt = write_checkpoint(hf_llama(seed=3, vocab_size=TINY["vocab_size"], max_position_embeddings=96), root / "m",
                            "safetensors")
    write_word_tokenizer(ckpt, TINY["vocab_size"])
    model = load_model(ckpt)
    adapters = {"seven": nonzero_adapter(model, LoRAConfig(r=2, alpha=4, target_modules=SEVEN, layers=(0, 2)), 5),
                "qvgd": nonzero_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=(
                    "q_proj", "v_proj", "gate_proj", "down_proj")), 6)}
    paths = {}
    for name, adapter in adapters.items():
        paths[name] = str(root / f"adapter_{name}")
        adapter.save_pretrained(paths[name])
    return dict(ckpt=ckpt, model=model, adapters=adapters, paths=paths)


@pytest.fixture(scope="module")
def llama_engine(llama_setup):
    import sglang

    require_boot_pth()
    old = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = PLUGIN
    eng = sglang.Engine(model_path=llama_setup["ckpt"], enable_lora=True, lora_backend="torch_native",
                        lora_paths=[f"{n}={p}" for n, p in llama_setup["paths"].items()], max_loras_per_batch=3,
                        **ENGINE_ARGS)
    yield eng
    eng.shutdown()
    if old is None:
        os.environ.pop("SGLANG_EXTERNAL_MODEL_PACKAGE", None)
    else:
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = old


def test_llama_engine_logprobs_and_lora_serving_equal_flashzo(llama_setup, llama_engine):
    names = [None, "seven", "qvgd"]
    outs = llama_engine.generate(input_ids=SEQS, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                                 logprob_start_len=0, lora_path=names)
    model = llama_setup["model"]
    for seq, out, name in zip(SEQS, outs, names):
        adapter = llama_setup["adapters"][name] if name is not None else None
        ref = model.token_logprobs([seq], adapter=adapter)[0]
        torch.testing.assert_close(_input_logprobs(out), ref, atol=ATOL, rtol=0)
    assert (_input_logprobs(outs[2]) - model.token_logprobs([SEQS[2]])[0]).abs().max() > 100 * ATOL


def test_llama_scorer_step_equals_mezo_step(llama_setup, llama_engine):
    config = MeZOConfig(lr=0.05, eps=1e-2, num_perturbations=2, seed=11)
    adapter = llama_setup["adapters"]["seven"]
    ours = MeZOTrainer(llama_setup["model"], adapter.clone(), config)
    theirs = MeZOTrainer(llama_setup["model"], adapter.clone(), config)
    scorer = fzs.SGLangScorer(llama_engine)
    try:
        for _ in range(2):
            want, got = ours.step(CLASSIFICATION), scorer.step(theirs, CLASSIFICATION)
            torch.testing.assert_close(torch.tensor(got.loss_plus), torch.tensor(want.loss_plus), atol=ATOL, rtol=0)
            torch.testing.assert_close(torch.tensor(got.loss_minus), torch.tensor(want.loss_minus), atol=ATOL,
                                       rtol=0)
            assert min(abs(p - m) for p, m in zip(want.loss_plus, want.loss_minus)) > 100 * ATOL
        torch.testing.assert_close(theirs.adapter.buffer, ours.adapter.buffer, atol=1e-5, rtol=0)
    finally:
        scorer.close()
