"""Data: JSONL datasets, the MeZO paper's prompt templates, and a built-in synthetic task.

A JSONL line is `{"prompt": ..., "candidates": [...], "label": i}` (classification) or
`{"prompt": ..., "target": ...}` (LM), with text (tokenized with the model directory's tokenizer,
offline) or token-id lists. Template helpers turn raw task fields into those records.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Sequence

import torch

from .batch import Example

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
        raise ValueError(f"question must be 'cause' or 'effect', got {question!r}")
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
    """The tokenizer saved in a model directory (transformers' AutoTokenizer, offline)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dev extra
        raise ValueError("text datasets need transformers: pip install 'flashzo[dev]'") from e
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{model_dir}: no usable tokenizer files ({type(e).__name__}: {e}); "
                         "use token-id lists in the dataset or add the tokenizer files") from e


def _ids(value, tokenizer, *, field: str, where: str, prompt: bool) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}: {field} is text but no tokenizer was found in the model directory")
        if prompt:
            return list(tokenizer(value)["input_ids"])  # OPT's tokenizer prepends </s> as BOS
        return list(tokenizer(value, add_special_tokens=False)["input_ids"])
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise ValueError(f"{where}: {field} must be a string or a list of token ids")


def record_to_example(rec: dict, tokenizer=None, *, where: str = "record") -> Example:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "prompt" not in rec:
        raise ValueError(f"{where}: no 'prompt' field")
    prompt = _ids(rec["prompt"], tokenizer, field="prompt", where=where, prompt=True)
    if "candidates" in rec:
        if "target" in rec:
            raise ValueError(f"{where}: has both 'candidates' and 'target'")
        cands = rec["candidates"]
        if not isinstance(cands, list):
            raise ValueError(f"{where}: 'candidates' must be a list")
        if "label" not in rec or not isinstance(rec["label"], int):
            raise ValueError(f"{where}: classification needs an integer 'label'")
        ids = [_ids(c, tokenizer, field=f"candidates[{i}]", where=where, prompt=False) for i, c in enumerate(cands)]
        return _example(where, prompt=prompt, candidates=ids, label=rec["label"])
    if "target" in rec:
        return _example(where, prompt=prompt, target=_ids(rec["target"], tokenizer, field="target", where=where,
                                                          prompt=False))
    raise ValueError(f"{where}: needs 'candidates' and 'label', or 'target'")


def _example(where: str, **kw) -> Example:
    try:
        return Example(**kw)
    except ValueError as e:  # name the record that failed
        raise ValueError(f"{where}: {e}") from None


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def load_jsonl(path: str, tokenizer=None, *, template: str | None = None) -> list[Example]:
    """Examples from a JSONL file; `template` ("sst2", "rte", "copa") maps raw task fields first."""
    records = read_jsonl(path)
    if template is not None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
        fn = TEMPLATES[template]
        try:
            records = [fn(**r) for r in records]
        except TypeError as e:
            raise ValueError(f"{path}: records do not have the fields of the {template} template: {e}") from e
    return [record_to_example(r, tokenizer, where=f"{path}:{i + 1}") for i, r in enumerate(records)]


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def example_to_record(ex: Example) -> dict:
    if ex.candidates is not None:
        return {"prompt": list(ex.prompt), "candidates": [list(c) for c in ex.candidates], "label": ex.label}
    return {"prompt": list(ex.prompt), "target": list(ex.target)}

# --------------------------------------------------------------------------------------------------
# Synthetic task
# --------------------------------------------------------------------------------------------------

# Token ids of the synthetic vocabulary (any vocab_size >= 64 works).
SYN_BOS, SYN_TEMPLATE, SYN_NEG, SYN_POS = 2, (4, 5), 6, 7  # "</s>", "It was", " terrible", " great"
SYN_WORDS = 8  # positive words: 8..15, negative words: 16..23, filler: 24..vocab-1
SYN_WORDS_PER_CLASS = 8  # room reserved per polarity; a task uses the first `words_per_class` of each
SYN_FILLER = SYN_WORDS + 2 * SYN_WORDS_PER_CLASS
SYN_DESIGNS = ("bag", "single")


def synthetic_task(n: int, *, seed: int = 0, vocab_size: int = 512, min_len: int = 4, max_len: int = 12,
                   split: str = "train", words_per_class: int = 4, sentiment_fraction: float = 0.5,
                   design: str = "bag", word_at: str = "random") -> list[Example]:
    """A deterministic, generated sentiment-like task: "</s> <review> It was" -> " terrible" / " great".

    design="bag" (the default, what `flashzo demo` trains): a review is `min_len..max_len` tokens, at
    least `sentiment_fraction` of them (at least one) sentiment words of the label's polarity (drawn
    from `words_per_class` positive or negative words), the rest filler, in a random order. Labels
    are exactly balanced (n // 2 of each, one extra negative when n is odd), in a random order.
    The evidence is a bag of words spread over the prompt: the mean of the value vectors that a
    random model's near-uniform attention computes carries it to the last position, so a rank-1
    LoRA on v_proj of the first layer (128 parameters on opt-tiny) can pick it up, and MeZO learns
    it in about a hundred steps (see tests/test_convergence.py).

    design="single" (the earlier, harder task): one sentiment word from 8 per polarity among
    `min_len..max_len` filler tokens, at a random place (word_at="random", then the template) or
    last (word_at="end", no template); labels drawn independently. A single word among fillers is
    weak evidence at the last position of a random model: first-order Adam learns it, MeZO on a
    small LoRA barely does.

    The same arguments give the same examples (torch's seeded CPU generator); splits "train", "eval"
    and "test" are independent draws.
    """
    if vocab_size < 64:
        raise ValueError(f"vocab_size must be >= 64 for the synthetic task, got {vocab_size}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    split_key = {"train": 0, "eval": 1, "test": 2}.get(split)
    if split_key is None:
        raise ValueError(f"split must be 'train', 'eval' or 'test', got {split!r}")
    if design not in SYN_DESIGNS:
        raise ValueError(f"design must be one of {SYN_DESIGNS}, got {design!r}")
    if word_at not in ("random", "end"):
        raise ValueError(f"word_at must be 'random' or 'end', got {word_at!r}")
    if not 1 <= int(words_per_class) <= SYN_WORDS_PER_CLASS:
        raise ValueError(f"words_per_class must be in 1..{SYN_WORDS_PER_CLASS}, got {words_per_class}")
    if not 0.0 <= float(sentiment_fraction) <= 1.0:
        raise ValueError(f"sentiment_fraction must be in [0, 1], got {sentiment_fraction}")
    g = torch.Generator().manual_seed(int(seed) * 7919 + split_key)
    if design == "single":
        return _synthetic_single(n, g, vocab_size, min_len, max_len, word_at)

    def randint(lo: int, hi: int, size: int = 1) -> list[int]:  # uniform on [lo, hi)
        return torch.randint(lo, hi, (size,), generator=g).tolist()

    labels = (torch.randperm(n, generator=g) % 2).tolist()  # exactly balanced
    out = []
    for label in labels:
        length = randint(min_len, max_len + 1)[0]
        num_words = randint(max(1, math.ceil(sentiment_fraction * length)), length + 1)[0]
        first = SYN_WORDS + (0 if label == 1 else SYN_WORDS_PER_CLASS)
        tokens = [first + w for w in randint(0, words_per_class, num_words)]
        tokens += randint(SYN_FILLER, vocab_size, length - num_words) if num_words < length else []
        review = [tokens[i] for i in torch.randperm(length, generator=g).tolist()]
        out.append(Example(prompt=[SYN_BOS] + review + list(SYN_TEMPLATE), candidates=[[SYN_NEG], [SYN_POS]],
                           label=label))
    return out


def _synthetic_single(n: int, g: torch.Generator, vocab_size: int, min_len: int, max_len: int,
                      word_at: str) -> list[Example]:
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        filler = torch.randint(SYN_FILLER, vocab_size, (length,), generator=g).tolist()
        label = int(torch.randint(0, 2, (1,), generator=g))
        word = SYN_WORDS + int(torch.randint(0, 8, (1,), generator=g)) + (0 if label == 1 else 8)
        at = int(torch.randint(0, length + 1, (1,), generator=g))
        if word_at == "end":
            prompt = [SYN_BOS] + filler + [word]
        else:
            prompt = [SYN_BOS] + filler[:at] + [word] + filler[at:] + list(SYN_TEMPLATE)
        out.append(Example(prompt=prompt, candidates=[[SYN_NEG], [SYN_POS]], label=label))
    return out


def batches(examples: Sequence[Example], batch_size: int, *, seed: int = 0, epoch: int = 0) -> list[list[Example]]:
    """One epoch of shuffled mini-batches (deterministic in seed and epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    return [[examples[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
