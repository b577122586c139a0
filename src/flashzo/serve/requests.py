"""The JSON request bodies as typed pydantic models, and the dependency that reads one after the key check.

Bodies are parsed strictly (an integer field refuses 4.0 and true, a number refuses "3"), with no
NaN or infinity, and by pydantic's own JSON parser: nesting deeper than its limit, and a string
with a lone surrogate escape (a \\ud800 without its pair: not Unicode text), are 400s, never a
RecursionError. A body that is not the request's shape (not JSON, an unknown or missing top-level
field, a top-level field of the wrong type) is answered 422 `invalid_body`; a value inside the
fields a model lists in `PARAMS` (a job's method, hyperparameters, metadata) is answered 400 with
that parameter named, as OpenAI does. Ranges are checked after parsing (run.py's RunOptions for
the hyperparameters, completions.py for completions), also 400.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .errors import ServeError

Auto = Literal["auto"]
MAX_NESTING = "recursion limit exceeded"  # pydantic's JSON parser's message for a too deeply nested body
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # an escaped UTF-16 surrogate (pydantic: lone ones refused)
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class MezoHyperparameters(BaseModel):
    """flashzo train's options (src/flashzo/run.py: RunOptions, the flags with underscores), and OpenAI's
    three (n_epochs, learning_rate_multiplier; batch_size may be "auto"). Unset: the option's default."""

    model_config = STRICT

    steps: Optional[int] = None
    batch_size: Optional[Union[int, Auto]] = None
    lr: Optional[float] = None
    eps: Optional[float] = None
    weight_decay: Optional[float] = None
    num_perturbations: Optional[int] = None
    lr_schedule: Optional[str] = None
    warmup_steps: Optional[int] = None
    lora_r: Optional[int] = None
    lora_alpha: Optional[float] = None
    target_modules: Optional[Union[list[str], str]] = None
    lora_layers: Optional[Union[list[int], str]] = None
    seed: Optional[int] = None
    template: Optional[str] = None
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    eval_batch_size: Optional[int] = None
    keep_best: Optional[str] = None
    batch_invariant: Optional[bool] = None
    n_epochs: Optional[Union[int, Auto]] = None
    learning_rate_multiplier: Optional[Union[float, Auto]] = None

    def given(self) -> dict:
        """The options the request set (an explicit null included: lora_alpha null is 2 x lora_r)."""
        return self.model_dump(exclude_unset=True)


class OpenAIHyperparameters(BaseModel):
    """OpenAI's top-level `hyperparameters`."""

    model_config = STRICT

    n_epochs: Optional[Union[int, Auto]] = None
    batch_size: Optional[Union[int, Auto]] = None
    learning_rate_multiplier: Optional[Union[float, Auto]] = None

    def given(self) -> dict:
        return {k: v for k, v in self.model_dump(exclude_unset=True).items() if v is not None}


class MezoMethod(BaseModel):
    model_config = STRICT

    hyperparameters: Optional[MezoHyperparameters] = None


class RewardHyperparameters(MezoHyperparameters):
    """A reward job's: flashzo train's options and those of its reward objective (a built-in reward only)."""

    reward: Optional[str] = None
    estimator: Optional[str] = None
    shaping: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop_newline: Optional[bool] = None


class RewardMethod(BaseModel):
    model_config = STRICT

    hyperparameters: Optional[RewardHyperparameters] = None


class Method(BaseModel):
    model_config = STRICT

    type: str
    mezo: Optional[MezoMethod] = None
    reward: Optional[RewardMethod] = None


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs. metadata: at most 16 pairs, keys of 1-64 and values of at most 512
    characters (OpenAI's limits)."""

    model_config = STRICT
    PARAMS: ClassVar[tuple[str, ...]] = ("method", "hyperparameters", "metadata", "suffix", "seed")

    model: str
    training_file: str
    validation_file: Optional[str] = None
    seed: Optional[int] = None
    suffix: Optional[str] = None
    method: Optional[Method] = None
    hyperparameters: Optional[OpenAIHyperparameters] = None
    integrations: Optional[list] = None
    metadata: Optional[Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]] = None


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's parameters; one flashzo does not implement must keep its default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    PARAMS: ClassVar[tuple[str, ...]] = ()

    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: Optional[int] = 1
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    best_of: Optional[int] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, Any]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None


class InvalidBody(Exception):
    """A body that pydantic refused: answered by app.py with OpenAI's error shape (see the docstring)."""

    def __init__(self, errors: list[dict], params: tuple[str, ...]):
        super().__init__(errors[0].get("msg") if errors else "invalid body")
        self.errors, self.params = errors, params


def body(model: type[BaseModel]):
    """A dependency that reads the request's body as `model`. Routes declare it after the key check, so
    no body is read (or held in memory) for a request without the key."""

    async def parse(request: Request):
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            errors = e.errors(include_url=False)
            if any(MAX_NESTING in str(er.get("msg", "")) for er in errors):
                raise ServeError(400, "The request body is nested too deeply to be read", code="invalid_body") \
                    from None
            if errors and errors[0].get("type") == "json_invalid" and SURROGATE.search(raw):
                raise ServeError(400, "The request body holds a lone surrogate escape (\\ud800-\\udfff without its "
                                 "pair): a string that is not Unicode text", code="invalid_body") from None
            raise InvalidBody(errors, getattr(model, "PARAMS", ())) from None

    return parse


def typed(model: type[BaseModel], data, where: str):
    """`data` (a JSON value) as `model`, for Python callers; a ServeError (400) as the HTTP answer says."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        errors = [{**er, "loc": (where, *er.get("loc", ()))} for er in e.errors(include_url=False)]
        status, message, param, code = describe(errors, (where,))
        raise ServeError(400, message, param=param, code=code) from None


KINDS = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
         "string_type": "a string", "list_type": "a list", "dict_type": "an object", "model_type": "an object"}


def _path(er: dict) -> list[str]:
    """An error's location, less pydantic's names for the branches of a union (`int`, `literal['auto']`)."""
    return [str(x) for x in er.get("loc", ()) if not (str(x) in ("int", "float", "str", "bool") or
                                                     str(x).startswith(("literal[", "list[", "dict[")))]


def _value(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(errors: list[dict], params: tuple[str, ...]) -> tuple[int, str, str | None, str]:
    """(status, message, param, code) of a refused body: 400 naming the parameter for a value inside
    one of `params`, 422 invalid_body otherwise."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid body", "type": ""}
    path = _path(first)
    if not (path and path[0] in params):
        msg = "; ".join(f"{'.'.join(_path(er))}: {er.get('msg')}" for er in errors[:5])
        return 422, f"Invalid request: {msg}", ".".join(path) or None, "invalid_body"
    name = ".".join(path)
    if first.get("type") == "extra_forbidden":
        return 400, _unknown(path), ".".join(path[:-1]) or None, "invalid_hyperparameter"
    code = "invalid_hyperparameter" if path[0] in ("method", "hyperparameters") else f"invalid_{path[0]}"
    same = [er for er in errors if _path(er) == path]  # a union's branches each refuse the value
    kinds = [KINDS.get(er.get("type")) or (er.get("ctx") or {}).get("expected") for er in same]
    if all(kinds) and "input" in first:
        wanted = " or ".join(dict.fromkeys(kinds))
        return 400, f"{name} must be {wanted}, got {_value(first['input'])}", name, code
    return 400, f"{name}: {'; '.join(dict.fromkeys(er.get('msg', '') for er in same))}", name, code


def _unknown(path: list[str]) -> str:
    where, name = ".".join(path[:-1]), path[-1]
    if where in ("method.mezo.hyperparameters", "method.reward.hyperparameters"):
        from flashzo.run import REWARD_OPTIONS, RunOptions

        names = [n for n in RunOptions.names() if n not in REWARD_OPTIONS or
                 (where.startswith("method.reward") and n not in ("objective", "reward_time_limit"))]
        known = ", ".join(names + ["n_epochs", "learning_rate_multiplier"])
        return f"{where}: unknown option {name} (known: {known})"
    if where == "hyperparameters":
        return (f"hyperparameters: unknown hyperparameter {name} (known: n_epochs, batch_size, "
                "learning_rate_multiplier; flashzo's own go in method.mezo.hyperparameters)")
    known = {"method": "type, mezo, reward", "method.mezo": "hyperparameters",
             "method.reward": "hyperparameters"}.get(where)
    return f"{where}: unknown field {name}" + (f" (known: {known})" if known else "")
