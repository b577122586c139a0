"""A training run's record in its checkpoint, and what `flashzo train --resume` may change.

A checkpoint holds the adapter and the step; the record (`MeZOTrainer.run_info`, saved beside them
in trainer_state.json) holds the rest of what defines the run: its options (`RunOptions`, the batch
size among them), the model (its path and a fingerprint), the dtype, the base's quantization
(`CausalLM.quantization`, None for a dense base) and the data files (path, sha256, number of
examples). `plan_resume` turns a record and the flags of a `--resume` launch into
what that launch runs: a flag that is not given takes the run's value; a flag that is given must
mean what the run's does, unless it is one of `RESUMABLE` (run.py) or `LAUNCH_FLAGS`; every
difference is listed in one InputError.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from flashzo.engine.quantized import QuantSpec
from flashzo.errors import InputError
from flashzo.run import KEEP_BEST, RESUMABLE, RunOptions

# Where and how a process runs, not what the run computes: any launch may set these.
LAUNCH_FLAGS = ("no_progress", "threads", "device", "parallel", "dist_timeout")
RECORD_KEYS = ("command", "options", "model", "dtype", "train", "eval", "best", "quantization")
# config.json keys that a re-save changes without changing the model
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SAMPLE = 1 << 20  # bytes hashed at each end of a weight file


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------

def file_fingerprint(path: str) -> dict:
    """{"path", "sha256", "bytes"} of a data file (its whole content)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise InputError(f"{path}: cannot be read: {e.strerror or e}") from None
    return {"path": os.path.abspath(path), "sha256": h.hexdigest(), "bytes": os.path.getsize(path)}


def model_fingerprint(path: str) -> str:
    """A model checkpoint's fingerprint: its config.json (less what a re-save changes) and, per weight
    file, its name, size and first and last MiB. Cheap for any size; the same for a moved copy."""
    h = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{cfg}: cannot be read: {e}") from None
            if isinstance(d, dict):
                d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
            h.update(json.dumps(d, sort_keys=True).encode())
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(_WEIGHT_SUFFIXES))
    for file in files:
        if not os.path.isfile(file):
            continue
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                f.seek(size - _SAMPLE)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    command: str  # "train" or "demo"
    options: RunOptions
    model: dict | None = None  # {"path", "fingerprint"}; None: a random model (the demo)
    dtype: str | None = None  # the model's dtype ("float32" ...)
    train: dict | None = None  # file_fingerprint + "examples"; None: built-in data (the demo)
    eval: dict | None = None
    best: dict | None = None  # {"step", "metric", "value"}: the best eval so far (--keep-best)
    quantization: dict | None = None  # the base's (CausalLM.quantization); None: dense

    def to_dict(self) -> dict:
        return {"command": self.command, "options": self.options.to_dict(), "model": self.model,
                "dtype": self.dtype, "train": self.train, "eval": self.eval, "best": self.best,
                "quantization": self.quantization}

    @property
    def quant_spec(self) -> QuantSpec | None:
        """The run's --quantize (what loads its base as it trained), None for a dense base."""
        return None if self.quantization is None else QuantSpec.from_dict(self.quantization, where="run_info")

    @classmethod
    def from_dict(cls, d, *, where: str) -> RunRecord:
        """A record read back from a checkpoint; anything malformed is an InputError naming `where`."""
        if not isinstance(d, dict):
            raise InputError(f"{where}: no run record (a checkpoint `flashzo train` did not write, or an older "
                             "flashzo's); resume it from Python with MeZOTrainer.resume, or start a new run")
        unknown = sorted(set(d) - set(RECORD_KEYS))
        if unknown:
            raise InputError(f"{where}: run_info has unknown key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}")
        if d.get("command") not in ("train", "demo"):
            raise InputError(f"{where}: run_info.command must be \"train\" or \"demo\", got {d.get('command')!r}")
        try:
            options = RunOptions.from_dict(d.get("options"), what="run_info.options")
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        for key, fields in (("model", ("path", "fingerprint")), ("train", ("path", "sha256")),
                            ("eval", ("path", "sha256")), ("best", ("step", "metric", "value"))):
            value = d.get(key)
            if value is None:
                continue
            if not isinstance(value, dict) or any(f not in value for f in fields):
                raise InputError(f"{where}: run_info.{key} must be an object with {', '.join(fields)}, got "
                                 f"{json.dumps(value)[:80]}")
        best = d.get("best")
        if best is not None and (best["metric"] not in KEEP_BEST or not isinstance(best["value"], (int, float))
                                 or isinstance(best["step"], bool) or not isinstance(best["step"], int)):
            raise InputError(f"{where}: run_info.best is malformed: {json.dumps(best)[:80]}")
        if d["command"] == "train" and (d.get("model") is None or d.get("train") is None):
            raise InputError(f"{where}: run_info names no model or no training file")
        dtype = d.get("dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise InputError(f"{where}: run_info.dtype must be a dtype name, got {json.dumps(dtype)}")
        quantization = d.get("quantization")
        if quantization is not None:
            QuantSpec.from_dict(quantization, where=f"{where}: run_info.quantization")
        return cls(d["command"], options, d.get("model"), dtype, d.get("train"), d.get("eval"), best, quantization)


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------

@dataclass
class Resume:
    """What a --resume launch runs: the run's options with the changes allowed, its model and data."""

    options: RunOptions
    model: str
    train: str
    eval: str | None
    dtype: str | None
    notes: list[str]  # what changes, in words (an extended schedule ...)
    quantize: QuantSpec | None = None  # the run's base quantization


def changeable_flags() -> list[str]:
    return [flag(n) for n in RESUMABLE + LAUNCH_FLAGS]


def plan_resume(record: RunRecord, given: dict, *, step: int, out: str) -> Resume:
    """The launch `given` (flag dest -> value, only the flags on the command line) continues, or an
    InputError listing every way it differs from the run of `record`, now at `step`."""
    if record.command != "train":
        raise InputError(f"{out} holds a `flashzo {record.command}` run, which cannot be resumed")
    stored = record.options
    asked = stored.replace(**{n: given[n] for n in RunOptions.names() if n in given})  # checked
    diffs = [f"{flag(n)} {_show(asked, n)} (the run's: {_show(stored, n)})"
             for n in stored.differences(asked) if n in given and n not in RESUMABLE]
    options = stored.replace(**{n: getattr(asked, n) for n in RESUMABLE})
    if options.steps < step:
        diffs.append(f"--steps {options.steps} is below the checkpoint's step {step} (a run cannot go back; "
                     f"its adapter at step {step} is in {out})")
    if "dtype" in given and given["dtype"] is not None and given["dtype"] != record.dtype:
        diffs.append(f"--dtype {given['dtype']} (the run's: {record.dtype})")
    quantize = record.quant_spec
    if given.get("quantize") is not None:
        asked = QuantSpec.parse(given["quantize"])
        if quantize is None or asked.name != quantize.name:
            diffs.append(f"--quantize {given['quantize']} (the run's: {quantize.name if quantize else 'none'})")

    model = given.get("model") or record.model["path"]
    if not os.path.exists(model):
        raise InputError(f"{model}: no such model" if given.get("model") else
                         f"the run's model {model} is missing; give its new place with --model")
    if model_fingerprint(model) != record.model["fingerprint"]:
        diffs.append(f"--model {model} is not the run's model {record.model['path']} (config or weights differ)"
                     if given.get("model") else f"the run's model {model} has changed since the run started")
    train = _data(record.train, given.get("train"), "train", diffs)
    eval_path = None
    if given.get("eval") is not None and record.eval is None:
        diffs.append(f"--eval {given['eval']} (the run has no eval file)")
    elif record.eval is not None:
        eval_path = _data(record.eval, given.get("eval"), "eval", diffs)
    if diffs:
        raise InputError(f"--resume: this launch differs from the run in {out}: {'; '.join(diffs)}. A resumed run "
                         f"keeps its options, model and data; only {', '.join(changeable_flags())} may change. "
                         "Start a new run for the rest (another --out, or --overwrite this one)")
    notes = []
    if options.steps != stored.steps and stored.lr_schedule != "constant":
        before = stored.mezo_config().lr_at(step)
        after = options.mezo_config().lr_at(step)
        notes.append(f"--steps {options.steps} re-plans the {stored.lr_schedule} schedule of {stored.steps} steps "
                     f"over {options.steps}: step {step} continues at lr {after:.3g} (the run's schedule had "
                     f"{before:.3g})")
    return Resume(options, model, train, eval_path, record.dtype, notes, quantize)


def _data(stored: dict, given: str | None, name: str, diffs: list[str]) -> str:
    path = given or stored["path"]
    if not os.path.exists(path):
        if given:
            raise InputError(f"{path}: no such file")
        raise InputError(f"the run's {flag(name)} file {path} is missing; give its new place with {flag(name)}")
    if file_fingerprint(path)["sha256"] != stored["sha256"]:
        diffs.append(f"{flag(name)} {path} is not the run's {name} data {stored['path']} (another content)"
                     if given else f"the run's {flag(name)} file {path} has changed since the run started")
    return path


def _show(options: RunOptions, name: str) -> str:
    value = getattr(options, name)
    if name == "lora_alpha":
        return f"{options.alpha:g}"
    if value is None:
        return "none" if name != "lora_layers" else "every layer"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
