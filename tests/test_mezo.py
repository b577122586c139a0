"""The MeZO trainer: the estimate, reproducibility, resume, NaN handling, step_together, bad input."""

import json
import math
import os

import pytest
import torch

import flashzo
from flashzo import Example, LoRAConfig, MeZOConfig, MeZOTrainer, OPTConfig, OPTModel
from flashzo.engine.batch import Copy
from flashzo.engine.mezo import perturbation_seed
from flashzo.kernels import gaussian

CFG = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OPTModel.from_config(CFG, seed=0)


def cls_examples(n, seed=0, n_cand=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(2, 9, (1,), generator=g))
        prompt = torch.randint(3, CFG.vocab_size, (plen,), generator=g).tolist()
        cands = [torch.randint(3, CFG.vocab_size, (int(torch.randint(1, 3, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(n_cand)]
        out.append(Example(prompt=prompt, candidates=cands, label=int(torch.randint(0, n_cand, (1,), generator=g))))
    return out


def lm_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(prompt=torch.randint(3, 96, (3,), generator=g).tolist(),
                    target=torch.randint(3, 96, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def nonzero_b(trainer, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    for slot in trainer.adapter.slots.values():
        slot.b.copy_(torch.randn(slot.b.shape, generator=g) * scale)


def autograd_loss(model, adapter, examples):
    """The classification loss (docs/design.md, "Losses"), differentiable in adapter.buffer (torch path)."""
    buf = adapter.buffer
    for s in adapter.slots.values():  # fresh views that track buf's autograd history
        s.a = buf[s.a_offset:s.a_offset + s.a.numel()].view(s.a.shape)
        s.b = buf[s.b_offset:s.b_offset + s.b.numel()].view(s.b.shape)
    batch = model.build_batch(examples, [Copy()], adapters=[adapter])
    model._pool = None  # the pool is written in place; a fresh one keeps the graph clean
    ctx = model.prepare(batch.inputs)
    ro = batch.readout
    x = model.forward(batch.inputs.input_ids, batch.inputs.positions, ctx)[ro.rows]
    lp = model.head(x).log_softmax(-1)[ro.req_row, ro.req_target]
    counts = torch.bincount(ro.req_group, minlength=ro.num_groups)
    scores = torch.stack([t.mean() for t in torch.split(lp, counts.tolist())])
    loss, g = 0.0, 0
    for ex in examples:
        s = scores[g:g + len(ex.candidates)]
        loss = loss + torch.logsumexp(s, 0) - s[ex.label]
        g += len(ex.candidates)
    return loss / len(examples)


def test_zo_estimate_matches_autograd(model):
    ex = cls_examples(4, seed=3)
    lora = LoRAConfig(r=1, alpha=2, target_modules=("v_proj",), layers=(2,), seed=0)
    tr = MeZOTrainer(model, lora, MeZOConfig(lr=0.0, eps=1e-3, num_perturbations=64, seed=5))
    nonzero_b(tr, 0.3)
    adapter = tr.adapter
    buf = adapter.buffer.clone()
    adapter.buffer.requires_grad_(True)
    with torch.enable_grad():
        autograd_loss(model, adapter, ex).backward()
    grad = adapter.buffer.grad.clone()
    adapter.buffer.requires_grad_(False)
    adapter.buffer.grad = None
    tr2 = MeZOTrainer(model, tr.adapter.clone(), tr.config)
    tr2.adapter.buffer.copy_(buf)
    est, n = torch.zeros_like(grad), 0
    for _ in range(16):  # lr = 0: theta stays put, every estimate is at the same point
        res = tr2.step(ex)
        for i, g in enumerate(res.projected_grads):
            est += g * gaussian(tr2.seeds(res.step)[i], grad.numel())
            n += 1
    est /= n
    d = grad.numel()
    cos = torch.nn.functional.cosine_similarity(est, grad, dim=0).item()
    # E[cos] ~ sqrt(n / (n + d)) for an unbiased estimate: 1024 samples, d = 64 -> ~0.97
    assert d == 64 and n == 1024
    assert cos > 0.9, cos
    assert abs(est.norm().item() / grad.norm().item() - 1) < 0.15


def test_update_is_minus_lr_g_z(model):
    ex = cls_examples(4)
    tr = MeZOTrainer(model, LoRAConfig(r=2, seed=1), MeZOConfig(lr=1e-2, eps=1e-3, seed=11))
    nonzero_b(tr)
    before = tr.adapter.buffer.clone()
    res = tr.step(ex)
    z = torch.cat([v.flatten() for v in tr.perturbation(0).values()])
    expected = before - 1e-2 * res.projected_grads[0] * z
    torch.testing.assert_close(tr.adapter.buffer, expected, rtol=0, atol=1e-7)
    assert res.loss == pytest.approx((res.loss_plus[0] + res.loss_minus[0]) / 2)
    assert res.projected_grads[0] == pytest.approx((res.loss_plus[0] - res.loss_minus[0]) / 2e-3)


def test_perturbation_names_match_saved_adapter(model, tmp_path):
    tr = MeZOTrainer(model, LoRAConfig(r=2, target_modules=("q_proj", "fc1")), MeZOConfig(lr=1e-3, eps=1e-3))
    z = tr.perturbation(3, 0)
    tr.adapter.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert set(z) == set(saved)
    assert all(z[k].shape == saved[k].shape for k in z)
    seed = perturbation_seed(0, 3, 0)
    flat = gaussian(seed, tr.adapter.num_parameters)
    assert torch.equal(torch.cat([z[k].flatten() for k in tr.adapter.named_tensors()]), flat)
    assert not torch.equal(tr.perturbation(3, 0)["base_model.model.model.decoder.layers.0.fc1.lora_A.weight"],
                           tr.perturbation(4, 0)["base_model.model.model.decoder.layers.0.fc1.lora_A.weight"])


def test_seeds_are_a_pure_function():
    s = {perturbation_seed(0, t, i) for t in range(50) for i in range(4)}
    assert len(s) == 200 and all(0 <= x < 2**63 for x in s)
    assert perturbation_seed(7, 3, 1) == perturbation_seed(7, 3, 1) != perturbation_seed(8, 3, 1)


@pytest.mark.parametrize("q", [1, 3])
def test_reproducible_and_resume_bit_identical(model, tmp_path, q):
    ex = cls_examples(8, seed=2)
    cfg = MeZOConfig(lr=5e-2, eps=1e-3, num_perturbations=q, seed=3, weight_decay=0.01,
                     lr_schedule="cosine", total_steps=6, warmup_steps=1)
    a = MeZOTrainer(model, LoRAConfig(r=2, seed=4), cfg)
    b = MeZOTrainer(model, LoRAConfig(r=2, seed=4), cfg)
    ra = [a.step(ex[:4]) for _ in range(3)]
    rb = [b.step(ex[:4]) for _ in range(3)]
    assert torch.equal(a.adapter.buffer, b.adapter.buffer)
    assert [r.loss_plus for r in ra] == [r.loss_plus for r in rb]
    a.save(tmp_path / "ck")
    for _ in range(3):
        a.step(ex[4:])
    c = MeZOTrainer.resume(tmp_path / "ck", model)
    # the trainer's config holds the batch-invariant mode it took (cfg leaves it to the process)
    assert c.step_count == 3 and c.config == a.config and a.config.batch_invariant is not None
    for _ in range(3):
        c.step(ex[4:])
    assert torch.equal(a.adapter.buffer, c.adapter.buffer)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    tr.step(cls_examples(2))
    path = tmp_path / "ck"
    tr.save(path)
    good = tr.adapter.buffer.clone()
    tr.step(cls_examples(2, seed=9))
    real_rename = os.rename
    calls = []

    def crash_on_swap(src, dst):
        calls.append((src, dst))
        if str(src).endswith(".tmp"):
            raise OSError("simulated crash between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_swap)
    with pytest.raises(OSError):
        tr.save(path)
    monkeypatch.setattr(os, "rename", real_rename)
    back = MeZOTrainer.resume(path, model)  # finds ck.old
    assert back.step_count == 1
    assert torch.equal(back.adapter.buffer, good)
    # a crash while writing the temporary directory leaves the checkpoint itself untouched
    tr.save(path)
    monkeypatch.setattr(flashzo.engine.lora.LoRAAdapter, "save_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    tr.step(cls_examples(2, seed=1))
    with pytest.raises(OSError):
        tr.save(path)
    assert MeZOTrainer.resume(path, model).step_count == 2


def test_run_info_is_saved_and_resumed(model, tmp_path):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    assert "run_info" not in tr.state_dict()
    tr.run_info = {"options": {"batch_size": 3}, "data": ["x"]}
    tr.save(tmp_path / "ck")
    back = MeZOTrainer.resume(tmp_path / "ck", model)
    assert back.run_info == tr.run_info
    assert back.state_dict()["run_info"] == tr.run_info


def _edited_checkpoint(model, path, edit):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    tr.step(cls_examples(2))
    tr.save(path)
    state_file = os.path.join(path, "trainer_state.json")
    with open(state_file) as f:
        state = json.load(f)
    text = edit(state)
    with open(state_file, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(state))
    return state_file


def _drop(key, where=None):
    def edit(state):
        (state if where is None else state[where]).pop(key)
    return edit


def _set(key, value, where=None):
    def edit(state):
        (state if where is None else state[where])[key] = value
    return edit


@pytest.mark.parametrize("edit,needle", [
    (lambda s: json.dumps(s)[:40], "cannot be read as JSON"),
    (lambda s: "[1, 2]", "not an object"),
    (_drop("step"), "no step"),
    (_drop("mezo_config"), "no mezo_config"),
    (_set("step", "3"), 'step must be an integer >= 0, got "3"'),
    (_set("step", 2.0), "step must be an integer >= 0, got 2.0"),
    (_set("step", -5), "step must be an integer >= 0, got -5"),
    (_set("step", True), "step must be an integer >= 0, got true"),
    (_set("nonfinite_total", -1), "nonfinite_total must be an integer >= 0"),
    (_set("learning_rate", 1e-3), "unknown key learning_rate"),
    (_set("momentum", 0.9, "mezo_config"), "mezo_config has unknown key momentum"),
    (_drop("lr", "mezo_config"), "mezo_config: .*lr"),
    (_set("lr", "fast", "mezo_config"), "mezo_config: lr must be a number"),
    (_set("num_perturbations", 1.5, "mezo_config"), "mezo_config: num_perturbations must be an integer"),
    (_set("mezo_config", [1], None), "mezo_config must be an object"),
    (_set("r", 0, "lora_config"), "lora_config: r must be an integer"),
    (_set("r", 4, "lora_config"), "disagrees with trainer_state.json's lora_config"),
    (_set("run_info", "yes"), "run_info must be an object"),
])
def test_edited_checkpoints_are_refused_by_name(model, tmp_path, edit, needle):
    state_file = _edited_checkpoint(model, tmp_path / "ck", edit)
    with pytest.raises(flashzo.InputError, match=needle) as info:
        MeZOTrainer.resume(tmp_path / "ck", model)
    if "disagrees" not in needle:
        assert state_file in str(info.value)


def test_adapter_config_without_rank_is_refused(model, tmp_path):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    tr.save(tmp_path / "ck")
    cfg = tmp_path / "ck" / "adapter_config.json"
    d = json.loads(cfg.read_text())
    del d["r"]
    cfg.write_text(json.dumps(d))
    with pytest.raises(flashzo.InputError, match=r"adapter_config.json: no 'r' \(the LoRA rank\)"):
        MeZOTrainer.resume(tmp_path / "ck", model)


def test_nonfinite_loss_skips_and_stops(model, monkeypatch):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3, max_nonfinite_steps=3))
    ex = cls_examples(2)
    tr.step(ex)
    before = tr.adapter.buffer.clone()
    real = OPTModel.score
    monkeypatch.setattr(OPTModel, "score", lambda self, batch, **k: real(self, batch, **k) * float("nan"))
    r1, r2 = tr.step(ex), tr.step(ex)
    assert r1.skipped and r2.skipped and math.isnan(r1.loss)
    assert torch.equal(tr.adapter.buffer, before)
    assert tr.counters.nonfinite_total == 2
    with pytest.raises(flashzo.NonFiniteLossError, match="3 consecutive"):
        tr.step(ex)
    assert torch.isfinite(tr.adapter.buffer).all()
    monkeypatch.setattr(OPTModel, "score", real)
    tr.counters.nonfinite_consecutive = 0
    assert not tr.step(ex).skipped


def test_overflowing_update_is_undone(model):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e38, eps=1e-3))
    nonzero_b(tr)
    before = tr.adapter.buffer.clone()
    res = tr.step(cls_examples(2))
    assert res.skipped and torch.equal(tr.adapter.buffer, before)


def test_step_together_equals_separate_runs(model):
    jobs = [
        (LoRAConfig(r=2, seed=1), MeZOConfig(lr=2e-2, eps=1e-3, seed=1), cls_examples(4, seed=1)),
        (LoRAConfig(r=2, seed=2), MeZOConfig(lr=5e-2, eps=1e-3, seed=2, num_perturbations=2), cls_examples(3, seed=2)),
        (LoRAConfig(r=2, seed=3), MeZOConfig(lr=1e-2, eps=1e-3, seed=3), cls_examples(5, seed=3, n_cand=4)),
    ]
    alone = [MeZOTrainer(model, lc, mc) for lc, mc, _ in jobs]
    together = [MeZOTrainer(model, lc, mc) for lc, mc, _ in jobs]
    for t in (alone + together):
        nonzero_b(t)
    init = [t.adapter.buffer.clone() for t in alone]
    for _ in range(3):
        ra = [t.step(b) for t, (_, _, b) in zip(alone, jobs)]
        rt = flashzo.step_together(together, [b for _, _, b in jobs])
        for x, y in zip(ra, rt):
            assert x.loss_plus == pytest.approx(y.loss_plus, rel=1e-5, abs=1e-6)
            assert x.projected_grads == pytest.approx(y.projected_grads, rel=1e-3, abs=1e-3)
    # The rows of a bigger batch are not rounded exactly as alone (BLAS blocking); g = dL / 2eps
    # amplifies that fp32 noise, so the trajectories agree to ~1e-4 of the distance travelled.
    for x, y, x0 in zip(alone, together, init):
        moved = (x.adapter.buffer - x0).norm()
        assert moved > 0
        assert (x.adapter.buffer - y.adapter.buffer).norm() / moved < 1e-3


def test_step_together_refuses_mismatched_jobs(model):
    a = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    b = MeZOTrainer(model, LoRAConfig(r=4), MeZOConfig(lr=1e-2, eps=1e-3))
    c = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-2))
    with pytest.raises(ValueError, match="structure"):
        flashzo.step_together([a, b], [cls_examples(2), cls_examples(2)])
    with pytest.raises(ValueError, match="eps"):
        flashzo.step_together([a, c], [cls_examples(2), cls_examples(2)])
    # one forward has one layout: a job that shares nothing is not stepped under another's sharing
    d = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3, sharing="none"))
    with pytest.raises(flashzo.InputError, match="trainer 1 has sharing='none', trainer 0 has 'all'"):
        flashzo.step_together([a, d], [cls_examples(2), cls_examples(2)])
    assert a.step_count == d.step_count == 0


def test_lm_loss_is_token_weighted(model):
    ex = lm_examples(4)
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=0.0, eps=1e-3))
    res = tr.evaluate(ex)
    lps = model.token_logprobs([e.prompt + e.target for e in ex], adapter=tr.adapter)
    nll = torch.cat([-lp[len(e.prompt) - 1:] for lp, e in zip(lps, ex)])
    assert res["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert "accuracy" not in res
    assert res["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert math.isfinite(tr.step(ex).loss)


def test_evaluate_classification(model):
    ex = cls_examples(5, n_cand=3)
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=0.0, eps=1e-3))
    res = tr.evaluate(ex, batch_size=2)
    lps = model.token_logprobs([e.prompt + c for e in ex for c in e.candidates], adapter=tr.adapter)
    k, loss, correct = 0, 0.0, 0
    for e in ex:
        s = torch.stack([lps[k + j][len(e.prompt) - 1:].double().mean() for j in range(3)])
        k += 3
        loss += float(torch.logsumexp(s, 0) - s[e.label])
        correct += int(int(s.argmax()) == e.label)
    assert res["loss"] == pytest.approx(loss / 5, rel=1e-5)
    assert res["accuracy"] == correct / 5


def test_lr_schedules():
    c = MeZOConfig(lr=1.0, eps=1e-3, lr_schedule="linear", total_steps=10, warmup_steps=2)
    assert [round(c.lr_at(t), 6) for t in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    c = MeZOConfig(lr=1.0, eps=1e-3, lr_schedule="cosine", total_steps=4)
    assert [round(c.lr_at(t), 6) for t in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    assert MeZOConfig(lr=0.3, eps=1e-3).lr_at(1000) == 0.3


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=1e-3, eps=0.0), "eps"),
    (dict(lr=1e-3, eps=-1.0), "eps"),
    (dict(lr=-1e-3, eps=1e-3), "lr"),
    (dict(lr=1e-3, eps=1e-3, num_perturbations=0), "num_perturbations"),
    (dict(lr=1e-3, eps=1e-3, lr_schedule="step"), "lr_schedule"),
    (dict(lr=1e-3, eps=1e-3, lr_schedule="cosine"), "total_steps"),
    (dict(lr=1e-3, eps=1e-3, weight_decay=-1), "weight_decay"),
    (dict(lr="1e-3", eps=1e-3), "lr must be a number"),
    (dict(lr=1e-3, eps=1e-3, seed=1.0), "seed must be an integer"),
    (dict(lr=1e-3, eps=1e-3, lr_schedule="linear", total_steps=True), "total_steps must be an integer"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeZOConfig(**kwargs)


BAD_BATCHES = [
    (lambda: [], "empty"),
    (lambda: [Example(prompt=[5, 6], candidates=[[7], [8]], label=2)], "label 2 is out of range"),
    (lambda: [Example(prompt=[5, 6], candidates=[[7], [8]], label=None)], "label"),
    (lambda: [Example(prompt=[5, 6], candidates=[[7], []], label=0)], "candidate 1 is empty"),
    (lambda: [Example(prompt=[5, 6], target=[])], "empty target"),
    (lambda: [Example(prompt=[], target=[5])], "prompt is empty|empty prompt"),
    (lambda: [Example(prompt=[5, 96], target=[5])], "token id 96"),
    (lambda: [Example(prompt=[5, -1], target=[5])], "token id -1"),
    (lambda: [Example(prompt=[5] * 60, target=[5] * 5)], "positions"),
    (lambda: [Example(prompt=[5], target=[6]), Example(prompt=[5], candidates=[[1], [2]], label=0)], "mixes"),
    (lambda: [Example(prompt=[5], candidates=[[1]], label=0)], "candidates"),
]


@pytest.mark.parametrize("make,match", BAD_BATCHES)
def test_bad_batches_are_refused_before_work(model, make, match, monkeypatch):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    monkeypatch.setattr(OPTModel, "score", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=match):  # refused when the Example is built, or by step()
        tr.step(make())
    assert tr.step_count == 0


def test_trainer_continues_from_adapter(model):
    tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-3))
    tr.step(cls_examples(2))
    tr2 = MeZOTrainer(model, tr.adapter, MeZOConfig(lr=1e-2, eps=1e-3))
    assert torch.equal(tr2.adapter.buffer, tr.adapter.buffer)
    with pytest.raises(ValueError, match="lora"):
        MeZOTrainer(model, "q_proj", MeZOConfig(lr=1e-2, eps=1e-3))
