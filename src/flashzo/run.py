"""What defines a training run: its options, checked once, and the configs they make.

`flashzo train`'s options and a service job's hyperparameters are the same thing, `RunOptions`
(names are the flags with underscores: `--lora-r` is `lora_r`). A run is a pure function of its
options, its data and its model (docs/design.md, "The algorithm"): the same options give the same
LoRA init, perturbations and mini-batches, and so the same adapter.

A resumed run keeps its options, except `RESUMABLE` ones, which say how long it runs and how often
it is evaluated and saved, not what it computes. `steps` may extend (or shorten) a run: a linear or
cosine schedule is then re-planned over the new `steps`, so every step from the checkpoint on takes
the learning rate a run of that many steps has at that step; the steps already done keep theirs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from flashzo.engine.lora import LoRAConfig
from flashzo.engine.mezo import SCHEDULES, MeZOConfig
from flashzo.errors import InputError

TEMPLATE_NAMES = ("sst2", "rte", "copa")
OBJECTIVES = ("loss", "reward")  # the log-likelihood of the data's targets, or a reward of generated text
# The options of the reward objective (a loss run leaves them at their defaults)
REWARD_OPTIONS = ("objective", "reward", "estimator", "shaping", "max_tokens", "temperature", "top_p", "stop_newline",
                  "reward_time_limit")
KEEP_BEST = ("loss", "accuracy", "reward")  # the eval metric a run's best checkpoint is kept by
# What a resumed run may change (the rest defines what it computes).
RESUMABLE = ("steps", "eval_every", "save_every", "eval_batch_size")
EPS_MIN = 2.0 ** -126  # float32's smallest normal number: the least eps a run accepts


@dataclass(frozen=True)
class RunOptions:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    eps: float = 1e-3
    weight_decay: float = 0.0
    num_perturbations: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lora_r: int = 8
    lora_alpha: float | None = None  # None: 2 * lora_r
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0
    template: str | None = None
    eval_every: int = 0  # 0: only before and after training
    save_every: int = 0  # 0: only at the end
    eval_batch_size: int = 32  # examples per evaluation forward
    keep_best: str | None = None  # None, or keep the checkpoint of the best eval "loss" / "accuracy"
    # batch-invariant numerics (engine/invariant.py): every row's bits independent of the other rows
    batch_invariant: bool = False
    # objective "reward": a reward of generated text (engine/reward_objective.py's RewardConfig: the reward, a
    # built-in or "module:function", its estimator and shaping, the generation, a call's time limit); the
    # completion also stops at the tokenizer's end-of-text token, and with stop_newline at a newline
    objective: str = "loss"
    reward: str | None = None
    estimator: str = "es"
    shaping: str | None = None  # None: "zscore" for "es"
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_newline: bool = False
    reward_time_limit: float = 10.0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "target_modules", _modules(self.target_modules))
        set_(self, "lora_layers", _layers(self.lora_layers))
        for name in ("steps", "batch_size", "num_perturbations", "warmup_steps", "lora_r", "seed", "eval_every",
                     "save_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{name} must be an integer, got {value!r}")
        for name, lo in (("steps", 0), ("batch_size", 1), ("num_perturbations", 1), ("warmup_steps", 0),
                         ("lora_r", 1), ("seed", 0), ("eval_every", 0), ("save_every", 0), ("eval_batch_size", 1)):
            if getattr(self, name) < lo:
                raise InputError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        for name in ("lr", "eps", "weight_decay", "lora_alpha"):
            value = getattr(self, name)
            if value is None and name == "lora_alpha":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            set_(self, name, float(value))
        if self.lr < 0 or self.weight_decay < 0:
            raise InputError(f"lr and weight_decay must be >= 0, got {self.lr}, {self.weight_decay}")
        if not self.eps >= EPS_MIN:
            raise InputError(f"eps must be >= {EPS_MIN:.4g} (float32's smallest normal number; a smaller one "
                             f"underflows in the perturbed weights), got {self.eps!r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise InputError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.lr_schedule not in SCHEDULES:
            raise InputError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise InputError(f"template must be one of {TEMPLATE_NAMES}, got {self.template!r}")
        if not isinstance(self.batch_invariant, bool):
            raise InputError(f"batch_invariant must be true or false, got {self.batch_invariant!r}")
        if self.keep_best is not None and self.keep_best not in KEEP_BEST:
            raise InputError(f"keep_best must be None or one of {KEEP_BEST}, got {self.keep_best!r}")
        self._check_reward()

    def _check_reward(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not isinstance(self.stop_newline, bool):
            raise InputError(f"stop_newline must be true or false, got {self.stop_newline!r}")
        if self.objective == "loss":
            if self.reward is not None:
                raise InputError(f"reward {self.reward!r} is for the reward objective (--objective reward)")
            for name in REWARD_OPTIONS[2:]:
                if getattr(self, name) != getattr(RunOptions, name):
                    raise InputError(f"{name} {getattr(self, name)!r} is for the reward objective (--objective reward)")
            if self.keep_best == "reward":
                raise InputError("keep_best 'reward' is for the reward objective (--objective reward)")
            return
        if self.reward is None:
            raise InputError("reward must name the reward of the reward objective (a built-in or module:function)")
        if not isinstance(self.reward, str):
            raise InputError(f"reward must be a built-in's name or 'module:function', got {self.reward!r}")
        if self.keep_best in ("loss", "accuracy"):
            raise InputError(f"keep_best {self.keep_best!r}: a reward run's evals have a reward (keep_best reward)")
        for name in ("max_tokens",):
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
                raise InputError(f"{name} must be an integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "reward_time_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        self.reward_config()  # the rest is RewardConfig's to check

    def reward_config(self, stop_tokens=()):
        """The RewardConfig of a reward run (None for the loss objective); stop_tokens: the token ids the
        completion stops at (the application's tokenizer knows them)."""
        if self.objective != "reward":
            return None
        from flashzo.engine.reward_objective import RewardConfig

        try:
            return RewardConfig(self.reward, estimator=self.estimator, shaping=self.shaping,
                                max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                stop_tokens=tuple(stop_tokens), time_limit_s=self.reward_time_limit)
        except InputError as e:  # RewardConfig names its fields: name the options
            msg = str(e).replace("time_limit_s", "reward_time_limit")
            raise InputError(msg) from None

    # Names ------------------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict, *, what: str = "options") -> RunOptions:
        """From a dict of option names (a job's hyperparameters): unknown names are refused by name."""
        if not isinstance(d, dict):
            raise InputError(f"{what} must be an object of option names, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise InputError(f"{what}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(known: {', '.join(cls.names())})")
        return cls(**d)

    @classmethod
    def from_args(cls, args) -> RunOptions:
        """From parsed `flashzo train` / `flashzo demo` arguments (argparse.Namespace); a refusal names the
        flag (`--eval-every must be >= 0`)."""
        try:
            return cls(**{n: getattr(args, n) for n in cls.names() if hasattr(args, n)})
        except InputError as e:
            msg = str(e)
            name = next((n for n in cls.names() if msg.startswith(n + " ")), None)
            if name is None:
                raise
            raise InputError("--" + name.replace("_", "-") + msg[len(name):]) from None

    def to_dict(self) -> dict:
        d = {n: getattr(self, n) for n in self.names()}
        d["target_modules"] = list(self.target_modules)
        d["lora_layers"] = list(self.lora_layers) if self.lora_layers is not None else None
        return d

    def replace(self, **changes) -> RunOptions:
        return dataclasses.replace(self, **changes)

    def differences(self, other: RunOptions, names=None) -> list[str]:
        """The option names (of `names`, default all) whose meaning differs between two runs' options.

        Equal meanings are equal whatever the spelling: target modules and layers are sets, and
        lora_alpha None is 2 * lora_r.
        """
        return [n for n in (names if names is not None else self.names()) if self._meaning(n) != other._meaning(n)]

    def _meaning(self, name: str):
        if name == "target_modules":
            return frozenset(self.target_modules)
        if name == "lora_layers":
            return None if self.lora_layers is None else frozenset(self.lora_layers)
        if name == "lora_alpha":
            return self.alpha
        return getattr(self, name)

    # The configs a run trains with ---------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.alpha, target_modules=self.target_modules,
                          layers=self.lora_layers, seed=self.seed)

    def mezo_config(self, *, parallel: str | None = None, stop_tokens=()) -> MeZOConfig:
        """The run's MeZOConfig (a reward run's completions stopping at `stop_tokens`)."""
        return MeZOConfig(lr=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                          num_perturbations=self.num_perturbations, seed=self.seed, lr_schedule=self.lr_schedule,
                          warmup_steps=self.warmup_steps, total_steps=self.steps, parallel=parallel,
                          batch_invariant=self.batch_invariant, reward=self.reward_config(stop_tokens))


def _modules(value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",") if m.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise InputError(f"target_modules must be module names (a list, or a comma-separated string), got {value!r}")
    if not value:
        raise InputError("target_modules is empty")
    return tuple(value)


def _layers(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"lora_layers must be comma-separated layer indices, got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in value):
        raise InputError(f"lora_layers must be a list of layer indices, got {value!r}")
    if not value or min(value) < 0:
        raise InputError(f"lora_layers must be a non-empty list of layer indices >= 0, got {list(value)}")
    return tuple(value)
