"""`flashzo eval --predictions`: every example's scores, one JSON line each, and the summary evaluate() gives.

A classification line holds the mean log-probability of each candidate's tokens (`scores`, the
quantity the loss and the prediction use; docs/design.md, "Losses"), the `prediction` (the argmax)
and the `label`; an LM line holds the negative log-likelihood of every target token (`nll`), their
mean and its exponential (`perplexity`). Every line names the data file's `line`. The summary
({"loss", "accuracy" | "perplexity", "num_examples"}) comes from the same forwards, through the
same loss code as `flashzo.evaluate`, so the two cannot disagree.
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
