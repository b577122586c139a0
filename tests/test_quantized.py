"""Quantized base weights in a model (engine/quantized.py, CausalLM.quantize_ / from_config(quantize=...)).

The contract (docs/design.md, "Quantized weights"): on a CPU a quantized model computes, bit for bit,
what the dense model of its dequantized weights computes: log-probs, every forward a training step
makes (signed copies, several adapters in one forward, the trunk fork or not, every sharing mode),
in and out of the batch-invariant mode, and so the same MeZO trajectory. Tested for OPT (tied head,
LayerNorms, biases) and a grouped-query Llama with an untied head, in int8 and int4 formats with and
without mins. The head is computed in vocabulary blocks (made 64 rows here, so the test's vocabulary
has a partial block); a quantized head is dequantized one block at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch

import flashzo
from flashzo import Example, LlamaConfig, LlamaModel, LoRAConfig, MeZOConfig, MeZOTrainer, OPTConfig, OPTModel
from flashzo.engine import Copy, LoRAAdapter, invariant
from flashzo.engine import model as model_module
from flashzo.engine.quantized import QuantizedEmbedding, QuantizedParameter, QuantSpec, quantized_weights
from flashzo.errors import InputError
from flashzo.kernels import quant_linear

VOCAB = 96
OPT = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=64)
LLAMA = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
MODELS = {"opt": (OPTModel, OPT), "llama": (LlamaModel, LLAMA)}
TARGETS = {"opt": ("q_proj", "v_proj", "fc2"), "llama": ("k_proj", "o_proj", "up_proj")}
SPECS = ("int8", "int8-g16-asym", "int4", "int4-g64-sym")


@pytest.fixture(autouse=True)
def small_head_blocks(monkeypatch):
    """64 vocabulary rows per head GEMM at hidden size 64: the 96-word head is a full block and a partial one."""
    monkeypatch.setattr(model_module, "HEAD_BLOCK", 64 * 64)
    assert model_module.head_rows(64) == 64


def pair(family: str, spec: str):
    """(the quantized model, the dense model of its dequantized weights); q and k scaled up so that
    attention is not near-uniform (a wrong row would then move the log-probs)."""
    cls, cfg = MODELS[family]
    dense = cls.from_config(cfg, seed=1)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "qkv_proj" in name and name.endswith("weight"):
                p.mul_(20.0)
    q = copy.deepcopy(dense).quantize_(spec)
    return q, copy.deepcopy(q).dequantize_(), dense


def examples(n: int, seed: int, kind: str = "mixed") -> list[Example]:
    """n random examples, classification and LM alternating (or only `kind`: "cls", "lm"), sharing a start."""
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prefix = toks(3, 4)  # a common start: the radix tree shares it
    out = []
    for i in range(n):
        if kind == "lm" or (kind == "mixed" and i % 2):
            out.append(Example(prompt=prefix + toks(1, 8), target=toks(1, 5)))
        else:
            out.append(Example(prompt=prefix + toks(2, 9), candidates=[toks(1, 3) for _ in range(3)], label=i % 3))
    return out


def adapters(model, family: str, n: int = 2) -> list[LoRAAdapter]:
    out = []
    for k in range(n):
        ad = LoRAAdapter.init(LoRAConfig(r=2, target_modules=TARGETS[family], layers=(1,), seed=k), model.config)
        g = torch.Generator().manual_seed(10 + k)
        for slot in ad.slots.values():  # B = 0 at init would leave the LoRA term out
            slot.b.copy_(torch.randn(slot.b.shape, generator=g) * 0.1)
        out.append(ad)
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_quantized_model_is_the_dense_model_of_its_dequantized_weights(family, spec):
    q, dq, dense = pair(family, spec)
    assert set(quantized_weights(q)) == set(q.quantizable()) and not quantized_weights(dq)
    assert isinstance(q.decoder.embed_tokens, QuantizedEmbedding)
    seqs = [[5, 17, 40, 3, 88, 21, 9, 60, 2], [7, 1], [5, 17, 40, 33]]
    ads = adapters(q, family)
    copies = [Copy(0, 101, 1), Copy(0, 101, -1), Copy(1, 202, 1), Copy(1, 202, -1), Copy(0)]
    data = examples(6, seed=3)
    for on in (False, True):
        with invariant.batch_invariant_mode(on):
            for a, b in zip(q.token_logprobs(seqs), dq.token_logprobs(seqs), strict=True):
                assert torch.equal(a, b)
            for sharing in ("all", "candidates", "none"):
                for fork in (True, False):  # copies of one adapter and sign 0: the fork needs all to share examples
                    kw = dict(adapters=ads, eps=1e-2, sharing=sharing, fork=fork)
                    lq = q.score(q.build_batch(data, copies, **kw))
                    assert torch.equal(lq, dq.score(dq.build_batch(data, copies, **kw))), (on, sharing, fork)
    # the quantization changed the weights, and the comparison sees a change of one scale
    assert not all(torch.equal(a, b) for a, b in zip(q.token_logprobs(seqs), dense.token_logprobs(seqs)))
    q.decoder.layers[0].self_attn.qkv_proj.weight.scales[0, 0] *= 1.01  # q's row 0 (or its first group)
    assert not all(torch.equal(a, b) for a, b in zip(q.token_logprobs(seqs), dq.token_logprobs(seqs)))


@pytest.mark.parametrize("on", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_mezo_on_a_quantized_base_is_the_dense_run(family, on):
    """Two jobs stepping together (multi-adapter segments, the fork, shared prompts) give the losses and
    adapters of the same jobs on the dense model of the dequantized weights."""
    q, dq, _ = pair(family, "int4")
    runs = []
    for model in (q, dq):
        trainers = [MeZOTrainer(model, LoRAConfig(r=2, target_modules=TARGETS[family], seed=s),
                                MeZOConfig(lr=5e-2, eps=1e-2, seed=s, batch_invariant=on)) for s in (0, 1)]
        losses = [[(r.loss_plus, r.loss_minus) for r in flashzo.step_together(
            trainers, [examples(4, t, "cls"), examples(3, 9 + t, "lm")])] for t in range(3)]
        runs.append((losses, [tr.adapter.buffer.clone() for tr in trainers]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not torch.equal(runs[0][1][0], runs[0][1][1])


def test_from_config_quantizes_the_dense_draws_a_block_of_rows_at_a_time(monkeypatch):
    """from_config(quantize=) quantizes the weights from_config() draws; no fp32 matrix of the model
    exists whole: quantize is handed blocks of at most HEAD_BLOCK values (4096 here: the 96 x 64
    embedding and the 256 x 64 gate/up projection come in several)."""
    dense = LlamaModel.from_config(LLAMA, seed=4)
    want = copy.deepcopy(dense).quantize_("int4")
    sizes = []
    real = model_module.quantize_weight

    def counting(t, *a, **kw):
        sizes.append(t.numel())
        return real(t, *a, **kw)

    monkeypatch.setattr(model_module, "quantize_weight", counting)
    got = LlamaModel.from_config(LLAMA, seed=4, quantize="int4")
    assert max(sizes) <= model_module.HEAD_BLOCK and len(sizes) > len(want.quantizable()), sizes
    for name, holder in quantized_weights(want).items():
        mine = quantized_weights(got)[name]
        assert mine.value.describe() == holder.value.describe() and all(
            torch.equal(getattr(mine, b), getattr(holder, b)) for b in ("data", "scales", "mins")
            if getattr(holder, b) is not None)
    for (n1, p1), (n2, p2) in zip(dense.named_parameters(), got.named_parameters()):
        if n2 == n1:
            assert torch.equal(p1, p2)
    assert got.quantization == {"mode": "int4", "group_size": None, "symmetric": None,
                                "weights": {"int4 g32 asym fp16": len(want.quantizable())}}


def test_the_head_never_dequantizes_the_whole_matrix(monkeypatch):
    q, _, _ = pair("llama", "int8")
    sizes = []
    real = quant_linear.scratch_weight

    def record(qw, dtype=torch.float32):
        sizes.append(qw.shape)
        return real(qw, dtype)

    monkeypatch.setattr(quant_linear, "scratch_weight", record)
    q.head(torch.randn(3, 64))
    assert sizes == [(64, 64), (32, 64)]  # the 96-row head as a full block and the partial one


def test_the_blocked_head_is_the_whole_gemm_up_to_summation_order():
    model = OPTModel.from_config(OPT, seed=2)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    whole = torch.nn.functional.linear(model.decoder.final(x), model.lm_head_weight)
    torch.testing.assert_close(model.head(x), whole, rtol=0, atol=1e-5)


def test_model_to_moves_the_buffers_and_keeps_the_format():
    q, _, _ = pair("opt", "int4")
    before = {n: (h.scales.clone(), h.scales.dtype) for n, h in quantized_weights(q).items()}
    q.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.decoder.embed_tokens(torch.tensor([3, 4])).dtype == torch.bfloat16
    for n, h in quantized_weights(q).items():
        assert h.scales.dtype == before[n][1] and torch.equal(h.scales, before[n][0])
    assert q.decoder.layers[0].self_attn_layer_norm.weight.dtype == torch.bfloat16
    q.to(torch.float32)
    dq = copy.deepcopy(q).dequantize_()  # a deepcopy keeps the buffers and the weight they make together
    assert torch.equal(q.token_logprobs([[1, 2, 3]])[0], dq.token_logprobs([[1, 2, 3]])[0])
    state = {k: v for k, v in q.state_dict().items() if k.endswith(".data")}
    assert state and all(v.dtype in (torch.uint8, torch.int8) for v in state.values())


def test_quantized_weights_are_buffers_not_parameters():
    q, _, _ = pair("llama", "int8")
    names = {n for n, _ in q.named_parameters()}
    assert not any(n in names for n in q.quantizable())
    assert all(isinstance(m, QuantizedParameter) for m in quantized_weights(q).values())
    assert q.lm_head.weight.value.describe() == "int8 per-channel sym fp16"


@pytest.mark.parametrize("text,want", [("int8", ("int8", None, None, "int8-channel-sym")),
                                       ("int4", ("int4", None, None, "int4-g32-asym")),
                                       ("int4-g128-sym", ("int4", 128, True, "int4-g128-sym")),
                                       ("int8-g32-asym", ("int8", 32, False, "int8-g32-asym")),
                                       ("int8-channel", ("int8", None, None, "int8-channel-sym"))])
def test_spellings(text, want):
    s = QuantSpec.parse(text)
    assert (s.mode, s.group_size, s.symmetric, s.name) == want
    assert QuantSpec.parse(s.name).name == s.name


@pytest.mark.parametrize("text,needle", [("int5", "not MODE"), ("int4-g16", "int4 group size must be one of 32, 64"),
                                         ("int4-channel", "per-channel scales are int8's"),
                                         ("int8-g48", "int8 group size must be one of 16, 32"), ("", "not MODE")])
def test_bad_spellings_are_refused_by_name(text, needle):
    with pytest.raises(InputError, match=needle):
        QuantSpec.parse(text)


def test_a_dimension_not_divisible_by_the_group_is_refused_by_name_before_any_weight_changes():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with pytest.raises(InputError, match=r"'model.layers.0.mlp.down_proj.weight': K = 96 .* int4 group size 64"):
        LlamaModel.from_config(cfg, quantize="int4-g64")
    model = LlamaModel.from_config(cfg)
    with pytest.raises(InputError, match="down_proj"):
        model.quantize_("int4", group_size=64)
    assert model.quantization is None and not quantized_weights(model)
    with pytest.raises(InputError, match="group_size and symmetric need quantize"):
        QuantSpec.of(None, group_size=32)


def test_saving_a_quantized_model_is_refused(tmp_path):
    q, _, _ = pair("opt", "int8")
    with pytest.raises(InputError, match="dequantize_"):
        flashzo.save_model(q, tmp_path / "m")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["int8", "int4"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_on_a_gpu_the_triton_path_is_the_dense_model_up_to_summation_order(family, spec):
    """On CUDA every quantized GEMM is the dequantize-in-the-GEMM kernel: fp32 log-probs and a signed
    forward's scores within the fp32 comparisons' tolerance of the dense model of the same weights."""
    q, dq, _ = pair(family, spec)
    q.to("cuda"), dq.to("cuda")
    seqs = [[5, 17, 40, 3, 88, 21, 9, 60, 2], [7, 1]]
    for a, b in zip(q.token_logprobs(seqs), dq.token_logprobs(seqs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    ads = [ad.to("cuda") for ad in adapters(q, family)]
    copies = [Copy(0, 101, 1), Copy(0, 101, -1), Copy(1, 202, 1), Copy(1, 202, -1)]
    data = examples(4, seed=3)
    kw = dict(adapters=ads, eps=1e-2)
    torch.testing.assert_close(q.score(q.build_batch(data, copies, **kw)), dq.score(dq.build_batch(data, copies, **kw)),
                               rtol=0, atol=1e-4)
