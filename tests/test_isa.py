"""The batch-invariant guarantee at other thread counts and on other instruction sets (docs/design.md,
"Batch invariance"): tests/isa_worker.py's checks and the distributed bit-identity, in subprocesses.

Each variant is an environment in which torch and MKL take other code paths on this very machine:

    native      what the machine picks
    avx2        ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2 (with
                the mkl-intel preload where it builds, so that MKL's AVX2 kernels run on any CPU)
    mkl-intel   MKL told it runs on an Intel CPU (tests/mkl_intel_path.c, LD_PRELOAD): on an AMD CPU
                MKL then runs the AVX2 / AVX-512 kernels an Intel CPU gets (on an Intel CPU it
                changes nothing)

In each, the worker runs at 2 and at 7 intra-op threads (7: more than the CI's cores, so that a
library cuts its work at other places) and 2 dist_worker ranks run the batch-invariant cases on one
thread each: no process may find a row whose bits depend on the rows beside it, the workers'
digests must be equal, and the ranks' results must be the workers' bits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import dist_worker as W
import isa_worker
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = (2, 7)


def mkl_intel_preload(tmp_path) -> str | None:
    """The preload library built from tests/mkl_intel_path.c, or None (no C compiler, or no MKL in torch)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not torch.backends.mkl.is_available():
        return None
    out = str(tmp_path / "libmkl_intel_path.so")
    done = subprocess.run([cc, "-shared", "-fPIC", "-o", out, os.path.join(HERE, "mkl_intel_path.c")],
                          capture_output=True, text=True)
    return out if done.returncode == 0 else None


def variant_env(name: str, tmp_path) -> dict:
    env = dict(os.environ)
    preload = mkl_intel_preload(tmp_path) if name in ("avx2", "mkl-intel") else None
    if name == "mkl-intel" and preload is None:
        pytest.skip("no C compiler to build tests/mkl_intel_path.c, or a torch without MKL")
    if preload:
        env["LD_PRELOAD"] = " ".join(p for p in (preload, env.get("LD_PRELOAD")) if p)
    if name == "avx2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip(f"a CPU without AVX2 ({torch.backends.cpu.get_cpu_capability()})")
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    return env


@pytest.mark.parametrize("variant", ["native", "avx2", "mkl-intel"])
def test_the_mode_gives_the_same_bits_at_any_thread_count_and_rank_split(tmp_path, variant):
    env = variant_env(variant, tmp_path)
    ranks = W.Launch(tmp_path, "invariant", env=env)
    workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "isa_worker.py"), str(tmp_path / f"w{t}.json"),
                                 str(t)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for t in THREADS]
    logs = [p.communicate(timeout=300)[0] for p in workers]
    results, rank_logs = ranks.results(wait_s=300)
    for t, p, log in zip(THREADS, workers, logs):
        assert p.returncode == 0, f"{t} threads:\n{log[-3000:]}"
    got = {t: json.load(open(tmp_path / f"w{t}.json")) for t in THREADS}
    first = got[THREADS[0]]
    if variant == "avx2":
        assert first["capability"] == "AVX2", first["capability"]  # the variant is real
    if variant == "mkl-intel":
        assert "Intel(R) Architecture processors" not in first["mkl"], first["mkl"]  # not MKL's generic path
    for t, res in got.items():
        assert res["threads"] == t and res["capability"] == first["capability"] and res["mkl"] == first["mkl"]
        assert res["problems"] == [], (t, first["capability"], first["mkl"], res["problems"])
        assert res["ops"] == first["ops"], (t, [k for k in res["ops"] if res["ops"][k] != first["ops"][k]])
        assert res["cases"] == first["cases"], (t, [k for k in res["cases"] if res["cases"][k] != first["cases"][k]])
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}\n{rank_logs[r][-3000:]}"
        for name, case in res["cases"].items():
            assert isa_worker.digest_case(case) == first["cases"][name], (r, name)
