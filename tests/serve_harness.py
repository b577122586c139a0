"""`flashzo serve` in the test process: the app from create_app on a tiny random OPT with a word-level
tokenizer, driven by the official `openai` client over Starlette's TestClient (`InProcess`), or
served by uvicorn on a loopback port in a thread when a test needs real sockets (`Live`)."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time

import torch
from helpers import TINY, write_word_tokenizer

import flashzo
from flashzo.engine import OPTConfig

KEY = "sk-flashzo-test"
TERMINAL = ("succeeded", "failed", "cancelled")


def tiny_checkpoint(root) -> str:
    ckpt = str(root / "tiny")
    flashzo.save_opt(flashzo.OPTModel.from_config(OPTConfig(**TINY), seed=1), ckpt)
    write_word_tokenizer(ckpt, TINY["vocab_size"])
    return ckpt


def write_data(path, n: int, seed: int = 0) -> str:
    """SST-2-shaped classification records with text prompts (the word tokenizer's "w5 w6 ...")."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"w{rng.randrange(20, 90)}" for _ in range(rng.randrange(3, 8)))
            f.write(json.dumps({"prompt": f"{words} w{10 + i % 2}", "candidates": ["w12", "w13"], "label": i % 2})
                    + "\n")
    return str(path)


def served_models(ckpt: str) -> dict:
    from flashzo.serve.served import load_served

    return {"tiny": load_served("tiny", ckpt)}


class InProcess:
    """`with InProcess(data_dir, ckpt, **create_app options) as s:` s.app, s.models, s.http (TestClient),
    s.client()."""

    def __init__(self, data_dir, ckpt: str, *, key: str | None = KEY, **options):
        from flashzo.serve.app import create_app

        self.key = key
        self.models = served_models(ckpt)
        self.app = create_app(str(data_dir), self.models, api_key=key, **options)

    def __enter__(self) -> InProcess:
        from fastapi.testclient import TestClient

        self.http = TestClient(self.app, base_url="http://testserver", raise_server_exceptions=False,
                               headers={"Authorization": f"Bearer {self.key}"} if self.key else {})
        self.http.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.http.__exit__(*exc)

    def client(self, max_retries: int = 0):
        import openai

        return openai.OpenAI(base_url="http://testserver/v1", api_key=self.key or "none", http_client=self.http,
                             max_retries=max_retries)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """An InProcess app also served by uvicorn on a loopback port, in a thread of the test process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # lifespan off: the InProcess around it runs the app's start and stop
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 60, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a socket: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    size = int(headers.get("content-length", 0))
    while len(body) < size:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the body")
        body += chunk
    return status, headers, body


def wait_job(client, job_id, statuses=TERMINAL, timeout=240, until=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or (until is not None and until(job)):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def create(client, file_id, valid_id=None, **hps):
    return client.fine_tuning.jobs.create(model="tiny", training_file=file_id, validation_file=valid_id,
                                          method={"type": "mezo", "mezo": {"hyperparameters": hps}})


def upload(client, path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def wait_for(predicate, what: str, timeout: float = 120):
    t0 = time.monotonic()
    while not (value := predicate()):
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout} s"
        time.sleep(0.02)
    return value


def multipart(filename: str, content: bytes, purpose: str = "fine-tune") -> tuple[bytes, bytes]:
    """(Content-Type header value, body) of an upload form."""
    boundary = b"flashzo-test-boundary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose.encode()
            + b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename.encode()
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n')
    return b"multipart/form-data; boundary=" + boundary, head + content + b"\r\n--" + boundary + b"--\r\n"


@contextlib.contextmanager
def one_thread():
    """As `flashzo serve --threads 1` runs its jobs, for the runs compared with them: a CPU GEMM's bits
    depend on its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
