"""The losses (docs/design.md, "Losses"), computed per signed copy from a batch's readout log-probs.

Requests of one group (a candidate, or an LM target) are contiguous in the batch, and groups are
ordered copy -> example -> candidate. Every sum is exact, rounded once (engine/invariant.py: a
group's log-probs with math.fsum, a copy's loss terms as an exact integer). A group's sum reads only
its own log-probs, so a non-finite score in one job's group never reaches another job's, and no
reduction depends on the order of its terms, on the other groups of the batch or on how the
examples are split over forwards or ranks (docs/design.md, "Batch invariance").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .batch import Readout
from .example import Example
from .invariant import exact_float, exact_sum


@dataclass(frozen=True)
class PairLoss:
    """The losses of one SignedPair's two copies (engine/batch.py): theta + eps z and theta - eps z."""

    plus: float
    minus: float

    def projected_grad(self, eps: float) -> float:
        """MeZO's g = (L+ - L-) / (2 eps)."""
        return (self.plus - self.minus) / (2 * eps)


def pair_losses(copy_loss: Sequence[float]) -> list[PairLoss]:
    """Per-copy losses laid out as engine.batch.pair_copies lays out copies (+ then - per pair) -> pairs."""
    if len(copy_loss) % 2:
        raise ValueError(f"{len(copy_loss)} copy losses do not form +/- pairs")
    return [PairLoss(float(copy_loss[i]), float(copy_loss[i + 1])) for i in range(0, len(copy_loss), 2)]


@dataclass
class CopyScores:
    loss: list[float]  # per copy
    loss_sum: list[float]  # per copy: summed CE over examples, or summed NLL over target tokens
    loss_exact: list  # per copy: loss_sum unrounded (engine/invariant.py's exact_sum: an int, or a non-finite float)
    loss_count: list[float]  # per copy: examples, or target tokens (loss = loss_sum / loss_count)
    correct: list[int]  # per copy: examples whose argmax candidate is the label (classification)
    num_examples: list[int]  # per copy
    scores: list[list[list[float]]]  # per copy, per example, per candidate: mean log-prob


def group_sums(readout: Readout, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs, token count) of every group, fp64 on the CPU; each sum correctly rounded."""
    counts = torch.bincount(readout.req_group, minlength=readout.num_groups).cpu()
    lp = logprobs.double().cpu().tolist()
    ends = counts.cumsum(0).tolist()
    sums = [math.fsum(lp[end - n:end]) for end, n in zip(ends, counts.tolist())]
    return torch.tensor(sums, dtype=torch.float64), counts.double()


def copy_losses(readout: Readout, logprobs: torch.Tensor, examples: Sequence[Example]) -> CopyScores:
    """Every copy's loss (and sums, correct predictions, candidate scores) from the readout's log-probs.

    logprobs: [R], one per readout request (CausalLM.score). examples: what the readout's groups index.
    """
    sums, counts = group_sums(readout, logprobs)
    n = readout.num_copies
    terms: list[list[float]] = [[] for _ in range(n)]  # per copy: each example's CE, or each target's -sum
    correct, num_ex = [0] * n, [0] * n
    scores: list[list[list[float]]] = [[] for _ in range(n)]
    tok_cnt = [0.0] * n
    g = 0
    groups = readout.groups
    while g < len(groups):
        c, e, _ = groups[g]
        ex = examples[e]
        k = len(ex.candidates) if ex.is_classification else 1
        if ex.is_classification:
            s = sums[g:g + k] / counts[g:g + k]  # mean log-prob of each candidate's tokens
            terms[c].append(float(torch.logsumexp(s, 0) - s[ex.label]))
            correct[c] += int(int(torch.argmax(s)) == ex.label)
            scores[c].append(s.tolist())
        else:
            terms[c].append(-float(sums[g]))
            tok_cnt[c] += float(counts[g])
            scores[c].append([float(sums[g] / counts[g])])
        num_ex[c] += 1
        g += k
    exact = [exact_sum(t) for t in terms]
    loss_sum = [exact_float(e) for e in exact]
    # LM: the token-weighted mean NLL; classification: the mean over examples (counts are exact integers)
    loss_count = [tok_cnt[c] if tok_cnt[c] else float(num_ex[c]) for c in range(n)]
    loss = [loss_sum[c] / loss_count[c] if loss_count[c] else float("nan") for c in range(n)]
    return CopyScores(loss, loss_sum, exact, loss_count, correct, num_ex, scores)
