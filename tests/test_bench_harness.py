"""bench/harness.py: the peak table, the timing quantiles (on a fake clock), and the result format's
round trip through its writer and reader."""

from __future__ import annotations

import csv
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import harness  # noqa: E402


@pytest.mark.parametrize("name, tflops, tbps", [
    ("NVIDIA H100 80GB HBM3", 989.0, 3.35),  # the SXM part's name
    ("NVIDIA H100 PCIe", 756.0, 2.0),
    ("NVIDIA H200", 989.0, 4.8),
    ("NVIDIA A100-SXM4-80GB", 312.0, 2.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 1.555),
    ("NVIDIA A100-PCIE-40GB", 312.0, 1.555),
    ("NVIDIA A100 80GB PCIe", 312.0, 1.935),
])
def test_peak_table(name, tflops, tbps):
    peak = harness.peak_for(name)
    assert (peak.bf16_tflops, peak.hbm_tbps) == (tflops, tbps)


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA H100 NVL", "NVIDIA H200 NVL",
                                  "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB"])
def test_peak_table_refuses_to_guess(name):
    assert harness.peak_for(name) is None


def test_quantile_is_linear_interpolation():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 20):
        x = torch.rand(n, generator=g, dtype=torch.float64)
        for q in harness.QUANTILES + (0.0, 1.0):
            assert harness.quantile(x.tolist(), q) == pytest.approx(float(torch.quantile(x, q)), abs=1e-12)
    with pytest.raises(ValueError):
        harness.quantile([], 0.5)


class FakeClock:
    """perf_counter stand-in: call k (k = 0, 1, ...) of the timed function lasts durations[k] s."""

    def __init__(self, durations):
        self.now, self.durations, self.calls, self.running = 0.0, list(durations), 0, False

    def __call__(self) -> float:
        if self.running:  # the clock is read when the call ends
            self.now += self.durations[self.calls]
            self.calls += 1
        self.running = not self.running
        return self.now


def test_time_ms_quantiles_on_a_fake_clock():
    calls = []
    clock = FakeClock([0.005, 0.001, 0.004, 0.002, 0.003])
    t = harness.time_ms(lambda: calls.append(1), "cpu", warmup=2, reps=5, timer=clock)
    assert len(calls) == 7 and clock.calls == 5  # warm-up calls are not timed
    # sorted [1, 2, 3, 4, 5] ms: p20 at position 0.8, p80 at 3.2
    assert t == pytest.approx({"p20_ms": 1.8, "p50_ms": 3.0, "p80_ms": 4.2})


def test_time_interleaved_rotates_and_skips_warmup():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    clock = FakeClock([0.001 * (i + 1) for i in range(9)])
    times = harness.time_interleaved(fns, warmup=1, reps=2, timer=clock)
    assert "".join(order) == "abc" + "bca" + "cab"
    # the clock runs in every round, warm-up included; round 1 (calls 3-5) is b, c, a; round 2 c, a, b
    assert {k: pytest.approx(v) for k, v in times.items()} == {"a": [6.0, 8.0], "b": [4.0, 9.0], "c": [5.0, 7.0]}


def test_device_info_and_meta_on_cpu():
    meta = harness.run_meta("unit", "cpu", dtype="fp32")
    assert meta["device"] == f"cpu ({harness.cpu_name()}, {torch.get_num_threads()} threads)"
    assert meta["device_type"] == "cpu" and meta["peak_bf16_tflops"] is None and meta["peak_hbm_tbps"] is None
    assert meta["torch"] == torch.__version__ and meta["dtype"] == "fp32" and len(meta["load_average"]) == 3
    assert re.fullmatch(r"[0-9a-f]{4,}(-dirty)?|unknown", meta["commit"])
    assert harness.device_tag(meta) == "cpu"
    assert harness.device_tag({"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}) == "gpu-nvidia-h100-80gb-hbm3"


def _results():
    meta = harness.run_meta("unit", "cpu", model="opt-tiny", dtype="bf16")
    rows = [dict(model="opt-tiny", T=37, variant=v, **harness.timing_fields([3.0, 1.0, 2.0 + i]), ratio=0.5 * i,
                 flashzo_p20_ms=None, flashzo_p50_ms=None, flashzo_p80_ms=None, note=None, ms_all=[1.0, 2.0])
            for i, v in enumerate(["fused", "base"])]
    return {"meta": meta, "rows": rows}


def test_write_and_read_round_trip(tmp_path):
    results = _results()
    seen = {}

    def plot(res, path):
        seen["plot"] = res
        with open(path, "wb") as f:
            f.write(b"png")

    paths = harness.write_results(str(tmp_path / "unit"), results, plot=plot,
                                  markdown=lambda r: f"| {len(r['rows'])} rows |\n")
    assert [os.path.basename(p) for p in paths] == ["unit.json", "unit.csv", "unit.md", "unit.png"]
    assert harness.read_results(paths[0]) == results and seen["plot"] is results
    assert (tmp_path / "unit.md").read_text() == "| 2 rows |\n"
    with open(paths[1]) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["fused", "base"]
    assert float(rows[1]["p80_ms"]) == pytest.approx(results["rows"][1]["p80_ms"])
    assert rows[0]["note"] == "" and rows[0]["device"] == results["meta"]["device"]  # meta columns added
    assert rows[0]["commit"] == results["meta"]["commit"] and rows[1]["dtype"] == "bf16"


@pytest.mark.parametrize("break_it, message", [
    (lambda r: r["rows"][0].update(p20_ms=9.0), "out of order"),
    (lambda r: r["rows"][0].pop("p80_ms"), "without"),
    (lambda r: r["rows"][0].update(extra={"a": 1}), "scalars and lists"),
    (lambda r: r["meta"].update(schema=0), "schema"),
    (lambda r: r["meta"].pop("commit"), "lacks"),
    (lambda r: r.update(results=[]), "exactly"),
])
def test_check_results_refuses(tmp_path, break_it, message):
    results = _results()
    harness.check_results(results)
    break_it(results)
    with pytest.raises(ValueError, match=message):
        harness.check_results(results)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=message):
        harness.read_results(str(path))


def test_peak_memory_on_cpu_sees_an_allocation():
    keep = []
    small = harness.peak_memory(lambda: None, "cpu")
    big = harness.peak_memory(lambda: keep.append(torch.ones(64 * 2**20 // 4)), "cpu")  # 64 MiB, touched
    assert big["method"] == small["method"] and len(big["ms_all"]) == 1
    if big["method"].startswith("VmHWM"):
        assert big["step_mib"] >= 60 > small["step_mib"]
    assert big["peak_mib"] >= big["loaded_mib"] > 0
