"""From a step's rewards to its update: MeZO on -R and evolution strategies with fitness shaping
(docs/design.md, "Rewards on generated text").

A step decodes its batch of P prompts under 2q copies: pair i's copies are theta + eps z_i (+) and
theta - eps z_i (-). R[c][p] is copy c's reward on prompt p, and F_c = mean_p R[c][p]. Both
estimators give one scalar g_i per pair, and the trainer applies the same update as for a loss:

    theta <- theta - lr_t (mean_i g_i z_i + weight_decay theta)          (kernels/zo_update.py)

    "mezo"  loss L = -F:  g_i = (L+ - L-) / (2 eps) = -(F_i+ - F_i-) / (2 eps)
    "es"    f = shape(R) over the population of the 2q copies;  g_i = -(f_i+ - f_i-) / 2,
            i.e. theta <- theta + lr_t / (2q) sum_c f_c s_c z_c   (s_c the copy's sign)

ES at Scale's update theta += alpha / N sum_n R_hat_n eps_n (N members, unit noise eps_n, sigma
absorbed into alpha) is "es" with lr = alpha, eps = sigma, N = 2q antithetic members; OpenAI-ES's
alpha / (N sigma) is lr = alpha / sigma.

Fitness shapings (`shape`), each 0 for every copy when the population ties (no update):

    "zscore"             f_c = (F_c - mean F) / std F            (std over the 2q copies, ddof 0)
    "zscore_per_prompt"  f_c = mean_p (R[c][p] - mean_c' R[c'][p]) / std_c' R[c'][p]   (a prompt whose
                         copies tie adds 0)
    "centered_ranks"     f_c = rank(F_c) / (2q - 1) - 1/2 in [-1/2, 1/2], tied values get the average
                         of their ranks

Every mean is math.fsum's (correctly rounded, independent of order), so the same rewards give the
same bits however the ranks of a torch.distributed run computed them.
"""

from __future__ import annotations

import math
from typing import Sequence

ESTIMATORS = ("es", "mezo")
SHAPINGS = ("zscore", "zscore_per_prompt", "centered_ranks")


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def zscore(values: Sequence[float]) -> list[float]:
    """(v - mean) / std over `values` (ddof 0); all zeros when they all tie."""
    if max(values) == min(values):
        return [0.0] * len(values)
    m = mean(values)
    std = math.sqrt(mean([(v - m) ** 2 for v in values]))
    return [(v - m) / std for v in values]


def centered_ranks(values: Sequence[float]) -> list[float]:
    """rank / (n - 1) - 1/2, ranks 0..n-1 in increasing value, ties sharing the average of their ranks."""
    n = len(values)
    if n == 1:
        return [0.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return [r / (n - 1) - 0.5 for r in ranks]


def copy_fitness(rewards: Sequence[Sequence[float]]) -> list[float]:
    """F_c = mean over prompts of `R[c][p]`."""
    return [mean(row) for row in rewards]


def shape(rewards: Sequence[Sequence[float]], shaping: str) -> list[float]:
    """Each copy's shaped fitness f_c from `R[c][p]` (copies in pair order: + then - for each pair)."""
    if shaping == "zscore":
        return zscore(copy_fitness(rewards))
    if shaping == "centered_ranks":
        return centered_ranks(copy_fitness(rewards))
    if shaping == "zscore_per_prompt":
        columns = [zscore([row[p] for row in rewards]) for p in range(len(rewards[0]))]
        return [mean([col[c] for col in columns]) for c in range(len(rewards))]
    raise ValueError(f"unknown fitness shaping {shaping!r}")


def pair_grads(rewards: Sequence[Sequence[float]], estimator: str, shaping: str, eps: float) -> list[float]:
    """g_i of each pair (copies 2i and 2i+1) from `R[c][p]`: the update is theta -= lr mean_i g_i z_i."""
    if estimator == "mezo":
        f = copy_fitness(rewards)
        return [-(f[2 * i] - f[2 * i + 1]) / (2 * eps) for i in range(len(f) // 2)]
    if estimator == "es":
        f = shape(rewards, shaping)
        return [-(f[2 * i] - f[2 * i + 1]) / 2 for i in range(len(f) // 2)]
    raise ValueError(f"unknown estimator {estimator!r}")


def signal(rewards: Sequence[Sequence[float]]) -> float:
    """The share of prompts whose copies do not all get the same reward (0: the step cannot move theta)."""
    P = len(rewards[0])
    return sum(len({row[p] for row in rewards}) > 1 for p in range(P)) / P
