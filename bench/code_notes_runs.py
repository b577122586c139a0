"""bench/code_notes.py's measurements of whole runs and builds: the demo's thread count, how far a job
out of the batch-invariant mode drifts beside another, how close the ranks of a distributed run
stay to one process, and the registers of the quantized GEMM's alternative tiles.

Each function returns rows (code_notes_ops.row); `smoke` picks small sizes. Run as a script, this
module compiles the quantized GEMM's builds (`quant_register_rows`' child process: Triton's compiler
must not be in interpreter mode, and the capture leaves a stand-in driver behind).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import harness
import torch
from code_notes_ops import row

TESTS = os.path.join(harness.REPO, "tests")


def _tests_on_path() -> None:
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)


# --------------------------------------------------------------------------------------------------
# src/flashzo/cli.py: the demo's one thread


def demo_rows(smoke: bool, reps: int) -> list[dict]:
    """Wall-clock time of the tiny demo's steps and of the real demo's held-out evaluation at 1 and 2
    intra-op threads, the calls interleaved (wall clock: thread hand-offs wait, they burn no CPU)."""
    from flashzo.cli import _trainer_from_args, build_parser, demo_args
    from flashzo.engine.opt import OPTModel
    from flashzo.loop import batch_for_step
    from flashzo.tasks import synthetic_task

    note = "src/flashzo/cli.py demo threads"
    args = demo_args(build_parser().parse_args(["demo", "--tiny"]), "tiny")
    model = OPTModel.from_config("opt-tiny", seed=args.seed)
    train = synthetic_task(args.train_size, seed=args.seed, split="train")
    trainers = {n: _trainer_from_args(args, model) for n in (1, 2)}
    steps = {1: 0, 2: 0}

    def step(n):
        with _threads(n):
            trainers[n].step(batch_for_step(train, args.batch_size, steps[n], args.seed))
        steps[n] += 1

    times = harness.time_interleaved({n: lambda n=n: step(n) for n in (1, 2)}, warmup=2, reps=3 * reps)
    out = [row(note, f"opt-tiny demo step (batch {args.batch_size}), {n} thread{'s' * (n > 1)}", "wall time",
               round(harness.quantile(times[n], 0.5), 2), "ms") for n in (1, 2)]
    return out + ([] if smoke else _real_eval_rows(note, reps))


def _real_eval_rows(note: str, reps: int) -> list[dict]:
    import random

    try:
        from flashzo.cli import _trainer_from_args, build_parser, demo_args
        from flashzo.engine.gguf import gguf_tokenizer
        from flashzo.engine.loading import load_model
        from flashzo.real import sentiment_task, smollm2_path

        path = smollm2_path()
        model, tokenizer = load_model(path), gguf_tokenizer(path)
        args = demo_args(build_parser().parse_args(["demo"]), "real")
        _, held = sentiment_task(tokenizer, seed=0)
    except Exception as e:  # noqa: BLE001 - any missing piece: the case is skipped, with the reason
        print(f"demo: the SmolLM2 evaluation skipped ({e})", file=sys.stderr)
        return []
    held_out = random.Random(args.seed).sample(held, min(args.eval_size, len(held)))
    trainer = _trainer_from_args(args, model)

    def evaluate(n):
        with _threads(n):
            trainer.evaluate(held_out, batch_size=args.eval_batch_size)

    times = harness.time_interleaved({n: lambda n=n: evaluate(n) for n in (1, 2)}, warmup=1, reps=max(2, reps // 2))
    return [row(note, f"SmolLM2-135M demo held-out evaluation ({len(held_out)} words), {n} thread{'s' * (n > 1)}",
                "wall time", round(harness.quantile(times[n], 0.5) / 1e3, 2), "s") for n in (1, 2)]


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


# --------------------------------------------------------------------------------------------------
# tests/test_serve.py SHARED_BOUND: two jobs in one forward, out of the batch-invariant mode


def shared_rows(smoke: bool) -> list[dict]:
    """The test's two jobs (tests/test_serve.py, test_without_the_mode_a_shared_job_stays_within_bound)
    on the engine: every step in one forward (step_together, as the scheduler runs a group) against
    each job alone, one thread as the server runs; random token data on the tests' tiny OPT."""
    _tests_on_path()
    import dist_worker as W

    from flashzo.engine.mezo import MeZOTrainer, step_together
    from flashzo.loop import batch_for_step
    from flashzo.run import RunOptions

    note = "tests/test_serve.py SHARED_BOUND"
    steps = 4 if smoke else 24
    model = W.make_model("opt")
    jobs = [(RunOptions(steps=steps, batch_size=4, lr=3e-2, eps=1e-2, lora_r=2, seed=1),
             W.make_examples("cls2", 40, seed=1)),
            (RunOptions(steps=steps, batch_size=3, lr=2e-2, eps=1e-2, lora_r=2, seed=2),
             W.make_examples("cls2", 40, seed=2))]

    def trainer(opts):
        return MeZOTrainer(model, opts.lora_config(), opts.mezo_config())

    with _threads(1):
        solo, shared = [trainer(o) for o, _ in jobs], [trainer(o) for o, _ in jobs]
        start = [t.adapter.buffer.clone() for t in solo]
        for t in range(steps):
            for tr, (o, data) in zip(solo, jobs):
                tr.step(batch_for_step(data, o.batch_size, t, o.seed))
            step_together(shared, [batch_for_step(data, o.batch_size, t, o.seed) for o, data in jobs])
    out = []
    for j, (o, _) in enumerate(jobs):
        diff = float((shared[j].adapter.buffer - solo[j].adapter.buffer).abs().max())
        moved = float((solo[j].adapter.buffer - start[j]).abs().max())
        case = f"job {j + 1} (lr {o.lr}, eps {o.eps}, batch {o.batch_size}, r={o.lora_r}), {steps} steps all shared"
        out += [row(note, case, "largest element-wise difference from the solo run", f"{diff:.2g}", ""),
                row(note, case, "the same, over the largest distance an element travelled", f"{diff / moved:.2g}", "")]
    return out


# --------------------------------------------------------------------------------------------------
# tests/test_distributed.py: the ranks against one process


def distributed_rows() -> list[dict]:
    """tests/test_distributed.py's equivalence runs: 2 gloo ranks (tests/dist_worker.py) against the
    same cases in this process; the largest relative loss difference and adapter difference."""
    _tests_on_path()
    import dist_worker as W

    note = "tests/test_distributed.py"
    run = W.Launch(pathlib.Path(tempfile.mkdtemp()), "equivalence")
    with _threads(1):
        models = {f: W.make_model(f) for f in ("opt", "llama")}
        ref = {name: W.run_case(models[W.family_of_case(name)], par, task, q, n) for name, par, task, q, n in W.CASES}
    results, logs = run.results()
    worst_loss, worst_adapter = 0.0, 0.0
    for r, res in enumerate(results):
        if res is None or "error" in res:
            raise RuntimeError(f"rank {r}: {res and res.get('error')}\n{logs[r][-2000:]}")
        for name, got in res["cases"].items():
            for key in ("loss_plus", "loss_minus", "loss"):
                a, b = torch.tensor(got[key], dtype=torch.float64), torch.tensor(ref[name][key], dtype=torch.float64)
                worst_loss = max(worst_loss, float(((a - b).abs() / b.abs()).max()))
            worst_adapter = max(worst_adapter, float((got["adapter"] - ref[name]["adapter"]).abs().max()))
    case = f"{len(W.CASES)} cases x {W.STEPS} steps, 2 ranks vs 1 process, lr = eps = 1e-2"
    return [row(note, case, "largest relative loss difference", f"{worst_loss:.2g}", ""),
            row(note, case, "largest adapter difference", f"{worst_adapter:.2g}", "")]


# --------------------------------------------------------------------------------------------------
# kernels/quant_plan.py: registers of the chosen and the alternative tiles


def quant_register_rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "quant-registers"], env=env,
                          capture_output=True, text=True, check=True)
    res = json.loads(done.stdout.splitlines()[-1])
    note = f"kernels/quant_plan.py quant_plan (triton {res['triton']})"
    return [row(note, case, "sm_80 / sm_90", value, "") for case, value in res["builds"].items()]


def _quant_register_child() -> dict:
    """Compile, for sm_80 and sm_90, the quantized GEMM's builds with the plan's tiles and with the
    alternatives its NOTE names (tests/compile_check.py's capture and compile)."""
    _tests_on_path()
    import compile_check as C
    import triton

    from flashzo.kernels.quant_linear import quantized_linear
    from flashzo.kernels.quant_plan import QuantKernelConfig

    meta = torch.device("meta")

    def calls():
        x, b = torch.empty(2048, 2048, dtype=torch.bfloat16, device=meta), torch.empty(8192, dtype=torch.bfloat16,
                                                                                       device=meta)
        for fmt in (("int8", None, True, "float16"), ("int4", 32, False, "float16")):
            qw = C.quant_weight(8192, 2048, *fmt, meta)
            yield f"bf16 {qw.describe()}, the plan's tiles", lambda qw=qw: quantized_linear(x, qw, b, impl="triton")
        qw = C.quant_weight(8192, 2048, "int8", None, True, "float16", meta)
        yield f"bf16 {qw.describe()}, 4 warps", lambda: quantized_linear(
            x, qw, b, impl="triton", config=QuantKernelConfig(num_warps=4))
        xo = torch.empty(37, 70, dtype=torch.bfloat16, device=meta)
        qo = C.quant_weight(33, 70, "int8", None, False, "float16", meta)
        for block_k in (32, 64):
            yield f"odd bf16 {qo.describe()}, K step {block_k}", lambda k=block_k: quantized_linear(
                xo, qo, None, impl="triton", config=QuantKernelConfig(block_k=k))

    C.representative_calls = calls  # capture() runs these through the real launcher
    builds = {}
    for rec in C.capture():
        name = rec["case"]
        values = []
        for arch in C.ARCHS:
            b = C.compile_one((rec, arch))
            values.append(b.get("error", "").split("\n")[0] or f"{b['registers']} regs, {b['spill_stores']} B spilled")
        builds[name] = " / ".join(values)
    return {"triton": triton.__version__, "builds": builds}


if __name__ == "__main__":
    print(json.dumps({"quant-registers": _quant_register_child}[sys.argv[1]]()))
