"""`flashzo serve`'s reward jobs (method {"type": "reward", "reward": {"hyperparameters": {...}}}), driven by
the official `openai` client in the test process (serve_harness.py): a job trains on {"prompt", "answer"}
files with a built-in reward and ends with `flashzo train --objective reward`'s adapter; a module:function
reward, a reward option under "mezo" or a reward job without its reward are 400s before a job exists; a
line without its answer fails the job naming the line."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
import torch
from serve_harness import InProcess, one_thread, tiny_checkpoint, upload, wait_job

from flashzo.cli import main
from flashzo.engine import LoRAAdapter, load_model

openai = pytest.importorskip("openai")
HPS = dict(steps=4, batch_size=4, lr=0.05, eps=0.5, lora_r=2, num_perturbations=2, reward="label_word",
           max_tokens=2, seed=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-reward"))


def write_reward_data(path, n: int, seed: int = 0, answer: bool = True) -> str:
    """Prompts of the word tokenizer's words ("w20 w31 ..."), answers one of two words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"prompt": " ".join(f"w{rng.randrange(20, 90)}" for _ in range(rng.randrange(2, 6)))}
            if answer or i != 2:
                rec["answer"] = f"w{12 + i % 2}"
            f.write(json.dumps(rec) + "\n")
    return str(path)


def reward_job(client, train, valid=None, **hps):
    return client.fine_tuning.jobs.create(model="tiny", training_file=train, validation_file=valid,
                                          method={"type": "reward", "reward": {"hyperparameters": hps}})



def test_a_reward_job_trains_as_flashzo_train_does(tmp_path, ckpt):
    train = write_reward_data(tmp_path / "train.jsonl", 12)
    valid = write_reward_data(tmp_path / "valid.jsonl", 6, seed=1)
    with one_thread(), InProcess(tmp_path / "data", ckpt) as s:
        c = s.client()
        job = reward_job(c, upload(c, train), upload(c, valid), eval_every=2, **HPS)
        job = wait_job(c, job.id)
        assert job.status == "succeeded", job.error
        method = job.model_dump()["method"]  # the client's model of a method type it does not know: plain JSON
        assert method["type"] == "reward" and method.get("mezo") is None
        given = method["reward"]["hyperparameters"]
        assert (given["reward"], given["max_tokens"], given["estimator"], given["shaping"]) == \
            ("label_word", 2, "es", None)
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)][::-1]
        assert sum(m.startswith("Step ") and "validation mean reward" in m for m in messages) == 3  # steps 0, 2, 4
        rows = c.files.content(job.result_files[0]).read().decode().splitlines()
        assert len(rows) == 1 + 5  # the header, steps 0 (eval) to 4
        data = c.files.content(job.result_files[1]).read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(tmp_path / "job", filter="data")
    model = load_model(ckpt)
    ours = LoRAAdapter.from_pretrained(str(tmp_path / "job" / "adapter"), model.config)
    args = ["train", "--model", ckpt, "--train", train, "--eval", valid, "--out", str(tmp_path / "solo"),
            "--no-progress", "--objective", "reward", "--batch-invariant", "--eval-every", "2"]
    for k, v in HPS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    with one_thread():
        assert main(args) == 0
    solo = LoRAAdapter.from_pretrained(str(tmp_path / "solo" / "adapter"), model.config)
    assert torch.equal(ours.buffer, solo.buffer) and ours.buffer.abs().sum() > 0


def test_reward_jobs_are_refused_before_they_exist(tmp_path, ckpt):
    train = write_reward_data(tmp_path / "train.jsonl", 8)
    with InProcess(tmp_path / "data", ckpt) as s:
        c = s.client()
        fid = upload(c, train)
        for hps, param, word in (
                (dict(HPS, reward="os:system"), "method.reward.hyperparameters.reward", "runs code of the request's"),
                (dict(HPS, reward="nope"), "method.reward.hyperparameters.reward", "not a built-in reward"),
                ({k: v for k, v in HPS.items() if k != "reward"}, "method.reward.hyperparameters.reward",
                 "is required"),
                (dict(HPS, estimator="mezo", shaping="zscore"), None, "shaping 'zscore' is for the 'es' estimator"),
                (dict(HPS, max_tokens=64), "method.reward.hyperparameters.max_tokens", "leaves no room"),
                (dict(HPS, reward_time_limit=5.0), "method.reward.hyperparameters", "unknown option")):
            with pytest.raises(openai.BadRequestError, match=word) as e:
                reward_job(c, fid, **hps)
            if param is not None:
                assert e.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="unknown option reward"):
            c.fine_tuning.jobs.create(model="tiny", training_file=fid,
                                      method={"type": "mezo", "mezo": {"hyperparameters": {"reward": "f1"}}})
        assert c.fine_tuning.jobs.list().data == []
        # a line without its answer fails the job, naming the line
        bad = upload(c, write_reward_data(tmp_path / "bad.jsonl", 8, answer=False))
        job = wait_job(c, reward_job(c, bad, **HPS).id)
        assert job.status == "failed" and "line 3: has no 'answer'" in job.error.message, job.error
