"""GGUF files (engine/gguf.py): small random Llama / Qwen2 models written as llama.cpp lays them out
(helpers.write_gguf, with llama.cpp's q/k permutation for `llama` files) load into the weights of
the transformers model they came from, every supported tensor type dequantizes, and everything else
is refused by name. The real SmolLM2 file is tested in tests/test_real_model.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from helpers import checkpoint_tensors, gguf_name, hf_llama, write_gguf  # noqa: E402

import flashzo  # noqa: E402
from flashzo.engine import LlamaModel, load_model  # noqa: E402
from flashzo.engine.gguf import SUPPORTED_TYPES, _reader, find_gguf, unpermute  # noqa: E402
from flashzo.engine.quantized import quantized_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

Q = gguf.GGMLQuantizationType
CASES = {
    "llama_gqa": dict(model_type="llama"),
    "llama_mqa_tied": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2_biases": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
}


def _hf(name):
    hf = hf_llama(seed=4, **CASES[name])
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.3)
    return hf


@torch.no_grad()
def _logprobs(model, seqs):
    out = []
    for s in seqs:
        lp = model(input_ids=torch.tensor([s])).logits[0].log_softmax(-1)[:-1]
        out.append(lp.gather(1, torch.tensor(s[1:])[:, None])[:, 0])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_f32_gguf_loads_the_weights_it_was_written_from(tmp_path, name):
    hf = _hf(name)
    file = write_gguf(hf, tmp_path / "m.gguf")
    model = load_model(file)
    assert isinstance(model, LlamaModel) and model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    theirs = hf.state_dict()
    for key, p in checkpoint_tensors(model).items():
        assert torch.equal(p, theirs[key]), key  # q/k rows unpermuted exactly
    seqs = [[3, 17, 5, 60, 2, 9, 41, 7, 7, 30, 12], [8, 1]]
    for a, b in zip(model.token_logprobs(seqs), _logprobs(hf, seqs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # the permutation matters: without undoing it, q and k differ
    k = theirs["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(unpermute(k, hf.config.num_key_value_heads), k)
    assert load_model(tmp_path).dtype == torch.float32  # a directory holding one .gguf
    assert load_model(file, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("qname", SUPPORTED_TYPES)
def test_every_supported_type_dequantizes(tmp_path, qname):
    """Each matrix stored in `qname` (K-quants: random valid blocks) loads as gguf's own dequantization,
    unpermuted; the types gguf-py can quantize also come back near the original weights."""
    hf = hf_llama(seed=1, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q[qname])
    model = load_model(file)
    reader = gguf.GGUFReader(file)
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {qname}
    theirs = hf.state_dict()
    for key, p in checkpoint_tensors(model).items():
        want = raw[gguf_name(key)].reshape(p.shape)
        if ".q_proj." in key:
            want = unpermute(want, 4)
        elif ".k_proj." in key:
            want = unpermute(want, 2)
        assert torch.equal(p, torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))), key
        if qname in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1") and p.ndim == 2:
            bound = {"F32": 0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.2}[qname]
            assert (p - theirs[key]).abs().max() <= bound * max(1.0, theirs[key].abs().max()), key
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_plain_view_reader_reads_the_same(tmp_path):
    file = write_gguf(_hf("qwen2_biases"), tmp_path / "m.gguf", qtype=lambda key, a: Q.Q8_0 if a.shape[1] % 32 == 0
                      else Q.F16)
    fast, plain = _reader(file), gguf.GGUFReader(file)
    assert type(fast) is not gguf.GGUFReader and type(plain.tensors[0].data) is np.memmap
    assert list(fast.fields) == list(plain.fields)
    for k in plain.fields:
        assert [np.asarray(x).tobytes() for x in fast.fields[k].parts] == \
            [np.asarray(x).tobytes() for x in plain.fields[k].parts], k
    for a, b in zip(fast.tensors, plain.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (b.name, b.tensor_type, b.shape.tolist())
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))


def test_bad_gguf_files_are_refused_by_name(tmp_path):
    hf = _hf("llama_gqa")
    with pytest.raises(flashzo.InputError, match="type Q5_0"):
        load_model(write_gguf(hf, tmp_path / "a.gguf", qtype=lambda key, a: Q.Q5_0 if "q_proj" in key else Q.F32))
    with pytest.raises(flashzo.InputError, match="'rope_freqs.weight' is not one"):
        load_model(write_gguf(hf, tmp_path / "b.gguf", extra={"rope_freqs.weight": np.ones(4)}))
    with pytest.raises(flashzo.InputError, match="'model.layers.1.self_attn.v_proj.weight'.*missing"):
        load_model(write_gguf(hf, tmp_path / "c.gguf", drop=("blk.1.attn_v.weight",)))
    with pytest.raises(flashzo.InputError, match="rope scaling type 'yarn'"):
        load_model(write_gguf(hf, tmp_path / "d.gguf", metadata={"llama.rope.scaling.type": "yarn"}))
    with pytest.raises(flashzo.InputError, match="llama.block_count is missing"):
        load_model(write_gguf(hf, tmp_path / "e.gguf", metadata={"llama.block_count": None}))
    with pytest.raises(flashzo.InputError, match="has shape"):
        load_model(write_gguf(hf, tmp_path / "f.gguf", metadata={"llama.attention.head_count_kv": 4}))
    good = write_gguf(hf, tmp_path / "g.gguf")
    with open(good, "rb") as f:
        data = f.read()
    for size in (len(data) // 3, 100):  # cut in its tensor data, or in its header
        with open(tmp_path / "h.gguf", "wb") as f:
            f.write(data[:size])
        with pytest.raises(flashzo.InputError, match="cannot be read as GGUF: truncated or corrupt"):
            load_model(tmp_path / "h.gguf")
    os.remove(tmp_path / "h.gguf")
    with pytest.raises(flashzo.InputError, match="several GGUF files"):
        load_model(tmp_path)
    os.makedirs(tmp_path / "one")
    os.replace(good, tmp_path / "one" / "m.gguf")
    assert find_gguf(tmp_path / "one") == str(tmp_path / "one" / "m.gguf")
    with pytest.raises(flashzo.InputError, match="a GGUF file holds a Llama-family model"):
        flashzo.load_opt(tmp_path / "one")


def test_gguf_architecture_refused_by_name(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(flashzo.InputError, match="architecture 'gpt2' is not one flashzo runs"):
        load_model(path)


def test_cli_eval_and_train_take_a_gguf_file(tmp_path, capsys):
    import json

    from flashzo.cli import main

    file = write_gguf(_hf("llama_gqa"), tmp_path / "m.gguf")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": [3, 4, 5 + i], "candidates": [[7], [8]], "label": i % 2})
                              for i in range(4)))
    assert main(["eval", "--model", file, "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 4
    out = tmp_path / "run"
    assert main(["train", "--model", file, "--train", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--target-modules", "q_proj,down_proj", "--no-progress"]) == 0
    assert os.path.isfile(out / "adapter" / "adapter_config.json")


def test_cli_merge_takes_a_gguf_file(tmp_path, capsys):
    """flashzo merge folds an adapter trained on a GGUF model into a checkpoint that scores as the
    model with the adapter does."""
    import json

    from flashzo.cli import main

    file = write_gguf(_hf("llama_gqa"), tmp_path / "m.gguf")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": [3, 4, 5 + i], "candidates": [[7], [8]], "label": i % 2})
                              for i in range(4)))
    run = tmp_path / "run"
    assert main(["train", "--model", file, "--train", str(data), "--out", str(run), "--steps", "3", "--lr", "1",
                 "--batch-size", "2", "--target-modules", "v_proj,down_proj", "--no-progress"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", file, "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    capsys.readouterr()
    evals = []
    for args in (["--model", file, "--adapter", str(run / "adapter")], ["--model", str(merged)], ["--model", file]):
        assert main(["eval", *args, "--data", str(data)]) == 0
        evals.append(json.loads(capsys.readouterr().out)["loss"])
    assert evals[0] == pytest.approx(evals[1], abs=1e-5) and abs(evals[0] - evals[2]) > 1e-4


# --------------------------------------------------------------------------------------------------
# quantize=: quantized tensors repacked exactly (engine/gguf_quant.py), never through fp32
# --------------------------------------------------------------------------------------------------

REPACKED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# (type, asked) -> the format every weight is held in (int4 asked of an 8-bit type: int8, exact)
HELD = {("Q8_0", "int8"): "int8 g32 sym fp16", ("Q8_0", "int4"): "int8 g32 sym fp16",
        ("Q4_0", "int8"): "int8 g32 sym fp16", ("Q4_0", "int4"): "int4 g32 sym fp16",
        ("Q4_1", "int8"): "int8 g32 asym fp16", ("Q4_1", "int4"): "int4 g32 asym fp16",
        ("Q4_K", "int8"): "int8 g32 asym fp32", ("Q4_K", "int4"): "int4 g32 asym fp32",
        ("Q5_K", "int8"): "int8 g32 asym fp32", ("Q5_K", "int4"): "int8 g32 asym fp32",
        ("Q6_K", "int8"): "int8 g16 sym fp32", ("Q6_K", "int4"): "int8 g16 sym fp32"}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("qname", REPACKED)
def test_quantized_tensors_are_repacked_into_the_weights_gguf_dequantizes_to(tmp_path, qname, mode):
    """Every linear and the embedding held quantized (q/k rows unpermuted) compute the dense load's bits:
    the repacked weights dequantize to gguf's own values, and the model is that dense model."""
    hf = hf_llama(seed=1, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q[qname])
    dense, q = load_model(file), load_model(file, quantize=mode)
    assert q.quantization == {"mode": mode, "group_size": None, "symmetric": None,
                              "weights": {HELD[qname, mode]: len(q.quantizable())}}
    params = dict(dense.named_parameters())
    for name, holder in quantized_weights(q).items():
        assert torch.equal(holder.dequantize(), params[name]), name
    seqs = [[3, 17, 5, 60, 2, 9, 41, 7, 7, 30, 12], [8, 1]]
    for a, b in zip(q.token_logprobs(seqs), dense.token_logprobs(seqs), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("qname", ["F32", "Q4_1"])
def test_the_metadata_is_freed_before_any_tensor_is_read(tmp_path, monkeypatch, qname):
    """The reader's metadata fields (a real file's tokenizer: one numpy view per string, 75 MiB for
    SmolLM2-135M) are dropped once the config is read, so they never sit beside the weights being
    loaded, dense or quantized; what was read from them before still holds (an F32 file loads into
    transformers' model: the config and the q/k row permutation, which the architecture decides)."""
    from flashzo.engine import gguf as gguf_module

    hf = hf_llama(seed=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96)
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q[qname])
    fields_seen = []
    real = gguf_module._release

    def record(reader, tensor):
        fields_seen.append(len(reader.fields))
        real(reader, tensor)

    monkeypatch.setattr(gguf_module, "_release", record)
    for mode in (None, "int4"):
        fields_seen.clear()
        load_model(file, quantize=mode)
        assert fields_seen and set(fields_seen) == {0}, (mode, fields_seen)
    if qname == "F32":
        seqs = [[3, 17, 5, 60, 2, 9], [8, 1]]
        for a, b in zip(load_model(file).token_logprobs(seqs), _logprobs(hf, seqs), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_a_weight_whose_tensors_cannot_share_one_exact_format_is_refused_before_any_is_read(tmp_path, monkeypatch):
    """Q4_K_M files store attn_v in Q6_K: v (int8 g16 sym) cannot join q and k (Q4_K: g32 asym) in one
    stacked weight exactly, in int4 or int8."""
    hf = hf_llama(seed=1, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q.Q6_K if "v_proj" in key else Q.Q4_K)
    from flashzo.engine import gguf as gguf_module

    monkeypatch.setattr(gguf_module, "repack_gguf", lambda *a, **k: pytest.fail("a tensor was read"))
    for mode in ("int4", "int8"):
        with pytest.raises(flashzo.InputError, match=r"blk.0.attn_q.weight \(Q4_K\), blk.0.attn_k.weight \(Q4_K\), "
                                                     r"blk.0.attn_v.weight \(Q6_K\): one weight stored in GGUF types"):
            load_model(file, quantize=mode)
    monkeypatch.undo()
    assert load_model(file).quantization is None  # without quantize it loads, dequantized


def test_a_format_the_blocks_do_not_hold_is_refused_by_name(tmp_path):
    hf = hf_llama(seed=1, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q.Q4_1)
    with pytest.raises(flashzo.InputError, match="token_embd.weight: GGUF type Q4_1 repacks exactly into int4 g32 "
                                                 "asym only, not the group size asked for"):
        load_model(file, quantize="int4-g64")
    with pytest.raises(flashzo.InputError, match="not the symmetry asked for"):
        load_model(file, quantize="int8", symmetric=True)
    assert load_model(file, quantize="int4-g32-asym").quantization["weights"] == {"int4 g32 asym fp16": 6}


def test_float_tensors_are_quantized_as_asked(tmp_path):
    hf = hf_llama(seed=1, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q.F16 if "mlp" in key else Q.F32)
    q = load_model(file, quantize="int4-g64-sym")
    assert q.quantization["weights"] == {"int4 g64 sym fp16": len(q.quantizable())}
    want = load_model(file).quantize_("int4-g64-sym")  # the same values quantized the same way
    for name, holder in quantized_weights(q).items():
        assert torch.equal(holder.dequantize(), quantized_weights(want)[name].dequantize()), name


MEMORY_SCRIPT = r"""
import json, sys
import torch
from flashzo.engine import load_model
torch.set_num_threads(1)

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

import gguf.quants  # noqa: F401  (what loading imports, imported before the measure)
from flashzo.engine import LlamaConfig, LlamaModel
from flashzo.engine.gguf import _reader
_reader(sys.argv[1])
LlamaModel(LlamaConfig.from_name("llama-tiny"), device="meta")  # torch's one-time set-up of the meta device
before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set
model = load_model(sys.argv[1], quantize=sys.argv[2] or None)
print(json.dumps({"growth": (kib("VmHWM") - before) * 1024,
                  "params": sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_loading_a_quantized_file_quantized_never_holds_the_fp32_model(tmp_path):
    """Peak memory while loading (the process's resident set, from before the load to its peak): a Q4_1
    file loaded as int4 stays under 0.3x of the fp32 model's bytes; the same file dequantized to fp32
    takes at least the fp32 model (what the measure sees when the fp32 model exists)."""
    import json
    import subprocess
    import sys

    hf = hf_llama(seed=1, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4096)
    params = sum(p.numel() for p in hf.parameters())
    file = write_gguf(hf, tmp_path / "m.gguf", qtype=lambda key, a: Q.Q4_1)
    del hf
    growth = {}
    for mode in ("int4", ""):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, file, mode], capture_output=True, text=True,
                             check=True)
        growth[mode] = json.loads(out.stdout)["growth"]
    fp32 = 4 * params
    assert growth[""] >= 0.8 * fp32, growth
    assert growth["int4"] <= 0.3 * fp32, (growth, fp32)
