"""The memory a `flashzo serve` process takes for uploads and for jobs sharing a file.

    python bench/bench_serve_memory.py            # writes bench/results/serve_memory_cpu.{json,csv,md,png}
    python bench/bench_serve_memory.py --small    # 8 MB uploads, 2 jobs: a minute; writes *_small.*

Each scenario starts a fresh server (`python -m flashzo serve`, a tiny random OPT with a word-level
tokenizer), waits for it, reads its resident memory (VmRSS), resets its peak (/proc/PID/clear_refs)
and then measures the peak (VmHWM) or resident memory the scenario leaves:

  upload-no-key   one upload of UPLOAD_MB without the API key (refused 401)
  4x-upload-no-key  four at once
  upload          one upload of BIG_MB with the key (accepted: --max-upload-mb above it)
  10-jobs         JOBS jobs created on one FILE_MB training file (text prompts), resident memory once
                  every job is validated (--max-running-jobs 1: the others wait queued)

Linux only (/proc). The client's memory is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time

import harness

KEY = "sk-bench"


def status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, data_dir: str, log: str, *extra: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "flashzo", "serve", "--model", f"tiny={model}", "--data-dir", data_dir,
               "--port", str(self.port), "--api-key", KEY, "--threads", "1", "--log-level", "warning", *extra]
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import httpx

        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    time.sleep(1.0)  # settle
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def form(content: bytes) -> tuple[bytes, bytes]:
    boundary = b"bench-boundary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--' + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n')
    return b"multipart/form-data; boundary=" + boundary, head + content + b"\r\n--" + boundary + b"--\r\n"


def post_upload(port: int, body: bytes, ctype: bytes, key: str | None) -> int:
    """Send the whole body (as a client that ignores an early answer does), then read the status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n" if key else b""
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    try:
        sock.sendall(head)
        view = memoryview(body)
        for k in range(0, len(body), 1 << 20):
            sock.sendall(view[k:k + (1 << 20)])
    except OSError:
        pass  # the server answered and closed before the whole body was sent
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return int(data.split()[1]) if data else -1


def jsonl(mb: float, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < mb * 1e6:
        words = " ".join(f"w{rng.randrange(20, 90)}" for _ in range(rng.randrange(3, 8)))
        line = json.dumps({"prompt": f"{words} w{10 + len(lines) % 2}", "candidates": ["w12", "w13"],
                           "label": len(lines) % 2}) + "\n"
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()


def measure_uploads(model: str, tmp: str, name: str, mb: float, copies: int, key: str | None) -> dict:
    ctype, body = form(jsonl(mb))
    with Server(model, os.path.join(tmp, name), os.path.join(tmp, name + ".log"), "--max-upload-mb",
                str(max(64, 2 * mb))) as s:
        before = status_mib(s.proc.pid, "VmRSS")
        reset_peak(s.proc.pid)
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(post_upload(s.port, body, ctype, key)))
                   for _ in range(copies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = status_mib(s.proc.pid, "VmHWM")
    return {"scenario": name, "body_mb": round(len(body) / 1e6, 1), "copies": copies, "status": codes[0],
            "rss_before_mib": round(before, 1), "peak_mib": round(peak, 1), "growth_mib": round(peak - before, 1)}


def measure_jobs(model: str, tmp: str, mb: float, jobs: int) -> dict:
    import httpx

    path = os.path.join(tmp, "train.jsonl")
    with open(path, "wb") as f:
        f.write(jsonl(mb, seed=1))
    h = {"Authorization": f"Bearer {KEY}"}
    with Server(model, os.path.join(tmp, "jobs"), os.path.join(tmp, "jobs.log"), "--max-running-jobs", "1") as s:
        with open(path, "rb") as f:
            fid = httpx.post(s.url + "/v1/files", headers=h, files={"file": ("train.jsonl", f)},
                             data={"purpose": "fine-tune"}, timeout=600).json()["id"]
        time.sleep(1.0)
        before = status_mib(s.proc.pid, "VmRSS")
        hps = {"steps": 1_000_000, "batch_size": 4, "lr": 1e-3, "eps": 1e-2, "lora_r": 2}
        ids = [httpx.post(s.url + "/v1/fine_tuning/jobs", headers=h, timeout=600, json={
            "model": "tiny", "training_file": fid, "method": {"type": "mezo", "mezo": {"hyperparameters": hps}}})
            .json()["id"] for _ in range(jobs)]
        t0 = time.monotonic()
        while any(httpx.get(f"{s.url}/v1/fine_tuning/jobs/{i}", headers=h, timeout=60).json()["status"]
                  == "validating_files" for i in ids):
            if time.monotonic() - t0 > 1200:
                raise RuntimeError("validation did not end")
            time.sleep(0.5)
        time.sleep(1.0)
        after = status_mib(s.proc.pid, "VmRSS")
        for i in ids:
            httpx.post(f"{s.url}/v1/fine_tuning/jobs/{i}/cancel", headers=h, timeout=60)
    return {"scenario": f"{jobs}-jobs", "body_mb": round(os.path.getsize(path) / 1e6, 1), "copies": jobs,
            "status": 200, "rss_before_mib": round(before, 1), "peak_mib": round(after, 1),
            "growth_mib": round(after - before, 1)}


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# flashzo serve: memory for uploads and shared files ({m['device']}, commit {m['commit']})", "",
             "| scenario | body MB | copies | status | RSS before (MiB) | peak / after (MiB) | growth (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['scenario']} | {r['body_mb']} | {r['copies']} | {r['status']} | {r['rss_before_mib']} | "
                     f"{r['peak_mib']} | {r['growth_mib']} |")
    lines += ["", "Uploads: the peak resident memory (VmHWM, reset before) minus the resident memory before. "
              "Jobs: the resident memory once every job is validated minus before they were created.",
              "", f"Command: `{m['command']}`", ""]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r["scenario"] for r in rows], [r["growth_mib"] for r in rows])
    ax.set_xlabel("memory growth of the server (MiB)")
    ax.set_title(f"flashzo serve memory (commit {results['meta']['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="8 MB uploads, 2 jobs on a 1 MB file; writes *_small.*")
    p.add_argument("--out-dir", default=harness.RESULTS, help="where serve_memory_cpu.* go")
    args = p.parse_args()
    upload_mb, big_mb, file_mb, jobs = (8, 8, 1, 2) if args.small else (63, 200, 5.8, 10)
    sys.path.insert(0, os.path.join(harness.REPO, "tests"))
    from helpers import TINY, write_word_tokenizer

    import flashzo
    from flashzo.engine import OPTConfig

    meta = harness.run_meta("serve_memory", "cpu", upload_mb=upload_mb, big_mb=big_mb, file_mb=file_mb, jobs=jobs,
                            command="python bench/bench_serve_memory.py " + " ".join(shlex.quote(a)
                                                                                     for a in sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="flashzo-bench-memory-") as tmp:
        model = os.path.join(tmp, "tiny")
        flashzo.save_opt(flashzo.OPTModel.from_config(OPTConfig(**TINY)), model)
        write_word_tokenizer(model, TINY["vocab_size"])
        rows = [measure_uploads(model, tmp, "upload-no-key", upload_mb, 1, None),
                measure_uploads(model, tmp, "4x-upload-no-key", upload_mb, 4, None),
                measure_uploads(model, tmp, "upload", big_mb, 1, KEY),
                measure_jobs(model, tmp, file_mb, jobs)]
        for r in rows:
            print(r, flush=True)
    meta["load_average_end"] = harness.load_average()
    stem = os.path.join(args.out_dir, "serve_memory_cpu" + ("_small" if args.small else ""))
    harness.write_results(stem, {"meta": meta, "rows": rows}, markdown=markdown, plot=plot, echo=True)


if __name__ == "__main__":
    main()
