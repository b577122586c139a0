"""`POST /v1/completions`: OpenAI's legacy completions on a base or fine-tuned model.

    echo, logprobs N, max_tokens 0   the prompt's token log-probabilities (what lm-evaluation-harness's
                                     local-completions asks for log-likelihoods): token_logprobs[0] is
                                     None, the others equal model.token_logprobs with the model's
                                     adapter (engine/generate.py: prompt_logprobs, the same bits)
    max_tokens > 0                   generation with the paged KV cache (engine/generate.py: generate),
                                     greedy at temperature 0, seeded sampling otherwise; it stops at
                                     max_tokens, the model's end-of-text token or a `stop` string

Prompts are a string, a list of strings, a list of token ids or a list of those; a string that is not
valid Unicode (a lone surrogate) is refused. A token's text is its tokenizer's decoding of it alone;
`text` and `text_offset` are built from those pieces. A request is three parts: `prepare` (checks,
tokenization) and `render` (token texts) on an HTTP thread, `forward` on the scheduler's.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from flashzo.engine.generate import decode_pool, generate, prompt_logprobs
from flashzo.errors import InputError

from .requests import CompletionRequest

MAX_PROMPTS = 64  # sequences (prompts x n) in one request
MAX_STOP = 4
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0  # besides 0 (greedy); OpenAI's range is [0, 2]
SEED_BOUND = 2**63  # seeds are in [0, 2**63)


def check(req: CompletionRequest) -> None:
    """Refuse what flashzo does not do, and values out of range (InputError naming the parameter)."""
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
    if req.max_tokens is not None and req.max_tokens < 0:
        raise InputError(f"max_tokens must be >= 0, got {req.max_tokens}")
    t = req.temperature
    if t is not None and t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
        raise InputError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {req.top_p!r}")
    if req.seed is not None and not 0 <= req.seed < SEED_BOUND:
        raise InputError(f"seed must be in [0, 2**63), got {req.seed}")
    top = req.logprobs
    if top is not None and (isinstance(top, bool) or not 0 <= top <= 20):
        raise InputError(f"logprobs must be in 0..20, got {top}")


def _text_ids(served, text: str, index: int) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"prompt {index} is not valid Unicode text: a lone surrogate "
                         f"({text[e.start]!r}) at character {e.start}") from None
    return served.encode(text)


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
        ids.append(_text_ids(served, x, len(ids)) if isinstance(x, str) else list(x))
        if not ids[-1]:
            raise InputError(f"prompt {len(ids) - 1} has no tokens")
    return ids


@dataclass
class Prepared:
    """A checked, tokenized completion request: what the scheduler's forwards need."""

    ids: list[list[int]]
    adapter: object
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top: int | None
    echo: bool
    stops: list[str]
    seed: int


def prepare(served, adapter, req: CompletionRequest) -> Prepared:
    """Checks and tokenization (an HTTP thread: never the scheduler's)."""
    check(req)
    n = 1 if req.n is None else req.n
    ids = prompts_of(req, served)
    if len(ids) * n > MAX_PROMPTS:
        raise InputError(f"{len(ids)} prompts x n={n} is more than {MAX_PROMPTS} sequences in one request")
    return Prepared(ids, adapter, n, 16 if req.max_tokens is None else req.max_tokens,
                    1.0 if req.temperature is None else req.temperature, 1.0 if req.top_p is None else req.top_p,
                    req.logprobs, bool(req.echo), [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                    req.seed if req.seed is not None else secrets.randbelow(2**31))


def forward(served, p: Prepared):
    """The forwards (the scheduler thread: it owns the model and its pools): (scored prompts, generations)."""
    model = served.model
    scored = prompt_logprobs(model, p.ids, p.adapter, top=p.top or 0) if p.echo and p.top is not None else None
    gens = None
    if p.max_tokens > 0:
        if served.pool is None:
            served.pool = decode_pool(model)
        eos = served.eos_token_id
        gens = generate(model, [q for q in p.ids for _ in range(p.n)], p.adapter, max_tokens=p.max_tokens,
                        temperature=p.temperature, top_p=p.top_p, seed=p.seed, top=p.top or 0,
                        stop_tokens=[eos] if eos is not None else [], pool=served.pool)
    return scored, gens


def render(served, p: Prepared, scored, gens, model_name: str) -> dict:
    """The completion response (an HTTP thread: token texts come from the tokenizer)."""
    choices, completion_tokens = [], 0
    for i, prompt in enumerate(p.ids):
        for k in range(p.n):
            g = gens[i * p.n + k] if gens is not None else None
            choices.append(_choice(served, len(choices), prompt, scored[i] if scored else None, g,
                                   echo=p.echo, top=p.top, stops=p.stops))
            completion_tokens += len(g.tokens) if g is not None else 0
    prompt_tokens = sum(len(q) for q in p.ids)
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _top_dict(served, ids, lps) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, lp in zip(ids, lps):
        out.setdefault(served.piece(int(t)), float(lp))
    return out


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
