"""flashzo.memory: the table of the memory each model size's weights take in each mode, as `flashzo train
--help` prints it and docs/models.md shows it, from the bytes per parameter bench/bench_quant_model.py
measured (bench/results/quant_model_cpu.json).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashzo.memory import BYTES_PER_PARAM, memory_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "quant_model_cpu.json"


def test_bytes_per_param_are_the_measured_ones():
    """Each mode's bytes per parameter is llama-3.2-1b's in the committed results (to the 4 decimals kept)."""
    rows = [r for r in json.loads(RESULTS.read_text())["rows"]
            if r.get("kind") == "memory" and r["model"] == "llama-3.2-1b"]
    measured = {r["mode"]: round(r["bytes_per_param"], 4) for r in rows}
    assert set(measured) == {"fp32", "int8", "int4"}, f"{RESULTS.name} has no llama-3.2-1b row of every mode"
    for mode, value in measured.items():
        assert BYTES_PER_PARAM[mode] == pytest.approx(value, abs=1e-12), mode


def test_the_docs_and_train_help_print_the_same_table():
    table = memory_table()
    assert table in (ROOT / "docs" / "models.md").read_text()
    out = subprocess.run([sys.executable, "-m", "flashzo", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert table in out


def test_the_table_reaches_70b_in_every_mode():
    lines = memory_table().splitlines()
    assert lines[0].split() == ["parameters", "fp32", "bf16", "int8", "int4"]
    last = lines[-2].split()
    assert last[0] == "70B" and len(last) == 5
    # 70e9 parameters at 4 bytes: 260.8 GiB, printed to the GiB
    assert last[1] == f"{70e9 * 4 / 2**30:.0f}"
