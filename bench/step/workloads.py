"""The batch shapes of the step benchmark: seeded random token ids in the shapes of the MeZO paper's tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashzo.engine import Example


@dataclass(frozen=True)
class Workload:
    prompt_len: tuple[int, int]  # inclusive range
    num_candidates: int = 0  # 0: an LM target instead
    candidate_len: tuple[int, int] = (1, 1)
    target_len: int = 0
    fixed_candidates: bool = True  # the same candidate tokens for every example (label words)


WORKLOADS = {
    "sst2": Workload(prompt_len=(12, 48), num_candidates=2),  # " terrible" / " great"
    "rte": Workload(prompt_len=(60, 250), num_candidates=2),  # "Yes" / "No"
    "multichoice": Workload(prompt_len=(16, 64), num_candidates=4, candidate_len=(3, 8), fixed_candidates=False),
    "lm": Workload(prompt_len=(32, 128), target_len=16),
}


def make_examples(workload: str, vocab_size: int, *, num_examples: int = 16, seed: int = 0) -> list[Example]:
    """A batch in the workload's shape. Prompts start with OPT's BOS (2); ids avoid the pad id (1)."""
    w = WORKLOADS[workload]
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(4, vocab_size, (n,), generator=g).tolist()

    def length(lo_hi):
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))

    label_words = [tokens(length(w.candidate_len)) for _ in range(w.num_candidates)]
    examples = []
    for i in range(num_examples):
        prompt = [2] + tokens(length(w.prompt_len) - 1)
        if w.num_candidates:
            cands = label_words if w.fixed_candidates else [tokens(length(w.candidate_len))
                                                             for _ in range(w.num_candidates)]
            examples.append(Example(prompt, candidates=[list(c) for c in cands], label=i % w.num_candidates))
        else:
            examples.append(Example(prompt, target=tokens(w.target_len)))
    return examples


def batch_tokens(examples) -> int:
    """The batch's tokens as the data holds them: every prompt + candidate / target sequence, unpadded."""
    return sum(len(toks) for ex in examples for toks, _ in ex.sequences())


CPU_MODELS = ("opt-125m", "opt-1.3b", "smollm2-135m", "llama-3.2-1b")  # the default sweep on a CPU
GPU_MODELS = ("opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "smollm2-135m", "llama-3.2-1b",
              "llama-3.1-8b")  # and on a GPU
