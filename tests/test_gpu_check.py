"""scripts/gpu_check.sh: the plumbing of the one GPU command, run on a CPU with tiny shapes (--dry-run)."""

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
PARTS = ["env", "install", "pytest_gpu", "kernels", "attention", "quant", "step", "reward_es", "reward_decode"]


def _run(out, **env):
    """The dry run with this interpreter as $PYTHON, and a PATH whose python and python3 fail: the script
    must run the Python it is given, never one it finds on the PATH."""
    poisoned = os.path.join(out, "poisoned-bin")
    os.makedirs(poisoned, exist_ok=True)
    for name in ("python", "python3"):
        with open(os.path.join(poisoned, name), "w") as f:
            f.write("#!/bin/sh\necho \"$0 from the PATH was run\" >&2\nexit 97\n")
        os.chmod(os.path.join(poisoned, name), 0o755)
    path = poisoned + os.pathsep + os.environ.get("PATH", "")
    return subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "PATH": path, **env})


def _status(out):
    with open(os.path.join(out, "work", "status.tsv")) as f:
        return {name: state for name, state, _ in (line.rstrip("\n").split("\t") for line in f)}


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_summary(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _status(tmp_path) == dict.fromkeys(PARTS, "pass")
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run" in summary and "| step | pass |" in summary
    assert "Paged attention" in summary and "# Quantized linear" in summary  # the result tables are in the summary
    with tarfile.open(tmp_path / "gpu_check.tgz") as tar:
        names = set(tar.getnames())
    for part in PARTS:
        assert f"work/{part}.log" in names
    assert any(n.startswith("work/results/step_smoke") for n in names)


def test_a_part_past_the_deadline_is_reported_and_the_rest_still_runs(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_TOTAL_S="12")
    assert proc.returncode == 1
    status = _status(tmp_path)
    assert set(status) == set(PARTS)  # every part has a line, whatever happened to it
    assert any(s.startswith(("TIMEOUT", "SKIPPED")) for s in status.values()), status
    assert (tmp_path / "summary.md").exists() and (tmp_path / "gpu_check.tgz").exists()
