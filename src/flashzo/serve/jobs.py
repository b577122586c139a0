"""Fine-tuning jobs as OpenAI's API sees them: a create request -> flashzo's run options, a stored job ->
OpenAI's job object, and OpenAI's `hyperparameters` mapped onto flashzo's.

A job's hyperparameters are exactly `flashzo train`'s options (flashzo.run.RunOptions, the flags with
underscores), given as `method = {"type": "mezo", "mezo": {"hyperparameters": {...}}}`; a job that
trains on a reward of generated text is `{"type": "reward", "reward": {"hyperparameters": {...}}}`
with the reward objective's options too (`reward`: a built-in's name; a module:function is refused:
a server runs no code of a request's). OpenAI's three are accepted there or in the top-level
`hyperparameters`, and mapped:

    batch_size                 -> batch_size (examples per step)
    learning_rate_multiplier   -> lr = multiplier x flashzo's default lr (RunOptions.lr, 1e-4)
    n_epochs                   -> steps = ceil(n_epochs x training examples / batch_size)
    "auto"                     -> flashzo's default for that option

Giving one quantity both ways (n_epochs and steps, learning_rate_multiplier and lr, two batch sizes)
is refused. Everything is checked before the job exists: names and types by serve/requests.py,
ranges here (RunOptions' checks, this server's LIMITS, nothing that overflows to an infinity); the
files line by line against the model once the job is created (serve/loader.py).
"""

from __future__ import annotations

import math
import re

import torch

from flashzo.engine.lora import LoRAAdapter
from flashzo.errors import InputError
from flashzo.run import RunOptions

from .errors import ServeError
from .requests import Method, OpenAIHyperparameters, typed

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
DEFAULTS = RunOptions()
SUFFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # the whole suffix (fullmatch: no trailing newline)
# What one job may ask of a shared server (a run of flashzo train has no such limits).
LIMITS = {"steps": 1_000_000, "batch_size": 1024, "num_perturbations": 64, "warmup_steps": 1_000_000}


def _auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def _positive(name: str, value, where: str):
    """An OpenAI hyperparameter's value (None for "auto"); ServeError unless positive."""
    if _auto(value):
        return None
    if value <= 0:
        raise ServeError(400, f"{where}.{name} must be positive or \"auto\", got {value!r}", param=f"{where}.{name}",
                         code="invalid_hyperparameter")
    return value


def run_options(method: Method | None, hyperparameters: OpenAIHyperparameters | None, seed: int | None,
                model, *, batch_invariant: bool = True, has_validation: bool = False) -> tuple[dict, float | None]:
    """(RunOptions as a dict, n_epochs or None) of a create request (typed by serve/requests.py, or the
    same as JSON values); an InputError naming what is wrong.

    With n_epochs the steps are known only once the training file has been read (`with_epochs`).
    A job that does not set method.mezo.hyperparameters.batch_invariant takes the server's
    (`flashzo serve --batch-invariant`, on by default): its adapter is then the one it gets alone,
    whichever jobs share its forwards.
    """
    if isinstance(method, dict):
        method = typed(Method, method, "method")
    if isinstance(hyperparameters, dict):
        hyperparameters = typed(OpenAIHyperparameters, hyperparameters, "hyperparameters")
    if method is not None and method.type not in ("mezo", "reward"):
        raise ServeError(400, "method.type must be \"mezo\" (MeZO on the data's loss) or \"reward\" (a reward of "
                         f"generated text), got {method.type!r}", param="method.type", code="invalid_method")
    kind = method.type if method is not None else "mezo"
    other = "reward" if kind == "mezo" else "mezo"
    if method is not None and getattr(method, other) is not None:
        raise ServeError(400, f"method.{other} is given but method.type is {kind!r}", param=f"method.{other}",
                         code="invalid_method")
    section = getattr(method, kind) if method is not None else None
    given = section.hyperparameters if section is not None else None
    hps = given.given() if given is not None else {}
    where_hps = f"method.{kind}.hyperparameters"
    if kind == "reward":
        _check_served_reward(hps, where_hps)
        hps["objective"] = "reward"
    top = hyperparameters.given() if hyperparameters is not None else {}
    openai = {}
    for name in OPENAI_HYPERPARAMETERS:
        values = []
        if name in top:
            values.append(("hyperparameters", top[name]))
        if name in hps and (name != "batch_size" or _auto(hps[name])):  # batch_size is flashzo's own too
            values.append((where_hps, hps.pop(name)))
        if len({repr(v) for _, v in values if not _auto(v) and v is not None}) > 1:
            raise ServeError(400, f"{name} is given twice with different values", param=f"hyperparameters.{name}",
                             code="invalid_hyperparameter")
        for where, value in values:
            value = _positive(name, value, where) if value is not None else None
            if value is not None:
                openai[name] = value
    if "batch_size" in openai:
        if "batch_size" in hps and hps["batch_size"] != openai["batch_size"]:
            raise ServeError(400, f"batch_size is given twice: {openai['batch_size']!r} in hyperparameters and "
                             f"{hps['batch_size']!r} in {where_hps}",
                             param="hyperparameters.batch_size", code="invalid_hyperparameter")
        hps["batch_size"] = openai["batch_size"]
    if "learning_rate_multiplier" in openai:
        if "lr" in hps:
            raise ServeError(400, "learning_rate_multiplier and lr both set the learning rate; give one",
                             param="hyperparameters.learning_rate_multiplier", code="invalid_hyperparameter")
        hps["lr"] = openai["learning_rate_multiplier"] * DEFAULTS.lr
    n_epochs = openai.get("n_epochs")
    if n_epochs is not None and "steps" in hps:
        raise ServeError(400, "n_epochs and steps both set the length of training; give one",
                         param="hyperparameters.n_epochs")
    if seed is not None:
        if "seed" in hps and hps["seed"] != seed:
            raise ServeError(400, f"seed is given twice: {seed!r} and {hps['seed']!r} in {where_hps}",
                             param="seed")
        hps["seed"] = seed
    if hps.get("batch_invariant") is None:
        hps.pop("batch_invariant", None)
    opts = RunOptions.from_dict({"batch_invariant": batch_invariant, **hps}, what=where_hps)
    for name, most in LIMITS.items():
        if getattr(opts, name) > most:
            raise InputError(f"{where_hps}: {name} must be <= {most} on this server, got {getattr(opts, name)}")
    try:
        opts.mezo_config()  # its checks (schedules need steps, a reward's settings ...)
    except InputError as e:
        raise InputError(f"{where_hps}: {e}") from None
    LoRAAdapter.empty(opts.lora_config(), model.config, device="meta")  # modules and layers of this model
    _check_numbers(opts, model)
    if opts.keep_best is not None and not has_validation:
        raise ServeError(400, f"keep_best {opts.keep_best!r} needs a validation_file (the best checkpoint is the "
                         "best evaluation's)", param=f"{where_hps}.keep_best",
                         code="invalid_hyperparameter")
    if kind == "reward" and model.limits.max_positions <= opts.max_tokens:
        raise ServeError(400, f"{where_hps}: max_tokens {opts.max_tokens} leaves no room for a prompt in the model's "
                         f"{model.limits.positions}", param=f"{where_hps}.max_tokens", code="invalid_hyperparameter")
    return opts.to_dict(), n_epochs


def _check_served_reward(hps: dict, where: str) -> None:
    """A reward job names a built-in reward: the server imports and runs no code a request names."""
    from flashzo.engine.rewards import REWARDS

    reward = hps.get("reward")
    if reward is None:
        raise ServeError(400, f"{where}.reward is required: one of {', '.join(REWARDS)}", param=f"{where}.reward",
                         code="invalid_hyperparameter")
    if reward not in REWARDS:
        what = "a module:function reward runs code of the request's, which a server refuses" if ":" in reward \
            else "not a built-in reward"
        raise ServeError(400, f"{where}.reward {reward!r}: {what}; this server's rewards are the built-ins: "
                         f"{', '.join(REWARDS)}", param=f"{where}.reward", code="invalid_hyperparameter")

def _check_numbers(opts: RunOptions, model) -> None:
    """Refuse what would put an infinity into the job's object or the model's forward."""
    multiplier = opts.lr / DEFAULTS.lr
    if not math.isfinite(multiplier):
        raise ServeError(400, f"lr {opts.lr!r} is too large: its learning_rate_multiplier (lr / {DEFAULTS.lr}) is "
                         "not a finite number", param="method.mezo.hyperparameters.lr", code="invalid_hyperparameter")
    biggest = torch.finfo(model.dtype).max
    scaling = opts.alpha / opts.lora_r
    if not scaling <= biggest:
        raise ServeError(400, f"lora_alpha / lora_r = {scaling:.3g} overflows the model's {model.dtype} (largest "
                         f"{biggest:.3g})", param="method.mezo.hyperparameters.lora_alpha",
                         code="invalid_hyperparameter")
    bad = _non_finite(job_object(provisional_row(opts.to_dict())))
    if bad is not None:
        raise ServeError(400, f"{bad} of the job would not be a finite number: a hyperparameter is too large",
                         param="method.mezo.hyperparameters", code="invalid_hyperparameter")


def provisional_row(options: dict) -> dict:
    """A stored job's row as it will be created (what job_object reads)."""
    return {"id": "ftjob-new", "model": "", "created_at": 0, "finished_at": None, "status": "validating_files",
            "fine_tuned_model": None, "result_files": [], "trained_tokens": None, "error": None,
            "started_at": None, "step": 0, "spec": {"training_file": ""}, "options": options}


def _non_finite(value, path: str = "") -> str | None:
    """The path of the first NaN or infinite number in `value`, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "a value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


def with_epochs(options: dict, n_epochs: float | None, num_examples: int) -> dict:
    """The options once the training set's size is known (n_epochs -> steps)."""
    if n_epochs is None:
        return options
    steps = max(1, math.ceil(n_epochs * num_examples / options["batch_size"]))
    if steps > LIMITS["steps"]:
        raise InputError(f"n_epochs {n_epochs} is {steps} steps of {options['batch_size']} examples; this server "
                         f"runs at most {LIMITS['steps']}")
    return RunOptions.from_dict({**options, "steps": steps}).to_dict()


def check_suffix(suffix: str | None) -> None:
    if suffix is not None and not SUFFIX.fullmatch(suffix):
        raise ServeError(400, f"suffix must be 1-64 characters of letters, digits, '-', '_' and '.', got {suffix!r}",
                         param="suffix")


def fine_tuned_name(model: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{model}:{suffix or ''}:{job_id}"


def job_object(row: dict) -> dict:
    """A stored job as OpenAI's fine_tuning.job object (plus `flashzo`: the step it is at)."""
    spec, opts = row["spec"], row["options"]
    n = spec.get("num_examples")
    # OpenAI's n_epochs is an integer or "auto": the one the job gave, else "auto" (the steps chose the
    # length); the epochs the steps make, a fraction in general, are flashzo's "epochs"
    hyper = {"n_epochs": spec.get("n_epochs") or "auto", "batch_size": opts["batch_size"],
             "learning_rate_multiplier": opts["lr"] / DEFAULTS.lr}
    return {
        "id": row["id"], "object": "fine_tuning.job", "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "status": row["status"], "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": "flashzo", "result_files": row["result_files"], "trained_tokens": row["trained_tokens"],
        "training_file": spec["training_file"], "validation_file": spec.get("validation_file"),
        "error": row["error"], "seed": opts["seed"], "suffix": spec.get("suffix"),
        "user_provided_suffix": spec.get("suffix"), "hyperparameters": hyper,
        "method": _method(opts), "integrations": [],
        "metadata": spec.get("metadata"), "estimated_finish": None,
        "flashzo": {"step": row["step"], "steps": opts["steps"], "started_at": row["started_at"],
                    "epochs": opts["steps"] * opts["batch_size"] / n if n else None},
    }


def _method(opts: dict) -> dict:
    """A job's method as it was given: its type and hyperparameters (a reward job's without the objective)."""
    if opts.get("objective", "loss") == "reward":
        from flashzo.run import REWARD_OPTIONS

        keep = ("reward", "estimator", "shaping", "max_tokens", "temperature", "top_p", "stop_newline")
        return {"type": "reward", "reward": {"hyperparameters": {k: v for k, v in opts.items()
                                                                 if k not in REWARD_OPTIONS or k in keep}}}
    from flashzo.run import REWARD_OPTIONS

    return {"type": "mezo", "mezo": {"hyperparameters": {k: v for k, v in opts.items() if k not in REWARD_OPTIONS}}}


def event_object(row: dict) -> dict:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"], "type": row["type"]}


def checkpoint_object(row: dict, job: dict) -> dict:
    name = job["fine_tuned_model"] or fine_tuned_name(job["model"], job["spec"].get("suffix"), job["id"])
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{row['step']}", "step_number": row["step"],
            "metrics": row["metrics"], "fine_tuning_job_id": row["job_id"]}


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}
