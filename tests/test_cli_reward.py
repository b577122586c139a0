"""`flashzo train --objective reward` and `flashzo eval --reward` on a tiny checkpoint written by transformers.

A reward run reads `{"prompt", "answer"}` lines, logs and plots the mean reward, records its reward
settings in the checkpoint (a resumed run refuses to change them, and continues bit-identically),
and `flashzo eval --reward` writes every generation with its reward. Bad input is one line, exit 2,
before any training: naming FILE:LINE, or the reward callable.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_opt_with_words

from flashzo.cli import main
from flashzo.data import write_jsonl

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random OPT saved by transformers (64 positions), with a word-level tokenizer beside it."""
    pytest.importorskip("transformers")
    return tiny_opt_with_words(str(tmp_path_factory.mktemp("tiny-opt")))


def reward_data(tmp_path, name="reward.jsonl", n=12):
    """Text prompts and token-id prompts, answers a word or a list of words."""
    words = ["great", "terrible", "good", "bad"]
    recs = [{"prompt": f"the {w} movie It was", "answer": words[i % 4] if i % 3 else [words[i % 4], "good"]}
            for i, w in enumerate(["plot", "movie", "a"] * (n // 3))]
    recs[1] = {"prompt": [2, 10, 9, 3, 4], "answer": "great"}
    path = tmp_path / name
    write_jsonl(path, recs)
    return str(path)


def train(checkpoint, out, data, *flags):
    return main(["train", "--model", checkpoint, "--train", data, "--out", str(out), "--objective", "reward",
                 "--reward", "label_word", "--steps", "4", "--batch-size", "4", "--lr", "0.05", "--eps", "0.5",
                 "--num-perturbations", "2", "--max-tokens", "3", "--no-progress", *flags])


def adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "checkpoint", "adapter_model.safetensors"))


def test_train_on_a_reward_logs_plots_and_records_it(checkpoint, tmp_path, capsys):
    data = reward_data(tmp_path)
    held = reward_data(tmp_path, "held.jsonl", n=6)
    out = tmp_path / "run"
    assert train(checkpoint, out, data, "--eval", held, "--eval-every", "2", "--keep-best", "reward") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    for r in log:
        assert len(r["rewards_plus"]) == len(r["rewards_minus"]) == 2 and 0 <= r["reward"] <= 1
        assert r["reward"] == pytest.approx((sum(r["rewards_plus"]) + sum(r["rewards_minus"])) / 4)
        assert r["loss"] == pytest.approx(-r["reward"]) and 0 <= r["signal"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["reward"] == [r["reward"] for r in log]
    assert [e["step"] for e in metrics["history"]["eval"]] == [0, 2, 4]
    assert all(set(e) == {"step", "reward", "num_examples"} for e in metrics["history"]["eval"])  # no generations
    assert metrics["eval_after"]["num_examples"] == 6 and (out / "curve.png").stat().st_size > 0
    assert (out / "best" / "adapter_model.safetensors").exists()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    opts = state["run_info"]["options"]
    assert (opts["objective"], opts["reward"], opts["estimator"], opts["max_tokens"]) == ("reward", "label_word",
                                                                                          "es", 3)
    assert state["mezo_config"]["reward"]["stop_tokens"] == [2]  # the tokenizer's end-of-text token
    assert state["run_info"]["best"]["metric"] == "reward"
    out_text = capsys.readouterr().out
    summary = json.loads(out_text[out_text.rindex("\n{") + 1:])
    assert "eval at step 2: reward=" in out_text
    assert summary["eval_after"]["reward"] == metrics["eval_after"]["reward"]


def test_resume_of_a_reward_run_is_bit_identical_and_keeps_its_reward(checkpoint, tmp_path, capsys):
    data = reward_data(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(checkpoint, full, data, "--estimator", "mezo") == 0
    assert train(checkpoint, part, data, "--estimator", "mezo", "--steps", "2") == 0
    for flags, needle in ((["--reward", "f1"], "--reward f1 (the run's: label_word)"),
                          (["--max-tokens", "2"], "--max-tokens 2 (the run's: 3)"),
                          (["--estimator", "es"], "--estimator es (the run's: mezo)"),
                          (["--stop-newline"], "--stop-newline True (the run's: False)"),
                          (["--objective", "loss"], "reward 'label_word' is for the reward objective")):
        capsys.readouterr()
        assert main(["train", "--out", str(part), "--resume", "--steps", "4", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", "--out", str(part), "--resume", "--steps", "4", "--no-progress"]) == 0
    a, b = adapter(full), adapter(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # the run moved the adapter
    la = (full / "log.jsonl").read_text().splitlines()
    lb = (part / "log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "time")} for x in lines]
    assert strip(la) == strip(lb)


def test_eval_reports_the_reward_and_writes_the_generations(checkpoint, tmp_path, capsys):
    data = reward_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, data, "--steps", "2") == 0
    preds = tmp_path / "preds.jsonl"
    capsys.readouterr()
    assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", data, "--reward",
                 "label_word", "--max-tokens", "3", "--predictions", str(preds), "--batch-size", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [r["line"] for r in lines] == list(range(1, 13)) and res["num_examples"] == 12
    assert res["reward"] == pytest.approx(sum(r["reward"] for r in lines) / 12)
    from flashzo.engine.rewards import label_word

    source = [json.loads(x) for x in open(data)]
    for r, rec in zip(lines, source):
        assert r["answer"] == rec["answer"] and 1 <= len(r["tokens"]) <= 3
        assert r["reward"] == label_word(None, r["completion"], r["answer"])
        assert r["finish_reason"] in ("stop", "length")
    # the same generations with --batch-size 32 (greedy: the batch does not change them)
    preds2 = tmp_path / "preds2.jsonl"
    assert main(["eval", "--model", checkpoint, "--adapter", str(out / "adapter"), "--data", data, "--reward",
                 "label_word", "--max-tokens", "3", "--predictions", str(preds2)]) == 0
    assert [json.loads(x)["tokens"] for x in preds2.read_text().splitlines()] == [r["tokens"] for r in lines]
    # never over an input, never over an existing file without --overwrite
    capsys.readouterr()
    assert main(["eval", "--model", checkpoint, "--data", data, "--reward", "label_word",
                 "--predictions", data]) == 2
    assert "--predictions" in capsys.readouterr().err
    assert main(["eval", "--model", checkpoint, "--data", data, "--reward", "label_word",
                 "--predictions", str(preds)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["eval", "--model", checkpoint, "--data", data, "--max-tokens", "3"]) == 2
    assert "--max-tokens is for a reward's evaluation (--reward NAME)" in capsys.readouterr().err


def _bad(tmp_path, name, recs):
    path = tmp_path / name
    with open(path, "w") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.mark.parametrize("lines, flags, needle", [
    ([{"prompt": "the movie", "answer": "great"}, {"prompt": "a plot"}], [],
     "{data}:2: has no 'answer', and the reward label_word compares the completion with one"),
    ([{"prompt": "the movie", "answer": "great"}, {"prompt": "   ", "answer": "bad"}], [],
     "{data}:2: its prompt is empty"),
    ([{"prompt": [], "answer": "great"}], [], "{data}:1: its prompt is empty"),
    ([{"prompt": "the movie", "answer": "great"}], ["--max-tokens", "63"],
     "{data}:1: its prompt (2 tokens) + max_tokens 63 is more than the model's 64"),
    ([{"prompt": "the movie", "answer": 3}], [], "{data}:1: its answer 3 is a int; the label_word reward compares"),
    ([{"prompt": "the movie", "answer": "x"}], ["--reward", "numeric"], "{data}:1: its answer 'x' is not a number"),
    ([{"prompt": "the movie", "answer": "great"}], ["--reward", "no_such_module_here:fn"],
     "--reward 'no_such_module_here:fn': module 'no_such_module_here' does not import"),
    ([{"prompt": "the movie", "answer": "great"}], ["--reward", "reward_funcs:not_there"],
     "--reward 'reward_funcs:not_there': 'reward_funcs' has no 'not_there'"),
    ([{"prompt": "the movie", "answer": "great"}], ["--reward", "reward_funcs:MARKER"],
     "--reward 'reward_funcs:MARKER' is a int, not a callable"),
    ([{"prompt": "the movie", "answer": "great"}], ["--reward", "reward_funcs:always_text"],
     "reward reward_funcs:always_text, called on {data}:1 with its reference as the completion: "),
    ([{"prompt": "the movie", "answer": "great"}] * 3, ["--max-tokens", "64"],
     "max_tokens 64 leaves no room for a prompt in the model's 64"),
    ([{"prompt": "the movie", "answer": "great"}], ["--reward", "nope"],
     "--reward 'nope' is neither a built-in"),
])
def test_bad_reward_input_is_one_line(checkpoint, tmp_path, lines, flags, needle):
    """Run as a user runs it (a process, the tests' folder on PYTHONPATH for module:function rewards)."""
    data = _bad(tmp_path, "bad.jsonl", lines)
    argv = ["train", "--model", checkpoint, "--train", data, "--out", str(tmp_path / "run"), "--objective", "reward",
            "--reward", "label_word", "--steps", "1", "--batch-size", "1", "--no-progress", *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "flashzo", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle.format(data=data) in err, err
    assert not (tmp_path / "run").exists()  # refused before the run's folder is made: a rerun is not blocked


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "m", "--train", "t.jsonl", "--out", "o", "--max-tokens", "4"],
     "--max-tokens 4 is for the reward objective (--objective reward)"),
    (["train", "--model", "m", "--train", "t.jsonl", "--out", "o", "--reward", "f1"],
     "--reward 'f1' is for the reward objective (--objective reward)"),
    (["train", "--model", "m", "--train", "t.jsonl", "--out", "o", "--objective", "reward"],
     "--reward must name the reward of the reward objective"),
    (["train", "--model", "m", "--train", "t.jsonl", "--out", "o", "--objective", "reward", "--reward", "f1",
      "--keep-best", "loss"], "a reward run's evals have a reward (keep_best reward)"),
    (["train", "--model", "m", "--train", "t.jsonl", "--out", "o", "--objective", "reward", "--reward", "f1",
      "--estimator", "mezo", "--shaping", "centered_ranks"], "--shaping 'centered_ranks' is for the 'es' estimator"),
    (["demo", "--reward", "--tiny"], "--reward and --tiny"),
    (["demo", "--estimator", "mezo"], "--estimator is for the reward demo (--reward)"),
])
def test_reward_flags_are_checked_before_loading(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "m").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_a_reward_module_beside_the_user_imports_as_the_installed_command_runs(checkpoint, tmp_path):
    """The installed `flashzo` script starts with its bin/ folder on sys.path, not the current directory:
    flashzo.cli.main then still imports `--reward mymodule:fn` from the current directory."""
    (tmp_path / "beside_me.py").write_text("def one(prompt, completion, answer):\n    return 1.0\n")
    data = reward_data(tmp_path)
    script = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.', sys.argv[1])]; "
              "from flashzo.cli import main; sys.exit(main(sys.argv[2:]))")
    argv = ["train", "--model", checkpoint, "--train", data, "--out", str(tmp_path / "run"), "--objective", "reward",
            "--reward", "beside_me:one", "--steps", "1", "--batch-size", "2", "--num-perturbations", "1",
            "--max-tokens", "2", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), *argv], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in log] == [1.0]


def test_a_run_whose_every_step_was_skipped_fails_and_says_why(checkpoint, tmp_path, monkeypatch, capsys):
    """A reward that fails on every generation (but not on the reference): each step is skipped and its
    log line names the failed calls; the run ends with an error, exit 1."""
    monkeypatch.syspath_prepend(TESTS)
    data = reward_data(tmp_path)
    out = tmp_path / "run"
    assert train(checkpoint, out, data, "--reward", "reward_funcs:raise_unless_reference", "--steps", "2") == 1
    captured = capsys.readouterr()
    assert "flashzo train: error: every step skipped (a reward call failed" in captured.err, captured.err
    assert json.loads(captured.out[captured.out.index("\n{") + 1:])["nonfinite_steps"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [True, True]
    assert all(r["reward_problems"] and "raised: ValueError: not the reference" in r["reward_problems"][0]
               for r in log), log
