"""Rewards of the tests' own (tests/test_rewards.py, tests/test_reward_training.py, tests/dist_worker.py): module-level
functions, so the reward worker process (engine/reward_worker.py) imports them by name."""

import os
import time


def first_token_in(prompt, completion, reference) -> float:
    """Token ids: 1.0 if the first generated id is one of the reference ids."""
    return float(bool(completion) and completion[0] in reference)


def hang_on(prompt, completion, reference) -> float:
    """Hangs (far past any time limit) on a completion equal to the reference; 1.0 otherwise."""
    if completion == reference:
        time.sleep(10_000)
    return 1.0


def raise_on(prompt, completion, reference) -> float:
    if completion == reference:
        raise ZeroDivisionError("the reward divided by zero")
    return 1.0


def text_on(prompt, completion, reference):
    return "yes" if completion == reference else 1.0


def nan_on(prompt, completion, reference) -> float:
    return float("nan") if completion == reference else 1.0


def exit_on(prompt, completion, reference) -> float:
    if completion == reference:
        os._exit(3)
    return 1.0


def always_text(prompt, completion, reference):
    return "great"


def noisy(prompt, completion, reference) -> float:
    print("a reward that prints")  # must not disturb the worker's messages
    return 0.5


def constant(prompt, completion, reference) -> float:
    return 1.0


MARKER = 77  # a prompt holding this token id makes the *_at_marker rewards fail (the probe's prompt does not)


def _marked(prompt) -> bool:
    return MARKER in prompt


def raise_at_marker(prompt, completion, reference) -> float:
    if _marked(prompt):
        raise KeyError("no score for this prompt")
    return 1.0


def hang_at_marker(prompt, completion, reference) -> float:
    if _marked(prompt):
        time.sleep(10_000)
    return 1.0


def nan_at_marker(prompt, completion, reference) -> float:
    return float("inf") if _marked(prompt) else 1.0


def text_at_marker(prompt, completion, reference):
    return "0.5" if _marked(prompt) else 1.0


def exit_at_marker(prompt, completion, reference) -> float:
    if _marked(prompt):
        os._exit(5)
    return 1.0


def word_decode(ids) -> str:
    """A tokenizer's decode for the tests' models: token id i is the word w<i>."""
    return " ".join(f"w{int(i)}" for i in ids)


def raise_unless_reference(prompt, completion, reference) -> float:
    """1.0 on the reference itself or one of a list's (the check before a run passes); raises on anything else."""
    if completion != reference and not (isinstance(reference, list) and completion in reference):
        raise ValueError("not the reference")
    return 1.0
