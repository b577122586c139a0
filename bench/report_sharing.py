"""What KV sharing saves in one MeZO step: tokens computed and the forward's peak memory.

Two batch shapes from the MeZO paper's tasks, with seeded random token ids:

    sst2: 16 examples, prompts of 12-48 tokens, two one-token candidates
    rte:  16 examples, prompts of 60-250 tokens, two one-token candidates

and q=1 (one perturbation: a +eps and a -eps copy), on an opt-125m-shaped model with random weights
(fp32, CPU) and a LoRA adapter on q_proj, v_proj with r=8.

Tokens per step:
    flashzo, sharing    plan_batch(sharing="all", fork=True): each prompt once per copy, the
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
runs a warm-up forward on a one-example batch, then bench/harness.py's peak_memory: gc.collect() and
malloc_trim(0), the kernel's peak-RSS counter reset (`echo 5 > /proc/self/clear_refs`), the measured
forward(s), VmHWM from /proc/self/status. "peak forward MiB" = VmHWM - VmRSS before the forward: the
memory the forward itself adds on top of the model's weights (tracemalloc does not see torch's CPU
allocations). On a GPU the same comparison is torch.cuda.max_memory_allocated (not done here).

    python bench/report_sharing.py            # opt-125m, a few minutes on a CPU
    python bench/report_sharing.py --smoke    # a tiny model, seconds

Writes bench/results/sharing_report.{json,csv,md,png} (the smoke run: sharing_report_smoke.*) in
bench/harness.py's format: one row per shape, the memory figures of each path prefixed with it
(hf_mezo_, flashzo_none_, flashzo_sharing_).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import engine_batch
import harness
import torch

RESULTS = harness.RESULTS
SHAPES = {
    "sst2": dict(num_examples=16, prompt_len=(12, 48), num_candidates=2, candidate_len=1),
    "rte": dict(num_examples=16, prompt_len=(60, 250), num_candidates=2, candidate_len=1),
}
MEASUREMENTS = ("flashzo-sharing", "flashzo-none", "hf-mezo")
MEMORY_FIELDS = ("peak_forward_mib", "rss_before_mib", "peak_rss_mib", "p20_ms", "p50_ms", "p80_ms", "reps",
                 "weights_mib")
HF_FIELDS = ("lora", "attn_implementation", "logits_mib_per_forward")


def prefix(kind: str) -> str:
    """"hf-mezo" -> "hf_mezo_": the prefix of a path's fields in a row."""
    return kind.replace("-", "_") + "_"


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
    """Tokens one step computes on each path (no model needed): the shape's row without memory."""
    from flashzo.engine import LoRAAdapter
    from flashzo.engine.batch import plan_batch
    from flashzo.engine.example import Limits, check_examples

    cfg = model_config(args)
    L = cfg.num_hidden_layers
    examples = make_examples(shape, cfg.vocab_size, args.seed)
    copies = signed_copies(args.q)
    lcfg = lora_config(args, L)
    ad = LoRAAdapter.empty(lcfg, cfg)
    check_examples(examples, Limits.of(cfg), what="examples", training=False)  # what a model's build_batch checks
    kw = dict(adapters=[ad], eps=1e-3, num_layers=L, device="cpu")
    shared = plan_batch(examples, copies, sharing="all", fork=True, **kw)
    cands = plan_batch(examples, copies, sharing="candidates", fork=True, **kw)
    none = plan_batch(examples, copies, sharing="none", fork=False, **kw)
    shared, cands, none = (engine_batch.batch_counts(b, ad, L) for b in (shared, cands, none))
    ids, _, seqs, _ = hf_padded_batch(examples, cfg.pad_token_id)
    prompt_lens = [len(ex.prompt) for ex in examples]
    return {
        "shape": shape,
        "examples": len(examples),
        "sequences": len(seqs),
        "prompt_len_min": min(prompt_lens), "prompt_len_max": max(prompt_lens),
        "prompt_len_mean": sum(prompt_lens) / len(prompt_lens),
        "copies": len(copies),
        "lowest_adapted_layer": ad.lowest_layer,
        "fork_layer": shared.fork_layer,
        "flashzo_sharing_rows": shared.rows,
        "flashzo_sharing_trunk_rows": shared.trunk_rows,
        "flashzo_sharing_tokens": shared.token_layers / L,
        "flashzo_candidates_tokens": cands.token_layers / L,
        "flashzo_none_tokens": none.token_layers / L,
        "hf_mezo_tokens": 2 * args.q * ids.numel(),  # 2q padded forwards per step
        "hf_mezo_padding_tokens": 2 * args.q * (ids.numel() - sum(map(len, seqs))),
        "hf_mezo_shape": list(ids.shape),
    }


# --------------------------------------------------------------------------------------------------
# One measurement, in a fresh process


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
    m = harness.peak_memory(step, "cpu")
    return {"kind": kind, "shape": shape, "peak_forward_mib": m["step_mib"], "rss_before_mib": m["loaded_mib"],
            "peak_rss_mib": m["peak_mib"], **harness.timing_fields(m["ms_all"]), "reps": len(m["ms_all"]),
            "method": m["method"], **info}


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


def markdown(results: dict) -> str:
    m, rows = results["meta"], results["rows"]
    lines = [
        f"# KV sharing in one MeZO step ({m['model']}, q={m['q']})",
        "",
        f"Device: {m['device']}, dtype {m['dtype']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, commit {m['commit']}. LoRA {m['lora']}.",
        "",
        "Tokens per step (token-equivalents: token-layers / layers; HF counts padding):",
        "",
        "| shape | prompt len | HF MeZO (padded, 2 fwd) | flashzo none | flashzo candidates | flashzo sharing "
        "| sharing vs none | sharing vs HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['prompt_len_min']}-{r['prompt_len_max']} (mean {r['prompt_len_mean']:.0f}) "
            f"| {r['hf_mezo_tokens']} | {r['flashzo_none_tokens']:.0f} | {r['flashzo_candidates_tokens']:.0f} "
            f"| {r['flashzo_sharing_tokens']:.0f} "
            f"| {r['flashzo_sharing_tokens'] / r['flashzo_none_tokens']:.2f}x "
            f"| {r['flashzo_sharing_tokens'] / r['hf_mezo_tokens']:.2f}x |")
    if "fork_variant_lora_layers" in m:
        lines += ["", f"With LoRA on layers {m['fork_variant_lora_layers']} only (fork at layer "
                  f"{m['fork_variant_fork_layer']}), flashzo sharing computes " + ", ".join(
                      f"{r['shape']}: {r['fork_variant_sharing_tokens']:.0f}" for r in rows) + " token-equivalents."]
    if rows and rows[0].get("hf_mezo_peak_forward_mib") is not None:
        lines += [
            "",
            "Peak memory one step's forward adds on top of the weights (MiB, peak RSS delta in a fresh "
            "process; see the method in bench/report_sharing.py), and the step's wall time on this CPU "
            f"(indicative only: load average {m['load_average'][0]:.1f} on {m['cores']} cores "
            "when the run started):",
            "",
            "| shape | HF MeZO | flashzo none | flashzo sharing | HF / sharing | HF s/step | sharing s/step "
            "| weights MiB (flashzo / HF) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            hf, sh = r["hf_mezo_peak_forward_mib"], r["flashzo_sharing_peak_forward_mib"]
            lines.append(
                f"| {r['shape']} | {hf:.0f} | {r['flashzo_none_peak_forward_mib']:.0f} "
                f"| {sh:.0f} | {hf / max(sh, 1e-9):.1f}x "
                f"| {r['hf_mezo_p50_ms'] / 1e3:.2f} | {r['flashzo_sharing_p50_ms'] / 1e3:.2f} "
                f"| {r['flashzo_sharing_weights_mib']:.0f} / {r['hf_mezo_weights_mib']:.0f} |")
        lines += ["", f"HF: full logits are {rows[-1]['hf_mezo_logits_mib_per_forward']:.0f}"
                  f" MiB per forward for the last shape; attention implementation "
                  f"{rows[-1]['hf_mezo_attn_implementation']}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = results["rows"]
    shapes = [r["shape"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.27
    for k, (key, label) in enumerate([("hf_mezo_tokens", "HF MeZO"), ("flashzo_none_tokens", "flashzo none"),
                                      ("flashzo_sharing_tokens", "flashzo sharing")]):
        axes[0].bar([i + (k - 1) * width for i in range(len(shapes))], [r[key] for r in rows], width, label=label)
    axes[0].set_title("tokens per step")
    if rows[0].get("hf_mezo_peak_forward_mib") is not None:
        for k, kind in enumerate(("hf-mezo", "flashzo-none", "flashzo-sharing")):
            axes[1].bar([i + (k - 1) * width for i in range(len(shapes))],
                        [r[prefix(kind) + "peak_forward_mib"] for r in rows], width, label=kind)
        axes[1].set_title("peak forward memory (MiB)")
    for ax in axes:
        ax.set_xticks(range(len(shapes)), shapes)
        ax.legend()
    fig.suptitle(f"{results['meta']['model']}, q={results['meta']['q']}, {results['meta']['device']}")
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
    p.add_argument("--out-dir", default=RESULTS, help="where sharing_report.{json,csv,md,png} go")
    p.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args)))
        return

    from tqdm import tqdm

    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {list(SHAPES)}")
    cfg = model_config(args)
    lcfg = lora_config(args, cfg.num_hidden_layers)
    meta = harness.run_meta(
        "sharing", "cpu", model="opt-tiny" if args.smoke else args.model, dtype="float32", q=args.q,
        lora=f"r={lcfg.r} alpha={lcfg.alpha} {'+'.join(lcfg.target_modules)} layers="
             f"{'all' if lcfg.layers is None else list(lcfg.layers)}",
        attention_backend="torch", shapes={s: SHAPES[s] for s in shapes},
        memory_method="peak RSS delta (VmHWM after clear_refs reset) around one step's forward(s) in a "
                      "fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536, after a warm-up forward")
    todo = [] if args.skip_memory else [(s, k) for s in shapes for k in MEASUREMENTS]
    memory: dict = {}
    for s, k in tqdm(todo, desc="measurements", disable=not todo):
        memory.setdefault(s, {})[k] = run_measurement(args, k, s)
    rows = [token_counts(args, s) for s in shapes]
    for row in rows:
        for kind, m in memory.get(row["shape"], {}).items():
            row.update({prefix(kind) + f: m[f] for f in MEMORY_FIELDS + (HF_FIELDS if kind == "hf-mezo" else ())})
            row["memory_method"] = m["method"]
    if args.lora_from_layer is None:  # what the trunk fork adds when only the upper half is adapted
        half = cfg.num_hidden_layers // 2
        variant = argparse.Namespace(**{**vars(args), "lora_from_layer": half})
        meta.update(fork_variant_lora_layers=f"{half}-{cfg.num_hidden_layers - 1}", fork_variant_fork_layer=half)
        for row in rows:
            row["fork_variant_sharing_tokens"] = token_counts(variant, row["shape"])["flashzo_sharing_tokens"]
    meta["load_average_end"] = harness.load_average()

    stem = os.path.join(args.out_dir, "sharing_report" + ("_smoke" if args.smoke else ""))
    harness.write_results(stem, {"meta": meta, "rows": rows}, markdown=markdown, plot=plot, echo=True)


if __name__ == "__main__":
    main()
