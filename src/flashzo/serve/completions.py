"""`POST /v1/completions`: OpenAI's legacy completions on a base or fine-tuned model.

    echo, logprobs N, max_tokens 0   the prompt's token log-probabilities (what lm-evaluation-harness's
                                     local-completions asks for log-likelihoods): token_logprobs[0] is
                                     None, the others equal model.token_logprobs with the model's
                                     adapter (engine/generate.py: prompt_logprobs, the same bits)
    max_tokens > 0                   generation with the paged KV cache (engine/generate.py: generate),
                                     greedy at temperature 0, seeded sampling otherwise; it stops at
                                     max_tokens, the model's end-of-text token or a `stop` string

Prompts are a string, a list of strings, a list of token ids or a list of those. A token's text is
its tokenizer's decoding of it alone; `text` and `text_offset` are built from those pieces.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from flashzo.engine.generate import decode_pool, generate, prompt_logprobs
from flashzo.errors import InputError

MAX_PROMPTS = 64  # sequences (prompts x n) in one request
MAX_STOP = 4


class CompletionRequest(BaseModel):
    """OpenAI's completion parameters; a parameter flashzo does not implement must keep its default."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: Optional[int] = 1
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    best_of: Optional[int] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, Any]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None


def check(req: CompletionRequest) -> None:
    """Refuse what flashzo does not do (InputError naming the parameter)."""
    if req.stream:
        raise InputError("stream: streaming is not supported; send stream: false")
    if req.best_of not in (None, 1, req.n):
        raise InputError("best_of is not supported (leave it unset)")
    if req.presence_penalty or req.frequency_penalty:
        raise InputError("presence_penalty and frequency_penalty are not supported (leave them 0)")
    if req.logit_bias:
        raise InputError("logit_bias is not supported")
    if req.suffix is not None:
        raise InputError("suffix (insertion) is not supported")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= 16:
        raise InputError(f"n must be in 1..16, got {n}")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise InputError(f"stop must be at most {MAX_STOP} non-empty strings")


def prompts_of(req: CompletionRequest, served) -> list[list[int]]:
    """The token ids of every prompt (strings through the model's tokenizer)."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise InputError("prompt is empty")
    if all(isinstance(x, int) for x in p):
        p = [p]
    ids = []
    for x in p:
        ids.append(served.encode(x) if isinstance(x, str) else list(x))
        if not ids[-1]:
            raise InputError(f"prompt {len(ids) - 1} has no tokens")
    return ids


def _top_dict(served, ids, lps) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, lp in zip(ids, lps):
        out.setdefault(served.piece(int(t)), float(lp))
    return out


def complete(served, adapter, req: CompletionRequest, model_name: str) -> dict:
    """The completion response (run on the scheduler thread: it owns the model)."""
    check(req)
    n = 1 if req.n is None else req.n
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens < 0:
        raise InputError(f"max_tokens must be >= 0, got {max_tokens}")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top = req.logprobs
    if top is not None and (isinstance(top, bool) or not 0 <= top <= 20):
        raise InputError(f"logprobs must be in 0..20, got {top}")
    ids = prompts_of(req, served)
    if len(ids) * n > MAX_PROMPTS:
        raise InputError(f"{len(ids)} prompts x n={n} is more than {MAX_PROMPTS} sequences in one request")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    model = served.model
    scored = prompt_logprobs(model, ids, adapter, top=top or 0) if req.echo and top is not None else None
    gens = None
    if max_tokens > 0:
        if served.pool is None:
            served.pool = decode_pool(model)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        eos = served.eos_token_id
        gens = generate(model, [p for p in ids for _ in range(n)], adapter, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, top=top or 0,
                        stop_tokens=[eos] if eos is not None else [], pool=served.pool)
    choices, completion_tokens = [], 0
    for i, prompt in enumerate(ids):
        for k in range(n):
            g = gens[i * n + k] if gens is not None else None
            choices.append(_choice(served, len(choices), prompt, scored[i] if scored else None, g,
                                   echo=bool(req.echo), top=top, stops=stops))
            completion_tokens += len(g.tokens) if g is not None else 0
    prompt_tokens = sum(len(p) for p in ids)
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _choice(served, index, prompt, scored, gen, *, echo, top, stops) -> dict:
    tokens, lps, tops = [], [], []
    if echo:
        tokens.extend(prompt)
        lps.append(None)
        tops.append(None)
        if scored is not None:
            lps.extend(float(x) for x in scored.logprobs)
            tops.extend(_top_dict(served, a, b) for a, b in zip(scored.top_ids.tolist(), scored.top_logprobs.tolist()))
        else:
            lps.extend([None] * (len(prompt) - 1))
            tops.extend([None] * (len(prompt) - 1))
    generated = gen.tokens if gen is not None else []
    pieces = served.pieces(list(prompt) + list(generated))
    prompt_pieces, gen_pieces = pieces[:len(prompt)], pieces[len(prompt):]
    finish = gen.finish_reason if gen is not None else "length"
    keep, gen_text = len(generated), "".join(gen_pieces)
    cut = min((at for at in (gen_text.find(s) for s in stops) if at >= 0), default=None)
    if cut is not None:  # keep the tokens that start before the stop string; the text ends where it begins
        pos, keep = 0, 0
        while keep < len(gen_pieces) and pos < cut:
            pos += len(gen_pieces[keep])
            keep += 1
        gen_text, finish = gen_text[:cut], "stop"
    if gen is not None:
        tokens.extend(generated[:keep])
        lps.extend(gen.logprobs[:keep])
        tops.extend(_top_dict(served, a, b) for a, b in zip(gen.top_ids[:keep], gen.top_logprobs[:keep]))
    prompt_text = "".join(prompt_pieces)
    text = (prompt_text if echo else "") + gen_text
    logprobs = None
    if top is not None:
        shown = (prompt_pieces if echo else []) + gen_pieces[:keep]
        offsets, pos = [], 0 if echo else len(prompt_text)
        for piece in shown:
            offsets.append(pos)
            pos += len(piece)
        logprobs = {"tokens": shown, "token_logprobs": lps, "top_logprobs": tops if top else None,
                    "text_offset": offsets}
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
