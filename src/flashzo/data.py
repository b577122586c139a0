"""Data files: JSONL datasets, their tokenization, and the MeZO paper's prompt templates.

A JSONL line is `{"prompt": ..., "candidates": [...], "label": i}` (classification) or
`{"prompt": ..., "target": ...}` (LM), with text (tokenized with the model directory's tokenizer,
offline) or token-id lists. Template helpers turn raw task fields into those records.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

from flashzo.engine.example import Example
from flashzo.errors import InputError

# --------------------------------------------------------------------------------------------------
# Templates (text records, as the MeZO paper prompts its tasks)
# --------------------------------------------------------------------------------------------------


def sst2_template(sentence: str, label: int) -> dict:
    """SST-2: "<sentence> It was" -> " terrible" (0) / " great" (1)."""
    return {"prompt": f"{sentence.strip()} It was", "candidates": [" terrible", " great"], "label": int(label)}


def rte_template(premise: str, hypothesis: str, label: int) -> dict:
    """RTE: entailment (label 0) -> "Yes", not entailment (1) -> "No"."""
    prompt = f'{premise.strip()}\nDoes this mean that "{hypothesis.strip()}" is true? Yes or No?\n'
    return {"prompt": prompt, "candidates": ["Yes", "No"], "label": int(label)}


def copa_template(premise: str, choice1: str, choice2: str, question: str, label: int) -> dict:
    """COPA-style multiple choice: the premise, a connective, and each choice as a candidate."""
    if question not in ("cause", "effect"):
        raise InputError(f"question must be 'cause' or 'effect', got {question!r}")
    connective = " because" if question == "cause" else " so"
    premise = premise.strip().rstrip(".")

    def choice(c: str) -> str:
        c = c.strip()
        return " " + c[:1].lower() + c[1:]

    return {"prompt": premise + connective, "candidates": [choice(choice1), choice(choice2)], "label": int(label)}


TEMPLATES: dict[str, Callable[..., dict]] = {"sst2": sst2_template, "rte": rte_template, "copa": copa_template}

# --------------------------------------------------------------------------------------------------
# Tokenization and JSONL
# --------------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str):
    """The tokenizer saved in a model directory (transformers' AutoTokenizer, offline), or a GGUF file's."""
    from flashzo.engine.gguf import find_gguf, gguf_tokenizer

    if find_gguf(model_dir) is not None:
        return gguf_tokenizer(model_dir)
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dev extra
        raise InputError("text datasets need transformers: pip install 'flashzo[dev]'") from e
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise InputError(f"{model_dir}: no usable tokenizer files ({type(e).__name__}: {e}); "
                         "use token-id lists in the dataset or add the tokenizer files") from e


def _ids(value, tokenizer, *, field: str, where: str, prompt: bool) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise InputError(f"{where}: {field} is text but no tokenizer was found in the model directory")
        if prompt:
            return list(tokenizer(value)["input_ids"])  # OPT's tokenizer prepends </s> as BOS
        return list(tokenizer(value, add_special_tokens=False)["input_ids"])
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise InputError(f"{where}: {field} must be a string or a list of token ids")


def record_to_example(rec: dict, tokenizer=None, *, where: str = "record") -> Example:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object")
    if "prompt" not in rec:
        raise InputError(f"{where}: no 'prompt' field")
    prompt = _ids(rec["prompt"], tokenizer, field="prompt", where=where, prompt=True)
    if "candidates" in rec:
        if "target" in rec:
            raise InputError(f"{where}: has both 'candidates' and 'target'")
        cands = rec["candidates"]
        if not isinstance(cands, list):
            raise InputError(f"{where}: 'candidates' must be a list")
        if "label" not in rec or not isinstance(rec["label"], int):
            raise InputError(f"{where}: classification needs an integer 'label'")
        ids = [_ids(c, tokenizer, field=f"candidates[{i}]", where=where, prompt=False) for i, c in enumerate(cands)]
        return _example(where, prompt=prompt, candidates=ids, label=rec["label"])
    if "target" in rec:
        return _example(where, prompt=prompt, target=_ids(rec["target"], tokenizer, field="target", where=where,
                                                          prompt=False))
    raise InputError(f"{where}: needs 'candidates' and 'label', or 'target'")


def _example(where: str, **kw) -> Example:
    try:
        return Example(**kw)
    except ValueError as e:  # name the record that failed
        raise InputError(f"{where}: {e}") from None


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not out:
        raise InputError(f"{path}: no records")
    return out


def load_jsonl(path: str, tokenizer=None, *, template: str | None = None) -> list[Example]:
    """Examples from a JSONL file; `template` ("sst2", "rte", "copa") maps raw task fields first."""
    records = read_jsonl(path)
    if template is not None:
        if template not in TEMPLATES:
            raise InputError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
        fn = TEMPLATES[template]
        try:
            records = [fn(**r) for r in records]
        except TypeError as e:
            raise InputError(f"{path}: records do not have the fields of the {template} template: {e}") from e
    return [record_to_example(r, tokenizer, where=f"{path}:{i + 1}") for i, r in enumerate(records)]


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def example_to_record(ex: Example) -> dict:
    if ex.candidates is not None:
        return {"prompt": list(ex.prompt), "candidates": [list(c) for c in ex.candidates], "label": ex.label}
    return {"prompt": list(ex.prompt), "target": list(ex.target)}
