"""How one SGLang request carries a MeZO perturbation (adapter, seed, sign, eps) into the model.

SGLang hands a model, for every request of a batch, its request id (`forward_batch.rids`) and its
LoRA id, and nothing else a client chooses (custom_params reach the scheduler only together with a
custom logit processor). So the perturbation rides in the request id:

    rid = "flashzo-zo:" + base64url(json{"adapter", "version", "seed", "sign", "eps"}) + ":" + unique

`adapter` is a PEFT adapter directory the server can read (flashzo's fp32 LoRA layout), `version`
names its current contents (the model caches one copy per (adapter, version)), `seed` and `sign`
select z and the side of the two-sided difference, `eps` its size. A request with a plain rid is not
perturbed. Requests under different perturbations produce different K/V for the same tokens, so
each also carries a `cache_salt` naming its perturbation: SGLang's prefix cache then shares K/V only
between requests with the same perturbation (a classification prompt under its candidates).

Nothing here imports torch or sglang: clients build requests with it, the model parses them.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from dataclasses import dataclass

from flashzo.errors import InputError

RID_PREFIX = "flashzo-zo:"


@dataclass(frozen=True)
class Perturbation:
    """theta + sign * eps * z(seed) for the LoRA adapter stored at `adapter` (contents `version`)."""

    adapter: str
    version: str
    seed: int
    sign: int
    eps: float

    def __post_init__(self):
        if not isinstance(self.adapter, str) or not self.adapter:
            raise InputError(f"adapter must be a non-empty directory path, got {self.adapter!r}")
        if not isinstance(self.version, str):
            raise InputError(f"version must be a string, got {type(self.version).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.sign not in (-1, 0, 1) or isinstance(self.sign, bool):
            raise InputError(f"sign must be -1, 0 or +1, got {self.sign!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise InputError(f"eps must be a finite number >= 0, got {self.eps!r}")

    @property
    def key(self) -> str:
        """Names the perturbation exactly (used as the prefix-cache salt)."""
        return f"flashzo-zo|{self.adapter}|{self.version}|{self.seed}|{self.sign}|{float(self.eps).hex()}"

    def rid(self, unique: str | None = None) -> str:
        """A request id carrying this perturbation; `unique` (default: a fresh uuid) keeps ids distinct."""
        payload = json.dumps({"adapter": self.adapter, "version": self.version, "seed": self.seed,
                              "sign": self.sign, "eps": float(self.eps).hex()}, separators=(",", ":"))
        encoded = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
        return f"{RID_PREFIX}{encoded}:{unique or uuid.uuid4().hex}"

    def request_fields(self) -> dict:
        """The keyword arguments of Engine.generate (or fields of a /generate body) for one request."""
        return {"rid": self.rid(), "cache_salt": self.key}


def parse_rid(rid: str | None) -> Perturbation | None:
    """The perturbation a request id carries, None for an ordinary id; ValueError for a malformed one."""
    if not isinstance(rid, str) or not rid.startswith(RID_PREFIX):
        return None
    body = rid[len(RID_PREFIX):]
    encoded, sep, _ = body.partition(":")
    if not sep:
        raise InputError(f"request id {rid!r} starts with {RID_PREFIX!r} but has no ':<unique>' suffix")
    try:
        payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        return Perturbation(adapter=payload["adapter"], version=payload["version"], seed=payload["seed"],
                            sign=payload["sign"], eps=float.fromhex(payload["eps"]))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"request id {rid!r} carries a malformed flashzo perturbation: {e}") from e
