"""The losses (engine/loss.py) on hand-made readouts: classification CE over mean candidate scores,
token-weighted LM NLL, per-copy sums, the +/- pairing."""

import math

import pytest
import torch

from flashzo.engine import Example, Readout
from flashzo.engine.batch import ReadoutGroup
from flashzo.engine.loss import PairLoss, copy_losses, pair_losses


def _readout(groups, tokens_per_group):
    """A readout whose group g has tokens_per_group[g] requests (rows are irrelevant to the losses)."""
    req_group = torch.tensor([g for g, n in enumerate(tokens_per_group) for _ in range(n)])
    rows = torch.arange(req_group.numel())
    return Readout(rows=rows, req_row=rows, req_target=torch.zeros_like(rows), req_group=req_group,
                   groups=[ReadoutGroup(*g) for g in groups], num_copies=1 + max(g[0] for g in groups))


def test_classification_loss_and_accuracy():
    examples = [Example([1], candidates=[[2], [3, 4]], label=1), Example([1], candidates=[[5], [6], [7]], label=0)]
    groups = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, 2)]
    readout = _readout(groups, [1, 2, 1, 1, 1])
    lp = torch.tensor([-1.0, -0.5, -1.5, -3.0, -0.25, -2.0])  # exact in fp32
    s = copy_losses(readout, lp, examples)
    s0 = torch.tensor([-1.0, -1.0], dtype=torch.float64)  # candidate 1: mean of -0.5 and -1.5
    s1 = torch.tensor([-3.0, -0.25, -2.0], dtype=torch.float64)
    want = ((torch.logsumexp(s0, 0) - s0[1]) + (torch.logsumexp(s1, 0) - s1[0])) / 2
    assert s.loss[0] == pytest.approx(float(want), rel=1e-12)
    assert s.loss_count == [2.0] and s.num_examples == [2]
    assert s.correct == [0]  # a tie goes to candidate 0 (label 1: wrong); example 1 predicts 1 (label 0: wrong)
    assert s.scores[0][0] == pytest.approx([-1.0, -1.0]) and s.scores[0][1] == pytest.approx([-3.0, -0.25, -2.0])


def test_lm_loss_is_token_weighted_per_copy():
    examples = [Example([1], target=[2, 3, 4]), Example([1], target=[5])]
    groups = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    readout = _readout(groups, [3, 1, 3, 1])
    lp = torch.tensor([-1.0, -2.0, -3.0, -10.0, -0.5, -0.5, -0.5, -4.0])
    s = copy_losses(readout, lp, examples)
    assert s.loss == pytest.approx([16.0 / 4, 5.5 / 4])  # token-weighted: not the mean of the examples' means
    assert s.loss_sum == pytest.approx([16.0, 5.5]) and s.loss_count == [4.0, 4.0]


def test_pairs():
    pairs = pair_losses([0.5, 0.25, 1.0, 1.5])
    assert pairs == [PairLoss(0.5, 0.25), PairLoss(1.0, 1.5)]
    assert pairs[0].projected_grad(0.125) == pytest.approx((0.5 - 0.25) / 0.25)
    with pytest.raises(ValueError, match="pairs"):
        pair_losses([1.0, 2.0, 3.0])


def test_empty_copy_is_nan():
    examples = [Example([1], target=[2])]
    readout = _readout([(0, 0, 0)], [1])
    readout.num_copies = 2  # copy 1 scored nothing
    s = copy_losses(readout, torch.tensor([-1.0]), examples)
    assert s.loss[0] == pytest.approx(1.0) and math.isnan(s.loss[1])


def test_a_copy_loss_reads_only_its_own_groups():
    """A non-finite or huge log-prob in copy 0 (a diverged job beside this one) leaves copy 1's loss
    exactly what it is alone: no sum runs across groups."""
    examples = [Example([1], target=[2, 3, 4]), Example([1], target=[5])]
    lp1 = torch.tensor([-0.1, -0.2, -0.3, -0.7], dtype=torch.float64)
    alone = copy_losses(_readout([(0, 0, 0), (0, 1, 0)], [3, 1]), lp1, examples)
    pair = _readout([(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)], [3, 1, 3, 1])
    for first in (float("nan"), -float("inf"), -1e300, -3e7):
        lp = torch.cat([torch.tensor([first, -1.0, -2.0, -3.0], dtype=torch.float64), lp1])
        s = copy_losses(pair, lp, examples)
        assert s.loss[1] == alone.loss[0] and s.loss_sum[1] == alone.loss_sum[0], first
