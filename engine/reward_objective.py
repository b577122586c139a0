"""What a reward run optimizes and how it scores: RewardConfig, RewardExample, their checks, and the two
things a run does with the model (docs/design.md, "Rewards on generated text"):

    copy_rewards(...)      decode the batch under the step's copies (one batched decode:
                           engine/perturbed_generate.py) and score every (copy, prompt): R[c][p]
    evaluate_rewards(...)  decode the batch with the adapter itself and score every prompt

A reward run is a MeZOTrainer whose MeZOConfig has `reward` set (engine/mezo.py): its steps take
RewardExamples, its estimator turns R into the update (engine/estimators.py), and its evaluation
reports the mean reward and the generations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from flashzo.kernels.errors import InputError

from .batch import Copy
from .estimators import ESTIMATORS, SHAPINGS
from .example import Limits, is_int
from .lora import LoRAAdapter
from .model import CausalLM
from .perturbed_generate import generate_copies
from .reward_calls import ISOLATION, RewardCaller, RewardProblem, reward_name
from .rewards import REWARDS, reference_problem


@dataclass(frozen=True)
class RewardConfig:
    """A reward run's objective: the reward, the estimator and how the copies generate.

    reward: a built-in's name ("exact_match", "f1", "label_word", "numeric": engine/rewards.py),
        "module:function", or a callable (prompt, completion, reference) -> float.
    estimator: "es" (evolution strategies over the 2q copies, with `shaping`) or "mezo" (MeZO on the
        loss -R); shaping: "zscore" (the default for "es"), "zscore_per_prompt" or "centered_ranks"
        (engine/estimators.py; None for "mezo").
    max_tokens, temperature, top_p, stop_tokens: the generation (greedy at temperature 0); the
        completion a reward sees ends before a stop token.
    time_limit_s: the longest one call of a user's reward may take; isolation: "process" (a user's
        reward runs in a worker process that the limit can stop) or "inline" (in this process, no
        limit); the built-ins always run inline (engine/reward_calls.py).
    needs_reference: every example must carry a reference (always, for the built-ins).
    """

    reward: str | Callable
    estimator: str = "es"
    shaping: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    time_limit_s: float = 10.0
    isolation: str = "process"
    needs_reference: bool = True

    def __post_init__(self):
        if not (callable(self.reward) or isinstance(self.reward, str)):
            raise InputError(f"reward must be a built-in name ({', '.join(REWARDS)}), 'module:function' or a "
                             f"callable, got {type(self.reward).__name__}")
        if isinstance(self.reward, str) and self.reward not in REWARDS and ":" not in self.reward:
            raise InputError(f"reward {self.reward!r} is neither a built-in ({', '.join(REWARDS)}) nor "
                             "'module:function'")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator == "es" and self.shaping is None:
            object.__setattr__(self, "shaping", "zscore")
        if self.estimator == "mezo" and self.shaping is not None:
            raise InputError(f"shaping {self.shaping!r} is for the 'es' estimator; 'mezo' uses the rewards as they are")
        if self.estimator == "es" and self.shaping not in SHAPINGS:
            raise InputError(f"shaping must be one of {SHAPINGS}, got {self.shaping!r}")
        if isinstance(self.max_tokens, bool) or not is_int(self.max_tokens) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not 0.0 <= self.temperature <= 100.0:
            raise InputError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        stops = self.stop_tokens if isinstance(self.stop_tokens, (list, tuple)) else None
        if stops is None or any(isinstance(t, bool) or not is_int(t) or int(t) < 0 for t in stops):
            raise InputError(f"stop_tokens must be a list of token ids, got {self.stop_tokens!r}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stops))
        if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) or \
                not (math.isfinite(self.time_limit_s) and self.time_limit_s > 0):
            raise InputError(f"time_limit_s must be a number > 0, got {self.time_limit_s!r}")
        if self.isolation not in ISOLATION:
            raise InputError(f"isolation must be one of {ISOLATION}, got {self.isolation!r}")
        if not isinstance(self.needs_reference, bool):
            raise InputError(f"needs_reference must be True or False, got {self.needs_reference!r}")
        if self.builtin and not self.needs_reference:
            raise InputError(f"the built-in reward {self.reward!r} compares with a reference: needs_reference=False "
                             "is for a reward of your own")

    @property
    def name(self) -> str:
        """The reward as a checkpoint records it (a callable: its module:qualname)."""
        return reward_name(self.reward)

    @property
    def builtin(self) -> bool:
        return isinstance(self.reward, str) and self.reward in REWARDS

    def to_dict(self) -> dict:
        """The config as JSON (a callable reward recorded by its name)."""
        return {**dataclasses.asdict(self), "reward": self.name, "stop_tokens": list(self.stop_tokens)}

    def caller(self) -> RewardCaller:
        """A RewardCaller of this reward (imports a "module:function" reward: an InputError if it cannot)."""
        return RewardCaller(self.reward, time_limit_s=self.time_limit_s, isolation=self.isolation)


@dataclass
class RewardExample:
    """A prompt to generate from (token ids) and what its reward compares the completion with.

    reference: the example's answer as the reward wants it (a built-in: a str or a list of str, or a
    number for "numeric"; a reward of your own: anything); prompt_text: the prompt as text, handed to
    the reward when the trainer decodes (None: decode(prompt)).
    """

    prompt: Sequence[int]
    reference: Any = None
    prompt_text: str | None = None


def check_reward_examples(examples, limits: Limits, config: RewardConfig, *, what: str = "batch") -> None:
    """Refuse a bad set of reward examples before any work (InputError naming `what[i]` and the problem)."""
    if examples is None or len(examples) == 0:
        raise InputError(f"{what} is empty")
    for i, ex in enumerate(examples):
        if not isinstance(ex, RewardExample):
            raise InputError(f"{what}[{i}] is a {type(ex).__name__}; a reward run steps on flashzo.RewardExample "
                             "(a prompt and a reference)")
        if len(ex.prompt) == 0:
            raise InputError(f"{what}[{i}]: its prompt is empty: generation needs a context")
        for t in ex.prompt:
            if isinstance(t, bool) or not is_int(t):
                raise InputError(f"{what}[{i}]: its prompt has a token {t!r} that is not an integer id")
            if not 0 <= int(t) < limits.vocab_size:
                raise InputError(f"{what}[{i}]: its prompt has token id {int(t)} outside the vocabulary "
                                 f"(vocab_size {limits.vocab_size})")
        if len(ex.prompt) + config.max_tokens > limits.max_positions:
            raise InputError(f"{what}[{i}]: its prompt ({len(ex.prompt)} tokens) + max_tokens {config.max_tokens} is "
                             f"more than the model's {limits.positions}")
        if ex.prompt_text is not None and not isinstance(ex.prompt_text, str):
            raise InputError(f"{what}[{i}]: prompt_text must be a str, got {type(ex.prompt_text).__name__}")
        if ex.reference is None and config.needs_reference:
            raise InputError(f"{what}[{i}] has no reference, and the reward {config.name} needs one")
        if config.builtin and (problem := reference_problem(config.reward, ex.reference)):
            raise InputError(f"{what}[{i}]: {problem}")


class Scorer:
    """A run's reward calls: the caller, the application's decode (None: the reward sees token ids), and
    what a reward is handed for a generation."""

    def __init__(self, config: RewardConfig, decode: Callable[[list[int]], str] | None):
        if decode is not None and not callable(decode):
            raise InputError(f"decode must be a callable (token ids -> text), got {type(decode).__name__}")
        if decode is None and config.builtin:
            raise InputError(f"the built-in reward {config.reward!r} compares text: give the trainer decode= (the "
                             "tokenizer's decode)")
        self.config, self.decode = config, decode
        self.caller = config.caller()
        self.probed = False
        self.stops = set(config.stop_tokens)

    def prompt_arg(self, ex: RewardExample):
        if self.decode is None:
            return list(ex.prompt)
        return ex.prompt_text if ex.prompt_text is not None else self._text(list(ex.prompt), "a prompt")

    def completion_ids(self, tokens: list[int]) -> list[int]:
        return tokens[:-1] if tokens and tokens[-1] in self.stops else list(tokens)

    def completion_arg(self, tokens: list[int]):
        ids = self.completion_ids(tokens)
        return ids if self.decode is None else self._text(ids, "a completion")

    def _text(self, ids: list[int], what: str) -> str:
        text = self.decode(ids)
        if not isinstance(text, str):
            raise InputError(f"decode returned a {type(text).__name__} for {what}, not a str")
        return text

    def probe(self, ex: RewardExample, what: str) -> None:
        """Once per run, before any work: the reward on `ex` with its reference as the completion."""
        if self.probed:
            return
        ref = ex.reference
        first = ref[0] if isinstance(ref, (list, tuple)) and ref and not all(is_int(t) for t in ref) else ref
        if self.decode is None:
            completion = list(ref) if isinstance(ref, (list, tuple)) and all(is_int(t) for t in ref) else []
        else:
            completion = first if isinstance(first, str) else "" if first is None else str(first)
        self.caller.probe((self.prompt_arg(ex), completion, ref), f"{what} with its reference as the completion")
        self.probed = True

    def score(self, examples: Sequence[RewardExample], generations, example_ids: Sequence[int],
              copy_ids: Sequence[int | None]) -> tuple[list[list[float | None]], list[RewardProblem]]:
        """`R[c][p]` of `generations[c][p]` (None where the reward failed) and the problems."""
        prompts = [self.prompt_arg(ex) for ex in examples]
        calls, where = [], []
        for c, row in zip(copy_ids, generations):
            for p, (ex, g) in enumerate(zip(examples, row)):
                calls.append((prompts[p], self.completion_arg(g.tokens), ex.reference))
                where.append((example_ids[p], c))
        values, problems = self.caller(calls, where)
        P = len(examples)
        return [values[k * P:(k + 1) * P] for k in range(len(copy_ids))], problems


def copy_rewards(model: CausalLM, adapter: LoRAAdapter, examples: Sequence[RewardExample], copies: Sequence[Copy], *,
                 eps: float, scorer: Scorer, prompt_seeds: Sequence[int], example_ids: Sequence[int],
                 copy_ids: Sequence[int]) -> tuple[list[list[float | None]], list[RewardProblem], dict]:
    """Decode the examples under the copies in one batched decode and score them: (`R[c][p]`, problems,
    the decode's row counts)."""
    cfg = scorer.config
    stats: dict = {}
    gens = generate_copies(model, [ex.prompt for ex in examples], adapter, copies, eps=eps, max_tokens=cfg.max_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, prompt_seeds=prompt_seeds,
                           stop_tokens=cfg.stop_tokens, stats=stats)
    rewards, problems = scorer.score(examples, gens, example_ids, copy_ids)
    return rewards, problems, stats


def evaluate_rewards(model: CausalLM, adapter: LoRAAdapter | None, examples: Sequence[RewardExample], *,
                     scorer: Scorer, prompt_seeds: Sequence[int], example_ids: Sequence[int],
                     batch_size: int = 32) -> list[dict]:
    """Decode every example with the adapter (no perturbation), `batch_size` prompts per decode, and score
    it: one {"completion", "tokens", "finish_reason", "reward"} per example (reward None where the
    reward failed; the problems in "problem")."""
    cfg = scorer.config
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        gens = generate_copies(model, [ex.prompt for ex in chunk], adapter, [Copy()], eps=0.0,
                               max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                               prompt_seeds=prompt_seeds[i:i + batch_size], stop_tokens=cfg.stop_tokens)
        rewards, problems = scorer.score(chunk, gens, example_ids[i:i + batch_size], [None])
        by_example = {pr.example: pr for pr in problems}
        for ex_id, g, r in zip(example_ids[i:i + batch_size], gens[0], rewards[0]):
            rec = {"completion": scorer.completion_arg(g.tokens), "tokens": list(g.tokens),
                   "finish_reason": g.finish_reason, "reward": r}
            if ex_id in by_example:
                rec["problem"] = str(by_example[ex_id])
            out.append(rec)
    return out
