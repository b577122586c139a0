"""Every Triton kernel of flashzo compiles for sm_80 and sm_90, as its launcher launches it, on a CPU.

tests/compile_check.py runs the real launchers (every dtype, every tile choice of the plan, aligned
and odd shapes) with Triton's compiler in place of a GPU, records each launch at the point Triton
would compile it, and compiles the distinct builds to cubin with the ptxas of the Triton wheel.
It needs Triton out of interpreter mode, so it runs in a subprocess without TRITON_INTERPRET, with
its own empty Triton cache (every build really runs ptxas). About 2 minutes on 2 idle cores.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SPILL_LIMIT = 64  # bytes of spill stores a build may have (ptxas -v); the defaults have at most 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    out = tmp / "report.json"
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_check.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    print(r.stdout.splitlines()[-1])
    return json.loads(out.read_text())


def _name(res):
    return f"sm_{res['arch']} {res['kernel'].split('.')[-1]} {res['constants']} ({res['cases'][0]})"


def test_every_build_compiles_to_cubin(report):
    errors = [f"{_name(res)}: {res['error']}" for res in report["results"] if "error" in res]
    assert not errors, "\n".join(errors)
    assert {res["arch"] for res in report["results"]} == {80, 90}
    assert all(res["ptxas_report"] and res["cubin_bytes"] > 0 for res in report["results"])


def test_no_register_spills(report):
    results = report["results"]
    spills = [f"{_name(res)}: {res['spill_stores']} B" for res in results if res["spill_stores"] > SPILL_LIMIT]
    assert not spills, "\n".join(spills)


def test_shared_memory_within_the_architecture(report):
    over = [f"{_name(res)}: {res['shared']} B" for res in report["results"] if res["shared"] > res["shared_limit"]]
    assert not over, "\n".join(over)


def test_dots_run_on_tensor_cores(report):
    """A tl.dot on TF32 (or 16-bit) operands must become mma / wgmma; only the fp32 path's "ieee"
    dots (full fp32 products, as torch's fp32 matmul) run on the FMA units by design."""
    dot_kernels = [res for res in report["results"] if res["dot_precisions"]]
    assert dot_kernels
    missing = [
        _name(res) for res in dot_kernels if set(res["dot_precisions"]) - {"ieee"} and not res["tensor_cores"]
    ]
    assert not missing, "\n".join(missing)
    assert any(res["tensor_cores"] for res in dot_kernels if res["arch"] == 90)


def test_every_launch_sets_fp_fusion_explicitly(report):
    """The CPU path rounds every op; each launch must say enable_fp_fusion=False itself (the
    subprocess runs with Triton's default set to fusion on, so a launch that forgets shows)."""
    loose = sorted(
        {_name(res) for res in report["results"] if res["launch_options"].get("enable_fp_fusion") is not False}
    )
    assert not loose, "\n".join(loose)
    assert all(res["options"]["enable_fp_fusion"] is False for res in report["results"])


def test_every_project_kernel_is_launched(report):
    """Every @triton.jit function in flashzo.kernels is either launched by some case or called from
    a launched kernel (a device helper such as _bf16_round_to_nearest_even)."""
    launched = set(report["launched"])
    sources = "\n".join(report["kernel_sources"].values())
    never = []
    for module, names in report["project_jit_functions"].items():
        for name in names:
            if f"{module}.{name}" not in launched and f"{name}(" not in sources:
                never.append(f"{module}.{name}")
    assert not never, f"no case launches {never}: add one to tests/compile_check.py"
    assert {"_gaussian_kernel", "_zo_update_kernel", "_lora_shrink_kernel", "_lora_reduce_kernel",
            "_lora_expand_kernel", "_quant_linear_kernel"} <= {k.split(".")[-1] for k in launched}  # fmt: skip


def test_every_plan_choice_is_built(report):
    """The builds cover every tile configuration the plan picks for the captured shapes: each
    dtype at every u width (8 .. 256) in the shrink and every r_pad (8 .. 64) in the expand."""
    seen = {}
    for res in report["results"]:
        kernel = res["kernel"].split(".")[-1]
        c = res["constants"]
        if kernel == "_lora_shrink_kernel":
            seen.setdefault(("shrink", c["PRECISION"]), set()).add(c["U_COLS"])
        elif kernel == "_lora_expand_kernel":
            seen.setdefault(("expand", c["PRECISION"]), set()).add(c["R_PAD"])
    widths = {w for w in (8, 16, 32, 64, 128, 256) if w >= report["min_dot_inner"]}
    for precision in ("ieee", "tf32"):
        assert widths <= seen[("shrink", precision)]
        assert {16, 32, 64} <= seen[("expand", precision)]


def test_every_quantized_format_is_built(report):
    """The quantized GEMM is built for int8 and int4, symmetric and asymmetric, on tensor cores for
    16-bit x and with "ieee" dots for fp32, including the odd shape's unaligned rows."""
    builds = [res for res in report["results"] if res["kernel"].endswith("_quant_linear_kernel")]
    kinds = {(c["INT4"], c["SYMMETRIC"], c["PRECISION"]) for c in (res["constants"] for res in builds)}
    assert {(i4, sym, "tf32") for i4 in (True, False) for sym in (True, False)} <= kinds
    assert {(True, False, "ieee"), (False, True, "ieee")} <= kinds
    assert all(res["tensor_cores"] for res in builds if res["constants"]["PRECISION"] == "tf32")
    assert any("odd quant" in case for res in builds for case in res["cases"])
