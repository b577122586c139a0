"""MeZO learns the built-in synthetic task: held-out accuracy rises from chance, deterministically, in seconds.

The configuration is the one `flashzo demo --tiny` runs (its parser's defaults), so these tests guard the demo:
a tiny random OPT, LoRA rank 1 on v_proj of layer 0 (128 parameters), MeZO with lr 5e-2, eps 1e-2.
"""

import json
from collections import Counter

import pytest
import torch

from flashzo import tasks
from flashzo.cli import _trainer_from_args, build_parser, demo_args, main
from flashzo.engine.opt import OPTModel
from flashzo.loop import batch_for_step
from flashzo.tasks import synthetic_task

STEPS = 150  # the demo runs 300; the test asks >= 0.9 held-out accuracy after these 150


@pytest.fixture
def one_thread():
    """opt-tiny's ops are tiny: intra-op threads only cost time (much of it on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _polarity(tok: int) -> int | None:
    """1 for a positive word, 0 for a negative one, None for anything else."""
    if tasks.SYN_WORDS <= tok < tasks.SYN_WORDS + tasks.SYN_WORDS_PER_CLASS:
        return 1
    if tasks.SYN_WORDS + tasks.SYN_WORDS_PER_CLASS <= tok < tasks.SYN_FILLER:
        return 0
    return None


def _key(examples):
    return [(tuple(e.prompt), tuple(map(tuple, e.candidates)), e.label) for e in examples]


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


def test_synthetic_task_is_deterministic():
    a = synthetic_task(300, seed=3)
    assert _key(a) == _key(synthetic_task(300, seed=3))
    assert _key(synthetic_task(300, seed=3, split="eval")) == _key(synthetic_task(300, seed=3, split="eval"))
    assert _key(a) != _key(synthetic_task(300, seed=4))
    assert _key(a) != _key(synthetic_task(300, seed=3, split="eval"))
    assert _key(synthetic_task(300, seed=3, split="eval")) != _key(synthetic_task(300, seed=3, split="test"))
    # positional n and the original keywords still work
    assert _key(synthetic_task(20, seed=0, vocab_size=512, min_len=4, max_len=12, split="train")) == \
        _key(synthetic_task(20))


@pytest.mark.parametrize("n", [1, 2, 255, 512])
def test_synthetic_task_is_balanced(n):
    counts = Counter(e.label for e in synthetic_task(n, seed=1))
    assert counts[0] + counts[1] == n
    assert counts[0] - counts[1] in (0, 1)


@pytest.mark.parametrize("kw", [{}, dict(vocab_size=64, min_len=1, max_len=3),
                                dict(words_per_class=1, sentiment_fraction=0.0, min_len=6, max_len=6),
                                dict(words_per_class=8, sentiment_fraction=1.0)])
def test_synthetic_task_structure(kw):
    vocab = kw.get("vocab_size", 512)
    lo, hi = kw.get("min_len", 4), kw.get("max_len", 12)
    k, frac = kw.get("words_per_class", 4), kw.get("sentiment_fraction", 0.5)
    examples = synthetic_task(400, seed=2, **kw)
    lengths, words = Counter(), Counter()
    for e in examples:
        assert e.candidates == [[tasks.SYN_NEG], [tasks.SYN_POS]] and e.label in (0, 1)
        assert e.prompt[0] == tasks.SYN_BOS and tuple(e.prompt[-len(tasks.SYN_TEMPLATE):]) == tasks.SYN_TEMPLATE
        review = e.prompt[1:-len(tasks.SYN_TEMPLATE)]
        lengths[len(review)] += 1
        assert lo <= len(review) <= hi
        assert all(tasks.SYN_WORDS <= t < vocab for t in review)
        sentiment = [t for t in review if _polarity(t) is not None]
        assert all(_polarity(t) == e.label for t in sentiment)  # no word of the other polarity
        assert len(sentiment) >= max(1, frac * len(review))
        assert all((t - tasks.SYN_WORDS) % tasks.SYN_WORDS_PER_CLASS < k for t in sentiment)
        words.update(sentiment)
    assert set(lengths) == set(range(lo, hi + 1))
    assert len(words) == 2 * k  # every sentiment word is used


@pytest.mark.parametrize("kw", [dict(vocab_size=32), dict(min_len=0), dict(min_len=5, max_len=4),
                                dict(split="dev"), dict(words_per_class=0), dict(words_per_class=9),
                                dict(sentiment_fraction=1.5)])
def test_synthetic_task_refuses_bad_arguments(kw):
    with pytest.raises(ValueError):
        synthetic_task(4, **kw)


# --------------------------------------------------------------------------------------------------
# Convergence
# --------------------------------------------------------------------------------------------------


def _train_demo_config(steps: int) -> tuple[float, float, torch.Tensor]:
    """The demo's configuration through the API: (accuracy before, accuracy after, adapter buffer)."""
    args = demo_args(build_parser().parse_args(["demo", "--tiny"]), "tiny")
    model = OPTModel.from_config("opt-tiny", seed=args.seed)
    train = synthetic_task(args.train_size, seed=args.seed, split="train")
    held_out = synthetic_task(args.eval_size, seed=args.seed, split="eval")
    trainer = _trainer_from_args(args, model)
    before = trainer.evaluate(held_out)["accuracy"]
    for t in range(steps):
        trainer.step(batch_for_step(train, args.batch_size, t, args.seed))
    after = trainer.evaluate(held_out)["accuracy"]
    return before, after, trainer.adapter.buffer.clone()


def test_mezo_learns_the_synthetic_task_deterministically(one_thread):
    args = demo_args(build_parser().parse_args(["demo", "--tiny"]), "tiny")
    assert (args.lora_r, args.target_modules, args.lora_layers) == (1, "v_proj", "0")
    before, after, buffer = _train_demo_config(STEPS)
    assert before <= 0.6, before  # a random model is at chance
    assert after >= 0.9, after
    before2, after2, buffer2 = _train_demo_config(STEPS)  # same seed: the same run, bit for bit
    assert (before2, after2) == (before, after)
    assert torch.equal(buffer2, buffer)


def test_demo_reaches_its_target(tmp_path, capsys):
    """`flashzo demo --tiny` with its defaults: held-out accuracy from chance to >= 0.85."""
    threads = torch.get_num_threads()
    assert main(["demo", "--tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread does not leak to the caller
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval_before"]["accuracy"] <= 0.6
    assert metrics["eval_after"]["accuracy"] >= 0.85
    assert "held-out accuracy" in capsys.readouterr().out
