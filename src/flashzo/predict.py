"""`flashzo eval --predictions`: every example's scores, one JSON line each, and the summary evaluate() gives.

A classification line holds the mean log-probability of each candidate's tokens (`scores`, the
quantity the loss and the prediction use; docs/design.md, "Losses"), the `prediction` (the argmax)
and the `label`; an LM line holds the negative log-likelihood of every target token (`nll`), their
mean and its exponential (`perplexity`). Every line names the data file's `line`. The summary
({"loss", "accuracy" | "perplexity", "num_examples"}) comes from the same forwards, through the
same loss code as `flashzo.evaluate`, so the two cannot disagree.

With a reward (`flashzo eval --reward`), every line holds what the adapter generated for the prompt
(greedy, or sampled from the seeds a reward run's evaluation uses): the `completion` as the reward
saw it, its `tokens`, the `finish_reason`, the `answer` and the `reward`; the summary is the mean
reward ({"reward", "num_examples"}), as a reward run's evaluation computes it.
"""

from __future__ import annotations

import json
import math
from typing import Iterator

import torch

from flashzo.data import Dataset
from flashzo.engine.batch import Copy
from flashzo.engine.example import check_examples
from flashzo.engine.invariant import add_exact, exact_float
from flashzo.engine.loss import copy_losses
from flashzo.engine.mezo import eval_result
from flashzo.errors import InputError
from flashzo.outputs import replacing_file


def predictions(model, adapter, dataset: Dataset, *, batch_size: int = 32, sums: list | None = None) -> Iterator[dict]:
    """One record per example of `dataset`, in file order. sums: if a list, receives the evaluation sums
    [loss_sum, loss_count, correct] as the records are produced."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_examples(dataset.examples, model.limits, what=dataset.path)
    adapters = [adapter] if adapter is not None else []
    if sums is not None:
        sums[:] = [0.0, 0.0, 0]
    loss_exact = 0  # evaluate()'s exact sum (engine/invariant.py), rounded into sums[0] as it grows
    for i in range(0, len(dataset.examples), batch_size):
        chunk = dataset.examples[i:i + batch_size]
        batch = model.build_batch(chunk, [Copy()], adapters=adapters, checked=True)
        lp = model.score(batch)
        s = copy_losses(batch.readout, lp, chunk)
        if sums is not None:
            loss_exact = add_exact(loss_exact, s.loss_exact[0])
            sums[0] = exact_float(loss_exact)
            sums[1] += s.loss_count[0]
            sums[2] += s.correct[0]
        counts = torch.bincount(batch.readout.req_group, minlength=batch.readout.num_groups).tolist()
        per_group = torch.split(lp.double().cpu(), counts)  # groups: example -> candidate, tokens contiguous
        g = 0
        for j, ex in enumerate(chunk):
            rec = {"line": dataset.lines[i + j]}
            if ex.is_classification:
                scores = s.scores[0][j]
                rec.update(scores=scores, prediction=max(range(len(scores)), key=scores.__getitem__),
                           label=ex.label)
                g += len(ex.candidates)
            else:
                nll = (-per_group[g]).tolist()
                mean = sum(nll) / len(nll)
                rec.update(nll=nll, loss=mean, tokens=len(nll), perplexity=math.exp(mean) if mean < 700 else math.inf)
                g += 1
            yield rec


def write_predictions(model, adapter, dataset: Dataset, path: str, *, batch_size: int = 32) -> dict:
    """Write `path` (JSONL, replaced atomically: on any error the file there before is kept; a full disk is a
    WriteError) and return the summary, as evaluate() computes it."""
    kind = check_examples(dataset.examples, model.limits, what=dataset.path)
    sums: list = []
    with replacing_file(path) as f:
        for rec in predictions(model, adapter, dataset, batch_size=batch_size, sums=sums):
            f.write(json.dumps(rec) + "\n")
    return eval_result(kind, sums[0], sums[1], sums[2], len(dataset.examples))


def reward_predictions(model, adapter, dataset: Dataset, config, decode, *, batch_size: int = 32) -> list[dict]:
    """One record per example of a reward dataset (RewardExamples), in file order: the line, the answer, the
    completion, its tokens, finish_reason and reward (None with "problem" where the reward call failed)."""
    from flashzo.engine.mezo import EVAL_STEP, sampling_seed
    from flashzo.engine.reward_objective import Scorer, check_reward_examples, evaluate_rewards

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    examples = dataset.examples
    check_reward_examples(examples, model.limits, config, what=dataset.path)
    scorer = Scorer(config, decode)
    try:
        scorer.probe(examples[0], f"{dataset.path}:{dataset.lines[0]}")
        recs = evaluate_rewards(model, adapter, examples, scorer=scorer,
                                prompt_seeds=[sampling_seed(0, EVAL_STEP, i) for i in range(len(examples))],
                                example_ids=list(range(len(examples))), batch_size=batch_size)
    finally:
        scorer.caller.close()
    return [{"line": line, "answer": ex.reference, **rec} for line, ex, rec in zip(dataset.lines, examples, recs)]


def reward_summary(records: list[dict]) -> dict:
    """{"reward": the mean over the examples, "num_examples"} (+ "failed" and the first "problem" where a
    reward call failed: the mean is then over the others)."""
    done = [r["reward"] for r in records if r["reward"] is not None]
    out = {"reward": math.fsum(done) / len(done) if done else None, "num_examples": len(records)}
    failed = [r for r in records if r["reward"] is None]
    if failed:
        out.update(failed=len(failed), problem=f"line {failed[0]['line']}: {failed[0].get('problem')}")
    return out


def write_reward_predictions(records: list[dict], path: str) -> None:
    """Write the records as JSONL to `path`, replaced atomically (as write_predictions)."""
    with replacing_file(path) as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
