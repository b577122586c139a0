"""Examples in token ids, and the one place they are checked.

An Example is a prompt plus either candidates and a label (classification: the loss is the
cross-entropy of the label over the candidates' mean token log-probabilities) or a target (LM: the
token-weighted NLL of the target); docs/design.md, "Losses".

Checking happens once per public entry point (MeZOTrainer.step, evaluate, step_together,
CausalLM.build_batch / token_logprobs, the data readers, SGLangScorer), through `example_problems`
and `check_examples` here; the batcher and the losses downstream trust what they are given.
Constructing an Example checks its shape only (what needs no model); the entry points add what the
model limits (vocabulary, positions) and what training needs (two or more candidates and a label,
a non-empty target). Every problem is a plain sentence, so callers can prefix where it came from
(`batch[3]: ...`, `train.jsonl:401: ...`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

from flashzo.kernels.errors import InputError


@dataclass
class Example:
    """A training or evaluation example in token ids."""

    prompt: Sequence[int]
    candidates: Sequence[Sequence[int]] | None = None
    label: int | None = None
    target: Sequence[int] | None = None

    def __post_init__(self):
        problems = shape_problems(self)
        if problems:
            raise InputError(problems[0])

    @property
    def is_classification(self) -> bool:
        return self.candidates is not None

    def sequences(self) -> list[tuple[list[int], int]]:
        """(full token list, index where the scored part starts) of every sequence this example needs."""
        p = [int(t) for t in self.prompt]
        if self.candidates is not None:
            return [(p + [int(t) for t in c], len(p)) for c in self.candidates]
        return [(p + [int(t) for t in self.target], len(p))]


@dataclass(frozen=True)
class Limits:
    """What a model accepts: token ids in [0, vocab_size), sequences of at most max_positions tokens.

    `reason` names what sets max_positions when it is not the model's positions (a sliding window).
    """

    vocab_size: int
    max_positions: int
    reason: str = ""

    @classmethod
    def of(cls, config) -> Limits:
        """The limits of a model config (any family: vocab_size, max_position_embeddings, or the family's
        `position_limit`: (tokens, reason))."""
        limit = getattr(config, "position_limit", None)
        if limit is not None:
            return cls(int(config.vocab_size), int(limit[0]), limit[1])
        return cls(int(config.vocab_size), int(config.max_position_embeddings))

    @property
    def positions(self) -> str:
        """`N positions`, with what limits them when that is not the positions themselves."""
        return f"{self.max_positions} positions" + (f" ({self.reason})" if self.reason else "")


def shape_problems(ex: Example) -> list[str]:
    """What is wrong with an Example whatever the model (empty parts, a label out of range)."""
    if (ex.candidates is None) == (ex.target is None):
        return ["an Example needs either candidates (classification) or a target (LM), not "
                f"{'both' if ex.candidates is not None else 'neither'}"]
    out = []
    if len(ex.prompt) == 0:
        out.append("an Example's prompt is empty: the first scored token needs a context")
    if ex.candidates is not None:
        if len(ex.candidates) == 0:
            out.append("an Example's candidates list is empty")
        for i, c in enumerate(ex.candidates):
            if len(c) == 0:
                out.append(f"candidate {i} is empty (its score, a mean over its tokens, is undefined)")
        if ex.label is not None:
            if isinstance(ex.label, bool) or not is_int(ex.label):
                out.append(f"label {ex.label!r} is not an integer candidate index")
            elif not 0 <= operator.index(ex.label) < len(ex.candidates):
                out.append(f"label {ex.label} is out of range for {len(ex.candidates)} candidates")
    return out


def example_problems(ex, limits: Limits | None = None, *, training: bool = True) -> list[str]:
    """Every problem of one example, as sentences (empty: the example is fine).

    limits: the model's vocabulary and positions (None: not checked). training: also require what
    a loss needs (>= 2 candidates and a label for classification, a non-empty target for LM).
    """
    if not isinstance(ex, Example):
        return [f"is a {type(ex).__name__}, not a flashzo.Example"]
    out = shape_problems(ex)
    if out and out[0].startswith("an Example needs either"):
        return out
    if training:
        if ex.candidates is not None:
            if len(ex.candidates) == 1:
                out.append("has 1 candidate; classification needs >= 2 candidates")
            if ex.label is None:
                out.append(f"has no label (classification needs an integer label in [0, {len(ex.candidates)}))")
        elif len(ex.target) == 0:
            out.append("has an empty target")
    parts = [("prompt", ex.prompt)]
    parts += [(f"candidate {c}", cand) for c, cand in enumerate(ex.candidates or ())]
    parts += [("target", ex.target)] if ex.target is not None else []
    for name, toks in parts:
        for t in toks:
            if isinstance(t, bool) or not is_int(t):
                out.append(f"{name} has a token {t!r} that is not an integer id")
                break
            if limits is not None and not 0 <= int(t) < limits.vocab_size:
                out.append(f"{name} has token id {int(t)} outside the vocabulary (vocab_size {limits.vocab_size})")
                break
    if limits is not None:
        if ex.candidates is not None:
            for c, cand in enumerate(ex.candidates):
                n = len(ex.prompt) + len(cand)
                if n > limits.max_positions:
                    out.append(f"prompt + candidate {c} is {n} tokens, longer than the model's "
                               f"{limits.positions}")
        elif len(ex.prompt) + len(ex.target) > limits.max_positions:
            out.append(f"prompt + target is {len(ex.prompt) + len(ex.target)} tokens, longer than the model's "
                       f"{limits.positions}")
    return out


def example_kind(ex: Example) -> str:
    return "classification" if ex.candidates is not None else "lm"


def check_examples(examples, limits: Limits | None, *, what: str = "batch", training: bool = True) -> str:
    """Refuse a bad set of examples before any work (InputError naming `what[i]` and the problem).

    Returns "classification" or "lm": a training or evaluation set never mixes the two (their losses
    differ); with training=False (scoring only) a mixed set is allowed and returns "mixed".
    """
    if examples is None or len(examples) == 0:
        raise InputError(f"{what} is empty")
    kinds = set()
    for i, ex in enumerate(examples):
        problems = example_problems(ex, limits, training=training)
        if problems:
            raise InputError(f"{what}[{i}]: {problems[0]}")
        kinds.add(example_kind(ex))
    if len(kinds) > 1:
        if not training:
            return "mixed"
        raise InputError(f"{what} mixes classification and LM examples; step them separately")
    return kinds.pop()


def check_sequences(sequences, limits: Limits, *, what: str = "sequence") -> None:
    """Refuse token sequences (token_logprobs) that are empty or outside the model's limits."""
    for s, seq in enumerate(sequences):
        if len(seq) == 0:
            raise InputError(f"{what} {s} is empty")
        for t in seq:
            if isinstance(t, bool) or not is_int(t):
                raise InputError(f"{what} {s}: token {t!r} is not an integer id")
            if not 0 <= int(t) < limits.vocab_size:
                raise InputError(f"{what} {s}: token id {int(t)} outside the vocabulary of {limits.vocab_size}")
        if len(seq) > limits.max_positions:
            raise InputError(f"{what} {s} is {len(seq)} tokens, longer than the model's {limits.positions}")


def is_int(value) -> bool:
    """Whether value is an integer (a Python int, a numpy or 0-d torch integer: operator.index takes it)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
