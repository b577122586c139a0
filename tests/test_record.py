"""A run's record (src/flashzo/record.py): fingerprints, and what --resume may change."""

import os
import shutil

import pytest

from flashzo.errors import InputError
from flashzo.record import RunRecord, file_fingerprint, model_fingerprint, plan_resume
from flashzo.run import RunOptions


@pytest.fixture
def run(tmp_path):
    """A record of a 40-step linear-schedule run, with its model directory and data files."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "opt", "hidden_size": 32, "transformers_version": "5.0"}')
    (model / "model.safetensors").write_bytes(os.urandom(3 << 20))
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"prompt": [1], "target": [2]}\n')
    held_out.write_text('{"prompt": [1], "target": [3]}\n')
    opts = RunOptions(steps=40, lr=1e-3, lr_schedule="linear", batch_size=4, seed=3, lora_r=4)
    record = RunRecord("train", opts, {"path": str(model), "fingerprint": model_fingerprint(str(model))},
                       "float32", file_fingerprint(str(train)), file_fingerprint(str(held_out)))
    return record, model, train, held_out


def test_fingerprints_follow_content_not_place(tmp_path, run):
    record, model, train, _ = run
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    (moved / "config.json").write_text('{"model_type": "opt", "hidden_size": 32, "transformers_version": "6.1"}')
    assert model_fingerprint(str(moved)) == record.model["fingerprint"]  # a re-save's version stamp is not content
    (moved / "config.json").write_text('{"model_type": "opt", "hidden_size": 64}')
    assert model_fingerprint(str(moved)) != record.model["fingerprint"]
    shutil.copy(model / "config.json", moved / "config.json")
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[-5] ^= 1  # one bit near the end of the weights
    (moved / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(str(moved)) != record.model["fingerprint"]
    assert file_fingerprint(str(train))["sha256"] == record.train["sha256"]


def test_resume_takes_the_runs_values_and_allows_the_resumable_flags(run, tmp_path):
    record, model, train, held_out = run
    plan = plan_resume(record, {}, step=10, out="OUT")
    assert plan.options == record.options and plan.model == str(model) and plan.train == str(train)
    assert plan.eval == str(held_out) and plan.dtype == "float32" and plan.notes == []
    # the same values, spelled otherwise, are no difference; --steps and the eval/save cadence may change
    moved = tmp_path / "copy.jsonl"
    shutil.copy(train, moved)
    given = dict(lr=0.001, lora_alpha=8.0, target_modules="q_proj, v_proj", steps=80, eval_every=5, save_every=7,
                 eval_batch_size=3, train=str(moved), model=str(model), dtype="float32", threads=1, device="cpu")
    plan = plan_resume(record, given, step=40, out="OUT")
    assert (plan.options.steps, plan.options.eval_every, plan.options.save_every, plan.options.eval_batch_size) == \
        (80, 5, 7, 3)
    assert plan.options.replace(steps=40, eval_every=0, save_every=0, eval_batch_size=32) == record.options
    assert plan.train == str(moved)
    # a decaying schedule is re-planned over the new --steps, and the launch says so
    assert len(plan.notes) == 1 and "re-plans the linear schedule of 40 steps over 80" in plan.notes[0]
    assert "step 40 continues at lr 0.0005 (the run's schedule had 0)" in plan.notes[0]


def test_every_difference_is_listed_at_once(run, tmp_path):
    record, model, train, held_out = run
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": [1], "target": [9]}\n')
    given = dict(lr=1e-2, eps=1e-2, seed=4, lora_r=8, target_modules="q_proj", batch_size=8, template="sst2",
                 dtype="bfloat16", train=str(other), steps=20)
    with pytest.raises(InputError) as info:
        plan_resume(record, given, step=30, out="OUT")
    msg = str(info.value)
    for needle in ("--lr 0.01 (the run's: 0.001)", "--eps 0.01 (the run's: 0.001)", "--seed 4 (the run's: 3)",
                   "--lora-r 8 (the run's: 4)",
                   "--target-modules q_proj (the run's: q_proj,v_proj)", "--batch-size 8 (the run's: 4)",
                   "--template sst2 (the run's: none)", "--dtype bfloat16 (the run's: float32)",
                   f"--train {other} is not the run's train data {train}",
                   "--steps 20 is below the checkpoint's step 30", "only --steps, --eval-every, --save-every"):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg and "--lora-alpha" not in msg  # what follows from a given flag is not listed again


def test_changed_files_and_a_missing_model(run):
    record, model, train, held_out = run
    train.write_text('{"prompt": [1], "target": [5]}\n')
    held_out.write_text('{"prompt": [1], "target": [5]}\n')
    (model / "config.json").write_text('{"model_type": "opt", "hidden_size": 48}')
    with pytest.raises(InputError) as info:
        plan_resume(record, {}, step=1, out="OUT")
    for needle in (f"the run's model {model} has changed", f"the run's --train file {train} has changed",
                   f"the run's --eval file {held_out} has changed"):
        assert needle in str(info.value)
    shutil.rmtree(model)
    with pytest.raises(InputError, match="the run's model .* is missing; give its new place with --model"):
        plan_resume(record, {}, step=1, out="OUT")


def test_no_eval_file_cannot_gain_one(run):
    record, model, train, held_out = run
    record.eval = None
    with pytest.raises(InputError, match="the run has no eval file"):
        plan_resume(record, {"eval": str(held_out)}, step=1, out="OUT")


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("options"), "options must be an object"),
    (lambda d: d["options"].update(lr=-1.0), "lr and weight_decay must be >= 0"),
    (lambda d: d["options"].update(momentum=0.9), "unknown option momentum"),
    (lambda d: d.update(command="serve"), "command must be"),
    (lambda d: d.update(train={"path": "x"}), "run_info.train must be an object with path, sha256"),
    (lambda d: d.update(best={"step": 1, "metric": "f1", "value": 0.5}), "run_info.best is malformed"),
    (lambda d: d.update(colour="red"), "unknown key colour"),
])
def test_malformed_records_are_refused(run, edit, needle):
    d = run[0].to_dict()
    edit(d)
    with pytest.raises(InputError, match=needle):
        RunRecord.from_dict(d, where="ck/trainer_state.json")
    assert RunRecord.from_dict(run[0].to_dict(), where="x").to_dict() == run[0].to_dict()
    with pytest.raises(InputError, match="no run record"):
        RunRecord.from_dict(None, where="x")
