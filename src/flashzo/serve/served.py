"""A base model the service serves: the engine model, its tokenizer, a decode pool, fine-tuned adapters."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict

from flashzo.errors import InputError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the whole name (fullmatch: no trailing newline)
ADAPTER_CACHE = 8  # fine-tuned adapters kept in memory per base model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


class ServedModel:
    def __init__(self, name: str, path: str, model, tokenizer):
        self.name, self.path, self.model, self.tokenizer = name, path, model, tokenizer
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads
        self.pool = None  # the decode pool (engine/generate.py): the scheduler thread's only
        self._adapters: OrderedDict[str, object] = OrderedDict()  # guarded by _adapters_lock
        self._adapters_lock = threading.Lock()  # HTTP threads load fine-tuned adapters

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        eos = getattr(self.model.config, "eos_token_id", None)
        return int(eos) if isinstance(eos, int) else None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InputError(f"model {self.name!r} has no tokenizer (its directory holds no tokenizer files, or "
                             "transformers builds none from its GGUF file): give prompts as lists of token ids")
        with self.tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def piece(self, token: int) -> str:
        """A token's text: the tokenizer's decoding of it alone, or <id> without a tokenizer."""
        if self.tokenizer is None:
            return f"<{token}>"
        with self.tokenizer_lock:
            return self.tokenizer.decode([token])

    def pieces(self, tokens: list[int], window: int = 4) -> list[str]:
        """Each token's text in context (what it adds to the decoding of the tokens before it, looking
        `window` tokens back), so that the pieces concatenate to the decoded text."""
        if self.tokenizer is None:
            return [f"<{t}>" for t in tokens]
        out = []
        with self.tokenizer_lock:
            for i in range(len(tokens)):
                lo = max(0, i - window)
                head = self.tokenizer.decode(tokens[lo:i]) if i > lo else ""
                out.append(self.tokenizer.decode(tokens[lo:i + 1])[len(head):])
        return out

    def adapter(self, key: str, path: str):
        """The fine-tuned adapter saved at `path` (PEFT format), loaded once and kept (LRU)."""
        from flashzo.engine.lora import LoRAAdapter

        with self._adapters_lock:
            if key in self._adapters:
                self._adapters.move_to_end(key)
                return self._adapters[key]
        ad = LoRAAdapter.from_pretrained(path, self.model.config, device=self.model.device)
        with self._adapters_lock:
            self._adapters[key] = ad
            while len(self._adapters) > ADAPTER_CACHE:
                self._adapters.popitem(last=False)
        return ad


def parse_model_flags(values: list[str]) -> dict[str, str]:
    """--model NAME=PATH flags -> {name: path}; InputError naming a bad one."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise InputError(f"--model {v!r}: expected NAME=PATH")
        if not NAME.fullmatch(name):
            raise InputError(f"--model {v!r}: NAME must be 1-64 letters, digits, '.', '_' or '-' (no ':')")
        if name in out:
            raise InputError(f"--model {name} is given twice")
        out[name] = os.path.abspath(os.path.expanduser(path))
    if not out:
        raise InputError("give at least one --model NAME=PATH")
    return out


def parse_quantize_flags(values: list[str], models: dict[str, str]) -> dict:
    """--quantize [NAME=]MODE flags -> {model name: QuantSpec}: MODE alone applies to every model no flag
    names; InputError naming a bad one."""
    from flashzo.engine.quantized import QuantSpec

    named, default = {}, None
    for v in values:
        name, sep, mode = v.rpartition("=")
        try:
            spec = QuantSpec.parse(mode)
        except InputError as e:
            raise InputError(f"--quantize {v!r}: {e}") from None
        if not sep:
            if default is not None:
                raise InputError(f"--quantize {v!r}: a MODE for every model is given twice")
            default = spec
        elif name not in models:
            raise InputError(f"--quantize {v!r}: no --model is named {name!r} (models: {', '.join(models)})")
        elif name in named:
            raise InputError(f"--quantize {v!r}: model {name} is given twice")
        else:
            named[name] = spec
    return {n: named.get(n, default) for n in models if named.get(n, default) is not None}


def load_served(name: str, path: str, *, dtype=None, device=None, quantize=None) -> ServedModel:
    """The checkpoint directory or .gguf file at `path` through flashzo.engine.load_model (any family; quantized
    as `quantize` says), and its tokenizer."""
    from flashzo.data import load_tokenizer
    from flashzo.engine import load_model
    from flashzo.engine.gguf import find_gguf

    model = load_model(path, dtype=dtype, device=device, quantize=quantize)
    tokenizer = None  # token-id data and prompts need none
    # NOTE: transformers 5 builds an empty tokenizer (one token, encodes everything to []) for a
    # directory without tokenizer files, so the files are looked for first; a GGUF file carries its
    # tokenizer in its metadata (load_tokenizer reads it there).
    if find_gguf(path) is not None or any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        try:
            tokenizer = load_tokenizer(path)
        except InputError:
            tokenizer = None
    return ServedModel(name, path, model, tokenizer)
