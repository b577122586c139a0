"""What KV sharing saves in one MeZO step: tokens computed and the forward's peak memory.

Two batch shapes from the MeZO paper's tasks, with seeded random token ids:

    sst2: 16 examples, prompts of 12-48 tokens, two one-token candidates
    rte:  16 examples, prompts of 60-250 tokens, two one-token candidates

and q=1 (one perturbation: a +eps and a -eps copy), on an opt-125m-shaped model with random weights
(fp32, CPU) and a LoRA adapter on q_proj, v_proj with r=8.

Tokens per step:
    flashzo, sharing    build_batch(sharing="all", fork=True): each prompt once per copy, the
                        candidates read its KV; layers below the lowest adapted layer run once
                        (reported as token-layers / num_layers, "token-equivalents")
    flashzo, none       sharing="none", fork=False: every candidate a separate sequence, no padding
    HF MeZO             what MeZO's code runs: each candidate a separate right-padded sequence,
                        one forward per sign (2 per step), full [B, L, vocab] logits

Peak memory of one step's forward: flashzo's model.score(batch) (both signs in one forward) against
Hugging Face OPTForCausalLM (+ PEFT LoRA, same targets) running one sign's padded batch with full
logits, as MeZO does; MeZO's two forwards per step run one after the other, so the step's peak is one
forward's. Method: every measurement runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536, so
large buffers are mmapped and returned to the OS when freed) that builds the model and the batch,
runs a warm-up forward on a one-example batch, calls gc.collect() and malloc_trim(0), resets the
kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs the measured forward(s) and reads
VmHWM from /proc/self/status. "peak forward MiB" = VmHWM - VmRSS before the forward: the memory the
forward itself adds on top of the model's weights (tracemalloc does not see torch's CPU allocations).
On a GPU the same comparison is torch.cuda.max_memory_allocated (not done here).

    python bench/report_sharing.py            # opt-125m, a few minutes on a CPU
    python bench/report_sharing.py --smoke    # a tiny model, seconds

Writes bench/results/sharing_report.{json,md,png} (the smoke run: sharing_report_smoke.*).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from _meta import cpu_name, git_commit, write_report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "sst2": dict(num_examples=16, prompt_len=(12, 48), num_candidates=2, candidate_len=1),
    "rte": dict(num_examples=16, prompt_len=(60, 250), num_candidates=2, candidate_len=1),
}
MEASUREMENTS = ("flashzo-sharing", "flashzo-none", "hf-mezo")


# --------------------------------------------------------------------------------------------------
# Batches


def make_examples(shape: str, vocab_size: int, seed: int):
    """Seeded random token ids in a task's shape: a list of flashzo Examples."""
    from flashzo.engine import Example

    s = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    lo, hi = s["prompt_len"]
    examples = []
    for i in range(s["num_examples"]):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        prompt = torch.randint(4, vocab_size, (n,), generator=g).tolist()
        # Candidates are distinct tokens (" great" / " terrible", "Yes" / "No"): the same pair for all.
        cands = [[4 + c * s["candidate_len"] + j for j in range(s["candidate_len"])]
                 for c in range(s["num_candidates"])]
        examples.append(Example(prompt, candidates=cands, label=i % s["num_candidates"]))
    return examples


def signed_copies(q: int):
    from flashzo.engine import Copy

    return [Copy(0, 1000 + i, sign) for i in range(q) for sign in (1, -1)]


def model_config(args):
    from flashzo.engine import OPTConfig

    return OPTConfig.from_name("opt-tiny" if args.smoke else args.model)


def lora_config(args, num_layers: int):
    from flashzo.engine import LoRAConfig

    layers = None if args.lora_from_layer is None else tuple(range(args.lora_from_layer, num_layers))
    return LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=("q_proj", "v_proj"), layers=layers)


def hf_padded_batch(examples, pad_id: int):
    """MeZO's batch: every (prompt, candidate) a row, right-padded. -> ids, mask [B, L], scored rows."""
    seqs = [toks for ex in examples for toks, _ in ex.sequences()]
    starts = [p for ex in examples for _, p in ex.sequences()]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    return ids, mask, seqs, starts


def token_counts(args, shape: str) -> dict:
    """Tokens one step computes on each path (no model needed)."""
    from flashzo.engine import LoRAAdapter, build_batch

    cfg = model_config(args)
    L = cfg.num_hidden_layers
    examples = make_examples(shape, cfg.vocab_size, args.seed)
    copies = signed_copies(args.q)
    lcfg = lora_config(args, L)
    ad = LoRAAdapter.empty(lcfg, cfg)
    kw = dict(adapters=[ad], eps=1e-3, num_layers=L, max_positions=cfg.max_position_embeddings, device="cpu")
    shared = build_batch(examples, copies, sharing="all", fork=True, **kw)
    cands = build_batch(examples, copies, sharing="candidates", fork=True, **kw)
    none = build_batch(examples, copies, sharing="none", fork=False, **kw)
    ids, _, seqs, _ = hf_padded_batch(examples, cfg.pad_token_id)
    prompt_lens = [len(ex.prompt) for ex in examples]
    return {
        "examples": len(examples),
        "sequences": len(seqs),
        "prompt_len": {"min": min(prompt_lens), "max": max(prompt_lens),
                       "mean": sum(prompt_lens) / len(prompt_lens)},
        "copies": len(copies),
        "lowest_adapted_layer": ad.lowest_layer,
        "fork_layer": shared.stats.fork_layer,
        "flashzo_sharing_rows": shared.stats.num_tokens,
        "flashzo_sharing_trunk_rows": shared.stats.trunk_tokens,
        "flashzo_sharing_tokens": shared.stats.token_layers / L,
        "flashzo_candidates_tokens": cands.stats.token_layers / L,
        "flashzo_none_tokens": none.stats.token_layers / L,
        "hf_mezo_tokens": 2 * args.q * ids.numel(),  # 2q padded forwards per step
        "hf_mezo_padding_tokens": 2 * args.q * (ids.numel() - sum(map(len, seqs))),
        "hf_mezo_shape": list(ids.shape),
    }


# --------------------------------------------------------------------------------------------------
# One measurement, in a fresh process


def _rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out["VmRSS"], out["VmHWM"]


def _reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _flashzo_setup(args, shape, sharing):
    from flashzo.engine import LoRAAdapter, OPTModel

    cfg = model_config(args)
    model = OPTModel.from_config(cfg, seed=0)
    model.set_attention_backend("torch")
    ad = LoRAAdapter.init(lora_config(args, cfg.num_hidden_layers), cfg)
    examples = make_examples(shape, cfg.vocab_size, args.seed)
    copies = signed_copies(args.q)
    fork = sharing == "all"
    batch = model.build_batch(examples, copies, adapters=[ad], eps=1e-3, sharing=sharing, fork=fork)
    warm = model.build_batch(examples[:1], copies, adapters=[ad], eps=1e-3, sharing=sharing, fork=fork)
    model.score(warm)

    def step():
        return model.score(batch)

    return step, {"weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def _hf_setup(args, shape):
    import transformers

    cfg = model_config(args)
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "architectures", "torch_dtype")}
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_cfg)).eval()
    lora = "none"
    try:
        import peft

        lcfg = lora_config(args, cfg.num_hidden_layers)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lcfg.r, lora_alpha=lcfg.alpha, target_modules=list(lcfg.target_modules), lora_dropout=0.0,
            layers_to_transform=list(lcfg.layers) if lcfg.layers is not None else None)).eval()
        lora = f"peft {peft.__version__}"
    except ImportError:
        pass
    examples = make_examples(shape, cfg.vocab_size, args.seed)
    ids, mask, seqs, starts = hf_padded_batch(examples, cfg.pad_token_id)

    @torch.no_grad()
    def forward(ids, mask, seqs, starts):
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, vocab]: full logits, as MeZO
        scores = []
        for b, (s, p) in enumerate(zip(seqs, starts)):
            lp = torch.log_softmax(logits[b, p - 1:len(s) - 1].float(), dim=-1)
            scores.append(lp.gather(1, torch.tensor(s[p:]).view(-1, 1)).mean())
        return torch.stack(scores)

    forward(*hf_padded_batch(examples[:1], cfg.pad_token_id))  # warm-up

    def step():  # +eps and -eps: one forward each, one after the other
        return [forward(ids, mask, seqs, starts) for _ in range(2 * args.q)]

    info = {"weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "lora": lora, "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "logits_mib_per_forward": ids.numel() * cfg.vocab_size * 4 / 2**20}
    return step, info


def measure(args) -> dict:
    torch.manual_seed(0)
    kind, shape = args.measure, args.shape
    if kind == "hf-mezo":
        step, info = _hf_setup(args, shape)
    else:
        step, info = _flashzo_setup(args, shape, "all" if kind == "flashzo-sharing" else "none")
    _reset_peak()
    rss0, _ = _rss_kib()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    _, hwm = _rss_kib()
    return {"kind": kind, "shape": shape, "peak_forward_mib": (hwm - rss0) / 1024, "rss_before_mib": rss0 / 1024,
            "peak_rss_mib": hwm / 1024, "step_seconds": seconds, **info}


def run_measurement(args, kind: str, shape: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", kind, "--shape", shape, "--model", args.model,
           "--q", str(args.q), "--lora-r", str(args.lora_r), "--seed", str(args.seed)]
    if args.lora_from_layer is not None:
        cmd += ["--lora-from-layer", str(args.lora_from_layer)]
    if args.smoke:
        cmd.append("--smoke")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    # Run outside the checkout: its kernels/ folder must not shadow anything on sys.path.
    out = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {kind}/{shape} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"# KV sharing in one MeZO step ({m['model']}, q={m['q']})",
        "",
        f"Device: {m['device']} ({m['cpu']}, {m['threads']} threads), dtype {m['dtype']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, commit {m['commit']}. LoRA {m['lora']}.",
        "",
        "Tokens per step (token-equivalents: token-layers / layers; HF counts padding):",
        "",
        "| shape | prompt len | HF MeZO (padded, 2 fwd) | flashzo none | flashzo candidates | flashzo sharing "
        "| sharing vs none | sharing vs HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        t = r["tokens"]
        pl = t["prompt_len"]
        lines.append(
            f"| {r['shape']} | {pl['min']}-{pl['max']} (mean {pl['mean']:.0f}) | {t['hf_mezo_tokens']} "
            f"| {t['flashzo_none_tokens']:.0f} | {t['flashzo_candidates_tokens']:.0f} "
            f"| {t['flashzo_sharing_tokens']:.0f} "
            f"| {t['flashzo_sharing_tokens'] / t['flashzo_none_tokens']:.2f}x "
            f"| {t['flashzo_sharing_tokens'] / t['hf_mezo_tokens']:.2f}x |")
    if report.get("fork_variant"):
        fv = report["fork_variant"]
        lines += ["", f"With LoRA on layers {fv['lora_layers']} only (fork at layer {fv['fork_layer']}), "
                  "flashzo sharing computes " + ", ".join(
                      f"{s}: {c:.0f}" for s, c in fv["flashzo_sharing_tokens"].items()) + " token-equivalents."]
    if report["results"] and report["results"][0].get("memory"):
        lines += [
            "",
            "Peak memory one step's forward adds on top of the weights (MiB, peak RSS delta in a fresh "
            "process; see the method in bench/report_sharing.py), and the step's wall time on this CPU "
            f"(indicative only: load average {m['load_average_at_start'][0]:.1f} on {os.cpu_count()} cores "
            "when the run started):",
            "",
            "| shape | HF MeZO | flashzo none | flashzo sharing | HF / sharing | HF s/step | sharing s/step "
            "| weights MiB (flashzo / HF) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["results"]:
            mem = r["memory"]
            hf, no, sh = mem["hf-mezo"], mem["flashzo-none"], mem["flashzo-sharing"]
            lines.append(
                f"| {r['shape']} | {hf['peak_forward_mib']:.0f} | {no['peak_forward_mib']:.0f} "
                f"| {sh['peak_forward_mib']:.0f} | {hf['peak_forward_mib'] / max(sh['peak_forward_mib'], 1e-9):.1f}x "
                f"| {hf['step_seconds']:.2f} | {sh['step_seconds']:.2f} "
                f"| {sh['weights_mib']:.0f} / {hf['weights_mib']:.0f} |")
        lines += ["", f"HF: full logits are {report['results'][-1]['memory']['hf-mezo']['logits_mib_per_forward']:.0f}"
                  f" MiB per forward for the last shape; attention implementation "
                  f"{report['results'][-1]['memory']['hf-mezo']['attn_implementation']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = [r["shape"] for r in report["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.27
    for k, (key, label) in enumerate([("hf_mezo_tokens", "HF MeZO"), ("flashzo_none_tokens", "flashzo none"),
                                      ("flashzo_sharing_tokens", "flashzo sharing")]):
        axes[0].bar([i + (k - 1) * width for i in range(len(shapes))],
                    [r["tokens"][key] for r in report["results"]], width, label=label)
    axes[0].set_title("tokens per step")
    if report["results"][0].get("memory"):
        for k, kind in enumerate(("hf-mezo", "flashzo-none", "flashzo-sharing")):
            axes[1].bar([i + (k - 1) * width for i in range(len(shapes))],
                        [r["memory"][kind]["peak_forward_mib"] for r in report["results"]], width, label=kind)
        axes[1].set_title("peak forward memory (MiB)")
    for ax in axes:
        ax.set_xticks(range(len(shapes)), shapes)
        ax.legend()
    fig.suptitle(f"{report['meta']['model']}, q={report['meta']['q']}, {report['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m", help="OPT preset whose shape the random model takes")
    p.add_argument("--smoke", action="store_true", help="a tiny model (opt-tiny), seconds; writes *_smoke.*")
    p.add_argument("--shapes", default="sst2,rte", help=f"comma-separated batch shapes from {list(SHAPES)}")
    p.add_argument("--q", type=int, default=1, help="perturbations per step (2q signed copies)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (q_proj, v_proj)")
    p.add_argument("--lora-from-layer", type=int, default=None,
                   help="adapt layers from this one up (default: every layer, so no trunk fork)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--skip-memory", action="store_true", help="count tokens only (no model is run)")
    p.add_argument("--out-dir", default=RESULTS, help="where sharing_report.{json,md,png} go")
    p.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args)))
        return

    import transformers
    from tqdm import tqdm

    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {list(SHAPES)}")
    cfg = model_config(args)
    lcfg = lora_config(args, cfg.num_hidden_layers)
    report = {"meta": {
        "model": "opt-tiny" if args.smoke else args.model, "device": "cpu", "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "dtype": "float32", "torch": torch.__version__,
        "transformers": transformers.__version__, "commit": git_commit(), "q": args.q,
        "lora": f"r={lcfg.r} alpha={lcfg.alpha} {'+'.join(lcfg.target_modules)} layers="
                f"{'all' if lcfg.layers is None else list(lcfg.layers)}",
        "attention_backend": "torch", "shapes": {s: SHAPES[s] for s in shapes},
        "memory_method": "peak RSS delta (VmHWM after clear_refs reset) around one step's forward(s) in a "
                         "fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536, after a warm-up forward",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_start": list(os.getloadavg()),
    }, "results": []}
    todo = [] if args.skip_memory else [(s, k) for s in shapes for k in MEASUREMENTS]
    memory: dict = {}
    for s, k in tqdm(todo, desc="measurements", disable=not todo):
        memory.setdefault(s, {})[k] = run_measurement(args, k, s)
    for s in shapes:
        report["results"].append({"shape": s, "tokens": token_counts(args, s), "memory": memory.get(s)})
    if args.lora_from_layer is None:  # what the trunk fork adds when only the upper half is adapted
        half = cfg.num_hidden_layers // 2
        variant = argparse.Namespace(**{**vars(args), "lora_from_layer": half})
        report["fork_variant"] = {
            "lora_layers": f"{half}-{cfg.num_hidden_layers - 1}", "fork_layer": half,
            "flashzo_sharing_tokens": {s: token_counts(variant, s)["flashzo_sharing_tokens"] for s in shapes}}

    stem = os.path.join(args.out_dir, "sharing_report" + ("_smoke" if args.smoke else ""))
    write_report(stem, report, markdown, plot)


if __name__ == "__main__":
    main()
