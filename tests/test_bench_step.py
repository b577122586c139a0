"""bench/bench_step.py and bench/mezo_baseline.py: the smoke run writes its files, and the baseline
computes the same task as flashzo (same loss on the same weights and batch), so the benchmark
compares equal work. Everything on a CPU in fp32 with opt-tiny; nothing here is timed."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_step  # noqa: E402
from helpers import checkpoint_tensors  # noqa: E402
from mezo_baseline import MeZOBaseline, collate, hf_from_flashzo, mezo_loss, peft_to_flat  # noqa: E402

from flashzo.engine import LlamaModel, LoRAAdapter, LoRAConfig, OPTModel  # noqa: E402
from flashzo.engine.mezo import evaluate  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# fp32 against fp32: the two sides differ in summation order (padded SDPA vs the paged torch
# backend, full-vocab log_softmax vs logsumexp over the read-out rows): fp32 rounding of losses of
# 0.6-6; the differences at the benchmark's shapes: the "loss diff" column of bench/results/step_cpu.md.
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    """opt-tiny with an adapter whose B is non-zero (PEFT's init makes LoRA a no-op)."""
    model = OPTModel.from_config("opt-tiny", seed=3)
    adapter = LoRAAdapter.init(LoRAConfig(r=8, alpha=16, seed=4), model.config)
    gen = torch.Generator().manual_seed(5)
    for slot in adapter.slots.values():
        slot.b.copy_(0.05 * torch.randn(slot.b.shape, generator=gen))
    return model, adapter


@pytest.fixture(scope="module", params=[False, True], ids=["checkpoint", "shared"])
def hf(request, tiny):
    model, adapter = tiny
    return hf_from_flashzo(model, adapter, dtype=torch.float32, device="cpu", share_weights=request.param)


def test_smoke_writes_its_files(tmp_path):
    paths = bench_step.main(["--smoke", "--out", str(tmp_path), "--workloads", "sst2", "lm", "--profile"])
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        f"step_smoke.{ext}" for ext in ("json", "csv", "md", "png"))
    profile = (tmp_path / "step_profile_smoke_opt-tiny_sst2.txt").read_text()
    assert "## flashzo" in profile and "## baseline" in profile and "aten::" in profile
    for p in paths:
        assert os.path.getsize(p) > 0, p
    with open(tmp_path / "step_smoke.json") as f:
        results = json.load(f)
    rows = results["rows"]
    assert [(r["model"], r["workload"]) for r in rows] == [("opt-tiny", "sst2"), ("opt-tiny", "lm"),
                                                           ("llama-tiny", "sst2"), ("llama-tiny", "lm")]
    for r in rows:
        for side in ("baseline", "flashzo", "floor"):
            assert r[f"{side}_ms"] > 0 and r[f"{side}_gflop"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["flashzo_ms"])
        assert abs(r["loss_baseline"] - r["loss_flashzo"]) < LOSS_ATOL
    assert rows[0]["flashzo_peak_mib"] > 0 and rows[0]["infer_peak_mib"] > 0  # memory: first workload
    assert results["meta"]["commit"] and results["meta"]["torch"] == torch.__version__
    with open(tmp_path / "step_smoke.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    md = (tmp_path / "step_smoke.md").read_text()
    assert "| opt-tiny | sst2 |" in md and "| llama-tiny | lm |" in md
    # --render-only rebuilds the table and plot from the JSON alone, without measuring
    os.remove(tmp_path / "step_smoke.md")
    bench_step.main(["--smoke", "--out", str(tmp_path), "--render-only"])
    assert (tmp_path / "step_smoke.md").read_text() == md


@pytest.mark.parametrize("workload", list(bench_step.WORKLOADS))
def test_baseline_loss_equals_flashzo_sign0_loss(tiny, hf, workload):
    model, adapter = tiny
    examples = bench_step.make_examples(workload, model.config.vocab_size, num_examples=6, seed=7)
    ours = evaluate(model, adapter, examples)["loss"]
    theirs = float(mezo_loss(hf, collate(examples)))
    assert abs(ours - theirs) < LOSS_ATOL, (ours, theirs)
    # the comparison can fail: another adapter gives another loss
    other = adapter.clone()
    other.buffer.add_(0.05 * torch.randn(other.buffer.shape, generator=torch.Generator().manual_seed(8)))
    assert abs(evaluate(model, other, examples)["loss"] - ours) > 100 * LOSS_ATOL


@pytest.fixture(scope="module")
def llama_tiny():
    """llama-tiny (GQA, untied head) with an adapter on every kind of linear, B non-zero."""
    model = LlamaModel.from_config("llama-tiny", seed=3)
    adapter = LoRAAdapter.init(LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "o_proj", "up_proj"),
                                          seed=4), model.config)
    gen = torch.Generator().manual_seed(5)
    for slot in adapter.slots.values():
        slot.b.copy_(0.05 * torch.randn(slot.b.shape, generator=gen))
    return model, adapter


@pytest.mark.parametrize("share", [False, True], ids=["checkpoint", "shared"])
@pytest.mark.parametrize("workload", ["sst2", "lm", "multichoice"])
def test_llama_baseline_loss_equals_flashzo_sign0_loss(llama_tiny, share, workload):
    """Left-padded rotary models get their positions from the mask (bench/mezo_baseline.py: mezo_loss)."""
    model, adapter = llama_tiny
    hf = hf_from_flashzo(model, adapter, dtype=torch.float32, device="cpu", share_weights=share)
    examples = bench_step.make_examples(workload, model.config.vocab_size, num_examples=6, seed=7)
    ours = evaluate(model, adapter, examples)["loss"]
    assert abs(ours - float(mezo_loss(hf, collate(examples)))) < LOSS_ATOL
    assert torch.equal(peft_to_flat(hf, adapter), adapter.buffer)


def test_weights_are_identical(tiny, hf):
    model, adapter = tiny
    theirs = {k: v for k, v in hf.base_model.model.state_dict().items() if "lora_" not in k}
    for name, p in checkpoint_tensors(model).items():
        key = f"model.{name}"
        key = key.replace("q_proj.weight", "q_proj.base_layer.weight").replace("q_proj.bias", "q_proj.base_layer.bias")
        key = key.replace("v_proj.weight", "v_proj.base_layer.weight").replace("v_proj.bias", "v_proj.base_layer.bias")
        assert torch.equal(theirs[key], p), name
    assert torch.equal(theirs["lm_head.weight"], model.decoder.embed_tokens.weight)
    assert torch.equal(peft_to_flat(hf, adapter), adapter.buffer)


def test_collate_is_mezo_s():
    examples = bench_step.make_examples("multichoice", 512, num_examples=3, seed=1)
    b = collate(examples)
    assert b.input_ids.shape[0] == 12 and b.input_ids.shape[1] % 8 == 0  # every candidate a sequence
    assert b.num_options == [4, 4, 4] and b.labels.tolist() == [ex.label for ex in examples]
    for i, (toks, _) in enumerate(s for ex in examples for s in ex.sequences()):
        n = len(toks)
        assert b.input_ids[i, -n:].tolist() == toks and b.attention_mask[i, -n:].all()  # left padding
        assert not b.attention_mask[i, :-n].any() and (b.input_ids[i, :-n] == 1).all()


def test_baseline_step_is_mezo_s(tiny):
    """+eps, -2eps, +eps returns theta (to fp32 rounding); the update is -lr * g * z, z from the seed."""
    model, adapter = tiny
    pm = hf_from_flashzo(model, adapter, dtype=torch.float32, device="cpu", share_weights=True)
    examples = bench_step.make_examples("sst2", model.config.vocab_size, num_examples=4, seed=2)
    before = peft_to_flat(pm, adapter)
    base = MeZOBaseline(pm, lr=0.0, eps=1e-3, seed=1)
    loss_plus, g = base.step(collate(examples))
    torch.testing.assert_close(peft_to_flat(pm, adapter), before, rtol=0, atol=1e-7)
    assert g != 0.0 and loss_plus > 0

    base.lr = 1e-2
    _, g = base.step(collate(examples))
    base.gen.manual_seed(base.zo_seed)
    z = [torch.normal(0.0, 1.0, size=p.shape, generator=base.gen) for _, p in base.params]
    flat_z = torch.empty_like(adapter.buffer)
    names = [n.replace(".default.", ".") for n, _ in base.params]
    views = adapter.unflatten(flat_z)
    for n, t in zip(names, z, strict=True):
        views[n].copy_(t)
    torch.testing.assert_close(peft_to_flat(pm, adapter) - before, -1e-2 * g * flat_z, rtol=1e-4, atol=1e-7)


def test_workload_shapes():
    for name, w in bench_step.WORKLOADS.items():
        examples = bench_step.make_examples(name, 50272, seed=0)
        assert len(examples) == 16
        for ex in examples:
            assert w.prompt_len[0] <= len(ex.prompt) <= w.prompt_len[1] and ex.prompt[0] == 2
            if w.num_candidates:
                assert len(ex.candidates) == w.num_candidates
                assert all(w.candidate_len[0] <= len(c) <= w.candidate_len[1] for c in ex.candidates)
            else:
                assert len(ex.target) == w.target_len
            assert 1 not in [t for toks, _ in ex.sequences() for t in toks]  # never the pad id


@pytest.mark.gpu
def test_gpu_smoke_reports_tflops_and_cuda_memory(tmp_path):
    """On a lent GPU: the bf16 path runs end to end (both sides, the Triton kernels, CUDA memory stats)."""
    bench_step.main(["--smoke", "--device", "cuda", "--dtype", "bf16", "--out", str(tmp_path),
                     "--workloads", "sst2"])
    with open(tmp_path / "step_smoke.json") as f:
        results = json.load(f)
    (row,) = results["rows"]
    assert row["dtype"] == "bf16" and row["flashzo_tflops"] > 0 and row["baseline_tflops"] > 0
    assert row["memory_method"].startswith("in-process") and row["flashzo_peak_mib"] > 0
    assert results["meta"]["device"] == torch.cuda.get_device_name()
