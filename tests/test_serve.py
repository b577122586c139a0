"""`flashzo serve` end to end: real servers (subprocesses on free loopback ports) driven by the official
`openai` client and raw HTTP, on a tiny random OPT with a word-level tokenizer.

What is checked: upload -> job -> succeeded -> result files, with the adapter bit-identical to
`flashzo train` with the same options; the fine-tuned model's completion log-probs equal
token_logprobs with that adapter, and its greedy generation engine/generate.py's; two jobs share
forwards (the metrics say so) and each ends with its solo run's adapter bit for bit (batch-invariant
numerics, the server's default), even when killed and resumed beside other jobs, or within
SHARED_BOUND of it out of the mode; a job's failure
fails only that job; cancel; auth; bad input of every kind answered with OpenAI's error shape while
the server keeps serving; a bounded load test; kill -9 and SIGTERM mid-job, then the same command
again: the same adapter.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import httpx
import pytest
import torch
from helpers import TINY, write_word_tokenizer
from serve_harness import one_thread

import flashzo
from flashzo.cli import main
from flashzo.engine import LoRAAdapter, OPTConfig, load_model
from flashzo.engine.generate import generate

openai = pytest.importorskip("openai")

KEY = "sk-flashzo-test"
# Out of the batch-invariant mode (the server's default is on, then a shared job's adapter is its solo
# run's bits): the largest element-wise difference of a job's adapter from its solo run, beside one
# other job in the same forwards (fp32: a bigger batch's GEMM rows are rounded differently, and g = dL / 2 eps
# amplifies it). Which steps share a forward depends on when the second job starts, so the bound
# leaves several times the largest difference seen (the test prints its own; two jobs of these
# hyperparameters with every step shared, on the engine: bench/results/code_notes_cpu.md,
# "tests/test_serve.py SHARED_BOUND"; what a user sees: docs/serve.md, "Beside other jobs").
SHARED_BOUND = 1e-5
BASE = dict(steps=12, batch_size=4, lr=2e-2, eps=1e-2, lora_r=2, save_every=4)


# --------------------------------------------------------------------------------------------------
# A tiny model, data, servers


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = str(root / "tiny")
    flashzo.save_opt(flashzo.OPTModel.from_config(OPTConfig(**TINY), seed=1), ckpt)
    write_word_tokenizer(ckpt, TINY["vocab_size"])
    rng = random.Random(0)

    def write(name, n, seed_words=0):
        path = root / name
        with open(path, "w") as f:
            for i in range(n):
                y = (i + seed_words) % 2
                words = " ".join(f"w{rng.randrange(20, 90)}" for _ in range(rng.randrange(3, 8)))
                f.write(json.dumps({"prompt": f"{words} w{10 + y}", "candidates": ["w12", "w13"], "label": y}) + "\n")
        return str(path)

    return dict(root=root, ckpt=ckpt, train=write("train.jsonl", 24), train2=write("train2.jsonl", 17, 1),
                valid=write("valid.jsonl", 8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`flashzo serve` in a subprocess; the same command can be started again after it stops."""

    def __init__(self, files, data_dir, *extra, key=KEY):
        self.port, self.key, self.log = free_port(), key, str(data_dir) + ".log"
        self.cmd = [os.path.join(os.path.dirname(sys.executable), "flashzo"), "serve", "--model",
                    f"tiny={files['ckpt']}", "--data-dir", str(data_dir), "--port", str(self.port),
                    "--log-level", "warning", "--threads", "1", *extra] + (["--api-key", key] if key else [])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout=120):
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"server exited:\n{open(self.log).read()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{open(self.log).read()[-3000:]}")

    def client(self, key=None):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key or "none", max_retries=0, timeout=60)

    def http(self, method, path, key=None, headers=(), **kw):
        auth = {"Authorization": f"Bearer {key or self.key}"} if (key or self.key) else {}
        return httpx.request(method, self.url + path, headers={**auth, **dict(headers)}, timeout=60, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """However a test ended: no server left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(files):
    s = Server(files, files["root"] / "data", "--max-upload-mb", "0.05")
    try:
        yield s.start()
        assert s.stop() == 0, open(s.log).read()[-3000:]
    finally:
        s.close()


def wait_job(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=240, until=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or (until is not None and until(job)):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def create(client, file_id, valid_id=None, **hps):
    return client.fine_tuning.jobs.create(model="tiny", training_file=file_id, validation_file=valid_id,
                                          method={"type": "mezo", "mezo": {"hyperparameters": hps}})


def upload(client, path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def adapter_of(client, job, tmp_path, model):
    """The PEFT adapter in the job's .tar.gz result file."""
    data = client.files.content(job.result_files[1]).read()
    out = tmp_path / job.id
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    return LoRAAdapter.from_pretrained(str(out / "adapter"), model.config)


def train_solo(files, tmp_path, train, valid=None, **hps):
    """`flashzo train` with the same options (batch-invariant, as a server's jobs are by default): its adapter."""
    out = tmp_path / f"solo-{len(os.listdir(tmp_path))}"
    args = ["train", "--model", files["ckpt"], "--train", train, "--out", str(out), "--no-progress"]
    args += ["--eval", valid] if valid else []
    for k, v in {"batch_invariant": True, **hps}.items():
        flag = k.replace('_', '-')
        args += ([f"--{flag}"] if v else [f"--no-{flag}"]) if isinstance(v, bool) else [f"--{flag}", str(v)]
    with one_thread():
        assert main(args) == 0
    return LoRAAdapter.from_pretrained(str(out / "adapter"), load_model(files["ckpt"]).config)



def error_of(resp, status):
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


# --------------------------------------------------------------------------------------------------


def test_job_end_to_end_equals_flashzo_train(server, files, tmp_path):
    c = server.client()
    train, valid = upload(c, files["train"]), upload(c, files["valid"])
    hps = dict(BASE, eval_every=4, seed=3)
    job = c.fine_tuning.jobs.create(model="tiny", training_file=train, validation_file=valid, suffix="e2e",
                                    method={"type": "mezo", "mezo": {"hyperparameters": hps}})
    assert job.object == "fine_tuning.job" and job.status == "validating_files"
    job = wait_job(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:e2e:{job.id}" and job.trained_tokens > 0 and job.finished_at
    assert job.hyperparameters.batch_size == 4 and job.seed == 3

    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)][::-1]
    assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "The job has successfully completed"
    assert "Fine-tuning job started" in messages
    assert sum(m.startswith("Step ") and "validation loss" in m for m in messages) == 4  # steps 0, 4, 8, 12
    assert [e for e in messages if e.startswith("Checkpoint saved")] == [f"Checkpoint saved at step {s}"
                                                                          for s in (4, 8, 12)]
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [k.step_number for k in ckpts] == [12, 8, 4]

    rows = list(csv.DictReader(io.StringIO(c.files.content(job.result_files[0]).read().decode())))
    assert list(rows[0])[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == list(range(13))
    assert all(r["train_loss"] for r in rows[1:]) and rows[4]["valid_loss"] and not rows[5]["valid_loss"]

    model = load_model(files["ckpt"])
    ours = adapter_of(c, job, tmp_path, model)
    solo = train_solo(files, tmp_path, files["train"], files["valid"], **hps)
    assert torch.equal(ours.buffer, solo.buffer)  # alone on the server: bit for bit flashzo train's

    # the fine-tuned model: log-probs of the prompt (echo, max_tokens 0) equal token_logprobs with its adapter
    prompt = "w20 w31 w44 w10 w12"
    r = c.completions.create(model=job.fine_tuned_model, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    ids = model_tokens(files, prompt)
    with one_thread():
        ref = model.token_logprobs([ids], ours)[0].tolist()
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == ref
    assert len(lp.tokens) == len(ids) and r.choices[0].text == prompt
    assert "".join(lp.tokens) == prompt and lp.tokens[1] == " w31"  # each token's text in context
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert all(len(t) == 3 for t in lp.top_logprobs[1:])
    base = c.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    with one_thread():
        assert base.choices[0].logprobs.token_logprobs[1:] == model.token_logprobs([ids])[0].tolist() != ref

    # generation with the paged KV cache: greedy = engine/generate.py's with the same adapter
    g = c.completions.create(model=job.fine_tuned_model, prompt=ids, max_tokens=6, temperature=0, logprobs=1)
    with one_thread():
        want = generate(model, [ids], ours, max_tokens=6, stop_tokens=[2])[0]
    assert g.choices[0].logprobs.token_logprobs == want.logprobs
    assert g.usage.completion_tokens == len(want.tokens)
    sampled = [c.completions.create(model=job.fine_tuned_model, prompt=ids, max_tokens=8, temperature=1.0, seed=s)
               .choices[0].text for s in (5, 5, 6)]
    assert sampled[0] == sampled[1]

    models = [m.id for m in c.models.list()]
    assert "tiny" in models and job.fine_tuned_model in models


def model_tokens(files, text):
    from flashzo.data import load_tokenizer

    return load_tokenizer(files["ckpt"])(text)["input_ids"]


def test_two_jobs_share_forwards_and_end_with_their_solo_adapters(server, files, tmp_path):
    c = server.client()
    before = server.http("GET", "/metrics").text
    t1, t2 = upload(c, files["train"]), upload(c, files["train2"])
    spec = [(t1, files["train"], dict(BASE, steps=24, seed=1, lr=3e-2)),
            (t2, files["train2"], dict(BASE, steps=24, seed=2, batch_size=3))]
    ids = [create(c, fid, **hps).id for fid, _, hps in spec]
    jobs = [wait_job(c, i) for i in ids]
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    after = server.http("GET", "/metrics").text
    forwards = metric(after, "flashzo_scheduler_steps_total") - metric(before, "flashzo_scheduler_steps_total")
    steps = metric(after, "flashzo_job_steps_total") - metric(before, "flashzo_job_steps_total")
    shared = metric(after, "flashzo_jobs_per_forward_sum") - metric(before, "flashzo_jobs_per_forward_sum")
    assert steps == 48 and shared == 48 and forwards < 40, (forwards, steps)  # most steps shared a forward
    assert 0 < metric(after, "flashzo_kv_hit_rate") < 1  # prompts shared by their candidates
    model = load_model(files["ckpt"])
    for job, (_, path, hps) in zip(jobs, spec):
        ours = adapter_of(c, job, tmp_path, model)
        solo = train_solo(files, tmp_path, path, **hps)
        assert not torch.equal(solo.buffer, LoRAAdapter.init(solo.config, model.config).buffer)
        assert torch.equal(ours.buffer, solo.buffer)  # the server's default: batch-invariant numerics


def test_without_the_mode_a_shared_job_stays_within_bound(server, files, tmp_path):
    """--no-batch-invariant's trade (a job's hyperparameter here): sharing rounds a job's rows differently."""
    c = server.client()
    t1, t2 = upload(c, files["train"]), upload(c, files["train2"])
    spec = [(files["train"], dict(BASE, steps=24, seed=1, lr=3e-2, batch_invariant=False)),
            (files["train2"], dict(BASE, steps=24, seed=2, batch_size=3, batch_invariant=False))]
    jobs = [wait_job(c, i) for i in [create(c, fid, **hps).id for fid, (_, hps) in zip((t1, t2), spec)]]
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    model = load_model(files["ckpt"])
    worst = max(float((adapter_of(c, job, tmp_path, model).buffer - train_solo(files, tmp_path, path, **hps).buffer)
                      .abs().max()) for job, (path, hps) in zip(jobs, spec))
    print(f"\ntwo jobs sharing forwards out of the mode, 24 steps: largest adapter difference from the solo "
          f"runs {worst:.3g}")
    assert worst <= SHARED_BOUND


def test_a_failing_job_fails_alone(server, files, tmp_path):
    c = server.client()
    fid = upload(c, files["train"])
    bad = create(c, fid, **dict(BASE, lr=1e38, steps=40)).id  # every update overflows: stops after 5 steps
    good = create(c, fid, **dict(BASE, steps=16, seed=4)).id
    bad, good = wait_job(c, bad), wait_job(c, good)
    assert bad.status == "failed" and bad.error.code == "non_finite_loss" and "non-finite" in bad.error.message
    assert good.status == "succeeded"
    model = load_model(files["ckpt"])
    diff = (adapter_of(c, good, tmp_path, model).buffer
            - train_solo(files, tmp_path, files["train"], **dict(BASE, steps=16, seed=4)).buffer).abs().max()
    assert float(diff) <= SHARED_BOUND


def test_cancel(server, files):
    c = server.client()
    fid = upload(c, files["train"])
    job = create(c, fid, **dict(BASE, steps=100000, save_every=0))
    wait_job(c, job.id, until=lambda j: j.status == "running" and j.flashzo["step"] >= 2)
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    step = c.fine_tuning.jobs.retrieve(job.id).flashzo["step"]
    time.sleep(1.0)
    later = c.fine_tuning.jobs.retrieve(job.id)
    assert later.status == "cancelled" and later.flashzo["step"] <= step + 1  # at most the step in flight
    err = error_of(server.http("POST", f"/v1/fine_tuning/jobs/{job.id}/cancel"), 409)
    assert "cancelled" in err["message"]
    queued = create(c, fid, **dict(BASE, steps=5))
    assert c.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    assert wait_job(c, queued.id).status == "cancelled"
    assert "Job cancelled" in [e.message for e in c.fine_tuning.jobs.list_events(job.id)]


def test_auth(server):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    for path in ("/v1/models", "/v1/files", "/v1/fine_tuning/jobs", "/metrics"):
        err = error_of(httpx.get(server.url + path), 401)
        assert err["code"] == "invalid_api_key"
        error_of(httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.client().models.list().data


def test_bad_inputs_get_openai_errors(server, files, tmp_path):
    c = server.client()
    h = server.http
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w5", "candidates": ["w6", "w7"], "label": 0}\n{"prompt": oops}\n')
    err = error_of(h("POST", "/v1/files", files={"file": ("bad.jsonl", bad.read_bytes())},
                     data={"purpose": "fine-tune"}), 400)
    assert "line 2" in err["message"] and err["code"] == "invalid_file"
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=bad.open("rb"), purpose="fine-tune")
    error_of(h("POST", "/v1/files", files={"file": ("x.jsonl", b'{"prompt": "w5"}\n')}, data={"purpose": "nope"}), 400)
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "w5 w6", "target": "w7"}\n' * 3000)  # ~100 KB, the limit is 0.05 MiB
    err = error_of(h("POST", "/v1/files", files={"file": ("big.jsonl", big.read_bytes())},
                     data={"purpose": "fine-tune"}), 413)
    assert "limit" in err["message"]
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=big.open("rb"), purpose="fine-tune")
    assert e.value.status_code == 413

    # a file that is JSONL but wrong for the model: the job fails, naming the file, its line and the problem
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "w5", "candidates": ["w6", "w7"], "label": 0}\n'
                     '{"prompt": [5, 500], "candidates": [[6], [7]], "label": 1}\n'
                     '{"prompt": "w5", "candidates": ["w6", "w7"], "label": 2}\n')
    fid = upload(c, wrong)
    job = wait_job(c, create(c, fid, **BASE).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert f"{fid} (wrong.jsonl) line 2" in job.error.message and "vocabulary" in job.error.message
    assert "line 3" in job.error.message and "out of range" in job.error.message

    train = upload(c, files["train"])

    def job_error(status, **body):
        return error_of(h("POST", "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": train, **body}),
                        status)

    assert job_error(404, model="gpt-5")["code"] == "model_not_found"
    err = job_error(400, method={"type": "mezo", "mezo": {"hyperparameters": {"stepz": 3}}})
    assert "unknown option stepz" in err["message"]
    assert "stepz" in job_error(400, hyperparameters={"stepz": 3})["message"]
    for hps, word in (({"lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"lora_r": 0}, "r must"),
                      ({"steps": 10**9}, "steps"), ({"eps": 0.0}, "eps"), ({"lora_layers": [7]}, "layers"),
                      ({"target_modules": ["gate_proj"]}, "gate_proj"), ({"lr_schedule": "zigzag"}, "lr_schedule"),
                      ({"steps": "ten"}, "steps")):
        err = job_error(400, method={"type": "mezo", "mezo": {"hyperparameters": hps}})
        assert word in err["message"], (hps, err)
    assert "learning_rate_multiplier" in job_error(400, hyperparameters={"learning_rate_multiplier": -2})["message"]
    assert job_error(400, method={"type": "supervised"})["param"] == "method.type"
    assert job_error(404, validation_file="file-nope")["param"] == "validation_file"
    assert job_error(422, trainin_file="x")["code"] == "invalid_body"  # an unknown field
    error_of(h("POST", "/v1/fine_tuning/jobs", json={"model": "tiny"}), 422)  # no training_file
    error_of(h("POST", "/v1/fine_tuning/jobs", content=b"{not json", headers={"Content-Type": "application/json"}),
             422)
    assert job_error(400, suffix="a:b")["param"] == "suffix"

    for method, path in (("GET", "/v1/files/file-nope"), ("GET", "/v1/files/file-nope/content"),
                         ("DELETE", "/v1/files/file-nope"), ("GET", "/v1/fine_tuning/jobs/ftjob-nope"),
                         ("POST", "/v1/fine_tuning/jobs/ftjob-nope/cancel"),
                         ("GET", "/v1/fine_tuning/jobs/ftjob-nope/events"),
                         ("GET", "/v1/fine_tuning/jobs/ftjob-nope/checkpoints"), ("GET", "/v1/models/nope"),
                         ("GET", "/v1/nothing-here")):
        error_of(h(method, path), 404)
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nope")

    def completion_error(status, **body):
        return error_of(h("POST", "/v1/completions", json={"model": "tiny", "prompt": "w5 w6", **body}), status)

    assert completion_error(404, model="ft:tiny::ftjob-nope")["code"] == "model_not_found"
    assert "max_tokens" in completion_error(400, max_tokens=-1)["message"]
    assert "logprobs" in completion_error(400, logprobs=50, echo=True, max_tokens=0)["message"]
    assert "positions" in completion_error(400, prompt=[5] * 60, max_tokens=10)["message"]
    assert "vocabulary" in completion_error(400, prompt=[5, 5000], max_tokens=1)["message"]
    assert "stream" in completion_error(400, stream=True)["message"]
    completion_error(422, prompt={"a": 1})
    completion_error(422, temperatur=0)
    assert "prompt" in completion_error(400, prompt=[])["message"]

    assert h("GET", "/health").status_code == 200  # and the server still serves
    assert c.completions.create(model="tiny", prompt="w5 w6", max_tokens=2, temperature=0).choices[0].text


def test_load_while_training(server, files):
    c = server.client()
    fid = upload(c, files["train"])
    job = create(c, fid, **dict(BASE, steps=100000, save_every=0))
    wait_job(c, job.id, until=lambda j: j.status == "running")
    lat, errors = [], []
    lock = threading.Lock()

    def client_loop(k):
        cl = server.client()
        for i in range(50):
            t0 = time.perf_counter()
            try:
                if i % 3 == 0:
                    cl.fine_tuning.jobs.list(limit=5)
                elif i % 3 == 1:
                    cl.completions.create(model="tiny", prompt=f"w{20 + k} w{30 + i} w10", max_tokens=0, echo=True,
                                          logprobs=1)
                else:
                    cl.completions.create(model="tiny", prompt=[20 + k, 30 + i], max_tokens=4, temperature=0)
            except Exception as e:  # counted, and reported below
                with lock:
                    errors.append(repr(e))
            with lock:
                lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    during = c.fine_tuning.jobs.retrieve(job.id)
    c.fine_tuning.jobs.cancel(job.id)
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"\nload: 8 clients x 50 requests in {wall:.1f} s while a job trained ({during.flashzo['step']} steps "
          f"by the end): p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms, {len(errors)} errors")
    assert not errors, errors[:3]
    assert len(lat) == 400 and during.status == "running" and during.flashzo["step"] > 0


@pytest.fixture
def own_server(files, tmp_path):
    s = Server(files, tmp_path / "data", key=None)
    yield s
    s.close()


def test_kill9_and_sigterm_then_the_same_command_finishes_with_the_same_adapter(files, tmp_path, own_server):
    s = own_server.start()
    c = s.client()
    fid = upload(c, files["train"])
    done = wait_job(c, create(c, fid, **dict(BASE, steps=3)).id)
    cancelled = c.fine_tuning.jobs.cancel(create(c, fid, **dict(BASE, steps=10000)).id).id
    hps = dict(BASE, steps=150, save_every=40, seed=9)
    s.http("POST", "/admin/admission", json={"step_budget": 45})  # the job's steps stop at 45, however fast
    job = create(c, fid, **hps).id
    # past the checkpoint at 40, before the next
    assert wait_job(c, job, until=lambda j: j.flashzo["step"] >= 45).flashzo["step"] == 45
    s.proc.kill()  # kill -9
    s.proc.wait(30)

    def resumed_at():
        events = [e.message for e in c.fine_tuning.jobs.list_events(job, limit=100)]
        return [int(m.rsplit(" ", 1)[1]) for m in events if m.startswith("Resumed from the checkpoint at step ")]

    s.start()  # the same command again: everything is there, the job continues from its last checkpoint
    assert fid in {f.id for f in c.files.list()}
    assert c.fine_tuning.jobs.retrieve(done.id).status == "succeeded"
    assert c.fine_tuning.jobs.retrieve(cancelled).status == "cancelled"
    assert resumed_at() == [40]
    before = wait_job(c, job, until=lambda j: j.flashzo["step"] >= 55).flashzo["step"]
    assert s.stop(signal.SIGTERM) == 0  # checkpoints the running job, then exits

    s.start()
    assert resumed_at()[0] >= before  # nothing done before the signal is lost
    j = wait_job(c, job)
    assert j.status == "succeeded"
    assert c.fine_tuning.jobs.retrieve(cancelled).status == "cancelled"
    model = load_model(files["ckpt"])
    assert torch.equal(adapter_of(c, j, tmp_path, model).buffer,
                       train_solo(files, tmp_path, files["train"], **hps).buffer)
    assert s.stop() == 0


def release_when_ready(server, jobs: int, **change) -> None:
    """Wait until `jobs` jobs have their files read and wait to start (the server runs with
    --hold-admission), then release them (with `change`: a step_budget): they start in one admission
    and share forwards from their first step."""
    t0 = time.monotonic()
    while (status := server.http("GET", "/admin/admission").json())["ready_jobs"] < jobs:
        assert time.monotonic() - t0 < 120, status
        time.sleep(0.1)
    assert status["held"] and status["running_jobs"] == 0, status
    assert server.http("POST", "/admin/admission", json={"hold": False, **change}).json()["held"] is False


def test_a_job_killed_and_resumed_beside_other_jobs_ends_with_its_solo_adapter(files, tmp_path):
    """Batch-invariant (the server's default): job A shares its forwards with B, the server is killed
    (-9), and A resumes from its checkpoint beside a new job C instead; its adapter is still the one
    `flashzo train` gives it alone, bit for bit. Admission is held until every job is ready, so the
    jobs start together and share whatever the machine's speed, and a step budget stops A and B at
    step 8 (A is killed between its checkpoint at 6 and its end at 16, however fast it runs)."""
    s = Server(files, tmp_path / "data", "--hold-admission", key=None)
    try:
        s.start()
        c = s.client()
        t1, t2 = upload(c, files["train"]), upload(c, files["train2"])
        hps = dict(BASE, steps=16, save_every=6, seed=9)
        a = create(c, t1, **hps).id
        create(c, t2, **dict(BASE, steps=30, seed=2, batch_size=3))
        release_when_ready(s, 2, step_budget=8)
        assert wait_job(c, a, until=lambda j: j.flashzo["step"] >= 8).flashzo["step"] == 8  # past the checkpoint at 6
        m = s.http("GET", "/metrics").text
        assert metric(m, "flashzo_jobs_per_forward_sum") > metric(m, "flashzo_scheduler_steps_total")  # A beside B
        s.proc.kill()
        s.proc.wait(30)
        s.start()  # the same command: A and B wait, held, while C is created
        create(c, upload(c, files["train"]), **dict(BASE, steps=20, seed=5, batch_size=5, lr=1e-2))  # C
        release_when_ready(s, 3)
        job = wait_job(c, a)
        assert job.status == "succeeded", job.error
        m = s.http("GET", "/metrics").text
        assert metric(m, "flashzo_jobs_per_forward_sum") > metric(m, "flashzo_scheduler_steps_total")  # shared again
        model = load_model(files["ckpt"])
        solo = train_solo(files, tmp_path, files["train"], **hps)
        assert torch.equal(adapter_of(c, job, tmp_path, model).buffer, solo.buffer)
        assert s.stop() == 0
    finally:
        s.close()


def test_refuses_a_public_host_without_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLASHZO_API_KEY", raising=False)
    assert main(["serve", "--model", "a=/nowhere", "--data-dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "API key" in capsys.readouterr().err
    assert main(["serve", "--model", "a:b=/nowhere", "--data-dir", str(tmp_path)]) == 2


def test_a_job_object_has_openais_types_whatever_length_it_trains():
    """n_epochs is OpenAI's (an integer or "auto") also where the steps make a fraction of an epoch."""
    from openai.types.fine_tuning.fine_tuning_job import Hyperparameters

    from flashzo.serve import jobs as J

    base = {"id": "ftjob-x", "model": "m", "created_at": 1, "finished_at": None, "status": "running",
            "fine_tuned_model": None, "result_files": [], "trained_tokens": None, "error": None, "step": 2,
            "started_at": 1}
    opts = dict(J.DEFAULTS.to_dict(), steps=4, batch_size=3)
    for spec, n_epochs, epochs in (({"training_file": "f", "num_examples": 9}, "auto", 4 * 3 / 9),
                                   ({"training_file": "f", "num_examples": 6, "n_epochs": 2}, 2, 2.0),
                                   ({"training_file": "f"}, "auto", None)):
        obj = J.job_object({**base, "spec": spec, "options": opts})
        assert obj["hyperparameters"]["n_epochs"] == n_epochs and obj["flashzo"]["epochs"] == epochs
        Hyperparameters.model_validate(obj["hyperparameters"], strict=True)  # OpenAI's types, no coercion


def test_openai_hyperparameters_are_mapped():
    from flashzo.serve import jobs as J

    model = flashzo.OPTModel.from_config(OPTConfig(**TINY))
    opts, epochs = J.run_options(None, {"n_epochs": 3, "batch_size": 5, "learning_rate_multiplier": 20}, 7, model)
    assert (opts["batch_size"], opts["lr"], opts["seed"], epochs) == (5, 20 * J.DEFAULTS.lr, 7, 3)
    assert J.with_epochs(opts, epochs, 23)["steps"] == 14  # ceil(3 * 23 / 5)
    opts, epochs = J.run_options({"type": "mezo", "mezo": {"hyperparameters": {"steps": 9}}},
                                 {"n_epochs": "auto", "batch_size": "auto"}, None, model)
    assert (opts["steps"], opts["batch_size"], epochs) == (9, J.DEFAULTS.batch_size, None)
    # batch-invariant numerics: the server's default unless the job chooses (a flashzo hyperparameter)
    assert opts["batch_invariant"] is True
    assert J.run_options(None, None, None, model, batch_invariant=False)[0]["batch_invariant"] is False
    mezo = {"type": "mezo", "mezo": {"hyperparameters": {"batch_invariant": False}}}
    assert J.run_options(mezo, None, None, model)[0]["batch_invariant"] is False
    with pytest.raises(flashzo.InputError, match="batch_invariant must be true or false"):
        J.run_options({"type": "mezo", "mezo": {"hyperparameters": {"batch_invariant": "yes"}}}, None, None, model)
    for method, top in (({"type": "mezo", "mezo": {"hyperparameters": {"steps": 9}}}, {"n_epochs": 2}),
                        ({"type": "mezo", "mezo": {"hyperparameters": {"lr": 1e-3}}}, {"learning_rate_multiplier": 2}),
                        ({"type": "mezo", "mezo": {"hyperparameters": {"batch_size": 3}}}, {"batch_size": 4})):
        with pytest.raises(flashzo.InputError, match="give one|twice"):
            J.run_options(method, top, None, model)


def test_groups_take_turns_and_no_job_starves(tmp_path):
    """Jobs that cannot share a forward (another eps, another adapter shape) are separate groups; groups
    alternate, and a group over --max-jobs-per-forward steps its least advanced jobs first."""
    from types import SimpleNamespace

    from flashzo.serve.metrics import Metrics
    from flashzo.serve.scheduler import Scheduler
    from flashzo.serve.store import Store

    store = Store(str(tmp_path))
    sched = Scheduler(store, {}, Metrics(store), max_jobs_per_forward=2)
    keys = {"a": ("m", 1e-3, (2,)), "b": ("m", 1e-3, (2,)), "c": ("m", 1e-3, (2,)), "d": ("m", 1e-2, (2,)),
            "e": ("m", 1e-3, (4,))}
    sched.running = {k: SimpleNamespace(id=k, key=key, step=0, steppable=True) for k, key in keys.items()}
    seen = []
    for _ in range(30):
        group = sched._next_group()
        assert len({j.key for j in group}) == 1 and len(group) <= 2
        for j in group:
            j.step += 1
        seen.append(group[0].key)
    assert all(seen[i] != seen[i + 1] for i in range(len(seen) - 1))  # round-robin over the 3 groups
    steps = {k: j.step for k, j in sched.running.items()}
    assert sorted(steps[k] for k in "abc") == [6, 7, 7] and steps["d"] == steps["e"] == 10, steps  # shared fairly
    store.close()


def test_a_model_without_tokenizer_files_serves_token_ids(tmp_path):
    from flashzo.serve.served import load_served

    flashzo.save_opt(flashzo.OPTModel.from_config(OPTConfig(**TINY)), str(tmp_path / "m"))
    served = load_served("m", str(tmp_path / "m"))
    assert served.tokenizer is None and served.pieces([5, 6]) == ["<5>", "<6>"]
    with pytest.raises(flashzo.InputError, match="no tokenizer"):
        served.encode("w5 w6")


def test_quantize_flags_pick_each_models_quantization(tmp_path):
    from flashzo.serve.served import load_served, parse_quantize_flags

    models = {"a": "/a", "b": "/b", "c": "/c"}
    got = parse_quantize_flags(["b=int8", "int4-g64"], models)
    assert {n: s.name for n, s in got.items()} == {"a": "int4-g64-asym", "b": "int8-channel-sym", "c": "int4-g64-asym"}
    assert {n: s.name for n, s in parse_quantize_flags(["c=int4"], models).items()} == {"c": "int4-g32-asym"}
    for flags, needle in ((["d=int8"], "no --model is named 'd'"), (["a=int8", "a=int4"], "model a is given twice"),
                          (["int8", "int4"], "given twice"), (["a=int9"], "'a=int9': quantization 'int9'")):
        with pytest.raises(flashzo.InputError, match=needle):
            parse_quantize_flags(flags, models)
    flashzo.save_opt(flashzo.OPTModel.from_config(OPTConfig(**TINY)), str(tmp_path / "m"))
    served = load_served("m", str(tmp_path / "m"), quantize=parse_quantize_flags(["int4"], {"m": "/m"})["m"])
    assert served.model.quantization["weights"] == {"int4 g32 asym fp16": 1 + 4 * TINY["num_hidden_layers"]}
    assert main(["serve", "--model", f"a={tmp_path / 'm'}", "--data-dir", str(tmp_path / "d"), "--quantize",
                 "b=int8"]) == 2
