"""Fine-tuning jobs as OpenAI's API sees them: a create request -> flashzo's run options, a stored job ->
OpenAI's job object, and OpenAI's `hyperparameters` mapped onto flashzo's.

A job's hyperparameters are exactly `flashzo train`'s options (flashzo.run.RunOptions, the flags with
underscores), given as `method = {"type": "mezo", "mezo": {"hyperparameters": {...}}}`. OpenAI's
three are accepted there or in the top-level `hyperparameters`, and mapped:

    batch_size                 -> batch_size (examples per step)
    learning_rate_multiplier   -> lr = multiplier x flashzo's default lr (RunOptions.lr, 1e-4)
    n_epochs                   -> steps = ceil(n_epochs x training examples / batch_size)
    "auto"                     -> flashzo's default for that option

Giving one quantity both ways (n_epochs and steps, learning_rate_multiplier and lr, two batch sizes)
is refused. Everything is checked before the job exists: unknown names, types and ranges here; the
files line by line against the model once the job is created (scheduler.py).
"""

from __future__ import annotations

import math
import re

from flashzo.engine.lora import LoRAAdapter
from flashzo.errors import InputError
from flashzo.run import RunOptions

from .errors import ServeError

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
DEFAULTS = RunOptions()
SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# What one job may ask of a shared server (a run of flashzo train has no such limits).
LIMITS = {"steps": 1_000_000, "batch_size": 1024, "num_perturbations": 64, "warmup_steps": 1_000_000}


def _auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def _number(name: str, value, *, integer: bool, where: str):
    if _auto(value):
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ServeError(400, f"{where}.{name} must be {kind} or \"auto\", got {value!r}", param=f"{where}.{name}",
                         code="invalid_hyperparameter")
    return value


def run_options(method: dict | None, hyperparameters: dict | None, seed: int | None,
                model, *, batch_invariant: bool = True) -> tuple[dict, float | None]:
    """(RunOptions as a dict, n_epochs or None) of a create request; InputError naming what is wrong.

    With n_epochs the steps are known only once the training file has been read (`with_epochs`).
    A job that does not set method.mezo.hyperparameters.batch_invariant takes the server's
    (`flashzo serve --batch-invariant`, on by default): its adapter is then the one it gets alone,
    whichever jobs share its forwards.
    """
    method = {"type": "mezo"} if method is None else method
    if not isinstance(method, dict) or method.get("type") != "mezo":
        got = method.get("type") if isinstance(method, dict) else method
        raise ServeError(400, f"method.type must be \"mezo\" (flashzo trains with MeZO), got {got!r}",
                         param="method.type", code="invalid_method")
    extra = sorted(set(method) - {"type", "mezo"})
    if extra:
        raise ServeError(400, f"method: unknown field {', '.join(extra)} (known: type, mezo)", param="method")
    mezo = method.get("mezo") or {}
    if not isinstance(mezo, dict) or sorted(set(mezo) - {"hyperparameters"}):
        raise ServeError(400, "method.mezo must be an object with one field, hyperparameters", param="method.mezo")
    hps = mezo.get("hyperparameters") or {}
    top = hyperparameters or {}
    for where, d in (("method.mezo.hyperparameters", hps), ("hyperparameters", top)):
        if not isinstance(d, dict):
            raise ServeError(400, f"{where} must be an object", param=where)
    unknown = sorted(set(top) - set(OPENAI_HYPERPARAMETERS))
    if unknown:
        raise ServeError(400, f"hyperparameters: unknown hyperparameter {', '.join(unknown)} (known: "
                         f"{', '.join(OPENAI_HYPERPARAMETERS)}; flashzo's own go in method.mezo.hyperparameters)",
                         param="hyperparameters", code="invalid_hyperparameter")
    hps = dict(hps)
    openai = {}
    for name in OPENAI_HYPERPARAMETERS:
        given = []
        if name in top:
            given.append(("hyperparameters", top[name]))
        if name in hps and (name != "batch_size" or _auto(hps[name])):  # batch_size is flashzo's own too
            given.append(("method.mezo.hyperparameters", hps.pop(name)))
        values = {repr(v) for _, v in given if not _auto(v)}
        if len(values) > 1:
            raise ServeError(400, f"{name} is given twice with different values", param=f"hyperparameters.{name}",
                             code="invalid_hyperparameter")
        for where, value in given:
            value = _number(name, value, integer=name != "learning_rate_multiplier", where=where)
            if value is not None:
                openai[name] = value
    if "batch_size" in openai:
        if "batch_size" in hps and hps["batch_size"] != openai["batch_size"]:
            raise ServeError(400, f"batch_size is given twice: {openai['batch_size']!r} in hyperparameters and "
                             f"{hps['batch_size']!r} in method.mezo.hyperparameters",
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
            raise ServeError(400, f"seed is given twice: {seed!r} and {hps['seed']!r} in method.mezo.hyperparameters",
                             param="seed")
        hps["seed"] = seed
    opts = RunOptions.from_dict({"batch_invariant": batch_invariant, **hps}, what="method.mezo.hyperparameters")
    for name, most in LIMITS.items():
        if getattr(opts, name) > most:
            raise InputError(f"method.mezo.hyperparameters: {name} must be <= {most} on this server, got "
                             f"{getattr(opts, name)}")
    opts.mezo_config()  # its checks (schedules need steps ...)
    LoRAAdapter.empty(opts.lora_config(), model.config, device="meta")  # modules and layers of this model
    return opts.to_dict(), n_epochs


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
    if suffix is not None and not SUFFIX.match(suffix):
        raise ServeError(400, f"suffix must be 1-64 characters of letters, digits, '-', '_' and '.', got {suffix!r}",
                         param="suffix")


def fine_tuned_name(model: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{model}:{suffix or ''}:{job_id}"


def job_object(row: dict) -> dict:
    """A stored job as OpenAI's fine_tuning.job object (plus `flashzo`: the step it is at)."""
    spec, opts = row["spec"], row["options"]
    n = spec.get("num_examples")
    epochs = opts["steps"] * opts["batch_size"] / n if n else spec.get("n_epochs") or "auto"
    hyper = {"n_epochs": epochs, "batch_size": opts["batch_size"],
             "learning_rate_multiplier": opts["lr"] / DEFAULTS.lr}
    return {
        "id": row["id"], "object": "fine_tuning.job", "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "status": row["status"], "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": "flashzo", "result_files": row["result_files"], "trained_tokens": row["trained_tokens"],
        "training_file": spec["training_file"], "validation_file": spec.get("validation_file"),
        "error": row["error"], "seed": opts["seed"], "suffix": spec.get("suffix"),
        "user_provided_suffix": spec.get("suffix"), "hyperparameters": hyper,
        "method": {"type": "mezo", "mezo": {"hyperparameters": opts}}, "integrations": [],
        "metadata": spec.get("metadata"), "estimated_finish": None,
        "flashzo": {"step": row["step"], "steps": opts["steps"], "started_at": row["started_at"]},
    }


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
