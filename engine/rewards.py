"""Rewards on generated text: the built-in rewards and what they accept (docs/design.md, "Rewards on
generated text").

A reward is a callable (prompt, completion, reference) -> float, higher is better. The engine knows
no tokenizer: given a `decode` callable (the application's tokenizer.decode) it hands a reward text
(the prompt's text and the completion's, without its stop token), otherwise token ids. `reference`
is the example's, as the user gave it. Pure Python: nothing here imports torch.

Built-ins (text only; each compares with one reference or the best of a list of them):

    exact_match  1.0 if normalize_answer(completion) == normalize_answer(reference), else 0.0
    f1           SQuAD's token F1 of the normalized words: 2 P R / (P + R), P = common / |completion|,
                 R = common / |reference| (common: the multiset intersection); 1.0 if both have no
                 words, 0.0 if one has none
    label_word   1.0 if the completion starts with the reference's words: its first words (runs of
                 letters and digits, lower-cased, punctuation dropped) are the reference's, else 0.0
    numeric      1.0 if the last number written in the completion equals the reference within
                 NUMERIC_RTOL * max(1, |reference|), else 0.0 (no number: 0.0)

normalize_answer is SQuAD's (the official evaluate-v1.1 script): lower-case, drop ASCII punctuation,
drop the articles a, an, the, collapse whitespace.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable

NUMERIC_RTOL = 1e-6
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_WORD = re.compile(r"[^\W_]+")  # letters and digits, any script
# a number as text: 12, -3.5, 1,234,567.8, .5, 6e-3 (thousands separators: groups of exactly three digits)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _references(reference) -> list:
    return list(reference) if isinstance(reference, (list, tuple)) else [reference]


def exact_match(prompt, completion: str, reference) -> float:
    """1.0 if the normalized completion equals a normalized reference (str or list of str), else 0.0."""
    pred = normalize_answer(completion)
    return float(any(pred == normalize_answer(r) for r in _references(reference)))


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prompt, completion: str, reference) -> float:
    """SQuAD's token F1 of the normalized words, the max over the references (str or list of str)."""
    pred = normalize_answer(completion).split()
    return max(_f1(pred, normalize_answer(r).split()) for r in _references(reference))


def words(text: str) -> list[str]:
    """The lower-cased runs of letters and digits of `text` (label_word's words)."""
    return _WORD.findall(text.lower())


def label_word(prompt, completion: str, reference) -> float:
    """1.0 if the completion's first words are a reference's words (str or list of str), else 0.0."""
    got = words(completion)
    return float(any((w := words(r)) and got[:len(w)] == w for r in _references(reference)))


def parse_number(text: str) -> float | None:
    """The number a string is (thousands separators allowed), or None."""
    m = _NUMBER.fullmatch(text.strip())
    return float(m.group().replace(",", "")) if m else None


def last_number(text: str) -> float | None:
    """The last number written in `text` (numeric's reading of a completion), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric(prompt, completion: str, reference) -> float:
    """1.0 if the completion's last number equals the reference (a number, a string that is one, or a list
    of those) within NUMERIC_RTOL * max(1, |reference|), else 0.0."""
    x = last_number(completion)
    if x is None:
        return 0.0
    for r in _references(reference):
        r = parse_number(r) if isinstance(r, str) else float(r)
        if math.isfinite(x) and abs(x - r) <= NUMERIC_RTOL * max(1.0, abs(r)):
            return 1.0
    return 0.0


REWARDS: dict[str, Callable] = {"exact_match": exact_match, "f1": f1, "label_word": label_word, "numeric": numeric}


def reference_problem(name: str, reference) -> str | None:
    """What is wrong with `reference` for the built-in reward `name` (None: it is fine)."""
    refs = _references(reference)
    if not refs:
        return "its reference is an empty list"
    for r in refs:
        if name == "numeric":
            ok = (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)) or \
                (isinstance(r, str) and parse_number(r) is not None and math.isfinite(parse_number(r)))
            if not ok:
                return f"its reference {r!r} is not a number (the numeric reward compares numbers)"
        elif not isinstance(r, str):
            return f"its reference {r!r} is a {type(r).__name__}; the {name} reward compares text (a str or a list " \
                   "of str)"
        elif name == "label_word" and not words(r):
            return f"its reference {r!r} has no word"
    return None
