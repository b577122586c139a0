"""Batch building (engine/batch.py): every KV-sharing path equals the computation that shares nothing.

A tiny random OPT in fp32 on the torch attention backend scores the same examples with
sharing="all" (radix tree), "candidates" (a prompt per example) and "none" (every sequence on its
own), with and without the trunk fork, and copy by copy; the batch layout's invariants (no padding,
every row written once, page tables) are checked directly.
"""

import pytest
import torch

import flashzo
from flashzo.engine import Copy, Example, LoRAAdapter, LoRAConfig, OPTConfig, OPTModel, build_batch, invariant
from flashzo.engine.batch import plan_batch

VOCAB = 97
CFG = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=256)
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    m = OPTModel.from_config(CFG, seed=0)
    m.set_attention_backend("torch")
    return m


def _adapter(layers=None, seed=1):
    ad = LoRAAdapter.init(LoRAConfig(r=4, target_modules=("q_proj", "v_proj", "fc1"), layers=layers), CFG)
    ad.buffer.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed))  # B nonzero
    return ad


def _tokens(g, n):
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _example_sets():
    g = torch.Generator().manual_seed(0)
    few_shot = _tokens(g, 23)  # a demonstration block common to several prompts
    dup = _tokens(g, 9)
    return {
        "two_candidates": [Example(_tokens(g, n), candidates=[[5], [6]], label=n % 2) for n in (1, 12, 31)],
        "four_candidates": [  # multi-token candidates, one the prefix of another
            Example(_tokens(g, 17), candidates=[[7], [7, 8], [7, 8, 9], [10, 11]], label=2),
            Example(_tokens(g, 4), candidates=[[12, 13, 14], [12], [15], [16]], label=0),
        ],
        "few_shot": [Example(few_shot + _tokens(g, n), candidates=[[5], [6]], label=0) for n in (3, 8, 1)],
        "duplicates": [Example(dup, candidates=[[5], [6]], label=0), Example(dup, candidates=[[5], [6]], label=1),
                       Example(dup + [5], candidates=[[6], [5, 6]], label=1)],
        "lm": [Example(few_shot[:5], target=few_shot[5:]), Example(few_shot[:9], target=_tokens(g, 6)),
               Example(_tokens(g, 1), target=_tokens(g, 40))],
        "mixed": [Example(few_shot + _tokens(g, 4), candidates=[[5], [5, 6], [7]], label=1),
                  Example(few_shot[:11], target=few_shot[11:] + _tokens(g, 3)),
                  Example(dup, candidates=[[8, 9], [8]], label=0)],
    }


EXAMPLES = _example_sets()
SIGNED = [Copy(0, 11, 1), Copy(0, 11, -1), Copy(0, 12, 1), Copy(0, 12, -1)]


def _score(model, examples, copies=None, **kw):
    batch = model.build_batch(examples, list(copies or [Copy()]), **kw)
    return batch, model.score(batch)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_sharing_equals_no_sharing_plain(model, name):
    exs = EXAMPLES[name]
    _, ref = _score(model, exs, sharing="none")
    for sharing in ("all", "candidates"):
        batch, out = _score(model, exs, sharing=sharing)
        torch.testing.assert_close(out, ref, **TOL)
    assert batch.stats.tokens_per_copy <= batch.stats.tokens_unshared


@pytest.mark.parametrize("name", ["four_candidates", "mixed"])
def test_sharing_and_fork_equal_no_sharing_signed(model, name):
    exs = EXAMPLES[name]
    ad = _adapter(layers=(2, 3))
    kw = dict(adapters=[ad], eps=0.05)
    ref_batch, ref = _score(model, exs, SIGNED, sharing="none", fork=False, **kw)
    assert ref_batch.inputs.trunk_meta is None
    for sharing in ("all", "candidates", "none"):
        for fork in (True, False):
            batch, out = _score(model, exs, SIGNED, sharing=sharing, fork=fork, **kw)
            assert (batch.inputs.trunk_meta is not None) == fork and batch.inputs.fork_layer == (2 if fork else 0)
            torch.testing.assert_close(out, ref, **TOL)
    # The signed copies differ (the test could fail), and +eps / -eps are not mirror images of 0.
    per_copy = ref.view(len(SIGNED), -1)
    assert (per_copy[0] - per_copy[1]).abs().max() > 1e-3
    assert (per_copy[0] - per_copy[2]).abs().max() > 1e-3


@pytest.mark.parametrize("sharing", ["all", "none"])
def test_each_copy_equals_scoring_it_alone(model, sharing):
    exs = EXAMPLES["mixed"] + EXAMPLES["two_candidates"]
    ad = _adapter(layers=(2, 3))
    batch, out = _score(model, exs, SIGNED, adapters=[ad], eps=0.05, sharing=sharing)
    assert batch.inputs.trunk_meta is not None
    for ci, copy in enumerate(SIGNED):
        alone_batch, alone = _score(model, exs, [copy], adapters=[ad], eps=0.05, sharing=sharing)
        sel = torch.tensor([batch.readout.groups[g][0] == ci for g in batch.readout.req_group.tolist()])
        torch.testing.assert_close(out[sel], alone, **TOL)
        assert [info[1:] for info in alone_batch.readout.groups] == \
            [info[1:] for info in batch.readout.groups if info[0] == ci]


def _rows_per_projection(model, batch):
    """{(layer, name): rows} that each q/k/v projection of the forward was computed on."""
    model.trace = []
    try:
        out = model.score(batch)
        rows = {(layer, name): n for layer, name, n in model.trace if name in ("q_proj", "k_proj", "v_proj")}
    finally:
        model.trace = None
    return rows, out


@pytest.mark.parametrize("layers,targets", [(None, ("q_proj", "v_proj", "fc1")), ((2, 3), ("k_proj",)),
                                            (None, ("q_proj", "k_proj", "v_proj"))])
def test_fork_layer_runs_unadapted_projections_once(model, layers, targets):
    """The fork layer's input is the same for every copy: its projections without an adapter run on
    the trunk's rows only (docs/design.md, "Sharing": K/V of an unadapted projection), and the
    scores equal the computation that shares nothing."""
    exs = EXAMPLES["few_shot"]
    ad = LoRAAdapter.init(LoRAConfig(r=4, target_modules=targets, layers=layers), CFG)
    ad.buffer.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    kw = dict(adapters=[ad], eps=0.05)
    batch = model.build_batch(exs, SIGNED, **kw)
    lowest = ad.lowest_layer
    assert batch.inputs.fork_layer == lowest and batch.inputs.fork_index is not None
    assert (batch.inputs.trunk_meta is None) == (lowest == 0)
    trunk, signed = batch.stats.trunk_tokens, batch.stats.num_tokens
    assert signed == len(SIGNED) * trunk
    rows, out = _rows_per_projection(model, batch)
    for (layer, name), n in rows.items():
        if layer < lowest:
            assert n == trunk
        elif layer == lowest:
            assert n == (signed if (layer, name) in ad.slots else trunk), (layer, name)
        else:
            assert n == signed, (layer, name)
    ref_batch = model.build_batch(exs, SIGNED, sharing="none", fork=False, **kw)
    ref_rows, ref = _rows_per_projection(model, ref_batch)
    assert set(ref_rows.values()) == {ref_batch.stats.num_tokens}
    torch.testing.assert_close(out, ref, **TOL)
    per_copy = ref.view(len(SIGNED), -1)  # the copies differ: the test could fail
    assert (per_copy[0] - per_copy[1]).abs().max() > 1e-3


def test_examples_per_copy(model):
    exs = EXAMPLES["mixed"]
    ad = _adapter(layers=(1,))
    copies = [Copy(0, 3, 1), Copy(0, 3, -1)]
    batch, out = _score(model, exs, copies, adapters=[ad], eps=0.05, examples_per_copy=[(0, 1), (2,)])
    assert batch.inputs.trunk_meta is None  # different layouts cannot fork
    _, a = _score(model, exs[:2], copies[:1], adapters=[ad], eps=0.05)
    _, b = _score(model, exs[2:], copies[1:], adapters=[ad], eps=0.05)
    torch.testing.assert_close(out, torch.cat([a, b]), **TOL)


def test_token_logprobs_match_across_sharing(model):
    seqs = [[4, 5, 6, 7, 8], [4, 5, 6], [4, 5, 9, 10], [30]]
    a = model.token_logprobs(seqs, sharing="all")
    b = model.token_logprobs(seqs, sharing="none")
    assert [t.shape[0] for t in a] == [4, 2, 3, 0]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


# ------------------------------------------------------------------------------------------------
# Layout invariants (no model)


def _build(exs, copies=None, **kw):
    kw.setdefault("num_layers", 4)
    return plan_batch(exs, list(copies or [Copy()]), device="cpu", **kw)


def _all_sequences(exs):
    return [toks for ex in exs for toks, _ in ex.sequences()]


def _distinct_prefixes(seqs):
    return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("sharing", ["all", "candidates", "none"])
@pytest.mark.parametrize("mode", [False, True], ids=["plain", "batch-invariant"])
def test_layout_invariants(name, sharing, mode):
    exs = EXAMPLES[name]
    seqs = _all_sequences(exs)
    with invariant.batch_invariant_mode(mode):
        batch = _build(exs, [Copy(), Copy()], sharing=sharing, fork=False)
    meta = batch.inputs.meta
    T = meta.num_tokens
    qo, kv = meta.qo_indptr.tolist(), meta.kv_indptr.tolist()
    # No padding: the rows are exactly the nodes' tokens, and what each mode should compute.
    assert T == qo[-1] == sum(b - a for a, b in zip(qo, qo[1:])) == batch.inputs.input_ids.numel()
    radix = sum(_distinct_prefixes(_all_sequences([ex])) for ex in exs) if mode else _distinct_prefixes(seqs)
    expected = {"none": sum(map(len, seqs)),
                "candidates": sum(len(ex.prompt) + sum(len(t) - len(ex.prompt) for t, _ in ex.sequences())
                                  for ex in exs),
                "all": radix}[sharing]
    assert batch.stats.tokens_per_copy == expected and T == 2 * expected
    assert batch.stats.tokens_unshared == sum(map(len, seqs))
    # Every row is written exactly once, and page tables only list written rows.
    assert sorted(meta.out_cache_loc.tolist()) == list(range(T))
    assert meta.kv_indices.min() >= 0 and meta.kv_indices.max() < T
    # A node's page table ends with its own rows, and spells a prefix of one of the sequences.
    row_tok = torch.empty(T, dtype=torch.long)
    row_pos = torch.empty(T, dtype=torch.long)
    row_tok[meta.out_cache_loc] = batch.inputs.input_ids
    row_pos[meta.out_cache_loc] = batch.inputs.positions
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    for s in range(meta.num_seqs):
        table = meta.kv_indices[kv[s]:kv[s + 1]].long()
        own = meta.out_cache_loc[qo[s]:qo[s + 1]]
        assert torch.equal(table[-own.numel():], own)
        assert tuple(row_tok[table].tolist()) in prefixes
        assert row_pos[table].tolist() == list(range(table.numel()))
        copy = int(own[0]) // batch.stats.tokens_per_copy  # page tables never cross copies
        assert (table // batch.stats.tokens_per_copy == copy).all()
    # Readouts: one per scored token, each reading a row that holds the previous token.
    n_scored = sum(len(t) - p for ex in exs for t, p in ex.sequences())
    assert batch.readout.req_row.numel() == 2 * n_scored and batch.readout.num_groups == 2 * len(seqs)
    rows = batch.readout.rows[batch.readout.req_row]
    for k, g in enumerate(batch.readout.req_group.tolist()):
        ci, e, c = batch.readout.groups[g]
        toks, scored_from = exs[e].sequences()[c]
        assert rows[k] // batch.stats.tokens_per_copy == ci
        p = row_pos[rows[k]].item() + 1
        assert p >= scored_from and toks[p] == batch.readout.req_target[k].item() and toks[p - 1] == row_tok[rows[k]]


def _attention_shapes(batch):
    meta = batch.inputs.meta
    qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
    return [(qo[s + 1] - qo[s], kv[s + 1] - kv[s]) for s in range(meta.num_seqs)]


@pytest.mark.parametrize("name", ["few_shot", "duplicates", "lm", "mixed"])
def test_in_the_mode_an_example_is_laid_out_as_alone(name):
    """Batch-invariant mode (engine/invariant.py): sharing="all" shares runs only inside an example, so
    every example's attention sequences (new tokens, page-table length) are the ones it has alone, in
    any batch; out of the mode a run common to two examples is computed once, a sequence of its own."""
    exs = EXAMPLES[name]
    for order in (exs, exs[::-1]):
        with invariant.batch_invariant_mode(True):
            alone = [s for ex in order for s in _attention_shapes(_build([ex]))]
            assert _attention_shapes(_build(order)) == alone
            assert _attention_shapes(_build(order, batch_invariant=False)) != alone  # the argument overrides
        assert _attention_shapes(_build(order)) != alone  # out of the mode: runs shared across examples


def test_token_counts_hand_example():
    # Two prompts of 10 tokens sharing their first 6, each with two one-token candidates.
    common = [3, 4, 5, 6, 7, 8]
    exs = [Example(common + [10, 11, 12, 13], candidates=[[20], [21]]),
           Example(common + [14, 15, 16, 17], candidates=[[20], [21]])]
    none = _build(exs, sharing="none")
    cands = _build(exs, sharing="candidates")
    radix = _build(exs, sharing="all")
    assert none.stats.tokens_per_copy == 2 * 2 * 11 == 44
    assert cands.stats.tokens_per_copy == 2 * (10 + 2) == 24
    assert radix.stats.tokens_per_copy == 6 + 2 * (4 + 2) == 18
    with invariant.batch_invariant_mode(True):  # the common run is each example's own
        assert _build(exs, sharing="all").stats.tokens_per_copy == 2 * (10 + 2) == 24
    assert none.stats.num_tokens - radix.stats.num_tokens == 26
    # Two signed copies, the adapter's lowest layer 2 of 4: layers 0-1 run once on the trunk.
    ad = _adapter(layers=(2, 3))
    forked = _build(exs, [Copy(0, 1, 1), Copy(0, 1, -1)], adapters=[ad], eps=0.1)
    assert forked.inputs.fork_layer == 2 and forked.stats.trunk_tokens == 18 and forked.stats.num_tokens == 36
    assert forked.stats.token_layers == 18 * 2 + 36 * 2
    assert forked.inputs.input_ids.numel() == 18 and forked.inputs.fork_index.tolist() == list(range(18)) * 2
    unforked = _build(exs, [Copy(0, 1, 1), Copy(0, 1, -1)], adapters=[ad], eps=0.1, fork=False)
    assert unforked.stats.token_layers == 36 * 4 and unforked.inputs.input_ids.numel() == 36
    assert forked.inputs.lora.segments.indptr.tolist() == [0, 18, 36]


def test_example_validation():
    with pytest.raises(ValueError, match="either"):
        Example([1, 2])
    with pytest.raises(ValueError, match="both"):
        Example([1, 2], candidates=[[3]], target=[4])
    with pytest.raises(ValueError, match="prompt is empty"):
        Example([], target=[4])
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        Example([1], candidates=[[3], []])
    with pytest.raises(ValueError, match="label"):
        Example([1], candidates=[[3], [4]], label=2)
    assert Example([1], target=[]).sequences() == [([1], 1)]  # nothing scored (token_logprobs of 1 token)
    # Token ids may come as tensors; they are keyed as ints.
    ex = Example(torch.tensor([1, 2]), candidates=[torch.tensor([3])])
    assert ex.sequences() == [([1, 2, 3], 2)]


def test_build_batch_errors():
    exs = [Example([1, 2], candidates=[[3]])]
    with pytest.raises(ValueError, match="sharing"):
        _build(exs, sharing="some")
    # flashzo.engine.build_batch, the deprecated model-less entry point, still checks and builds
    with pytest.raises(ValueError, match="copies"), pytest.warns(DeprecationWarning):
        build_batch(exs, [], num_layers=2, max_positions=8, device="cpu")
    with pytest.raises(ValueError, match="positions"), pytest.warns(DeprecationWarning):
        build_batch([Example(list(range(8)), target=[1])], [Copy()], num_layers=2, max_positions=8,
                    device="cpu")
    with pytest.raises(ValueError, match="examples_per_copy"):
        _build(exs, [Copy(), Copy()], examples_per_copy=[(0,)])


def test_build_batch_is_the_one_entry_point(model):
    """CausalLM.build_batch checks the examples unless told they are checked; the older names still
    build the same batch, with a DeprecationWarning."""
    exs = [Example([1, 2, 3], candidates=[[4], [5, 6]], label=1), Example([1, 2, 7], candidates=[[4], [8]], label=0)]
    copies, ad = [Copy(0, 3, 1), Copy(0, 3, -1)], _adapter()
    kw = dict(adapters=[ad], eps=1e-2, sharing="candidates")
    ref = model.build_batch(exs, copies, **kw)
    with pytest.warns(DeprecationWarning, match="build_batch"):
        old = model.plan_batch(exs, copies, **kw)
    with pytest.warns(DeprecationWarning, match="build_batch"):
        free = build_batch(exs, copies, num_layers=CFG.num_hidden_layers, max_positions=256, device="cpu", **kw)
    for other in (old, free):
        assert torch.equal(other.inputs.input_ids, ref.inputs.input_ids) and other.stats == ref.stats
        assert torch.equal(other.readout.req_target, ref.readout.req_target)
    assert torch.equal(model.score(old), model.score(ref)) and torch.equal(model.score(free), model.score(ref))
    too_long = [Example([3 + i % 90 for i in range(299)], target=[1])]
    with pytest.raises(flashzo.InputError, match="positions"):
        model.build_batch(too_long)
    assert model.build_batch(too_long, checked=True).stats.num_tokens == 300  # the caller vouched for them
