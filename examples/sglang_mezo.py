"""flashzo inside SGLang, end to end on a CPU: serve an OPT through the plugin, train MeZO through it,
serve the trained adapter through SGLang's LoRA serving. Every number is checked against flashzo.

    python examples/sglang_mezo.py [--out DIR] [--steps N]

Writes DIR/opt-tiny (a random OPT checkpoint with the shapes of flashzo's "opt-tiny" preset, the
model `flashzo demo` trains) and DIR/adapter (the adapter trained here, PEFT format), which
`python -m sglang.launch_server` serves too (see the README).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "flashzo.sglang"  # SGLang's workers inherit it

import torch  # noqa: E402

import flashzo  # noqa: E402
import flashzo.sglang  # noqa: E402  (before sglang: CPU start-up shims)
from flashzo.tasks import synthetic_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/flashzo-sglang", help="output directory (default /tmp/flashzo-sglang)")
    parser.add_argument("--steps", type=int, default=5, help="MeZO steps served by SGLang (default 5)")
    args = parser.parse_args()

    import sglang

    ckpt, adapter_dir = os.path.join(args.out, "opt-tiny"), os.path.join(args.out, "adapter")
    model = flashzo.OPTModel.from_config("opt-tiny", seed=0)
    flashzo.save_opt(model, ckpt)
    data = synthetic_task(32, seed=0, vocab_size=model.config.vocab_size, split="train")
    lora = flashzo.LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))

    t0 = time.perf_counter()
    engine = sglang.Engine(model_path=ckpt, device="cpu", attention_backend="torch_native", dtype="float32",
                           skip_tokenizer_init=True, mem_fraction_static=0.05, max_total_tokens=8192,
                           enable_lora=True, lora_backend="torch_native", max_lora_rank=lora.r,
                           lora_target_modules=list(lora.target_modules), log_level="warning")
    print(f"sglang.Engine up in {time.perf_counter() - t0:.0f} s")
    try:
        # 1. serving: SGLang's input log-probs are flashzo's
        seqs = [list(ex.prompt) + list(ex.candidates[ex.label]) for ex in data[:4]]
        outs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                               logprob_start_len=0)
        err = max((torch.tensor([e[0] for e in o["meta_info"]["input_token_logprobs"][1:]]) - ref).abs().max().item()
                  for o, ref in zip(outs, model.token_logprobs(seqs)))
        print(f"serving: max |SGLang - flashzo| log-prob = {err:.1e}")

        # 2. MeZO: the forward passes served by SGLang, the update by flashzo; a twin trained by flashzo alone
        config = flashzo.MeZOConfig(lr=5e-3, eps=1e-3, num_perturbations=2, seed=0)
        served = flashzo.MeZOTrainer(model, lora, config)
        local = flashzo.MeZOTrainer(model, lora, config)
        scorer = flashzo.sglang.SGLangScorer(engine)
        for step in range(args.steps):
            batch = data[8 * step % len(data):][:8]
            got, want = scorer.step(served, batch), local.step(batch)
            print(f"step {step}: loss (SGLang) {got.loss:.6f}  loss (flashzo) {want.loss:.6f}")
        drift = (served.adapter.buffer - local.adapter.buffer).abs().max().item()
        print(f"adapters after {args.steps} steps: max |difference| = {drift:.1e}")
        scorer.close()

        # 3. the trained adapter through SGLang's LoRA serving (per-request lora_path)
        served.adapter.save_pretrained(adapter_dir)
        engine.load_lora_adapter("trained", adapter_dir)
        outs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                               logprob_start_len=0, lora_path=["trained"] * len(seqs))
        err = max((torch.tensor([e[0] for e in o["meta_info"]["input_token_logprobs"][1:]]) - ref).abs().max().item()
                  for o, ref in zip(outs, model.token_logprobs(seqs, adapter=served.adapter)))
        print(f"LoRA serving: max |SGLang - flashzo| log-prob = {err:.1e}")
        print(f"wrote {ckpt} and {adapter_dir}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
