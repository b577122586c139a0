"""The MeZO trainer (docs/design.md, "The algorithm"): 2q signed passes in one forward, one fused update.

    z_i     regenerated from seed(t, i) inside the kernels, never stored
    g_i   = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)
    theta <- theta - lr_t * (mean_i g_i z_i + weight_decay * theta)

With `MeZOConfig.reward` set the objective is a reward on generated text instead (docs/design.md,
"Rewards on generated text"): a step decodes its RewardExamples under the 2q copies in one batched
decode, scores every (copy, prompt), and its estimator (MeZO on -R, or evolution strategies with
fitness shaping: engine/estimators.py) gives the g_i of the same update.

The run is a pure function of its config and data: seed(t, i) hashes (MeZOConfig.seed, t, i), so a
checkpoint is the adapter plus the step counter, and `perturbation(t, i)` rebuilds any z.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from flashzo.kernels import gaussian, zo_update_
from flashzo.kernels.errors import InputError

from . import distributed, invariant
from .batch import SHARING, BatchStats, Copy, SignedPair, pair_copies
from .estimators import copy_fitness, mean, pair_grads, signal
from .example import Example, check_examples, is_int
from .lora import ADAPTER_CONFIG, LoRAAdapter, LoRAConfig
from .loss import PairLoss, copy_losses, pair_losses
from .model import CausalLM
from .reward_calls import RewardError, RewardProblem
from .reward_objective import RewardConfig, RewardExample, Scorer, check_reward_examples, copy_rewards, evaluate_rewards

SCHEDULES = ("constant", "linear", "cosine")
STATE_FILE = "trainer_state.json"
_MASK64 = (1 << 64) - 1


@dataclass
class MeZOConfig:
    """A MeZO run's hyperparameters: learning rate and its schedule, perturbation size `eps`, weight
    decay, `num_perturbations` (q) per step, the `seed` every perturbation's seed derives from, how
    many non-finite steps in a row stop training, the batch's sharing mode, the split over
    torch.distributed ranks (`parallel`), the batch-invariant mode (None: the process's mode when
    the trainer is made), and `reward`: a RewardConfig makes the run optimize a reward on generated
    text (engine/reward_objective.py) instead of the examples' loss."""

    lr: float
    eps: float = 1e-3
    weight_decay: float = 0.0
    num_perturbations: int = 1
    seed: int = 0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None  # needed by the linear and cosine schedules
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before training stops
    sharing: str = "all"  # batching: "all" | "candidates" | "none" (see engine.batch)
    parallel: str | None = None  # under torch.distributed: "perturbations" | "batch" (engine.distributed)
    # Batch-invariant numerics (engine/invariant.py) for every forward of the run; None: the process's
    # mode when the trainer is made. The trainer's config holds the mode it took, and so does its checkpoint.
    batch_invariant: bool | None = None
    reward: RewardConfig | None = None  # a dict (as a checkpoint stores it) is read as a RewardConfig

    def __post_init__(self):
        if isinstance(self.reward, dict):
            try:
                self.reward = RewardConfig(**self.reward)
            except TypeError as e:
                raise InputError(f"reward: {e}") from None
        if self.reward is not None and not isinstance(self.reward, RewardConfig):
            raise InputError(f"reward must be a RewardConfig or None, got {type(self.reward).__name__}")
        for name in ("lr", "eps", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{name} must be a number, got {value!r}")
        for name in ("num_perturbations", "seed", "warmup_steps", "max_nonfinite_steps", "total_steps"):
            value = getattr(self, name)
            if (value is not None or name != "total_steps") and (isinstance(value, bool) or not is_int(value)):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)) or self.lr < 0:
            raise InputError(f"lr must be a finite number >= 0, got {self.lr}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)) or self.eps <= 0:
            raise InputError(f"eps must be a finite number > 0, got {self.eps}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if int(self.num_perturbations) < 1:
            raise InputError(f"num_perturbations must be >= 1, got {self.num_perturbations}")
        if not 0 <= int(self.seed) < 2**63:
            raise InputError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.lr_schedule not in SCHEDULES:
            raise InputError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule != "constant" and not self.total_steps:
            raise InputError(f"lr_schedule {self.lr_schedule!r} needs total_steps")
        if self.max_nonfinite_steps < 1:
            raise InputError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.sharing not in SHARING:
            raise InputError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
        if self.batch_invariant is not None and not isinstance(self.batch_invariant, bool):
            raise InputError(f"batch_invariant must be True, False or None, got {self.batch_invariant!r}")
        if self.parallel is not None and self.parallel not in distributed.PARALLEL:
            raise InputError(f"parallel must be None or one of {distributed.PARALLEL}, got {self.parallel!r}")

    def to_dict(self) -> dict:
        """The config as JSON (as checkpoints store it; MeZOConfig(**d) reads it back)."""
        d = dataclasses.asdict(dataclasses.replace(self, reward=None))
        d["reward"] = self.reward.to_dict() if self.reward is not None else None
        return d

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def perturbation_seed(seed: int, step: int, i: int) -> int:
    """seed_{t,i}: a pure function of (config seed, step, perturbation index), in [0, 2**63)."""
    h = _splitmix64(int(seed))
    h = _splitmix64(h ^ int(step))
    h = _splitmix64(h ^ (int(i) * 0xD1B54A32D192ED03 & _MASK64))
    return h & ((1 << 63) - 1)


_SAMPLING = 0x5A4D504C494E47  # separates the sampling seeds' stream from the perturbations'
EVAL_STEP = (1 << 63) - 1  # the step an evaluation's sampling seeds are drawn at (the same at every evaluation)


def sampling_seed(seed: int, step: int, example: int) -> int:
    """The seed of example `example`'s sampling generator at step `step` of a reward run (every copy of the
    example draws from it: common random numbers); a pure function, like perturbation_seed."""
    return perturbation_seed(int(seed) ^ _SAMPLING, step, example)


@dataclass
class StepResult:
    """What `MeZOTrainer.step` returns: the step's losses (per perturbation, for each sign), its
    projected gradients, the learning rate it used, whether it was skipped (a non-finite loss, or a
    reward that failed), the rows it computed and the bytes it exchanged with other ranks; for a
    reward run also its rewards, their signal and the failed reward calls."""

    loss: float  # mean of loss_plus and loss_minus over perturbations
    loss_plus: list[float]
    loss_minus: list[float]
    projected_grads: list[float]
    step: int = 0  # the step this result is of
    lr: float = 0.0
    skipped: bool = False  # a non-finite loss: no update was applied
    tokens: int = 0  # rows computed by the forward (by all ranks together under torch.distributed)
    bytes_exchanged: int = 0  # payload this rank sent + received for the step (0 in a single process)
    # A reward run (MeZOConfig.reward): loss = -reward, loss_plus[i] = -rewards_plus[i] ...
    reward: float | None = None  # the mean reward over every copy and prompt of the step
    rewards_plus: list[float] = field(default_factory=list)  # per perturbation: the + copy's mean reward
    rewards_minus: list[float] = field(default_factory=list)
    signal: float | None = None  # the share of prompts whose copies got different rewards (0: no update)
    generated: int = 0  # tokens generated by the step's copies
    reward_problems: list[RewardProblem] = field(default_factory=list)  # calls that gave no value: skipped


class NonFiniteLossError(RuntimeError):
    """Raised after MeZOConfig.max_nonfinite_steps consecutive steps with a non-finite loss (or, in a reward
    run, a reward call that failed: `problems` lists the last step's)."""

    def __init__(self, message: str, problems: Sequence[RewardProblem] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class _Counters:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    history: list = field(default_factory=list)


class MeZOTrainer:
    """MeZO on LoRA adapters of a flashzo model (any family: engine/model.py's CausalLM)."""

    def __init__(self, model: CausalLM, lora: LoRAConfig | LoRAAdapter, config: MeZOConfig, *,
                 decode: Callable[[list[int]], str] | None = None):
        """decode: a reward run's token ids -> text (the tokenizer's decode); None: its reward gets token ids."""
        if not isinstance(model, CausalLM):
            raise InputError(f"model must be a flashzo model (OPTModel ...), got {type(model).__name__}")
        if not isinstance(config, MeZOConfig):
            raise InputError(f"config must be a MeZOConfig, got {type(config).__name__}")
        if isinstance(lora, LoRAConfig):
            adapter = LoRAAdapter.init(lora, model.config, device=model.device)
        elif isinstance(lora, LoRAAdapter):
            if not lora.fits(model.config):
                raise InputError("the adapter was made for a model of another shape")
            adapter = lora.to(model.device)
        else:
            raise InputError(f"lora must be a LoRAConfig or a LoRAAdapter, got {type(lora).__name__}")
        if config.batch_invariant is None:
            config = dataclasses.replace(config, batch_invariant=invariant.is_batch_invariant())
        self.model, self.config, self.adapter = model, config, adapter
        adapter.base_quantization = model.quantization  # saved with the adapter (engine/lora.py)
        self.counters = _Counters()
        self._exchange: distributed.Exchange | None = None
        # What the application says defines the run (flashzo train: its options and data fingerprints;
        # src/flashzo/record.py): any JSON object, saved in the checkpoint and given back by resume().
        self.run_info: dict | None = None
        # A reward run's calls (engine/reward_objective.py): the reward resolved (imported) here, before any work.
        self.scorer = Scorer(config.reward, decode) if config.reward is not None else None

    def close(self) -> None:
        """Stop a reward run's worker process (it also stops when the trainer is garbage-collected)."""
        if self.scorer is not None:
            self.scorer.caller.close()

    # Seeds and perturbations ----------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self.counters.step

    def seeds(self, step: int) -> list[int]:
        return [perturbation_seed(self.config.seed, step, i) for i in range(self.config.num_perturbations)]

    def perturbation(self, step: int, i: int = 0) -> dict[str, torch.Tensor]:
        """The exact z of perturbation i at step `step`, as {PEFT parameter name: tensor}."""
        if not 0 <= i < self.config.num_perturbations:
            raise InputError(f"perturbation index {i} out of range (num_perturbations "
                             f"{self.config.num_perturbations})")
        if step < 0:
            raise InputError(f"step must be >= 0, got {step}")
        z = gaussian(self.seeds(step)[i], self.adapter.num_parameters, device=self.adapter.device)
        return {k: v.clone() for k, v in self.adapter.unflatten(z).items()}

    # One step -------------------------------------------------------------------------------------
    def pairs(self, adapter_index: int = 0) -> list[SignedPair]:
        """The current step's q perturbations, each a pair of signed copies of adapter `adapter_index`."""
        return [SignedPair(s, adapter_index) for s in self.seeds(self.counters.step)]

    def copies(self, adapter_index: int = 0) -> list[Copy]:
        """The current step's 2q copies (each pair's + then -)."""
        return pair_copies(self.pairs(adapter_index))

    def step(self, examples: Sequence[Example]) -> StepResult:
        """One step on the global batch `examples` (under torch.distributed every rank passes the same),
        in the run's batch-invariant mode. A reward run (MeZOConfig.reward) steps on RewardExamples."""
        if self.config.reward is not None:
            return self._reward_step(examples)
        with invariant.batch_invariant_mode(self.config.batch_invariant):
            check_examples(examples, self.model.limits)
            ex = self.exchange
            if ex is None:
                scores, tokens = self._score_copies(examples, self.copies())
                return self.apply(pair_losses(scores.loss), tokens=tokens)
            before = ex.traffic.bytes_sent.get("step", 0) + ex.traffic.bytes_received.get("step", 0)
            losses, tokens = distributed.step_losses(
                ex, self.config.parallel, self._scores, examples, q=self.config.num_perturbations,
                step=self.counters.step, checksum=float(self.adapter.buffer.sum(dtype=torch.float64)))
            result = self.apply(losses, tokens=tokens)
            result.bytes_exchanged = ex.traffic.bytes_sent["step"] + ex.traffic.bytes_received["step"] - before
            return result

    def _scores(self, examples: Sequence[Example], perturbations: Sequence[int]):
        """(loss_sum, loss_count, rows, loss_exact) of the copies (+, -) of some perturbations of the
        current step."""
        pairs = self.pairs()
        scores, tokens = self._score_copies(examples, pair_copies([pairs[i] for i in perturbations]))
        return scores.loss_sum, scores.loss_count, tokens, scores.loss_exact

    def _score_copies(self, examples: Sequence[Example], copies: Sequence[Copy]):
        """(CopyScores, rows of the forward) of checked `examples` under `copies` of this trainer's adapter."""
        batch = self.model.build_batch(examples, copies, adapters=[self.adapter], eps=self.config.eps,
                                       sharing=self.config.sharing, batch_invariant=self.config.batch_invariant,
                                       checked=True)
        return copy_losses(batch.readout, self.model.score(batch), examples), batch.stats.num_tokens

    # torch.distributed ----------------------------------------------------------------------------
    @property
    def exchange(self) -> distributed.Exchange | None:
        """The scalar exchange with the other ranks; None unless config.parallel is set and a process
        group of more than one rank exists (then the trainer runs as a single process)."""
        if self.config.parallel is None or not distributed.active():
            return None
        if self._exchange is None:
            self._exchange = distributed.Exchange()
        return self._exchange

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (rank 0, or the only process)."""
        return self.exchange is None or self.exchange.rank == 0

    def apply(self, losses: Sequence[PairLoss], *, tokens: int = 0) -> StepResult:
        """Turn the losses of the current step's q signed pairs into the update."""
        cfg, t = self.config, self.counters.step
        if len(losses) != cfg.num_perturbations or not all(isinstance(p, PairLoss) for p in losses):
            raise InputError(f"apply needs {cfg.num_perturbations} PairLoss values (one per perturbation), got "
                             f"{len(losses)}")
        plus, minus = [p.plus for p in losses], [p.minus for p in losses]
        grads = [p.projected_grad(cfg.eps) for p in losses]
        loss = (sum(plus) + sum(minus)) / (2 * len(plus))
        lr = cfg.lr_at(t)
        skipped = not all(math.isfinite(x) for x in plus + minus + grads) or not self._update(grads, t, lr)
        result = StepResult(loss, plus, minus, grads, step=t, lr=lr, skipped=skipped, tokens=tokens)
        self._count(result, f"a non-finite loss or update (loss_plus={plus}, loss_minus={minus})")
        return result

    def _update(self, grads: Sequence[float], t: int, lr: float) -> bool:
        """theta -= lr (mean_i g_i z_i + wd theta); False (and theta unchanged) if that overflows."""
        before = self.adapter.buffer.clone()
        coeffs = [g / len(grads) for g in grads]
        zo_update_(self.adapter.buffer, self.seeds(t), coeffs, lr=lr, weight_decay=self.config.weight_decay)
        if not bool(torch.isfinite(self.adapter.buffer).all()):  # an overflowing update: undo it
            self.adapter.buffer.copy_(before)
            return False
        return True

    def _count(self, result: StepResult, what: str) -> None:
        """Advance the step; count a skipped one, and stop after max_nonfinite_steps of them in a row."""
        self.counters.step += 1
        if not result.skipped:
            self.counters.nonfinite_consecutive = 0
            return
        self.counters.nonfinite_total += 1
        self.counters.nonfinite_consecutive += 1
        if self.counters.nonfinite_consecutive >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.counters.nonfinite_consecutive} consecutive steps (last: step {result.step}) had {what}; "
                "the adapter holds the last finite state. "
                + ("Fix the reward." if result.reward_problems else "Lower lr or eps, or check the data."),
                result.reward_problems)

    # Rewards on generated text --------------------------------------------------------------------
    def _reward_step(self, examples: Sequence[RewardExample]) -> StepResult:
        cfg = self.config
        with invariant.batch_invariant_mode(cfg.batch_invariant):
            check_reward_examples(examples, self.model.limits, cfg.reward)
            self.scorer.probe(examples[0], "batch[0]")
            ex = self.exchange
            if ex is None:
                rewards, problems, stats = self._rewards(examples, list(range(len(examples))),
                                                         range(cfg.num_perturbations))
                return self.apply_rewards(rewards, problems, tokens=stats["rows"], generated=stats["generated"])
            before = ex.traffic.bytes_sent.get("step", 0) + ex.traffic.bytes_received.get("step", 0)
            rewards, problems, (tokens, generated) = distributed.step_rewards(
                ex, cfg.parallel, self._rewards, examples, q=cfg.num_perturbations, step=self.counters.step,
                checksum=float(self.adapter.buffer.sum(dtype=torch.float64)))
            result = self.apply_rewards(rewards, problems, tokens=tokens, generated=generated)
            result.bytes_exchanged = ex.traffic.bytes_sent["step"] + ex.traffic.bytes_received["step"] - before
            return result

    def _rewards(self, examples: Sequence[RewardExample], example_ids: Sequence[int], perturbations: Sequence[int]):
        """(`R[c][p]`, problems, the decode's row counts) of the current step's copies of some perturbations
        (+, - for each) on some examples of the global batch (`example_ids`: their indices there)."""
        t, pairs = self.counters.step, self.pairs()
        return copy_rewards(self.model, self.adapter, examples, pair_copies([pairs[i] for i in perturbations]),
                            eps=self.config.eps, scorer=self.scorer,
                            prompt_seeds=[sampling_seed(self.config.seed, t, e) for e in example_ids],
                            example_ids=example_ids, copy_ids=[2 * i + s for i in perturbations for s in (0, 1)])

    def apply_rewards(self, rewards: Sequence[Sequence[float | None]], problems: Sequence[RewardProblem] = (), *,
                      tokens: int = 0, generated: int = 0) -> StepResult:
        """Turn the current step's rewards `R[c][p]` (2q copies in pair order, + then -; None: a failed call)
        into the update of the run's estimator (engine/estimators.py); a step with a failed call is skipped."""
        cfg, t = self.config, self.counters.step
        q = cfg.num_perturbations
        if len(rewards) != 2 * q or not rewards[0] or any(len(row) != len(rewards[0]) for row in rewards):
            raise InputError(f"apply_rewards needs {2 * q} rows of rewards (one per copy) of one length")
        lr = cfg.lr_at(t)
        failed = bool(problems) or any(v is None for row in rewards for v in row)
        if failed:
            f = [math.nan if any(v is None for v in row) else mean(row) for row in rewards]
            grads, reward, sig = [math.nan] * q, math.nan, None
        else:
            f = copy_fitness(rewards)
            grads = pair_grads(rewards, cfg.reward.estimator, cfg.reward.shaping, cfg.eps)
            reward, sig = mean([v for row in rewards for v in row]), signal(rewards)
        skipped = failed or not all(math.isfinite(g) for g in grads) or not self._update(grads, t, lr)
        result = StepResult(-reward, [-x for x in f[0::2]], [-x for x in f[1::2]], grads, step=t, lr=lr,
                            skipped=skipped, tokens=tokens, reward=reward, rewards_plus=f[0::2],
                            rewards_minus=f[1::2], signal=sig, generated=generated, reward_problems=list(problems))
        what = f"a failed reward call (first: {problems[0]})" if problems else \
            "a failed reward call (on another rank)" if failed else "a non-finite update"
        self._count(result, what)
        return result

    def _evaluate_rewards(self, examples: Sequence[RewardExample], batch_size: int) -> dict:
        check_reward_examples(examples, self.model.limits, self.config.reward, what="eval set")
        self.scorer.probe(examples[0], "eval set[0]")

        def records(ids: Sequence[int]) -> list[dict]:
            return evaluate_rewards(self.model, self.adapter, [examples[i] for i in ids], scorer=self.scorer,
                                    prompt_seeds=[sampling_seed(self.config.seed, EVAL_STEP, i) for i in ids],
                                    example_ids=list(ids), batch_size=batch_size)

        ex = self.exchange
        recs = records(range(len(examples))) if ex is None else \
            distributed.gather_records(ex, records, len(examples))
        failed = [r["problem"] for r in recs if r["reward"] is None]
        if failed:
            raise RewardError(f"evaluate: {len(failed)} reward call(s) failed; first: {failed[0]}", [])
        return {"reward": mean([r["reward"] for r in recs]), "num_examples": len(examples), "generations": recs}

    # Evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], *, batch_size: int = 32) -> dict:
        """As evaluate(), in the run's mode; under torch.distributed each rank scores a shard and the sums
        are combined (exactly: the result does not depend on the number of ranks).

        A reward run (MeZOConfig.reward) evaluates RewardExamples: each is decoded with the adapter
        (greedy at temperature 0; sampling from seeds that are the same at every evaluation) and
        scored; returns {"reward": the mean, "num_examples", "generations": per example
        {"completion", "tokens", "finish_reason", "reward"}}. A reward call that fails raises
        RewardError (an evaluation cannot be skipped)."""
        with invariant.batch_invariant_mode(self.config.batch_invariant):
            if self.config.reward is not None:
                return self._evaluate_rewards(examples, batch_size)
            ex = self.exchange
            if ex is None:
                return evaluate(self.model, self.adapter, examples, batch_size=batch_size,
                                sharing=self.config.sharing)
            kind = check_examples(examples, self.model.limits, what="eval set")
            loss_sum, loss_cnt, correct = distributed.eval_sums(
                ex, lambda shard: _eval_sums(self.model, self.adapter, shard, batch_size, self.config.sharing),
                examples)
            return eval_result(kind, loss_sum, loss_cnt, correct, len(examples))

    # Checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        c = self.counters
        state = {
            "step": c.step,
            "nonfinite_total": c.nonfinite_total,
            "nonfinite_consecutive": c.nonfinite_consecutive,
            "mezo_config": self.config.to_dict(),
            "lora_config": dataclasses.asdict(self.adapter.config),
            "lr_next": self.config.lr_at(c.step),
        }
        if self.run_info is not None:
            state["run_info"] = self.run_info
        return state

    def save(self, path: str) -> None:
        """Adapter (PEFT format) + step + config + schedule state (+ run_info), replacing `path` atomically.

        Everything is written to `path.tmp`, then swapped in with two renames; if a crash lands
        between them, `path.old` holds the previous checkpoint and resume() finds it there.
        Under torch.distributed every rank calls save: rank 0 writes, the others wait for it. The
        checkpoint holds no world size: it resumes under any number of ranks.
        """
        ex = self.exchange
        if ex is None:
            self._write(path)
        else:
            ex.on_main(lambda: self._write(path), what=f"saving the checkpoint {path}")

    def _write(self, path: str) -> None:
        path = os.path.abspath(path)
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
            self.adapter.save_pretrained(tmp)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(self.state_dict(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk, Ctrl-C: `path` is untouched; what was written so far goes
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def resume(cls, path: str, model: CausalLM, *, decode: Callable[[list[int]], str] | None = None,
               **overrides) -> "MeZOTrainer":
        """A trainer that continues the run saved at `path` (bit-identically on the same device).

        overrides: MeZOConfig fields this launch sets (`parallel`; `total_steps` to extend a run;
        `reward`: the callable of a reward run whose reward was a callable that cannot be imported by its
        recorded name, which replaces the recorded reward only). decode: as MeZOTrainer's.
        A checkpoint that is not one flashzo wrote (edited, truncated) is refused with an InputError.
        """
        path, state = read_state(path)
        # A checkpoint that records no mode was trained before batch-invariant numerics existed.
        stored = {"batch_invariant": False, **state["mezo_config"]}
        if "reward" in overrides and not isinstance(overrides["reward"], (RewardConfig, type(None))):
            if not isinstance(stored.get("reward"), dict):
                raise InputError(f"{path} is not a reward run: reward= has nothing to replace")
            stored["reward"] = {**stored["reward"], "reward": overrides.pop("reward")}
        try:
            config = MeZOConfig(**dict(stored, **overrides))
        except TypeError as e:
            raise InputError(f"overrides: {e}") from None
        lora = LoRAConfig(**state["lora_config"])
        adapter = LoRAAdapter.from_pretrained(path, model.config, seed=lora.seed, device=model.device)
        if adapter.config != lora:
            raise InputError(f"{path}: its {ADAPTER_CONFIG} ({_lora_fields(adapter.config)}) disagrees with "
                             f"{STATE_FILE}'s lora_config ({_lora_fields(lora)})")
        trainer = cls(model, adapter, config, decode=decode)
        trainer.counters = _Counters(step=state["step"], nonfinite_total=state.get("nonfinite_total", 0),
                                     nonfinite_consecutive=state.get("nonfinite_consecutive", 0))
        trainer.run_info = state.get("run_info")
        return trainer


STATE_KEYS = ("step", "nonfinite_total", "nonfinite_consecutive", "mezo_config", "lora_config", "lr_next",
              "run_info")


def read_state(path: str) -> tuple[str, dict]:
    """(the checkpoint directory read, its trainer_state.json checked): `path`, or `path.old` when a crash
    landed between save()'s two renames. Anything save() would not have written is an InputError
    naming the file and the key: a missing or unknown key, a step that is not an integer >= 0, a
    config MeZOConfig or LoRAConfig refuses."""
    path = os.path.abspath(path)
    old = path + ".old"
    if not os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isfile(os.path.join(old, STATE_FILE)):
        path = old
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise InputError(f"{path}: no {STATE_FILE}; not a flashzo checkpoint")
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{state_file}: cannot be read as JSON (truncated or edited?): {e}") from None
    if not isinstance(state, dict):
        raise InputError(f"{state_file}: holds a JSON {type(state).__name__}, not an object")
    unknown = sorted(set(state) - set(STATE_KEYS))
    if unknown:
        raise InputError(f"{state_file}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(known: {', '.join(STATE_KEYS)})")
    missing = [k for k in ("step", "mezo_config", "lora_config") if k not in state]
    if missing:
        raise InputError(f"{state_file}: no {', '.join(missing)} (truncated or edited?)")
    for key in ("step", "nonfinite_total", "nonfinite_consecutive"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{state_file}: {key} must be an integer >= 0, got {json.dumps(value)}")
    for key, cls in (("mezo_config", MeZOConfig), ("lora_config", LoRAConfig)):
        value = state[key]
        if not isinstance(value, dict):
            raise InputError(f"{state_file}: {key} must be an object, got {json.dumps(value)[:60]}")
        fields = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(value) - set(fields))
        if bad:
            raise InputError(f"{state_file}: {key} has unknown key{'s' if len(bad) > 1 else ''} {', '.join(bad)} "
                             f"(known: {', '.join(fields)})")
        try:
            cls(**value)
        except TypeError as e:  # a required field is missing
            raise InputError(f"{state_file}: {key}: {e}") from None
        except InputError as e:
            raise InputError(f"{state_file}: {key}: {e}") from None
    if state.get("run_info") is not None and not isinstance(state["run_info"], dict):
        raise InputError(f"{state_file}: run_info must be an object, got {json.dumps(state['run_info'])[:60]}")
    return path, state


def _lora_fields(c: LoRAConfig) -> str:
    layers = "every layer" if c.layers is None else f"layers {list(c.layers)}"
    return f"r={c.r}, alpha={c.alpha:g}, {','.join(c.target_modules)}, {layers}"


@torch.no_grad()
def evaluate(model: CausalLM, adapter: LoRAAdapter | None, examples: Sequence[Example], *,
             batch_size: int = 32, sharing: str = "all") -> dict:
    """{"loss", "accuracy" (classification only), "num_examples"} of the adapter (sign 0) on examples."""
    kind = check_examples(examples, model.limits, what="eval set")
    loss_exact, loss_cnt, correct = _eval_sums(model, adapter, examples, batch_size, sharing)
    return eval_result(kind, invariant.exact_float(loss_exact), loss_cnt, correct, len(examples))


def _eval_sums(model, adapter, examples, batch_size, sharing) -> tuple[int | float, float, int]:
    """(the exact loss sum: engine/invariant.py's exact_sum, token or example count, correct) of the
    examples, `batch_size` per forward; the sum is the same whatever the batch size."""
    loss_sum, loss_cnt = 0, 0.0
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        batch = model.build_batch(chunk, [Copy()], adapters=[adapter] if adapter is not None else [],
                                  sharing=sharing, checked=True)
        s = copy_losses(batch.readout, model.score(batch), chunk)
        loss_sum = invariant.add_exact(loss_sum, s.loss_exact[0])
        loss_cnt += s.loss_count[0]
        correct += s.correct[0]
    return loss_sum, loss_cnt, correct


def eval_result(kind: str, loss_sum: float, loss_cnt: float, correct: int, n: int) -> dict:
    """evaluate()'s summary from its sums (kind: check_examples' "classification" or "lm")."""
    out = {"loss": loss_sum / loss_cnt, "num_examples": n}
    if kind == "classification":
        out["accuracy"] = correct / n
    else:  # LM: the token-weighted mean NLL's exponential
        out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 700 else math.inf
    return out


def step_together(trainers: Sequence[MeZOTrainer], batches: Sequence[Sequence[Example]]) -> list[StepResult]:
    """Step several independent jobs in one forward (one adapter per job, multi-adapter segments).

    Every trainer must share one model, one eps, one sharing mode, one batch-invariant mode and one
    adapter structure (r, alpha, target modules, layers); each job keeps its own lr, seed, schedule
    and data. In the
    batch-invariant mode its trajectory is bit-identical to training it alone (docs/design.md,
    "Batch invariance"); without it, equal up to the rounding of rows in a bigger forward.
    """
    scored = score_together(trainers, batches)
    return [tr.apply(losses, tokens=scored.stats.num_tokens) for tr, losses in zip(trainers, scored.losses)]


@dataclass
class TogetherScores:
    """What one shared forward of several jobs gave: each job's pair losses, its copies' scores, the cost."""

    losses: list[list[PairLoss]]  # per job: one PairLoss per perturbation of its current step
    correct: list[list[int]]  # per job, per copy: examples whose argmax candidate is the label
    num_examples: list[int]  # per job: examples in its batch
    stats: BatchStats  # the shared forward's cost (all jobs' copies)


def score_together(trainers: Sequence[MeZOTrainer], batches: Sequence[Sequence[Example]]) -> TogetherScores:
    """The scoring half of step_together: one forward for every job's signed copies, no update.

    A caller that applies each job's losses itself (`trainer.apply(scores.losses[j])`) can keep one
    job's failure from touching the others.
    """
    if len(trainers) != len(batches):
        raise InputError(f"{len(trainers)} trainers but {len(batches)} batches")
    if not trainers:
        raise InputError("trainers is empty")
    model = trainers[0].model
    for j, tr in enumerate(trainers):
        if tr.config.reward is not None:
            raise InputError(f"trainer {j} is a reward run; reward runs step on their own (trainer.step)")
        if tr.model is not model:
            raise InputError(f"trainer {j} uses another model; step_together needs one shared model")
        if tr.config.eps != trainers[0].config.eps:
            raise InputError(f"trainer {j} has eps {tr.config.eps}, trainer 0 has {trainers[0].config.eps}")
        if tr.config.batch_invariant != trainers[0].config.batch_invariant:
            raise InputError(f"trainer {j} has batch_invariant={tr.config.batch_invariant}, trainer 0 has "
                             f"{trainers[0].config.batch_invariant}; one forward runs in one mode")
        if tr.config.sharing != trainers[0].config.sharing:
            raise InputError(f"trainer {j} has sharing={tr.config.sharing!r}, trainer 0 has "
                             f"{trainers[0].config.sharing!r}; one forward is laid out one way")
        if tr.adapter.structure() != trainers[0].adapter.structure() or \
                tr.adapter.config.scaling != trainers[0].adapter.config.scaling:
            raise InputError(f"trainer {j}'s adapter has another structure (r, alpha, modules, layers)")
        check_examples(batches[j], model.limits, what=f"batches[{j}]")
    examples, per_copy, copies, spans = [], [], [], []
    for j, (tr, b) in enumerate(zip(trainers, batches)):
        ids = list(range(len(examples), len(examples) + len(b)))
        examples.extend(b)
        job_copies = tr.copies(adapter_index=j)
        spans.append((len(copies), len(copies) + len(job_copies)))
        copies.extend(job_copies)
        per_copy.extend([ids] * len(job_copies))
    with invariant.batch_invariant_mode(trainers[0].config.batch_invariant):  # the layout is the mode's too
        batch = model.build_batch(examples, copies, adapters=[tr.adapter for tr in trainers],
                                  eps=trainers[0].config.eps, sharing=trainers[0].config.sharing,
                                  examples_per_copy=per_copy, checked=True)
        scores = copy_losses(batch.readout, model.score(batch), examples)
    return TogetherScores(losses=[pair_losses(scores.loss[a:b]) for a, b in spans],
                          correct=[scores.correct[a:b] for a, b in spans],
                          num_examples=[len(b) for b in batches], stats=batch.stats)
