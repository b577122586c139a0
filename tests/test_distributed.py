"""MeZO under torch.distributed (engine/distributed.py): 2 gloo processes on the CPU.

Each test starts its ranks as subprocesses (tests/dist_worker.py) and compares them with the
single-process run of the same config, computed here.

Tolerances. Both modes compute the same losses from differently shaped forwards (a rank's batch holds
fewer copies or fewer examples), and CPU GEMMs round a row differently for different row counts, so a
loss agrees to a few fp32 ulps, not bitwise (asserted within 1e-6 relative). g = (l+ - l-) / (2 eps)
carries that absolute error divided by 2 eps, so g is compared with exactly that bound, not a
guessed tolerance. The adapter moves by lr * g * z, so its error grows like lr / (2 eps) * |dl| * |z|
per step: lr = eps = 1e-2 (dist_worker.make_trainer) keeps it within 1e-6 over the test's steps,
where a larger lr / eps would not. The largest loss and adapter differences of these runs:
bench/results/code_notes_cpu.md, "tests/test_distributed.py". Across ranks the adapters are
bit-identical: every rank applies the update from the same gathered losses.
"""

import json
import math
import os
import subprocess
import sys

import dist_worker as W
import pytest
import torch

from flashzo import MeZOConfig, MeZOTrainer
from flashzo.engine import distributed

LOSS_RTOL = 1e-6
ADAPTER_ATOL = 1e-6


def launch(tmp_path, scenario, *, wait_s=90.0, wait_for=None, **spec):
    return W.Launch(tmp_path, scenario, **spec).results(wait_s=wait_s, wait_for=wait_for)


def check_close_run(got, ref, eps):
    """Losses within LOSS_RTOL, g within what those loss errors allow, adapters within ADAPTER_ATOL."""
    for key in ("loss_plus", "loss_minus", "loss"):
        for a, b in zip(got[key], ref[key]):
            assert a == pytest.approx(b, rel=LOSS_RTOL, abs=0), key
    for t, (ga, gb) in enumerate(zip(got["grads"], ref["grads"])):
        for i, (x, y) in enumerate(zip(ga, gb)):
            dl = abs(got["loss_plus"][t][i] - ref["loss_plus"][t][i]) + \
                abs(got["loss_minus"][t][i] - ref["loss_minus"][t][i])
            assert abs(x - y) <= dl / (2 * eps) * (1 + 1e-6) + 1e-12, (t, i, x, y)
    torch.testing.assert_close(got["adapter"], ref["adapter"], rtol=0, atol=ADAPTER_ATOL)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """All CASES on 2 ranks in one launch, and the same runs in this (single) process."""
    run = W.Launch(tmp_path_factory.mktemp("dist"), "equivalence")  # the ranks start while the reference runs
    models = {f: W.make_model(f) for f in ("opt", "llama")}
    ref = {name: W.run_case(models[W.family_of_case(name)], par, task, q, n) for name, par, task, q, n in W.CASES}
    results, logs = run.results()
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}\n{logs[r][-3000:]}"
    return ref, results


@pytest.mark.parametrize("case", W.CASES, ids=[c[0] for c in W.CASES])
def test_trajectory_equals_single_process(equivalence, case):
    ref, results = equivalence
    name = case[0]
    for res in results:
        check_close_run(res["cases"][name], ref[name], eps=1e-2)
    # every rank applies the same update: the ranks' adapters are bit-identical, whatever the rounding above
    assert torch.equal(results[0]["cases"][name]["adapter"], results[1]["cases"][name]["adapter"])
    assert results[0]["cases"][name]["loss"] == results[1]["cases"][name]["loss"]
    start = W.make_trainer(W.make_model(W.family_of_case(name)), None, 1).adapter.buffer
    moved = (ref[name]["adapter"] - start).abs().max()
    assert moved > 1e3 * ADAPTER_ATOL  # the comparison above is not trivially true
    ev, ev_ref = results[0]["cases"][name]["eval"], ref[name]["eval"]  # evaluate() shards the eval set too
    assert ev["loss"] == pytest.approx(ev_ref["loss"], rel=LOSS_RTOL)
    assert ev.get("accuracy") == ev_ref.get("accuracy") and ev["num_examples"] == ev_ref["num_examples"]
    assert ref[name]["bytes"] == [0] * W.STEPS


def test_batch_invariant_runs_equal_the_single_process_bit_for_bit(tmp_path):
    """In the batch-invariant mode (engine/invariant.py) a rank's share of the batch or of the
    perturbations gives every loss the single process's bits, so the trajectory is the same bits too,
    whatever the number of ranks (here 2 single-threaded ranks against this process)."""
    run = W.Launch(tmp_path, "invariant")
    models = {f: W.make_model(f) for f in ("opt", "llama")}
    ref = {name: W.run_case(models[W.family_of_case(name)], par, task, q, n, batch_invariant=True)
           for name, par, task, q, n in W.INVARIANT_CASES}
    results, logs = run.results()
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}\n{logs[r][-3000:]}"
    for name, parallel, _, q, _ in W.INVARIANT_CASES:
        for res in results:
            got = res["cases"][name]
            for key in ("loss_plus", "loss_minus", "grads", "loss", "eval"):
                assert got[key] == ref[name][key], (name, key)
            assert torch.equal(got["adapter"], ref[name]["adapter"]), name
            # batch mode: the loss sums travel exactly, as LIMBS float64 limbs each
            per_rank = 5 + (2 * math.ceil(q / 2) if parallel == "perturbations" else 2 * q * (distributed.LIMBS + 1))
            assert got["bytes"] == [2 * 8 * per_rank] * W.STEPS, name


def test_reward_runs_on_two_ranks_equal_one_process_bit_for_bit(tmp_path):
    """A reward run (batch-invariant) split over 2 ranks, by perturbations or by examples: every copy decodes
    the bits it decodes alone, every rank assembles the same rewards, so the trajectory and the evaluation
    are the single process's, bit for bit."""
    run = W.Launch(tmp_path, "rewards")
    models = {f: W.make_model(f) for f in ("opt", "llama")}
    ref = {name: W.run_reward_case(models["llama" if "llama" in name else "opt"], par, est, q, n)
           for name, par, est, q, n in W.REWARD_CASES}
    results, logs = run.results(wait_s=180)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}\n{logs[r][-3000:]}"
    for name, parallel, _, q, n in W.REWARD_CASES:
        for res in results:
            got = res["cases"][name]
            for key in ("rewards_plus", "rewards_minus", "grads", "generated", "eval"):
                assert got[key] == ref[name][key], (name, key)
            assert torch.equal(got["adapter"], ref[name]["adapter"]), name
            per_rank = 6 + (2 * math.ceil(q / 2) * n if parallel == "perturbations" else 2 * q * math.ceil(n / 2))
            assert got["bytes"] == [2 * 8 * per_rank] * W.STEPS, name
        assert any(g != 0 for gs in ref[name]["grads"] for g in gs), name  # the runs moved


@pytest.mark.parametrize("case", W.CASES, ids=[c[0] for c in W.CASES])
def test_bytes_per_step_are_o_of_q(equivalence, case):
    """One all_gather of float64 per step: 5 header scalars + 2*ceil(q/W) losses or 4q sums and counts,
    sent once and received from W - 1 = 1 other rank; nothing depends on the model or the batch."""
    _, results = equivalence
    name, parallel, _, q, _ = case
    per_rank = 5 + (2 * math.ceil(q / 2) if parallel == "perturbations" else 4 * q)
    for res in results:
        assert res["cases"][name]["bytes"] == [2 * 8 * per_rank] * W.STEPS
    # q = 1 -> q = 4 in batch mode: (5 + 16) / (5 + 4) times the bytes, the same for a 1 and a 7 example batch
    b1 = results[0]["cases"]["batch-cls2-q1"]["bytes"][0]
    b4 = results[0]["cases"]["batch-lm-q4"]["bytes"][0]
    assert b4 * 9 == b1 * 21 and results[0]["cases"]["batch-lm-q1-one-example"]["bytes"][0] == b1


@pytest.mark.parametrize("fault,parallel", [("raise", "batch"), ("hang", "perturbations")])
def test_a_failing_rank_stops_the_others(tmp_path, fault, parallel):
    timeout = 6.0
    # wait_s bounds the whole run: a rank 0 that never reports is killed, and r0 is None
    results, logs = launch(tmp_path, "fault", fault=fault, parallel=parallel, timeout_s=timeout, wait_s=45,
                           wait_for=[0])
    r0 = results[0]
    assert r0 is not None, logs[0][-3000:]
    assert r0["error_type"] == "DistributedError", r0
    if fault == "raise":
        # told by rank 1 (its error in the message), not by the timeout ("got no answer")
        assert "rank 1: RuntimeError: injected fault in the forward" in r0["error"]
        assert "got no answer" not in r0["error"]
        assert results[1]["error"] == "RuntimeError: injected fault in the forward"  # its own error, re-raised
    else:
        assert "got no answer from the other ranks" in r0["error"] and f"timeout {timeout:g} s" in r0["error"]
        assert r0["step_seconds"] > timeout - 0.5  # it waited for the timeout
        assert results[1] is None  # still asleep: the test killed it


def test_rank0_writes_and_checkpoints_resume_under_another_world_size(tmp_path):
    """A run of 4 steps, uninterrupted in 1 process, vs 2 steps on 2 ranks + 2 in 1 process, vs 2 steps
    in 1 process + 2 on 2 ranks: the checkpoint holds no world size, the trajectory is the run's."""
    model = W.make_model()
    full = W.make_trainer(model, None, 3)
    full_losses = [full.step(W.run_batch(t)).loss for t in range(4)]
    single_first = W.make_trainer(model, None, 3)  # the config of a 1-process run has parallel=None
    for t in range(2):
        single_first.step(W.run_batch(t))
    single_first.save(tmp_path / "ck_single")
    jobs = [dict(parallel="batch", q=3, steps=2, save=str(tmp_path / "ck_two")),
            dict(parallel="perturbations", resume=str(tmp_path / "ck_single"), steps=2,
                 save=str(tmp_path / "ck_resumed"))]
    results, logs = launch(tmp_path, "train_and_save", jobs=jobs)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}\n{logs[r][-3000:]}"
    # only rank 0 writes; every rank's save returns once the checkpoint is in place
    assert [res["jobs"][0]["writes"] for res in results] == [1, 0]
    assert all(res["jobs"][j]["visible_after_save"] for res in results for j in range(2))
    assert not os.path.exists(tmp_path / "ck_two.tmp") and not os.path.exists(tmp_path / "ck_two.old")
    # 2 ranks -> 1 process
    two, resumed = results[0]["jobs"]
    assert two["losses"] == pytest.approx(full_losses[:2], rel=LOSS_RTOL, abs=0)
    tr = MeZOTrainer.resume(tmp_path / "ck_two", model, parallel=None)
    assert tr.step_count == 2 and json.load(open(tmp_path / "ck_two" / "trainer_state.json"))["step"] == 2
    tail = [tr.step(W.run_batch(t)).loss for t in range(2, 4)]
    assert tail == pytest.approx(full_losses[2:], rel=LOSS_RTOL, abs=0)
    torch.testing.assert_close(tr.adapter.buffer, full.adapter.buffer, rtol=0, atol=ADAPTER_ATOL)
    # 1 process -> 2 ranks
    assert resumed["step"] == 4 and resumed["losses"] == pytest.approx(full_losses[2:], rel=LOSS_RTOL, abs=0)
    torch.testing.assert_close(resumed["adapter"], full.adapter.buffer, rtol=0, atol=ADAPTER_ATOL)
    assert torch.equal(results[0]["jobs"][1]["adapter"], results[1]["jobs"][1]["adapter"])


def test_single_process_ignores_parallel(tmp_path):
    """Without a process group (or with one rank), parallel changes nothing: bit-identical to None."""
    model = W.make_model()
    a, b = W.make_trainer(model, None, 2), W.make_trainer(model, "batch", 2)
    ex = W.make_examples("cls2", 4, seed=0)
    assert [a.step(ex).loss_plus for _ in range(2)] == [b.step(ex).loss_plus for _ in range(2)]
    assert torch.equal(a.adapter.buffer, b.adapter.buffer) and b.exchange is None and b.is_main
    b.save(tmp_path / "ck")
    assert MeZOTrainer.resume(tmp_path / "ck", model).config.parallel == "batch"


def test_helpers_and_bad_config():
    with pytest.raises(ValueError, match="parallel"):
        MeZOConfig(lr=1e-3, parallel="tensor")
    # blocks cover 0..q-1 once, in order, sizes differing by at most 1
    for q in range(1, 9):
        for world in range(1, 6):
            blocks = [distributed.perturbation_block(q, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(q))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    ex = W.make_examples("cls2", 7, seed=0)
    assert sorted(id(e) for r in range(3) for e in distributed.shard(ex, r, 3)) == sorted(map(id, ex))
    assert distributed.batch_fingerprint(ex) == distributed.batch_fingerprint(list(ex))
    assert distributed.batch_fingerprint(ex) != distributed.batch_fingerprint(ex[::-1])
    with pytest.raises(ValueError, match="torchrun"):
        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            distributed.init_distributed(device="cpu")
        finally:
            os.environ.update(env)


def test_flashzo_train_under_torchrun(tmp_path):
    """docs/distributed.md's command: 2 processes under torchrun, then --resume in 1 process, equals 1
    process."""
    from flashzo import save_opt
    from flashzo.cli import main
    from flashzo.data import example_to_record, write_jsonl

    save_opt(W.make_model(), tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", [example_to_record(e) for e in W.make_examples("cls2", 24, seed=4)])
    flags = ["--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"), "--batch-size", "5",
             "--lr", "1e-2", "--eps", "1e-2", "--num-perturbations", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flashzo",
           "train", "--parallel", "batch", "--out", str(tmp_path / "two"), "--steps", "2"] + flags
    out = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"steps_run"') == 1  # only rank 0 prints
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["traffic"]["bytes_sent_per_step"] == 8 * (5 + 4 * 2)
    assert main(["train", "--out", str(tmp_path / "two"), "--steps", "3", "--resume"] + flags) == 0
    assert main(["train", "--out", str(tmp_path / "one"), "--steps", "3"] + flags) == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ADAPTER_ATOL)
    assert json.load(open(tmp_path / "two" / "checkpoint" / "trainer_state.json"))["step"] == 3
