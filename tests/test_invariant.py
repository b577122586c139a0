"""Batch-invariant numerics (engine/invariant.py, docs/design.md "Batch invariance"), bit for bit.

In the mode a job's losses and adapter are the same bits whether it steps alone, beside other jobs
in one forward (flashzo.step_together), with its examples elsewhere in the batch, or under
torch.distributed on 2 processes (tests/test_distributed.py runs those); the service's kill-and-resume
case is in tests/test_serve.py; tests/test_isa.py runs the checks at other thread counts and on other
instruction sets.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashzo
from flashzo import Example, LlamaConfig, LlamaModel, LoRAConfig, MeZOConfig, MeZOTrainer, OPTConfig, OPTModel
from flashzo.engine import invariant
from flashzo.engine.attention import AttentionMetadata, TorchAttentionBackend
from flashzo.errors import InputError

VOCAB = 96
OPT = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                max_position_embeddings=64)
# grouped-query attention: 4 query heads over 2 KV heads
LLAMA = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
TARGETS = {"opt": ("q_proj", "v_proj", "fc1"), "llama": ("q_proj", "v_proj", "gate_proj")}
STEPS = 2


@pytest.fixture(scope="module", params=["opt", "llama"])
def family(request):
    model = OPTModel.from_config(OPT, seed=0) if request.param == "opt" else LlamaModel.from_config(LLAMA, seed=0)
    return request.param, model


def examples(task: str, n: int, seed: int, prefix: tuple = ()) -> list[Example]:
    """n random examples; every prompt starts with `prefix` (a common start, as real prompts have)."""
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    if task == "lm":
        return [Example(prompt=list(prefix) + toks(2, 9), target=toks(1, 7)) for _ in range(n)]
    return [Example(prompt=list(prefix) + toks(2, 12), candidates=[toks(1, 4) for _ in range(3)],
                    label=int(torch.randint(0, 3, (1,), generator=g))) for _ in range(n)]


def trainer(model, name: str, seed: int, *, q: int = 1, on: bool = True) -> MeZOTrainer:
    tr = MeZOTrainer(model, LoRAConfig(r=2, target_modules=TARGETS[name], seed=seed),
                     MeZOConfig(lr=5e-2, eps=1e-2, num_perturbations=q, seed=seed, batch_invariant=on))
    g = torch.Generator().manual_seed(seed)  # B = 0 at init would leave the first forward's LoRA term out
    for slot in tr.adapter.slots.values():
        slot.b.copy_(torch.randn(slot.b.shape, generator=g) * 0.1)
    return tr


def run_job(family, task: str, *, beside: int, first: bool, reverse: bool, on: bool):
    """The job's (losses of every step, final adapter), stepped alone (beside=0) or with `beside` other
    jobs in one forward, placed first or last among them, its own examples in order or reversed."""
    name, model = family
    job = trainer(model, name, 11, q=2, on=on)
    others = [trainer(model, name, 20 + k, on=on) for k in range(beside)]
    data = examples(task, 5, seed=1)
    batches = [examples(task if k % 2 else "cls", 3 + 2 * k, seed=30 + k) for k in range(beside)]
    losses = []
    for _ in range(STEPS):
        mine = data[::-1] if reverse else data
        if beside == 0:
            r = job.step(mine)
        else:
            trainers = [job] + others if first else others + [job]
            bs = [mine] + batches if first else batches + [mine]
            r = flashzo.step_together(trainers, bs)[0 if first else -1]
        losses.append((r.loss_plus, r.loss_minus, r.projected_grads))
    return losses, job.adapter.buffer.clone()


ARRANGEMENTS = [dict(beside=1, first=True, reverse=False), dict(beside=3, first=False, reverse=False),
                dict(beside=3, first=True, reverse=True), dict(beside=0, first=True, reverse=True)]


@pytest.mark.parametrize("task", ["cls", "lm"])
def test_a_job_gets_the_same_bits_whoever_shares_its_forward(family, task):
    alone = run_job(family, task, beside=0, first=True, reverse=False, on=True)
    assert not torch.equal(alone[1], trainer(family[1], family[0], 11).adapter.buffer)  # it trained
    for where in ARRANGEMENTS:
        losses, adapter = run_job(family, task, on=True, **where)
        assert losses == alone[0], where  # == on floats: the same bits
        assert torch.equal(adapter, alone[1]), where


def test_out_of_the_mode_the_forward_runs_the_plain_ops(family, monkeypatch):
    """What the mode changes, seen in the calls flashzo makes (how the platform rounds either way is
    not flashzo's): out of the mode every projection is one F.linear over all the rows of its forward,
    attention runs the backend's padded chunks, and nothing goes through kernels/serial.py; in the
    mode no F.linear runs, every GEMM and row-wise op goes through fixed-size row chunks and every
    sequence is its own attention call, each a single-threaded piece (kernels/serial.py)."""
    import torch.nn.functional as F

    import flashzo.engine.attention as attention
    import flashzo.kernels.rows as rows
    from flashzo.kernels.serial import run_serial

    seen = {"rows": [], "attention": [], "linear": []}

    def spy(kind):
        def run(fn, items):
            items = list(items)
            seen[kind].append(len(items))
            return run_serial(fn, items)
        return run

    linear = F.linear
    monkeypatch.setattr(rows, "run_serial", spy("rows"))
    monkeypatch.setattr(attention, "run_serial", spy("attention"))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen["linear"].append(x.shape[:-1].numel())
                        or linear(x, w, b))
    for on in (False, True):
        for v in seen.values():
            v.clear()
        run_job(family, "cls", beside=1, first=True, reverse=False, on=on)
        if on:
            assert seen["linear"] == [] and seen["rows"] and seen["attention"]
            assert sum(seen["attention"]) > len(seen["attention"])  # one piece per sequence
        else:
            assert seen["rows"] == seen["attention"] == []
            # a projection's call holds all its forward's rows: more than any one example has
            assert max(seen["linear"]) > 11 + 3 * 3  # (prompts of up to 11 tokens, 3 candidates of up to 3)


@pytest.mark.parametrize("prefix", [(), (1, 2, 7, 8)], ids=["random", "common-prefix"])
def test_scores_and_evaluate_are_batch_size_invariant(family, prefix):
    """Also when the prompts share their first tokens (a start token and an instruction): sharing those
    across the examples of a batch would split each example's attention into other calls."""
    name, model = family
    tr = trainer(model, name, 5)
    exs = examples("cls", 9, seed=4, prefix=prefix) + examples("lm", 4, seed=5, prefix=prefix)
    cls, lm = exs[:9], exs[9:]
    for data in (cls, lm):
        ref = tr.evaluate(data, batch_size=len(data))
        for bs in (1, 2, 4):
            assert tr.evaluate(data, batch_size=bs) == ref, bs


def test_torch_attention_gives_a_sequence_the_same_bits_in_any_stage():
    """One sequence's output rows, in stages of 1, 3 and 6 sequences of other lengths (GQA, H=4, KV=2)."""
    from flashzo.engine.attention import KVPool

    g = torch.Generator().manual_seed(0)
    H, KV, D = 4, 2, 16
    lens = [(5, 9), (1, 40), (7, 7), (3, 20), (2, 2), (6, 33)]  # (qo_len, kv_len)
    pool = KVPool(1, KV, D, dtype=torch.float32, device="cpu", capacity=256)
    kb, vb = pool.buffers(0)
    kb.copy_(torch.randn(kb.shape, generator=g))
    vb.copy_(torch.randn(vb.shape, generator=g))
    slots = [torch.randperm(kb.shape[0], generator=g)[:m].tolist() for _, m in lens]
    queries = [torch.randn(n, H, D, generator=g) for n, _ in lens]

    def run(order):
        qo_lens = [lens[s][0] for s in order]
        meta = AttentionMetadata.build(qo_lens, [slots[s] for s in order], [0] * sum(qo_lens), "cpu")
        be = TorchAttentionBackend()
        plan = be.plan(meta, num_heads=H, head_dim=D)
        o = be.forward(torch.cat([queries[s] for s in order]), meta, plan, pool, 0, D ** -0.5)
        qo = meta.qo_indptr_host
        return {s: o[qo[i]:qo[i + 1]] for i, s in enumerate(order)}

    with invariant.batch_invariant_mode(True):
        alone = run([0])[0]
        for order in ([3, 0, 1], [5, 4, 3, 2, 1, 0], [1, 2, 0, 4, 5, 3]):
            assert torch.equal(run(order)[0], alone), order


def test_row_invariant_ops_equal_torch_out_of_the_mode_and_close_in_it():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(37, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    w = torch.randn(48, generator=g)
    assert torch.equal(invariant.linear(x, W, b), torch.nn.functional.linear(x, W, b))
    with invariant.batch_invariant_mode(True):
        torch.testing.assert_close(invariant.linear(x, W, b), torch.nn.functional.linear(x, W, b))
        torch.testing.assert_close(invariant.logsumexp(x), torch.logsumexp(x, -1))
        torch.testing.assert_close(invariant.layer_norm(x, (48,), w, None, 1e-5),
                                   torch.nn.functional.layer_norm(x, (48,), w, None, 1e-5))
        ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(invariant.rms_norm(x, w, 1e-6), ref)


def test_exact_sums():
    vals = [1e308, 1.0, -1e308, 2.0 ** -1074, 1e-300, -3.5, 0.1] * 3
    e = invariant.exact_sum(vals)
    assert invariant.exact_float(e) == math.fsum(vals)
    assert invariant.exact_sum(vals[::-1]) == e  # order-free: the same integer
    parts = [invariant.exact_sum(vals[i::4]) for i in range(4)]
    total = 0
    for p in parts:
        total = invariant.add_exact(total, invariant.from_limbs(invariant.to_limbs(p)))
    assert total == e
    assert math.isnan(invariant.exact_float(invariant.exact_sum([1.0, float("nan")])))
    assert invariant.exact_float(invariant.exact_sum([1.0, float("inf")])) == math.inf
    assert invariant.exact_float(invariant.exact_sum([1e308] * 4)) == math.inf


def test_the_mode_is_per_thread_and_recorded(tmp_path, family):
    name, model = family
    assert not invariant.is_batch_invariant()
    with invariant.batch_invariant_mode(True):
        assert invariant.is_batch_invariant()
        tr = MeZOTrainer(model, LoRAConfig(r=2), MeZOConfig(lr=1e-2, eps=1e-2))
    assert tr.config.batch_invariant is True and not invariant.is_batch_invariant()
    flashzo.set_batch_invariant(True)
    try:
        assert flashzo.is_batch_invariant()
        with flashzo.batch_invariant_mode(False):
            assert not flashzo.is_batch_invariant()
    finally:
        flashzo.set_batch_invariant(False)
    tr.step(examples("cls", 2, seed=0))
    tr.save(tmp_path / "ck")
    assert MeZOTrainer.resume(tmp_path / "ck", model).config.batch_invariant is True
    with pytest.raises(InputError, match="batch_invariant"):
        flashzo.set_batch_invariant(1)
    with pytest.raises(InputError, match="batch_invariant"):
        flashzo.step_together([tr, trainer(model, name, 3, on=False)], [examples("cls", 2, 0)] * 2)


def test_flashinfer_plans_in_the_mode_fix_each_sequence_by_its_own_length():
    """What the FlashInfer backend hands to plan in the mode (checked on a CPU): no split of the keys,
    and one plan per FA2 query-tile class, so a sequence's tile never depends on the others' lengths."""
    from flashzo.engine.attention import flashinfer_plan_args, flashinfer_tile_classes, sub_metadata

    qo_lens, kv_lens = [3, 40, 1, 17, 64, 65, 200], [9, 40, 30, 17, 70, 65, 260]
    slots = [list(range(sum(kv_lens[:s]), sum(kv_lens[:s + 1]))) for s in range(len(kv_lens))]
    meta = AttentionMetadata.build(qo_lens, slots, [0] * sum(qo_lens), "cpu")
    _, kw = flashinfer_plan_args(meta, num_heads=4, head_dim=64, dtype=torch.bfloat16, batch_invariant=True)
    assert kw["disable_split_kv"] is True
    _, kw = flashinfer_plan_args(meta, num_heads=4, head_dim=64, dtype=torch.bfloat16)
    assert "disable_split_kv" not in kw  # out of the mode, FlashInfer's own choice
    assert flashinfer_tile_classes(meta) == [[0, 2], [1, 3, 4], [5, 6]]  # packed qo_len <= 16, <= 64, > 64
    assert flashinfer_tile_classes(meta, group_size=4) == [[0, 2], [1, 3, 4, 5, 6]]  # GQA packs 4 heads per row
    sub, rows = sub_metadata(meta, [1, 4])
    assert sub.qo_indptr_host == [0, 40, 104] and sub.kv_indptr_host == [0, 40, 110]
    assert rows.tolist() == list(range(3, 43)) + list(range(61, 125))
    assert sub.kv_indices.tolist() == slots[1] + slots[4]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_gives_a_sequence_the_same_bits_in_any_stage(dtype):
    pytest.importorskip("flashinfer")
    from flashzo.engine.attention import FlashInferAttentionBackend, KVPool

    g = torch.Generator(device="cuda").manual_seed(0)
    H, KV, D, dev = 8, 2, 128, "cuda"
    lens = [(5, 9), (1, 300), (70, 70), (3, 200), (20, 20), (130, 400)]
    pool = KVPool(1, KV, D, dtype=dtype, device=dev, capacity=2048)
    kb, vb = pool.buffers(0)
    kb.copy_(torch.randn(kb.shape, generator=g, device=dev))
    vb.copy_(torch.randn(vb.shape, generator=g, device=dev))
    slots = [torch.randperm(kb.shape[0], device="cpu")[:m].tolist() for _, m in lens]
    queries = [torch.randn(n, H, D, generator=g, device=dev, dtype=dtype) for n, _ in lens]

    def run(order):
        qo_lens = [lens[s][0] for s in order]
        meta = AttentionMetadata.build(qo_lens, [slots[s] for s in order], [0] * sum(qo_lens), dev)
        be = FlashInferAttentionBackend(device=dev)
        plan = be.plan(meta, num_heads=H, head_dim=D, dtype=dtype, num_kv_heads=KV, sm_scale=D ** -0.5)
        o = be.forward(torch.cat([queries[s] for s in order]), meta, plan, pool, 0, D ** -0.5)
        qo = meta.qo_indptr_host
        return {s: o[qo[i]:qo[i + 1]] for i, s in enumerate(order)}

    with invariant.batch_invariant_mode(True):
        for s in range(len(lens)):
            alone = run([s])[s]
            for order in ([s] + [t for t in range(len(lens)) if t != s], [t for t in range(len(lens)) if t != s] + [s]):
                assert torch.equal(run(order)[s], alone), (s, order)
