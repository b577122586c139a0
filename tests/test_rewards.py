"""engine/rewards.py and engine/reward_calls.py: the built-in rewards as SQuAD and the docs define them, and
every way a reward call fails reported with its example and copy (a hung call stopped by its time limit).

The failing rewards are tests/reward_funcs.py's: module-level functions, so the reward worker process imports
them by name.
"""

import math
import os

import pytest
import reward_funcs

from flashzo.engine.reward_calls import RewardCaller, RewardProblem, resolve_reward
from flashzo.engine.rewards import exact_match, f1, label_word, normalize_answer, numeric, reference_problem
from flashzo.errors import InputError


def test_normalize_answer_is_squads():
    assert normalize_answer("  The Cat,  sat on a MAT!  ") == "cat sat on mat"
    assert normalize_answer("An apple's the answer.") == "apples answer"
    assert normalize_answer("theatre") == "theatre"  # whole words only
    assert normalize_answer("") == ""


def test_exact_match_and_f1():
    assert exact_match(None, "the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match(None, "Eiffel", "Eiffel Tower") == 0.0
    # F1: 2 common words of 3 predicted, 2 reference words -> P 2/3, R 1 -> 0.8
    assert f1(None, "the big red barn", "red barn") == pytest.approx(0.8)
    assert f1(None, "red barn", ["blue", "a red barn"]) == 1.0  # max over references
    assert f1(None, "barn barn", "barn") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset intersection
    assert f1(None, "", "") == 1.0 and f1(None, "", "x") == 0.0 and f1(None, "x", "") == 0.0
    assert f1(None, "nothing", "else") == 0.0


def test_label_word():
    assert label_word(None, " Great. It was", "great") == 1.0
    assert label_word(None, "great", ["terrible", "great"]) == 1.0
    assert label_word(None, "greatly", "great") == 0.0
    assert label_word(None, "not great", "great") == 0.0
    assert label_word(None, "very good indeed", "Very good") == 1.0
    assert label_word(None, "", "great") == 0.0


def test_numeric():
    assert numeric(None, "2 + 3 = 5", 5) == 1.0
    assert numeric(None, "The answer is 1,234.5.", "1234.5") == 1.0
    assert numeric(None, "it is -3", -3.0) == 1.0
    assert numeric(None, "5 apples, then 6", 5) == 0.0  # the last number counts
    assert numeric(None, "no number", 0) == 0.0
    assert numeric(None, "0.1000004", 0.1) == 1.0 and numeric(None, "0.100002", 0.1) == 0.0  # 1e-6 * max(1, |r|)
    assert numeric(None, "2000001", 2e6) == 1.0 and numeric(None, "2000003", 2e6) == 0.0
    assert numeric(None, "6e-3", ["7", 0.006]) == 1.0


@pytest.mark.parametrize("name, reference, needle", [
    ("exact_match", 3, "compares text"), ("f1", [], "empty list"), ("label_word", "...", "no word"),
    ("numeric", "seven", "not a number"), ("numeric", math.inf, "not a number"), ("numeric", True, "not a number"),
])
def test_reference_problems(name, reference, needle):
    assert needle in reference_problem(name, reference)
    assert reference_problem("f1", ["a", "b"]) is None and reference_problem("numeric", "1,000") is None


def calls():
    """Three calls of which the second has its completion equal to its reference."""
    return [("p", "a", "b"), ("p", "x", "x"), ("p", "c", "d")], [(0, 0), (1, 3), (2, 1)]


@pytest.mark.parametrize("fn, kind, detail", [
    (reward_funcs.raise_on, "raised", "ZeroDivisionError: the reward divided by zero (reward_funcs.py:"),
    (reward_funcs.text_on, "not a number", "a str ('yes')"),
    (reward_funcs.nan_on, "not finite", "nan"),
    (reward_funcs.exit_on, "worker died", "exited with status 3"),
    (reward_funcs.hang_on, "timed out", "time limit of 3 s"),
])
@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_a_failing_call_is_a_problem_naming_example_and_copy(fn, kind, detail, isolation):
    if isolation == "inline" and fn in (reward_funcs.exit_on, reward_funcs.hang_on):
        pytest.skip("only a worker process can survive an exit or stop a hang")
    caller = RewardCaller(fn, time_limit_s=3.0, isolation=isolation)
    values, problems = caller(*calls())
    assert len(problems) == 1
    p = problems[0]
    assert (p.example, p.copy, p.kind) == (1, 3, kind) and detail in p.detail, p
    assert str(p).startswith(f"example 1, copy 3: the reward {kind}: ")
    assert values[0] == 1.0 and values[1] is None
    if kind in ("timed out", "worker died"):  # the worker is gone: the calls after it were not made
        assert values[2] is None and caller._worker is None
    else:
        assert values[2] == 1.0
    # the next batch works (a fresh worker after a stop)
    assert caller([("p", "a", "b")], [(0, 0)]) == ([1.0], [])
    caller.close()


def test_a_hung_reward_is_stopped():
    caller = RewardCaller(reward_funcs.hang_on, time_limit_s=3.0)
    caller([("p", "a", "b")], [(0, 0)])
    pid = caller._worker.proc.pid
    values, problems = caller([("p", "x", "x")], [(0, 0)])
    assert problems[0].kind == "timed out"
    with pytest.raises(ProcessLookupError):  # the worker that ran the hung call no longer exists
        os.kill(pid, 0)


def test_a_reward_that_prints_and_builtins_inline():
    caller = RewardCaller(reward_funcs.noisy)
    assert caller([("p", "a", "b")] * 3, [(0, 0)] * 3) == ([0.5] * 3, [])
    caller.close()
    builtin = RewardCaller("label_word")
    assert builtin.inline and builtin._worker is None
    assert builtin([("p", "great!", "great")], [(0, 0)]) == ([1.0], [])


def test_rewards_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not import"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(InputError, match="has no 'nope'"):
        resolve_reward("reward_funcs:nope")
    with pytest.raises(InputError, match="neither a built-in"):
        resolve_reward("f2")
    with pytest.raises(InputError, match="cannot be sent to the reward worker"):
        RewardCaller(lambda p, c, r: 1.0)
    assert RewardCaller(lambda p, c, r: 1.0, isolation="inline")([(1, 2, 3)], [(0, 0)]) == ([1.0], [])
    # a module the worker process cannot import (it exists only in this process's sys.modules)
    import types

    ghost = types.ModuleType("ghost_rewards")
    exec("def score(p, c, r):\n    return 1.0\n", ghost.__dict__)
    monkeypatch.setitem(__import__("sys").modules, "ghost_rewards", ghost)
    caller = RewardCaller(ghost.score)
    with pytest.raises(InputError, match="could not be loaded in the reward worker process"):
        caller([(1, 2, 3)], [(0, 0)])
    with pytest.raises(InputError, match="called on batch\\[0\\]: not a number: a str \\('great'\\)"):
        RewardCaller(reward_funcs.always_text).probe(("p", "c", "r"), "batch[0]")


def test_problem_text():
    assert str(RewardProblem(4, None, "raised", "KeyError: 'x'")) == "example 4: the reward raised: KeyError: 'x'"
