"""One rank of the distributed tests (tests/test_distributed.py starts W of these as subprocesses).

    python dist_worker.py SPEC.json RANK WORLD      writes result_RANK.pt beside SPEC.json

Also the shared fixtures of those tests: the tiny model, the example sets and the configs, so that
the single-process reference in the test process is built from exactly the same inputs; and Launch,
which starts the ranks (tests/test_distributed.py, tests/test_isa.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=64)

# (name, parallel, task, q, examples per step): odd q and odd batch sizes give uneven shares.
CASES = [
    ("perturbations-cls2-q3", "perturbations", "cls2", 3, 6),
    ("batch-cls2-q1", "batch", "cls2", 1, 7),
    ("perturbations-cls4-q4", "perturbations", "cls4", 4, 5),
    ("batch-cls4-q2", "batch", "cls4", 2, 5),
    ("perturbations-lm-q2", "perturbations", "lm", 2, 6),
    ("batch-lm-q4", "batch", "lm", 4, 7),
    ("batch-lm-q1-one-example", "batch", "lm", 1, 1),  # rank 1 has nothing to score
    ("llama-perturbations-cls2-q3", "perturbations", "cls2", 3, 6),  # the Llama family (GQA, rotary)
    ("llama-batch-lm-q2", "batch", "lm", 2, 7),
]
# In the batch-invariant mode (engine/invariant.py) these equal the single process bit for bit.
INVARIANT_CASES = [c for c in CASES if c[0] in ("perturbations-cls2-q3", "batch-cls4-q2", "batch-lm-q1-one-example",
                                                "llama-perturbations-cls2-q3", "llama-batch-lm-q2")]
STEPS = 2  # the second step starts from the first one's update
EVAL_SIZE = 9


def make_model(family: str = "opt"):
    from flashzo import LlamaConfig, LlamaModel, OPTConfig, OPTModel

    if family == "llama":
        return LlamaModel.from_config(LlamaConfig(vocab_size=TINY["vocab_size"], hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64), seed=0)
    return OPTModel.from_config(OPTConfig(**TINY), seed=0)


def family_of_case(name: str) -> str:
    return "llama" if name.startswith("llama-") else "opt"


def make_examples(task: str, n: int, seed: int):
    from flashzo import Example

    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(3, TINY["vocab_size"], (int(torch.randint(lo, hi, (1,), generator=g)),),
                             generator=g).tolist()

    out = []
    for _ in range(n):
        if task == "lm":
            out.append(Example(prompt=toks(2, 7), target=toks(1, 6)))
        else:
            k = int(task[3:])
            out.append(Example(prompt=toks(2, 9), candidates=[toks(1, 4) for _ in range(k)],
                               label=int(torch.randint(0, k, (1,), generator=g))))
    return out


def make_trainer(model, parallel, q, *, seed=7, batch_invariant=False):
    from flashzo import LoRAConfig, MeZOConfig, MeZOTrainer

    # eps = 1e-2: g = (l+ - l-) / 2eps turns fp32 rounding of the losses into g's error, see the tests.
    cfg = MeZOConfig(lr=1e-2, eps=1e-2, num_perturbations=q, seed=seed, weight_decay=1e-3, parallel=parallel,
                     lr_schedule="cosine", total_steps=8, batch_invariant=batch_invariant)
    tr = MeZOTrainer(model, LoRAConfig(r=2, target_modules=("q_proj", "v_proj"), seed=3), cfg)
    g = torch.Generator().manual_seed(1)  # B = 0 at init would make the first steps trivial
    for slot in tr.adapter.slots.values():
        slot.b.copy_(torch.randn(slot.b.shape, generator=g) * 0.05)
    return tr


def batch_of(examples, step, n):
    return [examples[(step * n + j) % len(examples)] for j in range(n)]


def run_case(model, parallel, task, q, n, *, steps=STEPS, batch_invariant=False):
    """Steps and a final evaluation; the same code runs the reference in the test process."""
    examples = make_examples(task, 3 * n + 2, seed=len(task) + q)
    tr = make_trainer(model, parallel, q, batch_invariant=batch_invariant)
    res = [tr.step(batch_of(examples, t, n)) for t in range(steps)]
    return {"loss_plus": [r.loss_plus for r in res], "loss_minus": [r.loss_minus for r in res],
            "grads": [r.projected_grads for r in res], "loss": [r.loss for r in res],
            "bytes": [r.bytes_exchanged for r in res], "adapter": tr.adapter.buffer.clone(),
            "eval": tr.evaluate(make_examples(task, EVAL_SIZE, seed=99), batch_size=4)}


# Reward runs (engine/estimators.py), batch-invariant: (name, parallel, estimator, q, examples per step)
REWARD_CASES = [("rewards-perturbations-es-q3", "perturbations", "es", 3, 5),
                ("rewards-batch-mezo-q2", "batch", "mezo", 2, 5),
                ("rewards-llama-batch-es-q2", "batch", "es", 2, 3)]


def run_reward_case(model, parallel, estimator, q, n, *, steps=STEPS):
    """A reward run's steps and evaluation (tests/reward_funcs.py's first_token_in on odd token ids)."""
    import reward_funcs

    from flashzo import LoRAConfig, MeZOConfig, MeZOTrainer
    from flashzo.engine.reward_objective import RewardConfig, RewardExample

    g = torch.Generator().manual_seed(q)
    examples = [RewardExample(torch.randint(3, TINY["vocab_size"], (int(torch.randint(2, 6, (1,), generator=g)),),
                                            generator=g).tolist(), reference=list(range(3, 96, 2)))
                for _ in range(3 * n)]
    cfg = MeZOConfig(lr=0.05, eps=0.1, num_perturbations=q, seed=5, parallel=parallel, batch_invariant=True,
                     reward=RewardConfig(reward_funcs.first_token_in, estimator=estimator, max_tokens=2))
    tr = MeZOTrainer(model, LoRAConfig(r=2, target_modules=("q_proj", "v_proj"), layers=(1,), seed=3), cfg)
    res = [tr.step(batch_of(examples, t, n)) for t in range(steps)]
    out = {"rewards_plus": [r.rewards_plus for r in res], "rewards_minus": [r.rewards_minus for r in res],
           "grads": [r.projected_grads for r in res], "generated": [r.generated for r in res],
           "bytes": [r.bytes_exchanged for r in res], "adapter": tr.adapter.buffer.clone(),
           "eval": tr.evaluate(examples[:7], batch_size=3)}
    tr.close()
    return out


def main(spec_path: str, rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    from flashzo.engine import distributed

    out: dict = {"rank": rank}
    t0 = time.perf_counter()
    try:
        distributed.init_distributed(device="cpu", timeout_s=spec["timeout_s"], init_method=spec["init_method"])
        out.update(SCENARIOS[spec["scenario"]](rank, world, spec))
    except Exception as e:  # noqa: BLE001 - the test reads what happened
        out.update(error=f"{type(e).__name__}: {e}", error_type=type(e).__name__)
    out["seconds"] = time.perf_counter() - t0
    torch.save(out, os.path.join(os.path.dirname(spec_path), f"result_{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # a failed process group can block interpreter shutdown


def scenario_equivalence(rank, world, spec):
    models = {f: make_model(f) for f in ("opt", "llama")}
    return {"cases": {name: run_case(models[family_of_case(name)], par, task, q, n) for name, par, task, q, n in CASES}}


def scenario_invariant(rank, world, spec):
    models = {f: make_model(f) for f in ("opt", "llama")}
    return {"cases": {name: run_case(models[family_of_case(name)], par, task, q, n, batch_invariant=True)
                      for name, par, task, q, n in INVARIANT_CASES}}


def scenario_rewards(rank, world, spec):
    models = {f: make_model(f) for f in ("opt", "llama")}
    return {"cases": {name: run_reward_case(models["llama" if "llama" in name else "opt"], par, est, q, n)
                      for name, par, est, q, n in REWARD_CASES}}


def scenario_fault(rank, world, spec):
    """Rank 1 raises (or hangs) in its forward at step 1; report what the step raised on each rank."""
    from flashzo import OPTModel

    model = make_model()
    tr = make_trainer(model, spec["parallel"], 2)
    ex = make_examples("cls2", 4, seed=0)
    tr.step(ex)
    if rank == 1:
        real = OPTModel.score

        def faulty(self, batch, **kw):
            if spec["fault"] == "hang":
                time.sleep(3600)
            raise RuntimeError("injected fault in the forward")

        OPTModel.score = faulty
    t0 = time.perf_counter()
    try:
        tr.step(ex)
        return {"step_seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__,
                "step_seconds": time.perf_counter() - t0}
    finally:
        if rank == 1:
            OPTModel.score = real


def scenario_train_and_save(rank, world, spec):
    """Jobs of one run: steps from scratch or from a checkpoint ("resume"), then a save; with the
    number of checkpoint writes this rank made and whether the checkpoint exists when save returns."""
    from flashzo import MeZOTrainer

    model = make_model()
    writes = []
    real = MeZOTrainer._write
    MeZOTrainer._write = lambda self, path: (writes.append(path), real(self, path))[1]
    out = []
    for job in spec["jobs"]:
        writes.clear()
        tr = MeZOTrainer.resume(job["resume"], model, parallel=job["parallel"]) if job.get("resume") else \
            make_trainer(model, job["parallel"], job["q"])
        losses = [tr.step(run_batch(tr.step_count)).loss for _ in range(job["steps"])]
        tr.save(job["save"])
        out.append({"losses": losses, "adapter": tr.adapter.buffer.clone(), "writes": len(writes),
                    "visible_after_save": os.path.isfile(os.path.join(job["save"], "trainer_state.json")),
                    "step": tr.step_count})
    return {"jobs": out}


def run_batch(step, n=5):
    """The global batch of step `step` of the checkpoint tests' run (LM, so token-weighted)."""
    return batch_of(make_examples("lm", 12, seed=5), step, n)


class Launch:
    """`world` ranks of dist_worker.py running one scenario, started now, each on one intra-op thread
    (env: their environment, default this process's)."""

    def __init__(self, tmp_path, scenario, *, world=2, timeout_s=60.0, env=None, **spec):
        self.dir, self.world = tmp_path / scenario, world
        self.dir.mkdir()
        spec = dict(spec, scenario=scenario, timeout_s=timeout_s, init_method=f"file://{self.dir / 'store'}")
        (self.dir / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
        self.logs = [open(self.dir / f"log_{r}.txt", "w") for r in range(world)]
        self.procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.dir / "spec.json"), str(r),
                                        str(world)], cwd=self.dir, env=env, stdout=self.logs[r],
                                       stderr=subprocess.STDOUT)
                      for r in range(world)]

    def results(self, *, wait_s=90.0, wait_for=None):
        """Wait for the ranks `wait_for` (default all) up to wait_s, kill the others (ours, by handle).
        Returns (per-rank results or None, per-rank logs)."""
        deadline = time.monotonic() + wait_s
        for r in (wait_for if wait_for is not None else range(self.world)):
            try:
                self.procs[r].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        results = []
        for r, p in enumerate(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait()
            self.logs[r].close()
            f = self.dir / f"result_{r}.pt"
            results.append(torch.load(f) if f.exists() else None)
        return results, [(self.dir / f"log_{r}.txt").read_text() for r in range(self.world)]


SCENARIOS = {"equivalence": scenario_equivalence, "invariant": scenario_invariant, "fault": scenario_fault,
             "rewards": scenario_rewards,
             "train_and_save": scenario_train_and_save}

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
