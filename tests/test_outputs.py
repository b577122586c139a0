"""What the `flashzo` command writes (src/flashzo/outputs.py): never over an input or a file it did not
write, an existing output replaced only with --overwrite and whole or not at all, a full disk in one line.

A full disk is simulated in-process: the writer flashzo calls (safetensors' save_file, a file's write)
raises the error a full disk gives (safetensors' own SafetensorError with the message it writes for
ENOSPC; OSError(ENOSPC)) at a chosen call. The real thing is checked once on a small tmpfs where the
machine allows mounting one (test_a_real_full_disk_keeps_the_checkpoint).
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from flashzo.cli import main
from flashzo.data import write_jsonl
from flashzo.engine import LoRAAdapter, LoRAConfig, load_model
from flashzo.engine.mezo import read_state

RUN = ["--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2", "--lora-r", "2", "--no-progress", "--threads", "1"]
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"  # its real message


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random OPT saved by transformers, with a word-level tokenizer ("w5 w6")."""
    transformers = pytest.importorskip("transformers")
    from helpers import write_word_tokenizer

    path = str(tmp_path_factory.mktemp("opt") / "model")
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    transformers.OPTForCausalLM(cfg).save_pretrained(path)
    write_word_tokenizer(path, 64)
    return path


def ids_data(path):
    write_jsonl(path, [{"prompt": [2, 9 + i % 3, 3, 4], "candidates": [[6], [5]], "label": i % 2} for i in range(12)])
    return str(path)


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------

def make_project(model_dir, root):
    """P/model (a copy of the model), P/adapter, P/notes.txt: a user's project folder."""
    shutil.copytree(model_dir, root / "model")
    model = load_model(str(root / "model"))
    adapter = LoRAAdapter.empty(LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")), model.config)
    adapter.buffer.copy_(0.3 * torch.randn(adapter.buffer.shape, generator=torch.Generator().manual_seed(0)))
    adapter.save_pretrained(str(root / "adapter"))
    (root / "notes.txt").write_text("mine")
    return str(root / "model"), str(root / "adapter")


def test_merge_never_deletes_a_folder_holding_its_inputs(model_dir, tmp_path, capsys):
    project = tmp_path / "P"
    model, adapter = make_project(model_dir, project)
    before = snapshot(project)
    os.symlink(project / "model", tmp_path / "link")
    for out, needle in ((project, f"--out {project} holds the --model {model}"),
                        (project / "model", "is the --model"),
                        (tmp_path / "link", "is the --model"),
                        (project / "adapter" / "merged", "is inside the --adapter directory")):
        assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out), "--overwrite"]) == 2
        assert needle in one_line(capsys)
    assert snapshot(project) == before


def test_merge_overwrites_only_its_own_output_and_whole(model_dir, tmp_path, capsys, monkeypatch):
    import flashzo.engine.loading

    model, adapter = make_project(model_dir, tmp_path / "P")
    mine = tmp_path / "mine"  # a folder of the user's: never replaced, --overwrite or not
    mine.mkdir()
    (mine / "weights.bin").write_text("precious")
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(mine), "--overwrite"]) == 2
    assert "holds weights.bin, which flashzo merge did not write" in one_line(capsys)
    assert (mine / "weights.bin").read_text() == "precious"

    out = tmp_path / "merged"
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out)]) == 0
    info = json.loads((out / "flashzo_merge.json").read_text())
    assert set(info["files"]) == set(os.listdir(out)) - {"flashzo_merge.json"} and "model.safetensors" in info["files"]
    first = snapshot(out)
    capsys.readouterr()
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out)]) == 2
    assert "is not empty" in one_line(capsys)
    (out / "extra.txt").write_text("added by hand")
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out), "--overwrite"]) == 2
    assert "holds extra.txt, which flashzo merge did not write" in one_line(capsys)
    os.remove(out / "extra.txt")

    # a failure or Ctrl-C mid-write leaves the earlier output as it was, and nothing beside it
    real = flashzo.engine.loading.save_model
    argv = ["merge", "--model", model, "--adapter", adapter, "--out", str(out), "--overwrite", "--dtype", "bf16"]
    for error in (KeyboardInterrupt(), RuntimeError("a bug")):
        def failing(model, path, _error=error, **kw):
            real(model, path, **kw)
            raise _error
        monkeypatch.setattr(flashzo.engine.loading, "save_model", failing)
        if isinstance(error, KeyboardInterrupt):
            assert main(argv) == 130
            assert capsys.readouterr().err == "flashzo merge: interrupted\n"
        else:
            with pytest.raises(RuntimeError, match="a bug"):
                main(argv)
        assert snapshot(out) == first and sorted(os.listdir(tmp_path)) == ["P", "merged", "mine"]
    monkeypatch.setattr(flashzo.engine.loading, "save_model", real)
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out), "--overwrite", "--dtype",
                 "bf16"]) == 0
    assert load_model(str(out)).dtype == torch.bfloat16 and sorted(os.listdir(tmp_path)) == ["P", "merged", "mine"]


def test_merge_on_a_full_disk_is_one_line_and_keeps_the_earlier_output(model_dir, tmp_path, capsys, monkeypatch):
    import safetensors
    import safetensors.torch

    model, adapter = make_project(model_dir, tmp_path / "P")
    out = tmp_path / "merged"
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out)]) == 0
    first = snapshot(out)
    capsys.readouterr()

    def full(*a, **k):
        raise safetensors.SafetensorError(ENOSPC_SAFETENSORS)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["merge", "--model", model, "--adapter", adapter, "--out", str(out), "--overwrite"]) == 1
    assert f"flashzo merge: error: cannot write {out}: the disk is full (No space left on device)" in one_line(capsys)
    assert snapshot(out) == first and sorted(os.listdir(tmp_path)) == ["P", "merged"]


# --------------------------------------------------------------------------------------------------
# eval --predictions
# --------------------------------------------------------------------------------------------------

def test_predictions_never_replace_an_input(model_dir, tmp_path, capsys):
    data = ids_data(tmp_path / "d.jsonl")
    before = open(data).read()
    os.symlink(data, tmp_path / "sym.jsonl")
    os.link(data, tmp_path / "hard.jsonl")
    for preds, needle in ((data, "is the --data"), (tmp_path / "sym.jsonl", "is the --data"),
                          (tmp_path / "hard.jsonl", "is the --data"),
                          (os.path.join(model_dir, "config.json"), "is inside the --model directory"),
                          (os.path.join(model_dir, "new.jsonl"), "is inside the --model directory")):
        assert main(["eval", "--model", model_dir, "--data", data, "--predictions", str(preds), "--overwrite"]) == 2
        assert needle in one_line(capsys)
    assert open(data).read() == before and not os.path.exists(os.path.join(model_dir, "new.jsonl"))


def test_predictions_replace_a_file_only_with_overwrite_and_whole(model_dir, tmp_path, capsys, monkeypatch):
    import flashzo.predict

    data = ids_data(tmp_path / "d.jsonl")
    preds = tmp_path / "p.jsonl"
    preds.write_text("an earlier file\n")
    assert main(["eval", "--model", model_dir, "--data", data, "--predictions", str(preds)]) == 2
    assert f"--predictions {preds} exists: --overwrite replaces it" in one_line(capsys)
    assert preds.read_text() == "an earlier file\n"

    real = flashzo.predict.predictions

    def stops_after_one(*a, **k):  # a crash (here Ctrl-C) after the first line is written
        yield next(real(*a, **k))
        raise KeyboardInterrupt
    monkeypatch.setattr(flashzo.predict, "predictions", stops_after_one)
    assert main(["eval", "--model", model_dir, "--data", data, "--predictions", str(preds), "--overwrite"]) == 130
    assert capsys.readouterr().err == "flashzo eval: interrupted\n"
    assert preds.read_text() == "an earlier file\n" and sorted(os.listdir(tmp_path)) == ["d.jsonl", "p.jsonl"]

    def full(fd):  # a full disk seen when the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(flashzo.predict, "predictions", real)
    monkeypatch.setattr(os, "fsync", full)
    try:
        code = main(["eval", "--model", model_dir, "--data", data, "--predictions", str(preds), "--overwrite"])
    finally:
        monkeypatch.undo()
    assert code == 1
    assert f"cannot write {preds}: the disk is full" in one_line(capsys)
    assert preds.read_text() == "an earlier file\n" and sorted(os.listdir(tmp_path)) == ["d.jsonl", "p.jsonl"]
    assert main(["eval", "--model", model_dir, "--data", data, "--predictions", str(preds), "--overwrite"]) == 0
    assert len(preds.read_text().splitlines()) == 12


# --------------------------------------------------------------------------------------------------
# train --out
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "eval", "merge", "demo"])
def test_an_empty_path_is_refused(model_dir, tmp_path, capsys, command):
    data = ids_data(tmp_path / "d.jsonl")
    argv = {"train": ["train", "--model", model_dir, "--train", data, "--out", ""],
            "eval": ["eval", "--model", model_dir, "--data", data, "--predictions", ""],
            "merge": ["merge", "--model", model_dir, "--adapter", str(tmp_path), "--out", ""],
            "demo": ["demo", "--tiny", "--out", ""]}[command]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(argv) == 2
    finally:
        os.chdir(cwd)
    assert "is empty" in one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_overwrite_keeps_inputs_and_files_flashzo_did_not_write(model_dir, tmp_path, capsys):
    data = ids_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), "--steps", "1", *RUN]) == 0
    shutil.copy(data, out / "checkpoint" / "d.jsonl")  # data kept (by mistake) inside the run's checkpoint
    capsys.readouterr()
    for argv in (["--train", str(out / "checkpoint" / "d.jsonl"), "--overwrite"], ["--train", data, "--overwrite"]):
        assert main(["train", "--model", model_dir, "--out", str(out), "--steps", "1", *argv, *RUN]) == 2
        assert f"{out / 'checkpoint' / 'd.jsonl'} is in a folder of the run" in one_line(capsys)
    assert main(["train", "--out", str(out), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "d.jsonl is in a folder of the run" in one_line(capsys)
    assert (out / "checkpoint" / "d.jsonl").read_text() == open(data).read()
    os.remove(out / "checkpoint" / "d.jsonl")
    shutil.copy(data, out / "log.jsonl")  # the training data is a file the run replaces
    assert main(["train", "--model", model_dir, "--train", str(out / "log.jsonl"), "--out", str(out), "--steps", "1",
                 "--overwrite", *RUN]) == 2
    assert f"--train {out / 'log.jsonl'} is {out / 'log.jsonl'}, one of the files of the run" in one_line(capsys)


def test_overwrite_keeps_the_old_run_until_the_new_one_is_saved(model_dir, tmp_path, capsys, monkeypatch):
    from flashzo.engine.mezo import MeZOTrainer

    data = ids_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), "--steps", "2", *RUN]) == 0
    (out / "notes.txt").write_text("mine")
    old = snapshot(out / "checkpoint")
    real = MeZOTrainer.step

    def crashes_at_step_1(self, batch):
        if self.step_count == 1:
            raise RuntimeError("a bug")
        return real(self, batch)
    monkeypatch.setattr(MeZOTrainer, "step", crashes_at_step_1)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--model", model_dir, "--train", data, "--out", str(out), "--steps", "3", "--seed", "5",
              "--overwrite", *RUN])
    assert f"the run --overwrite replaced is kept in {out / '.replaced-run'}" in capsys.readouterr().err
    assert snapshot(out / ".replaced-run" / "checkpoint") == old and (out / "notes.txt").read_text() == "mine"
    monkeypatch.setattr(MeZOTrainer, "step", real)
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), "--steps", "3", "--seed", "5",
                 "--overwrite", *RUN]) == 0
    assert read_state(str(out / "checkpoint"))[1]["step"] == 3 and not (out / ".replaced-run").exists()
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint", "curve.png", "log.jsonl", "metrics.json", "notes.txt"]


def test_set_aside_finishes_its_renames_before_a_signal(tmp_path):
    """SIGINT in the middle of moving the old run aside takes effect once every file has moved."""
    import signal

    from flashzo.loop import set_aside_run

    for name in ("log.jsonl", "metrics.json", "curve.png"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoint").mkdir()
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(a)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        real(a, b)
    os.rename = rename
    try:
        with pytest.raises(KeyboardInterrupt):
            set_aside_run(str(tmp_path))
    finally:
        os.rename = real
    assert len(calls) == 4 and os.listdir(tmp_path) == [".replaced-run"]
    assert sorted(os.listdir(tmp_path / ".replaced-run")) == ["checkpoint", "curve.png", "log.jsonl", "metrics.json"]


# --------------------------------------------------------------------------------------------------
# A full disk while training
# --------------------------------------------------------------------------------------------------

def _fail_checkpoint_save(monkeypatch, nth):
    """safetensors' save_file fails as on a full disk from its nth call on (1: the first)."""
    import safetensors
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) >= nth:
            with open(path, "wb") as f:  # as a real full disk does, part of the file is there
                f.write(b"\0" * 8)
            raise safetensors.SafetensorError(ENOSPC_SAFETENSORS)
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


class _FillsUp:
    """A file whose writes fail as on a full disk (OSError ENOSPC, part of the text written) from the nth on."""

    def __init__(self, f, nth):
        self.f, self.left = f, nth - 1

    def write(self, text):
        if self.left == 0:
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= 1
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fail_log_write(monkeypatch, step):
    """log.jsonl's line of `step` (the (step + 1)th write of a new run) fails as on a full disk."""
    import flashzo.loop

    real = flashzo.loop._StepLog.__init__

    def init(self, path, start):
        real(self, path, start)
        self._f = _FillsUp(self._f, step + 1)
    monkeypatch.setattr(flashzo.loop._StepLog, "__init__", init)


@pytest.mark.parametrize("where", ["checkpoint", "log"])
def test_a_full_disk_while_training_is_one_line_and_the_checkpoint_resumes(model_dir, tmp_path, capsys, monkeypatch,
                                                                            where):
    data = ids_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    if where == "checkpoint":
        _fail_checkpoint_save(monkeypatch, nth=2)  # the checkpoint at step 2 is saved, the one at step 4 is not
        failed = out / "checkpoint"
    else:
        _fail_log_write(monkeypatch, step=3)
        failed = out / "log.jsonl"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), "--steps", "6", "--save-every", "2",
                 *RUN]) == 1
    err = one_line(capsys)
    assert f"flashzo train: error: cannot write {failed}: the disk is full (No space left on device); the checkpoint " \
           f"at step 2 in {out} is intact: free some space, then flashzo train --out {out} --resume continues it" in err
    assert read_state(str(out / "checkpoint"))[1]["step"] == 2
    assert not any(n.endswith((".tmp", ".old")) for n in os.listdir(out)), os.listdir(out)
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--threads", "1"]) == 0
    ref = tmp_path / "ref"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(ref), "--steps", "6", *RUN]) == 0
    assert snapshot(out / "adapter") == snapshot(ref / "adapter")
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(6))


def test_a_full_disk_before_any_checkpoint_says_so(model_dir, tmp_path, capsys, monkeypatch):
    data = ids_data(tmp_path / "d.jsonl")
    _fail_checkpoint_save(monkeypatch, nth=1)
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(out), "--steps", "2", *RUN]) == 1
    err = one_line(capsys)
    assert f"cannot write {out / 'checkpoint'}: the disk is full" in err and "no checkpoint was saved" in err


def test_out_of_memory_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import flashzo.data

    data = ids_data(tmp_path / "d.jsonl")

    def no_memory(*a, **k):
        raise MemoryError
    monkeypatch.setattr(flashzo.data, "read_dataset", no_memory)
    assert main(["train", "--model", model_dir, "--train", data, "--out", str(tmp_path / "run"), *RUN]) == 1
    assert one_line(capsys) == "flashzo train: error: out of memory\n"


TMPFS_SCRIPT = """
set -e
mount -t tmpfs -o size=96k tmpfs "$SMALL"
set +e
"$PY" -m flashzo train --model "$MODEL" --train "$DATA" --out "$SMALL/run" --steps 100000 --save-every 2 \\
    --batch-size 4 --lr 1e-2 --eps 1e-2 --lora-r 2 --no-progress --threads 1 2>"$ERR"
echo $? > "$RC"
cp -r "$SMALL/run" "$COPY"
"""


@pytest.mark.slow
def test_a_real_full_disk_keeps_the_checkpoint(model_dir, tmp_path):
    """`flashzo train` on a 96 KiB tmpfs (a private mount; skipped where the machine cannot mount one)
    runs until the disk is full, then stops with one line; its checkpoint resumes elsewhere."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {tmp_path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    (tmp_path / "small").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", SMALL=str(tmp_path / "small"), PY=sys.executable, MODEL=model_dir,
               DATA=ids_data(tmp_path / "d.jsonl"), ERR=str(tmp_path / "err"), RC=str(tmp_path / "rc"),
               COPY=str(tmp_path / "copy"))
    r = subprocess.run(["unshare", "-m", "sh", "-c", TMPFS_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", err
    assert err.count("\n") == 1 and "Traceback" not in err and "the disk is full" in err, err
    step = read_state(str(tmp_path / "copy" / "checkpoint"))[1]["step"]
    assert step >= 2 and f"the checkpoint at step {step} in {tmp_path / 'small' / 'run'} is intact" in err, err
    assert main(["train", "--out", str(tmp_path / "copy"), "--resume", "--steps", str(step + 2), "--no-progress"]) == 0
