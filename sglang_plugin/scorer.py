"""MeZO step losses computed by a running sglang.Engine that serves flashzo's plugin (any family).

    scorer = SGLangScorer(engine)                  engine: sglang.Engine(model_path=..., ...) started
                                                   with SGLANG_EXTERNAL_MODEL_PACKAGE=flashzo.sglang
    result = scorer.step(trainer, examples)        == trainer.step(examples), the forward passes
                                                   served by SGLang; the update stays in flashzo

Each of the step's 2q signed copies is a set of SGLang requests, one per scored sequence (prompt +
candidate, or prompt + target), whose request id carries (adapter, seed, sign, eps) (request.py).
The adapter's current values are written once per version to a PEFT directory the server reads.
SGLang returns the log-probabilities of the scored tokens; flashzo's own loss code
(flashzo.engine.loss.copy_losses) turns them into the copies' losses, so the loss definitions
cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Sequence

import torch

from flashzo.engine.batch import Copy, Readout, ReadoutGroup
from flashzo.engine.example import Example, Limits, check_examples
from flashzo.engine.lora import LoRAAdapter
from flashzo.engine.loss import copy_losses, pair_losses
from flashzo.engine.mezo import MeZOTrainer, StepResult
from flashzo.errors import InputError

from .request import Perturbation


class SGLangScorer:
    """Scores flashzo Examples under signed LoRA perturbations through an sglang.Engine."""

    def __init__(self, engine, *, workdir: str | None = None):
        self.engine = engine
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flashzo-sglang-")
            workdir = self._tmp.name
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._published: dict[int, tuple[str, str]] = {}  # id(adapter) -> (path, version) last written

    # The adapter as the server reads it ---------------------------------------------------------------
    def publish(self, adapter: LoRAAdapter) -> tuple[str, str]:
        """Write `adapter` (if its contents changed) to a PEFT directory; returns (path, version)."""
        digest = hashlib.sha256(adapter.buffer.detach().cpu().numpy().tobytes())
        digest.update(json.dumps(adapter.peft_config(), sort_keys=True).encode())
        version = digest.hexdigest()[:20]
        path = os.path.join(self.workdir, f"adapter-{id(adapter):x}")
        if self._published.get(id(adapter)) != (path, version):
            adapter.save_pretrained(path)
            self._published[id(adapter)] = (path, version)
        return path, version

    # Scoring ----------------------------------------------------------------------------------------
    def copy_losses(self, examples: Sequence[Example], adapter: LoRAAdapter, copies: Sequence[Copy],
                    eps: float) -> list[float]:
        """The loss of `examples` under each copy (adapter + copy.sign * eps * z(copy.seed)), via SGLang."""
        check_examples(examples, Limits.of(adapter.model_config))
        return self._copy_losses(examples, adapter, copies, eps)

    def _copy_losses(self, examples, adapter, copies, eps) -> list[float]:
        path, version = self.publish(adapter)
        input_ids, starts, rids, salts, group_of_request, group_info = [], [], [], [], [], []
        for c, copy in enumerate(copies):
            if copy.adapter != 0:
                raise InputError(f"copy {c} names adapter {copy.adapter}; SGLangScorer scores one adapter")
            p = Perturbation(adapter=path, version=version, seed=int(copy.seed), sign=int(copy.sign), eps=float(eps))
            for e, ex in enumerate(examples):
                for k, (toks, scored_from) in enumerate(ex.sequences()):
                    group_of_request.append(len(group_info))
                    group_info.append(ReadoutGroup(c, e, k))
                    input_ids.append(toks)
                    starts.append(scored_from - 1)  # SGLang's first entry has no log-prob (see below)
                    fields = p.request_fields()
                    rids.append(fields["rid"])
                    salts.append(fields["cache_salt"])
        outputs = self.engine.generate(input_ids=input_ids, sampling_params={"max_new_tokens": 0},
                                       return_logprob=True, logprob_start_len=starts, rid=rids, cache_salt=salts)
        logprobs, req_group, req_target = [], [], []
        for r, (out, toks, start) in enumerate(zip(outputs, input_ids, starts)):
            got = _scored_logprobs(out, toks, start)
            logprobs.extend(got)
            req_group.extend([group_of_request[r]] * len(got))
            req_target.extend(toks[start + 1:])
        # SGLang computed one log-prob per scored position: request k reads the k-th of them.
        lt = dict(dtype=torch.long)
        scored = torch.arange(len(logprobs), **lt)
        readout = Readout(rows=scored, req_row=scored, req_target=torch.tensor(req_target, **lt),
                          req_group=torch.tensor(req_group, **lt), groups=group_info, num_copies=len(copies))
        return copy_losses(readout, torch.tensor(logprobs, dtype=torch.float64), examples).loss

    def step(self, trainer: MeZOTrainer, examples: Sequence[Example]) -> StepResult:
        """One MeZO step of `trainer` whose 2q forward passes SGLang serves (same result as trainer.step)."""
        check_examples(examples, trainer.model.limits)
        losses = self._copy_losses(examples, trainer.adapter, trainer.copies(), trainer.config.eps)
        return trainer.apply(pair_losses(losses))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _scored_logprobs(out: dict, toks: list[int], start: int) -> list[float]:
    """log p(toks[i] | toks[:i]) for i = start+1 .. len-1 from one Engine.generate output.

    With logprob_start_len = start, SGLang returns (logprob, token id, text) for positions
    start .. len-1; the first has no log-prob when its predecessor's state came from the prefix cache
    (None), so the request starts one token before the first scored one and drops that entry.
    """
    entries = out["meta_info"]["input_token_logprobs"]
    if len(entries) != len(toks) - start:
        raise InputError(f"SGLang returned {len(entries)} input log-probs for tokens {start}..{len(toks) - 1}")
    got = []
    for i, entry in enumerate(entries[1:], start=start + 1):
        lp, tok = entry[0], entry[1]
        if tok != toks[i] or lp is None:
            raise InputError(f"SGLang's input log-prob for position {i} is ({lp}, token {tok}), expected a "
                             f"log-prob of token {toks[i]}")
        got.append(float(lp))
    return got
