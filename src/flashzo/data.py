"""Data files: JSONL datasets, their tokenization, and the MeZO paper's prompt templates.

A JSONL line is `{"prompt": ..., "candidates": [...], "label": i}` (classification) or
`{"prompt": ..., "target": ...}` (LM), with text (tokenized with the model's tokenizer, offline) or
token-id lists. `--template` readers turn raw task fields (GLUE/SuperGLUE files) into those records.
A reward run (`read_dataset(..., reward=RewardConfig)`) reads `{"prompt": ..., "answer": ...}` into
RewardExamples: the answer is the reward's reference (a string, a list of strings or a number for
the built-ins; any JSON value for a reward of your own, which may also need none).

`load_jsonl` reads a whole file and checks every example against the model before anything trains
(engine/example.py: the same checks the trainer makes): a file with problems is refused with one
`DataError` that lists them all (up to `max_errors`), each as `FILE:LINE: problem`. What JSON allows
but no tokenizer takes is a problem of its line too: a lone surrogate (`"\ud800"`, half of a UTF-16
pair) or a NUL in text, a number or a nesting Python's JSON reader refuses, and a line longer than
`MAX_LINE_BYTES` (never read whole).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from flashzo.engine.example import Example, Limits, example_kind, example_problems
from flashzo.errors import InputError

if TYPE_CHECKING:  # the engine's reward module loads torch: imported where a reward run reads its data
    from flashzo.engine.reward_objective import RewardExample

MAX_ERRORS = 20  # problems listed per file before "... and N more"
# The longest line a data file may have. A model's whole context as token ids or as \u-escaped text
# is a few MB at most (128k positions x ~8 bytes); a longer line is refused without being read whole.
MAX_LINE_BYTES = 16 << 20
_SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of a line that is too long


class DataError(InputError):
    """A data file was refused: `problems` lists every (line, message) found (line 0: the whole file)."""

    def __init__(self, path: str, problems: list[tuple[int, str]], total: int | None = None):
        self.path, self.problems = path, problems
        total = len(problems) if total is None else total
        lines = [f"{path}:{line}: {msg}" if line else f"{path}: {msg}" for line, msg in problems]
        if total > len(problems):
            lines.append(f"... and {total - len(problems)} more problems in {path}")
        head = f"{path}: {total} problems\n" if total > 1 else ""
        super().__init__(head + "\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Templates (raw task fields -> records, as the MeZO paper prompts its tasks)
# --------------------------------------------------------------------------------------------------


class TemplateError(ValueError):
    """One record does not fit a template (the reader adds the file and line)."""


def text_problem(value: str) -> str | None:
    """What makes a string unusable as text (a lone surrogate, which UTF-8 cannot encode and a tokenizer
    refuses; a NUL), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate \\u{ord(value[e.start]):04x} at character {e.start + 1} (half of a UTF-16 " \
               "pair, not text)"
    if "\0" in value:
        return f"holds a NUL character (\\u0000) at character {value.index(chr(0)) + 1}"
    return None


def _text(rec: dict, name: str) -> str:
    if name not in rec:
        raise TemplateError(f"no '{name}' field")
    value = rec[name]
    if not isinstance(value, str):
        raise TemplateError(f"'{name}' must be a string, got {_show(value)}")
    problem = text_problem(value)
    if problem:
        raise TemplateError(f"'{name}' {problem}")
    if not value.strip():
        raise TemplateError(f"'{name}' is empty")
    return value.strip()


def _show(value, n: int = 60) -> str:
    """A JSON value in a message: at most n characters (a value too deep to write is said so)."""
    try:
        return json.dumps(value)[:n]
    except RecursionError:
        return "(a value nested too deeply to show)"


def _label(rec: dict, names: dict[str, int]) -> int:
    """The label as an int: 0/1, "0"/"1", or one of `names` (case-insensitive); never a bool."""
    if "label" not in rec:
        raise TemplateError("no 'label' field")
    value = rec["label"]
    allowed = sorted(set(range(len(set(names.values())))))
    if isinstance(value, bool) or value is None:
        raise TemplateError(f"'label' must be one of {allowed} or {sorted(names)}, got {_show(value)}")
    if isinstance(value, int) and value in allowed:
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key.isdigit() and int(key) in allowed:
            return int(key)
        if key in names:
            return names[key]
    raise TemplateError(f"'label' must be one of {allowed} or {sorted(names)}, got {_show(value)}")


def sst2_template(rec: dict) -> dict:
    """SST-2: `sentence`, `label` -> "<sentence> It was" -> " terrible" (0, negative) / " great" (1, positive)."""
    label = _label(rec, {"negative": 0, "positive": 1})
    return {"prompt": f"{_text(rec, 'sentence')} It was", "candidates": [" terrible", " great"], "label": label}


def rte_template(rec: dict) -> dict:
    """RTE: `premise`, `hypothesis`, `label` -> "Yes" (0, entailment) / "No" (1, not_entailment)."""
    label = _label(rec, {"entailment": 0, "not_entailment": 1})
    prompt = f'{_text(rec, "premise")}\nDoes this mean that "{_text(rec, "hypothesis")}" is true? Yes or No?\n'
    return {"prompt": prompt, "candidates": ["Yes", "No"], "label": label}


def copa_template(rec: dict) -> dict:
    """COPA: `premise`, `choice1`, `choice2`, `question` (cause/effect), `label` (0: choice1, 1: choice2)."""
    question = _text(rec, "question").lower()
    if question not in ("cause", "effect"):
        raise TemplateError(f"'question' must be \"cause\" or \"effect\", got {_show(rec['question'])}")
    connective = " because" if question == "cause" else " so"
    premise = _text(rec, "premise").rstrip(".")

    def choice(name: str) -> str:
        c = _text(rec, name)
        return " " + c[:1].lower() + c[1:]

    label = _label(rec, {"choice1": 0, "choice2": 1})
    return {"prompt": premise + connective, "candidates": [choice("choice1"), choice("choice2")], "label": label}


TEMPLATES: dict[str, Callable[[dict], dict]] = {"sst2": sst2_template, "rte": rte_template, "copa": copa_template}

# --------------------------------------------------------------------------------------------------
# Tokenization and JSONL
# --------------------------------------------------------------------------------------------------


# A tokenizer's vocabulary lives in one of these (with the tokenizer_config.json beside it); a directory
# without any is given an empty tokenizer by transformers' AutoTokenizer, which turns text into nothing.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.txt", "tekken.json")


def load_tokenizer(model_dir: str):
    """The tokenizer saved in a model directory (transformers' AutoTokenizer, offline), or a GGUF file's.

    InputError naming the cause when the directory has no tokenizer files, or when what transformers
    returns turns text into no tokens.
    """
    from flashzo.engine.gguf import find_gguf, gguf_tokenizer

    if find_gguf(model_dir) is not None:
        return gguf_tokenizer(model_dir)
    if os.path.isdir(model_dir) and not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise InputError(f"{model_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the "
                         "model's tokenizer files into it, or give token-id lists in the data")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dev extra
        raise InputError("text datasets need transformers: pip install 'flashzo[dev]'") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise InputError(f"{model_dir}: its tokenizer files cannot be loaded ({type(e).__name__}: {e}); "
                         "use token-id lists in the data or fix the tokenizer files") from e
    if not tokenizer("a b c", add_special_tokens=False)["input_ids"]:
        raise InputError(f"{model_dir}: its tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) turns "
                         "text into no tokens: its vocabulary files are missing or empty")
    return tokenizer


class NoTokenizer:
    """Stands for a model's missing tokenizer, with the reason (a data file with text is refused with it)."""

    def __init__(self, reason: str):
        self.reason = reason


class _RecordError(ValueError):
    """One record cannot become an Example (the reader adds the file and line)."""


class _NoTokenizerError(_RecordError):
    """Text without a tokenizer: the file is refused at its first text line (every line would say it)."""


def _ids(value, tokenizer, *, field: str, prompt: bool) -> list[int]:
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise _RecordError(f"{field} {problem}")
        if isinstance(tokenizer, NoTokenizer):
            raise _NoTokenizerError(f"{field} is text but the model has no tokenizer: {tokenizer.reason}")
        if tokenizer is None:
            raise _NoTokenizerError(f"{field} is text but the model has no tokenizer (give token-id lists, or add "
                                    "the tokenizer files to the model directory)")
        if prompt:
            return list(tokenizer(value)["input_ids"])  # a tokenizer that adds a BOS adds it to the prompt
        return list(tokenizer(value, add_special_tokens=False)["input_ids"])
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise _RecordError(f"{field} must be a string or a list of integer token ids, got {_show(value)}")


def record_to_example(rec, tokenizer=None) -> Example:
    """A JSONL record as an Example (its shape checked; _RecordError / InputError say what is wrong)."""
    if not isinstance(rec, dict):
        raise _RecordError(f"expected a JSON object, got {type(rec).__name__}")
    if "prompt" not in rec:
        raise _RecordError("no 'prompt' field")
    if "candidates" in rec and "target" in rec:
        raise _RecordError("has both 'candidates' and 'target'")
    prompt = _ids(rec["prompt"], tokenizer, field="prompt", prompt=True)
    if "candidates" in rec:
        cands = rec["candidates"]
        if not isinstance(cands, list):
            raise _RecordError("'candidates' must be a list")
        label = rec.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise _RecordError(f"classification needs an integer 'label' (a candidate index), got {_show(label)}")
        ids = [_ids(c, tokenizer, field=f"candidates[{i}]", prompt=False) for i, c in enumerate(cands)]
        return Example(prompt=prompt, candidates=ids, label=label)
    if "target" in rec:
        return Example(prompt=prompt, target=_ids(rec["target"], tokenizer, field="target", prompt=False))
    raise _RecordError("needs 'candidates' and 'label' (classification), or 'target' (LM)")


def record_to_reward_example(rec, tokenizer, config) -> RewardExample:
    """A `{"prompt", "answer"}` record as a RewardExample for the reward of `config` (a RewardConfig)."""
    from flashzo.engine.reward_objective import RewardExample  # noqa: F811

    if not isinstance(rec, dict):
        raise _RecordError(f"expected a JSON object, got {type(rec).__name__}")
    if "prompt" not in rec:
        raise _RecordError("no 'prompt' field")
    extra = sorted(k for k in ("candidates", "label", "target") if k in rec)
    if extra:
        raise _RecordError(f"has {', '.join(repr(k) for k in extra)}: a reward run reads 'prompt' and 'answer'")
    value = rec["prompt"]
    if (isinstance(value, str) and not value.strip()) or value == []:
        raise _RecordError("its prompt is empty: generation needs a context")
    prompt = _ids(value, tokenizer, field="prompt", prompt=True)
    answer = rec.get("answer")
    if answer is None and config.needs_reference:
        raise _RecordError(f"has no 'answer', and the reward {config.name} compares the completion with one")
    return RewardExample(prompt=prompt, reference=answer, prompt_text=value if isinstance(value, str) else None)


def reward_problems(ex: RewardExample, limits: Limits | None, config) -> list[str]:
    """What makes a reward example unusable for `config` with a model of `limits` (engine/reward_objective.py's
    checks, said of one line)."""
    from flashzo.engine.reward_objective import check_reward_examples

    if limits is None:
        limits = Limits(vocab_size=1 << 62, max_positions=1 << 62)
    try:
        check_reward_examples([ex], limits, config, what="line")
    except InputError as e:
        msg = str(e).removeprefix("line[0]").lstrip(":").strip()
        return [msg.replace("its reference", "its answer").replace("no reference", "no 'answer'")]
    return []


def newline_tokens(tokenizer) -> list[int]:
    """The ids of the tokenizer's tokens that are whitespace holding a newline (where a completion stops with
    --stop-newline)."""
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if "\n" in text and not text.strip():
            out.append(i)
    return out


def stop_tokens(tokenizer, *, newline: bool = False) -> tuple[int, ...]:
    """The token ids a reward run's completions stop at: the tokenizer's end-of-text token, and with
    `newline` every whitespace token holding a newline. No tokenizer (None or NoTokenizer): none, and
    `newline` is refused."""
    if tokenizer is None or isinstance(tokenizer, NoTokenizer):
        if newline:
            why = tokenizer.reason if isinstance(tokenizer, NoTokenizer) else "the model has no tokenizer"
            raise InputError(f"--stop-newline needs the model's tokenizer to know its newline tokens: {why}")
        return ()
    stops = set(newline_tokens(tokenizer)) if newline else set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))
    return tuple(sorted(stops))


@dataclass
class Dataset:
    """The examples of a file, and the line each came from (what errors and predictions name)."""

    path: str
    examples: list[Example]
    lines: list[int]


def read_dataset(path: str, tokenizer=None, *, template: str | None = None, limits: Limits | None = None,
                 training: bool = True, max_errors: int = MAX_ERRORS, reward=None) -> Dataset:
    """Every example of a JSONL file, checked; DataError listing every problem (FILE:LINE) otherwise.

    tokenizer: the model's, for text (None, or a NoTokenizer saying why there is none: a file with
    text is then refused at its first text line, with the reason).
    template: "sst2", "rte" or "copa" maps raw task fields first (extra fields are ignored).
    limits: the model's vocabulary and positions (None: not checked). training: also require what a
    loss needs (two or more candidates and a label, a non-empty target), and one kind in the file.
    reward: a RewardConfig: the file is a reward run's `{"prompt", "answer"}` records (RewardExamples).
    """
    if template is not None and template not in TEMPLATES:
        raise InputError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file")
    if reward is not None and limits is not None and reward.max_tokens >= limits.max_positions:
        raise InputError(f"max_tokens {reward.max_tokens} leaves no room for a prompt in the model's "
                         f"{limits.positions}")
    problems: list[tuple[int, str]] = []
    examples, lines, kinds = [], [], {}
    total = 0

    def problem(line: int, msg: str) -> None:
        nonlocal total
        total += 1
        if len(problems) < max_errors:
            problems.append((line, msg))

    try:
        with open(path, "rb") as f:
            for n, raw in _lines(f):
                if raw is None:
                    problem(n, f"longer than {MAX_LINE_BYTES >> 20} MiB (the limit on a line of a data file)")
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problem(n, f"not UTF-8 text (byte {e.start + 1} of the line: {e.reason})")
                    continue
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    problem(n, f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                except ValueError:  # Python's limit on the digits of an integer
                    problem(n, f"not valid JSON (a number of more than {sys.get_int_max_str_digits()} digits)")
                    continue
                except RecursionError:
                    problem(n, "not valid JSON (nested deeper than Python's JSON reader allows)")
                    continue
                try:
                    if template is not None:
                        if not isinstance(rec, dict):
                            raise TemplateError(f"expected a JSON object, got {type(rec).__name__}")
                        rec = TEMPLATES[template](rec)
                    ex = record_to_example(rec, tokenizer) if reward is None else \
                        record_to_reward_example(rec, tokenizer, reward)
                except _NoTokenizerError as e:
                    problem(n, str(e))
                    raise DataError(path, problems, total) from None
                except (TemplateError, _RecordError, InputError) as e:
                    problem(n, str(e) if template is None or not isinstance(e, TemplateError)
                            else f"{template} template: {e}")
                    continue
                if reward is not None:
                    msgs = reward_problems(ex, limits, reward)
                else:
                    kinds.setdefault(example_kind(ex), n)
                    msgs = example_problems(ex, limits, training=training)
                for msg in msgs:
                    problem(n, msg)
                if msgs:
                    continue
                examples.append(ex)
                lines.append(n)
    except OSError as e:
        raise InputError(f"{path}: cannot be read: {e.strerror or e}") from None
    except MemoryError:
        raise InputError(f"{path}: out of memory after {len(examples)} examples: the file is too large for this "
                         "machine's memory") from None
    if training and len(kinds) > 1:
        problem(0, f"mixes classification (first on line {kinds['classification']}) and LM examples (first on "
                   f"line {kinds['lm']}); a file trains one loss")
    if problems:
        raise DataError(path, problems, total)
    if not examples:
        raise InputError(f"{path}: no records")
    return Dataset(path, examples, lines)


def _lines(f) -> Iterator[tuple[int, bytes | None]]:
    """(line number, its bytes) of a binary file; None for a line longer than MAX_LINE_BYTES, whose
    rest is skipped in chunks, so no more than the limit is ever held."""
    n = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield n, raw
            continue
        del raw
        while True:
            chunk = f.readline(_SKIP_CHUNK)
            if not chunk or chunk.endswith(b"\n"):
                break
        yield n, None


def load_jsonl(path: str, tokenizer=None, *, template: str | None = None, limits: Limits | None = None,
               training: bool = True) -> list[Example]:
    """The examples of a JSONL file (see read_dataset): every problem reported, with its line, up front."""
    return read_dataset(path, tokenizer, template=template, limits=limits, training=training).examples


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def example_to_record(ex: Example) -> dict:
    if ex.candidates is not None:
        return {"prompt": list(ex.prompt), "candidates": [list(c) for c in ex.candidates], "label": ex.label}
    return {"prompt": list(ex.prompt), "target": list(ex.target)}
