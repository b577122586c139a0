"""The training loop (src/flashzo/loop.py): its schedule, the per-step log, metrics across resumes, signals,
keep_best."""

import json
import signal

import pytest
import torch

from flashzo import Example, LoRAConfig, MeZOConfig, MeZOTrainer, NonFiniteLossError, OPTConfig, OPTModel
from flashzo.errors import InputError
from flashzo.loop import RunSchedule, clear_run, describe_run, fit, run_files

CFG = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                max_position_embeddings=32)
LOG_KEYS = {"step", "loss", "loss_plus", "loss_minus", "projected_grads", "lr", "tokens", "skipped", "seconds",
            "time"}


@pytest.fixture(scope="module")
def model():
    return OPTModel.from_config(CFG, seed=0)


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(prompt=torch.randint(3, 64, (4,), generator=g).tolist(), candidates=[[5], [6]],
                    label=int(torch.randint(0, 2, (1,), generator=g))) for _ in range(n)]


TRAIN, HELD_OUT = examples(12), examples(6, seed=1)


def trainer(model, **kw):
    return MeZOTrainer(model, LoRAConfig(r=2, seed=1), MeZOConfig(lr=0.5, eps=1e-2, seed=2, **kw))


def run(model, out, steps, tr=None, **kw):
    tr = tr or trainer(model)
    res = fit(tr, TRAIN, HELD_OUT, steps=steps, batch_size=4, out_dir=str(out), progress=False, log=lambda m: None,
              **kw)
    return tr, res


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_log_has_one_line_per_step(model, tmp_path):
    tr, res = run(model, tmp_path, 3)
    lines = log_lines(tmp_path)
    assert [r["step"] for r in lines] == [0, 1, 2] and set(lines[0]) == LOG_KEYS
    assert [r["loss"] for r in lines] == res["history"]["loss"]
    assert lines[0]["tokens"] > 0 and lines[0]["lr"] == 0.5 and len(lines[0]["projected_grads"]) == 1


def test_resume_after_a_crash_continues_the_files_and_the_trajectory(model, tmp_path, monkeypatch):
    ref, ref_res = run(model, tmp_path / "ref", 6, eval_every=2)
    tr = trainer(model)
    real = MeZOTrainer.step

    def crash_at_5(self, batch):
        if self.step_count == 5:
            raise RuntimeError("simulated crash")
        return real(self, batch)

    monkeypatch.setattr(MeZOTrainer, "step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated"):
        run(model, tmp_path / "run", 6, tr=tr, eval_every=2, save_every=2)
    monkeypatch.setattr(MeZOTrainer, "step", real)
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [0, 1, 2, 3, 4]  # written as it went
    back = MeZOTrainer.resume(str(tmp_path / "run" / "checkpoint"), model)
    assert back.step_count == 4
    _, res = run(model, tmp_path / "run", 6, tr=back, eval_every=2)
    assert torch.equal(back.adapter.buffer, ref.adapter.buffer)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"]["step"] == list(range(6)) and [e["step"] for e in metrics["history"]["eval"]] == \
        [0, 2, 4, 6]
    assert metrics["history"]["loss"] == ref_res["history"]["loss"]
    assert metrics["eval_before"] == ref_res["eval_before"] and res["eval_before"] == ref_res["eval_before"]
    assert [r["step"] for r in log_lines(tmp_path / "run")] == list(range(6))
    # extending a finished run: no eval at the resume point, none twice
    _, res = run(model, tmp_path / "run", 8, tr=back, eval_every=2)
    evals = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]["eval"]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8] and res["eval_before"] == ref_res["eval_before"]


def _signal_during_step(monkeypatch, at, times, signum=signal.SIGINT):
    real = MeZOTrainer.step

    def step(self, batch):
        res = real(self, batch)  # the update is applied: a second signal must undo it
        if self.step_count == at + 1:
            for _ in range(times):
                signal.raise_signal(signum)
        return res

    monkeypatch.setattr(MeZOTrainer, "step", step)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_and_saves(model, tmp_path, monkeypatch, signum):
    _signal_during_step(monkeypatch, at=2, times=1, signum=signum)
    previous = signal.getsignal(signum)
    tr, res = run(model, tmp_path, 50)
    assert signal.getsignal(signum) is previous  # fit puts the handlers back
    assert res["interrupted"] == signal.Signals(signum).name and res["step"] == 3 and res["eval_after"] is None
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    for f in ("adapter/adapter_model.safetensors", "metrics.json", "curve.png"):
        assert (tmp_path / f).exists(), f
    assert len(log_lines(tmp_path)) == 3


def test_a_second_signal_abandons_the_step(model, tmp_path, monkeypatch):
    two, _ = run(model, tmp_path / "two", 2)
    _signal_during_step(monkeypatch, at=2, times=2)
    tr, res = run(model, tmp_path / "run", 50)
    assert res["step"] == 2 and tr.step_count == 2
    assert torch.equal(tr.adapter.buffer, two.adapter.buffer)
    back = MeZOTrainer.resume(str(tmp_path / "run" / "checkpoint"), model)
    assert back.step_count == 2 and torch.equal(back.adapter.buffer, two.adapter.buffer)


def test_nonfinite_loss_saves_the_run_then_raises(model, tmp_path, monkeypatch):
    real = OPTModel.score
    calls = []

    def nan_after_two_steps(self, batch, **k):
        calls.append(1)
        out = real(self, batch, **k)
        return out * float("nan") if len(calls) > 3 else out  # 1 eval forward, then 2 good steps

    monkeypatch.setattr(OPTModel, "score", nan_after_two_steps)
    tr = trainer(model, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError):
        run(model, tmp_path, 20, tr=tr)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert "consecutive" in json.loads((tmp_path / "metrics.json").read_text())["error"]


@pytest.mark.parametrize("metric,values,best_step", [("loss", [3.0, 1.0, 1.0, 2.0, 0.5, 0.7], 8),
                                                     ("accuracy", [0.5, 0.5, 0.75, 0.75, 0.6, 0.6], 4)])
def test_keep_best(model, tmp_path, monkeypatch, metric, values, best_step):
    scripted = iter(values)
    monkeypatch.setattr(MeZOTrainer, "evaluate", lambda self, ex, batch_size=32: {
        "loss": next(scripted) if metric == "loss" else 1.0, "accuracy": next(scripted) if metric != "loss" else 0.5,
        "num_examples": len(ex)})
    tr, res = run(model, tmp_path, 4, eval_every=2, keep_best=metric)  # evals at 0, 2, 4
    first_best = 2 if metric == "loss" else 4
    assert res["best"]["step"] == first_best
    assert json.loads((tmp_path / "best" / "trainer_state.json").read_text())["step"] == first_best
    back = MeZOTrainer.resume(str(tmp_path / "checkpoint"), model)
    assert back.run_info["best"]["step"] == first_best  # the checkpoint remembers the best so far
    _, res = run(model, tmp_path, 10, tr=back, eval_every=2, keep_best=metric)  # evals at 6, 8, 10
    assert res["best"] == {"step": best_step, "metric": metric,
                           "value": min(values) if metric == "loss" else max(values)}
    state = json.loads((tmp_path / "best" / "trainer_state.json").read_text())
    assert state["step"] == best_step and (tmp_path / "best" / "adapter_model.safetensors").exists()


def test_bad_arguments(model, tmp_path):
    tr = trainer(model)
    for kw, needle in ((dict(keep_best="f1"), "keep_best"), (dict(eval_batch_size=0), "eval_batch_size"),
                       (dict(steps=-1), "steps")):
        with pytest.raises(InputError, match=needle):
            fit(tr, TRAIN, HELD_OUT, **{"steps": 2, "batch_size": 4, "out_dir": str(tmp_path), **kw})
    with pytest.raises(InputError, match="keep_best needs an eval set"):
        fit(tr, TRAIN, None, steps=2, batch_size=4, out_dir=str(tmp_path), keep_best="loss")
    lm = [Example(prompt=[3], target=[4, 5])]
    with pytest.raises(InputError, match="needs classification"):
        fit(tr, TRAIN, lm, steps=2, batch_size=4, out_dir=str(tmp_path), keep_best="accuracy")
    tr.counters.step = 5
    with pytest.raises(InputError, match="steps 3 is below the trainer's step 5"):
        fit(tr, TRAIN, HELD_OUT, steps=3, batch_size=4, out_dir=str(tmp_path))


def test_out_dir_helpers(model, tmp_path):
    assert describe_run(str(tmp_path)) is None
    (tmp_path / "notes.txt").write_text("mine")
    run(model, tmp_path, 1)
    assert describe_run(str(tmp_path)) == "a run with a checkpoint at step 1"
    clear_run(str(tmp_path))
    assert run_files(str(tmp_path)) == [] and (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "log.jsonl").write_text("")  # killed before its first checkpoint
    assert describe_run(str(tmp_path)) == "the files of a run without a checkpoint (log.jsonl)"


def test_the_run_schedule():
    s = RunSchedule(steps=10, eval_every=4, save_every=3, evaluates=True)
    assert [t for t in range(1, 11) if s.eval_after(t)] == [4, 8]  # never after the last: the end evaluates
    assert [t for t in range(1, 11) if s.save_after(t)] == [3, 6, 9]
    assert s.eval_first(0, evaluated=True) and s.eval_first(5, evaluated=False) and not s.eval_first(5, evaluated=True)
    assert s.eval_at_end(10) and not s.eval_at_end(9) and s.finished(10) and not s.finished(9)
    off = RunSchedule(steps=10, eval_every=4)
    assert not any(off.eval_after(t) or off.save_after(t) for t in range(11)) and not off.eval_first(0, False)


def test_fit_evaluates_and_saves_where_the_schedule_says(model, tmp_path, monkeypatch):
    saved, evaluated = [], []
    real_save, real_eval = MeZOTrainer.save, MeZOTrainer.evaluate
    monkeypatch.setattr(MeZOTrainer, "save", lambda self, path: saved.append(self.step_count) or real_save(self, path))
    monkeypatch.setattr(MeZOTrainer, "evaluate", lambda self, ex, **kw: evaluated.append(self.step_count)
                        or real_eval(self, ex, **kw))
    run(model, tmp_path / "o", 7, eval_every=3, save_every=2)
    s = RunSchedule(7, 3, 2, evaluates=True)
    assert evaluated == [0] + [t for t in range(1, 8) if s.eval_after(t)] + [7] == [0, 3, 6, 7]
    assert saved == [t for t in range(1, 8) if s.save_after(t)] + [7] == [2, 4, 6, 7]
