"""`flashzo serve`'s HTTP layer against hostile input, in the test process (serve_harness.py): nothing
non-finite is stored or answered, bad values are refused with OpenAI's 400 before a job exists, a
malformed file fails its job instead of leaving it validating, an upload is refused before its body
without the key and is streamed to disk, uploads and waiting jobs are bounded, a 500 keeps the
connection, a download racing a delete is a 404."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from serve_harness import (
    KEY,
    InProcess,
    Live,
    create,
    multipart,
    read_response,
    tiny_checkpoint,
    upload,
    wait_for,
    wait_job,
    write_data,
)

import flashzo
from flashzo.cli import main
from flashzo.serve.completions import prompts_of
from flashzo.serve.requests import CompletionRequest

openai = pytest.importorskip("openai")
BASE = dict(steps=3, batch_size=4, lr=2e-2, eps=1e-2, lora_r=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-api"))


@pytest.fixture
def train(tmp_path):
    return write_data(tmp_path / "train.jsonl", 16)


def error_of(resp, status):
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def no_non_finite(text: str) -> bool:
    return not any(word in text for word in ("NaN", "Infinity"))


# --------------------------------------------------------------------------------------------------
# Nothing non-finite stored or answered


def test_a_non_finite_hyperparameter_is_refused_before_the_job_exists(tmp_path, ckpt, train):
    """lr 1e308 makes learning_rate_multiplier (lr / 1e-4) infinite: 400, no job stored, so the client's
    retries (which a 500 triggers) create nothing either."""
    with InProcess(tmp_path / "data", ckpt) as s:
        c = s.client(max_retries=2)
        fid = upload(c, train)
        for hps, word in (({"lr": 1e308}, "learning_rate_multiplier"), ({"lora_alpha": 1e300}, "lora_alpha"),
                          ({"eps": 1e-320}, "eps must be >=")):
            with pytest.raises(openai.BadRequestError, match=word):
                create(c, fid, **dict(BASE, **hps))
        assert c.fine_tuning.jobs.list().data == []
        err = error_of(s.http.post("/v1/fine_tuning/jobs", content=b'{"model": "tiny", "training_file": "%s", '
                                   b'"hyperparameters": {"learning_rate_multiplier": NaN}}' % fid.encode()), 400)
        assert err["param"] == "hyperparameters.learning_rate_multiplier"
        assert c.fine_tuning.jobs.list().data == []


def test_rows_holding_non_finite_numbers_still_read(tmp_path, ckpt, train):
    """A database an older flashzo wrote (a job with lr 1e308, NaN metrics): every listing still answers,
    the non-finite numbers as null."""
    data = tmp_path / "data"
    with InProcess(data, ckpt) as s:
        c = s.client()
        job = create(c, upload(c, train), **BASE)
        wait_job(c, job.id)
    db = sqlite3.connect(data / "flashzo.db")
    options = json.loads(db.execute("SELECT options FROM jobs WHERE id = ?", (job.id,)).fetchone()[0])
    db.execute("UPDATE jobs SET options = ? WHERE id = ?", (json.dumps(dict(options, lr=1e308)), job.id))
    db.execute("INSERT INTO checkpoints (id, job_id, step, created_at, metrics) VALUES ('ftckpt-x', ?, 1, 0, ?)",
               (job.id, json.dumps({"step": 1, "train_loss": float("nan"), "valid_loss": float("inf")})))
    db.execute("INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES "
               "('ftevent-x', ?, 0, 'info', 'metrics', 'm', ?)", (job.id, json.dumps({"valid_loss": float("-inf")})))
    db.commit()
    db.close()
    with InProcess(data, ckpt) as s:
        for path in ("/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job.id}", f"/v1/fine_tuning/jobs/{job.id}/events",
                     f"/v1/fine_tuning/jobs/{job.id}/checkpoints"):
            r = s.http.get(path)
            assert r.status_code == 200 and no_non_finite(r.text), (path, r.status_code, r.text[:300])
        assert s.http.get(f"/v1/fine_tuning/jobs/{job.id}").json()["hyperparameters"]["learning_rate_multiplier"] \
            is None
        ck = s.http.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]
        assert [k["metrics"]["train_loss"] for k in ck if k["id"] == "ftckpt-x"] == [None]


def test_a_job_whose_every_step_was_skipped_has_failed_and_its_records_read(tmp_path, ckpt, train):
    """lora_alpha 1e30 (finite, but the forward overflows): every loss is NaN, every step skipped. The
    job fails (3 steps: fewer than the 5 in a row that stop a run), and its events and checkpoints,
    NaN losses in them, answer with nulls."""
    with InProcess(tmp_path / "data", ckpt) as s:
        c = s.client()
        job = wait_job(c, create(c, upload(c, train), **dict(BASE, lora_alpha=1e30, save_every=1)).id)
        assert job.status == "failed" and job.error.code == "non_finite_loss", job
        assert "every one of the 3 steps was skipped" in job.error.message
        assert job.fine_tuned_model is None and job.result_files == []
        for path in (f"/v1/fine_tuning/jobs/{job.id}/events?limit=100", f"/v1/fine_tuning/jobs/{job.id}/checkpoints"):
            r = s.http.get(path)
            assert r.status_code == 200 and no_non_finite(r.text), (path, r.text[:300])
        ck = c.fine_tuning.jobs.checkpoints.list(job.id).data
        assert ck and all(k.metrics.train_loss is None for k in ck)


# --------------------------------------------------------------------------------------------------
# Malformed text


def test_a_lone_surrogate_fails_the_job_and_is_refused_in_completions(tmp_path, ckpt, train):
    """A prompt holding "\\ud800" (valid JSON, not valid Unicode): the job fails with the file named
    (never stays validating, also after a restart); a completion of it is a 400."""
    bad = tmp_path / "surrogate.jsonl"
    lines = open(train).read().splitlines()
    lines[1] = '{"prompt": "w20 \\ud800 w10", "candidates": ["w12", "w13"], "label": 1}'
    bad.write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    with InProcess(data, ckpt) as s:
        c = s.client()
        fid = upload(c, bad)
        job = wait_job(c, create(c, fid, **BASE).id, timeout=60)
        assert job.status == "failed" and job.error.code == "invalid_training_file", job.error
        assert fid in job.error.message and "surrogate.jsonl" in job.error.message
        err = error_of(s.http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "w5 \\ud800", '
                                   b'"max_tokens": 1}'), 400)
        assert "surrogate" in err["message"]
        err = error_of(s.http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ["w5", "w6 \\udfff"], '
                                   b'"max_tokens": 0, "echo": true, "logprobs": 0}'), 400)
        assert "surrogate" in err["message"]
        with pytest.raises(flashzo.InputError, match="prompt 1 is not valid Unicode text"):  # from Python, too
            prompts_of(CompletionRequest(model="tiny", prompt=["w5", "w6 \udfff"]), s.app.state.models["tiny"])
    with InProcess(data, ckpt) as s:  # restarted: still failed, nothing stuck
        assert s.client().fine_tuning.jobs.retrieve(job.id).status == "failed"


# --------------------------------------------------------------------------------------------------
# Smaller refusals


@pytest.mark.parametrize("body,status,word", [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "16"),
    ({"metadata": {"k" * 65: "v"}}, 400, "metadata"),
    ({"metadata": {"k": "v" * 513}}, 400, "512"),
    ({"suffix": "abc\n"}, 400, "suffix"),
    ({"method": {"type": "mezo", "mezo": {"hyperparameters": {"eps": 1e-320}}}}, 400, "eps must be >="),
    ({"method": {"type": "mezo", "mezo": {"hyperparameters": {"steps": 4.0}}}}, 400, "steps must be an integer"),
    ({"seed": "3"}, 400, "seed"),
])
def test_job_values_refused(tmp_path, ckpt, train, body, status, word):
    with InProcess(tmp_path / "data", ckpt) as s:
        fid = upload(s.client(), train)
        err = error_of(s.http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid, **body}),
                       status)
        assert word in err["message"], err
        assert s.http.get("/v1/fine_tuning/jobs").json()["data"] == []
        ok = s.http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid, "suffix": "abc",
                                                       "metadata": {f"k{i}": "v" * 512 for i in range(16)}})
        assert ok.status_code == 200, ok.text  # the limits themselves are allowed


@pytest.mark.parametrize("body,word", [({"temperature": 1e-308}, "temperature"), ({"seed": 2**64}, "seed"),
                                       ({"seed": -1}, "seed"), ({"temperature": 3.0}, "temperature"),
                                       ({"top_p": 0.0}, "top_p")])
def test_completion_values_refused(tmp_path, ckpt, body, word):
    with InProcess(tmp_path / "data", ckpt) as s:
        err = error_of(s.http.post("/v1/completions", json={"model": "tiny", "prompt": "w5 w6", "max_tokens": 2,
                                                            **body}), 400)
        assert word in err["message"]
        assert s.http.post("/v1/completions", json={"model": "tiny", "prompt": "w5 w6", "max_tokens": 2,
                                                    "temperature": 0.01, "seed": 2**63 - 1}).status_code == 200


def test_deeply_nested_json_is_a_400(tmp_path, ckpt):
    with InProcess(tmp_path / "data", ckpt) as s:
        for path in ("/v1/fine_tuning/jobs", "/v1/completions"):
            deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            error_of(s.http.post(path, content=deep), 400)


def test_model_names_and_keys(tmp_path, ckpt, capsys, monkeypatch):
    from flashzo.serve.app import create_app
    from flashzo.serve.served import parse_model_flags

    with pytest.raises(flashzo.InputError, match="NAME must be"):
        parse_model_flags([f"tiny\n={ckpt}"])
    with pytest.raises(flashzo.InputError, match="API key is empty"):
        create_app(str(tmp_path / "data"), {}, api_key="")
    monkeypatch.delenv("FLASHZO_API_KEY", raising=False)
    assert main(["serve", "--model", f"tiny={ckpt}", "--data-dir", str(tmp_path), "--api-key", "",
                 "--port", "99999"]) == 2
    assert "--api-key is empty" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Connections, races


def test_a_500_is_json_and_keeps_the_connection(tmp_path, ckpt, monkeypatch):
    with InProcess(tmp_path / "data", ckpt, key=None) as s, Live(s.app) as live:
        monkeypatch.setattr(s.app.state.store, "list_jobs", lambda **kw: 1 / 0)  # a bug in a route
        sock = live.connect()
        sock.sendall(b"GET /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 500 and json.loads(body)["error"]["code"] == "server_error"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
        assert read_response(sock)[0] == 200
        sock.close()


def test_content_racing_delete_is_a_404(tmp_path, ckpt, train, monkeypatch):
    with InProcess(tmp_path / "data", ckpt) as s:
        fid = upload(s.client(), train)
        assert s.http.get(f"/v1/files/{fid}/content").content == open(train, "rb").read()
        store = s.app.state.store
        looked_up = store.get_file

        def then_deleted(file_id):  # the DELETE lands between the lookup and the read
            row = looked_up(file_id)
            os.unlink(store.file_path(file_id))
            return row

        monkeypatch.setattr(store, "get_file", then_deleted)
        assert error_of(s.http.get(f"/v1/files/{fid}/content"), 404)["code"] == "file_not_found"


# --------------------------------------------------------------------------------------------------
# Uploads


def test_an_upload_without_the_key_is_refused_before_its_body(tmp_path, ckpt):
    """Only the headers are sent: the 401 comes back without the server waiting for (or holding) the body."""
    with InProcess(tmp_path / "data", ckpt) as s, Live(s.app) as live:
        ctype, _ = multipart("big.jsonl", b"")
        sock = live.connect()
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype
                     + b"\r\nContent-Length: 60000000\r\n\r\n")
        status, _, body = read_response(sock)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        sock.close()


def test_an_upload_is_streamed_to_disk_and_uploads_are_bounded(tmp_path, ckpt, train):
    """Half a body sent: its bytes are already on disk (DATA_DIR/files/*.part); a second upload meanwhile is
    a 429 (--max-concurrent-uploads 1); the first completes once the rest is sent."""
    content = open(train, "rb").read() * 400  # ~0.9 MB of valid JSONL
    ctype, body = multipart("train.jsonl", content)
    half = len(body) // 2
    files_dir = tmp_path / "data" / "files"
    with InProcess(tmp_path / "data", ckpt, max_concurrent_uploads=1) as s, Live(s.app) as live:
        sock = live.connect()
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body[:half])
        wait_for(lambda: any(f.endswith(".part") and os.path.getsize(files_dir / f) > half // 2
                             for f in os.listdir(files_dir)), "the upload's first half on disk")
        second = s.client()
        with pytest.raises(openai.RateLimitError, match="uploads"):
            upload(second, train)
        sock.sendall(body[half:])
        status, _, answer = read_response(sock)
        assert status == 200, answer
        fid = json.loads(answer)["id"]
        assert open(files_dir / fid, "rb").read() == content
        assert not [f for f in os.listdir(files_dir) if f.endswith(".part")]
        assert upload(second, train)  # the slot is free again
        sock.close()


def test_waiting_jobs_are_bounded(tmp_path, ckpt, train):
    with InProcess(tmp_path / "data", ckpt, max_queued_jobs=2, hold_admission=True) as s:
        c = s.client()
        fid = upload(c, train)
        first = [create(c, fid, **BASE).id for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as e:
            create(c, fid, **BASE)
        assert e.value.response.headers["retry-after"] == "1"
        assert len(c.fine_tuning.jobs.list().data) == 2
        c.fine_tuning.jobs.cancel(first[0])
        assert create(c, fid, **BASE).status == "validating_files"  # room again
