"""The microbenchmark, the sharing report, the service benchmark and the code notes' measurements run in
their seconds-long smoke modes (never timed here)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts' CPU paths are plain torch
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_perturbed_lora_microbenchmark_smoke(tmp_path):
    out = run("bench_perturbed_lora.py", "--smoke", "--out", str(tmp_path))
    names = os.listdir(tmp_path)
    assert any(n.endswith(".csv") for n in names) and any(n.endswith(".png") for n in names), names
    assert "ms" in out
    assert "traffic model" in out and " expand " in out and " shrink " in out  # lora_launches' table


def test_sharing_report_smoke(tmp_path):
    run("report_sharing.py", "--smoke", "--out-dir", str(tmp_path))
    names = os.listdir(tmp_path)
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".md") for n in names), names


def test_serve_benchmark_smoke(tmp_path):
    out = run("bench_serve.py", "--smoke", "--out-dir", str(tmp_path))
    names = os.listdir(tmp_path)
    assert {"serve_cpu_smoke.json", "serve_cpu_smoke.md", "serve_cpu_smoke.png"} <= set(names), names
    assert "serve K=2" in out and "train K=2" in out


def test_quant_benchmark_smoke(tmp_path):
    import json

    out = run("bench_quant.py", "--smoke", "--out", str(tmp_path))
    names = set(os.listdir(tmp_path))
    assert {"quant_cpu_smoke.json", "quant_cpu_smoke.md", "quant_cpu_smoke.png"} <= names, names
    assert "traffic model" in out and " fused " in out and " unfused " in out  # quant_launches' table
    results = json.loads((tmp_path / "quant_cpu_smoke.json").read_text())
    flashzo = [r for r in results["rows"] if r["variant"].startswith("flashzo")]
    assert flashzo and all(r["bit_exact"] for r in flashzo)  # the CPU path is the reference's bits
    assert {f["format"] for f in results["meta"]["formats"]} >= {"int8 per-channel sym fp16", "int4 g32 asym fp16"}


def test_code_notes_smoke(tmp_path):
    out = run("code_notes.py", "--smoke", "--out", str(tmp_path))
    names = os.listdir(tmp_path)
    assert {"code_notes_cpu_smoke.json", "code_notes_cpu_smoke.md", "code_notes_cpu_smoke.png"} <= set(names), names
    assert "kernels/randn.py TORCH_CHUNK" in out and "the expand's traffic over y's own" in out
    for note in ("kernels/rows.py row_chunk", "engine/attention.py grouped-query attention",
                 "kernels/quant.py dequantize_into", "src/flashzo/cli.py demo threads",
                 "tests/test_serve.py SHARED_BOUND"):
        assert f"## {note}" in out, note  # the notes' later sections run in smoke mode too
    assert "python bench/code_notes.py --smoke" in out  # the command that made the figures


def test_quant_model_benchmark_smoke(tmp_path):
    import json

    out = run("bench_quant_model.py", "--smoke", "--out", str(tmp_path))
    names = set(os.listdir(tmp_path))
    assert {"quant_model_cpu_smoke.json", "quant_model_cpu_smoke.md", "quant_model_cpu_smoke.png"} <= names, names
    rows = json.loads((tmp_path / "quant_model_cpu_smoke.json").read_text())["rows"]
    memory = {r["mode"]: r for r in rows if r["kind"] == "memory"}
    assert set(memory) == {"fp32", "int8", "int4"} and "over A" in out
    assert memory["int4"]["weights_mib"] < memory["int8"]["weights_mib"] < memory["fp32"]["weights_mib"]
    repacked = [r for r in rows if r["kind"] == "logprobs" and r["source"] == "gguf repacked"]
    assert all(r["bit_exact"] for r in repacked)  # empty without the real model installed


def test_reward_decode_benchmark_smoke(tmp_path):
    out = run("bench_reward_decode.py", "--smoke", "--out-dir", str(tmp_path))
    assert {"reward_decode_smoke.json", "reward_decode_smoke.md", "reward_decode_smoke.png"} <= set(
        os.listdir(tmp_path))
    assert "perturbed/plain" in out


def test_reward_calls_benchmark_smoke(tmp_path):
    out = run("bench_reward_calls.py", "--smoke", "--out-dir", str(tmp_path))
    assert "reward_calls_smoke.json" in os.listdir(tmp_path) and "worker us/call" in out


def test_reward_es_benchmark_smoke(tmp_path):
    import json

    out = run("bench_reward_es.py", "--smoke", "--out-dir", str(tmp_path))
    assert {"reward_es_smoke.json", "reward_es_smoke.md", "reward_es_smoke.png"} <= set(os.listdir(tmp_path))
    rows = json.loads((tmp_path / "reward_es_smoke.json").read_text())["rows"]
    curve = {(r["side"], r["step"]) for r in rows if r["kind"] == "curve"}
    assert curve == {(side, t) for side in ("flashzo", "baseline") for t in (0, 1, 2)}  # both sides, every step
    summary = {r["side"]: r for r in rows if r["kind"] == "summary"}
    assert summary["flashzo"]["before"] == summary["baseline"]["before"]  # one start
    assert summary["flashzo"]["adapter_change"] > 0 and summary["baseline"]["adapter_change"] > 0  # both updated
    assert [r["variant"] for r in rows if r["kind"] == "decode"] == ["plain", "perturbed", "transformers"]
    assert "vs flashzo plain" in out


def test_es_at_scale_baseline_update_is_the_z_scored_sum_of_its_members_noise():
    """bench/es_baseline.py: members restored after scoring, then theta += alpha / N sum_n R_hat_n eps_n with
    R_hat the z-scores of engine/estimators.py (up to ES at Scale's 1e-8 in the denominator)."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from es_baseline import ESAtScale

    from flashzo.engine.estimators import zscore

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    theta0 = [p.detach().clone() for p in model.parameters()]
    seen = []

    def gen(prompts):  # a member's "generation": the sum of its perturbed weights, one per prompt
        seen.append(sum(float(p.sum()) for p in model.parameters()))
        return [[len(seen)] for _ in prompts]

    es = ESAtScale(model, population=6, sigma=0.1, alpha=0.3, seed=4, generate=gen)
    out = es.step([[1], [2]], lambda p, tokens: float(tokens[0] % 3) + p)  # member n's reward: n % 3 + mean p
    assert len(set(seen)) == 6  # every member saw its own perturbed weights
    f = zscore([sum(row) / len(row) for row in out["rewards"]])
    for i, (p, p0) in enumerate(zip(model.parameters(), theta0)):
        expect = p0 + 0.3 / 6 * sum(w * es.noise(s, i, p) for s, w in zip(out["seeds"], f))
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-6)
