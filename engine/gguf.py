"""GGUF files (llama.cpp's format) as Llama-family models: read with the `gguf` package, llama.cpp's reader.

    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")       or load_model(path): it dispatches here
    tokenizer = gguf_tokenizer(path)                          transformers' tokenizer from the metadata

The config comes from the file's metadata (`{arch}.block_count`, `.embedding_length`,
`.attention.head_count_kv`, `.rope.freq_base` ...; no `output.weight`: a tied head), the weights
from its tensors, each dequantized by `gguf.quants.dequantize` into fp32 and copied into its
parameter in the compute dtype one at a time (engine/loading.py: CheckpointFill), so peak memory is
the model plus one tensor. With `quantize` (engine/quantized.py) a quantized tensor of a weight that
is held quantized is repacked from its blocks (engine/gguf_quant.py: exact, never through fp32),
and a float one quantized; the formats of all weights are settled from the tensor table before any
tensor is read. llama.cpp's converter permutes the rows of q_proj and k_proj of
`llama` files (its rotary embedding rotates adjacent pairs, Hugging Face's the two halves of a
head): the permutation is undone here, per head, as transformers' GGUF loader does. `qwen2`
files are not permuted.

Refused by name (InputError): an architecture other than llama and qwen2, a tensor type outside
SUPPORTED_TYPES, a tensor the family has no parameter for (e.g. `rope_freqs.weight`, llama3's
rope as stored frequency factors), rope scaling other than linear, a missing tensor; with
`quantize`, a tensor that cannot be repacked exactly (gguf_quant.stack_format says which).
"""

from __future__ import annotations

import gc
import mmap
import os

import numpy as np
import torch

from flashzo.kernels.errors import InputError

from .family import FAMILIES
from .gguf_quant import FLOAT_TYPES, repack_gguf, stack_format
from .llama import LlamaModel
from .llama_config import LlamaConfig
from .quantized import QuantSpec, WeightFormat

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF architecture -> Hugging Face model_type
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes

_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def find_gguf(path: str | os.PathLike) -> str | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a directory without config.json.
    None: not GGUF (a Hugging Face checkpoint directory). Several .gguf files in a directory are refused."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise InputError(f"{path}: holds several GGUF files ({', '.join(found)}); name one")
    return os.path.join(path, found[0]) if found else None


def _reader(path: str):
    """gguf.GGUFReader over `path`, parsing from a plain view of its memory map.

    NOTE: GGUFReader slices a numpy memmap for every field; the memmap subclass's slicing costs most
    of the time of opening a file whose metadata holds many strings (SmolLM2-135M's: 98k tokenizer
    strings), and its tensors' data come out as memmaps too, which slows gguf.quants.dequantize
    (both timed: bench/results/code_notes_cpu.md, "engine/gguf.py _reader"). The same bytes are read
    either way (tests/test_gguf.py compares the two readers).
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise InputError(f"{path}: reading GGUF files needs the gguf package: pip install gguf") from e

    class PlainViewReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = np.asarray(self.data)
            count = int(count)
            itemsize = int(np.empty([], dtype=dtype).itemsize)
            arr = plain[offset:offset + itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    cls = PlainViewReader if hasattr(GGUFReader, "_get") else GGUFReader
    try:
        return cls(path)
    except Exception as e:  # truncated, not GGUF, unknown version
        why = "truncated or corrupt (its tensor table runs past the end of the file)" \
            if isinstance(e, ValueError) and ("reshape" in str(e) or "size must be a divisor" in str(e)) \
            else f"{type(e).__name__}: {e}"
        raise InputError(f"{path}: cannot be read as GGUF: {why}") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None or not f.types:
        return default
    value = f.contents()
    return value.item() if hasattr(value, "item") else value


def read_gguf_config(reader, where: str = "GGUF") -> LlamaConfig:
    """A LlamaConfig from a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{where}: architecture {arch!r} is not one flashzo runs (supported: "
                         f"{', '.join(ARCHITECTURES)})")

    def get(key, default=None, *, required=False):
        value = _field(reader, f"{arch}.{key}", default)
        if required and value is None:
            raise InputError(f"{where}: metadata {arch}.{key} is missing")
        return value

    heads = get("attention.head_count", required=True)
    hidden = get("embedding_length", required=True)
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise InputError(f"{where}: {arch}.rope.dimension_count {get('rope.dimension_count')} != head_dim "
                         f"{head_dim} (a partial rotary embedding is not supported)")
    scaling_type = get("rope.scaling.type")
    scaling = None
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise InputError(f"{where}: rope scaling type {scaling_type!r} is not supported (flashzo reads linear "
                             "scaling from GGUF metadata)")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", required=True))}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise InputError(f"{where}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    names = {t.name for t in reader.tensors}
    qwen2 = ARCHITECTURES[arch] == "qwen2"
    kwargs = dict(
        model_type=ARCHITECTURES[arch], vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)), num_attention_heads=int(heads),
        num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=int(head_dim),
        max_position_embeddings=int(get("context_length", required=True)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=qwen2 or "blk.0.attn_q.bias" in names, o_bias=not qwen2 and "blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names, sliding_window=get("attention.sliding_window"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"), torch_dtype="float32")
    try:
        return LlamaConfig(**kwargs)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def hf_name(gguf_name: str) -> str | None:
    """A GGUF tensor name in Hugging Face's (and the model's) naming; None: not one the family has."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (0, 2, 4 ... 1, 3, 5 ...) back to halves."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
              quantize: QuantSpec | None = None) -> LlamaModel:
    """The LlamaModel of a GGUF file (or a directory holding one), dequantized into `dtype` (default fp32),
    or with `quantize` its linears and embedding held quantized (see the module docstring)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from .loading import CheckpointFill

    file = find_gguf(path)
    if file is None:
        raise InputError(f"{path}: not a GGUF file")
    reader = _reader(file)
    cfg = read_gguf_config(reader, file)
    permuted = _field(reader, "general.architecture") in PERMUTED
    _drop_metadata(reader)
    model = LlamaModel(cfg, device="meta")
    fam = FAMILIES["llama"]
    fill = CheckpointFill(model, fam, dtype=dtype or torch.float32, device=torch.device(device or "cpu"),
                          tied_shape=(cfg.vocab_size, cfg.hidden_size))
    supported = {GGMLQuantizationType[t] for t in SUPPORTED_TYPES}
    plan = []
    for t in reader.tensors:  # every name, type and shape checked before any is read
        name = hf_name(t.name)
        if name is None:
            raise InputError(f"{file}: tensor {t.name!r} is not one flashzo's Llama family reads")
        if t.tensor_type not in supported:
            raise InputError(f"{file}: tensor {t.name!r} has type {t.tensor_type.name}, which flashzo does not "
                             f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
        fill.check_name(name, file)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        fill.check_shape(t.name, name, shape, file)
        plan.append((t, name, shape))
    if quantize is not None:
        fill.quant = _formats(model, fill, plan, quantize, file)
    heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
    for t, name, shape in plan:
        sub = ".".join(name.split(".")[-3:-1])  # "self_attn.q_proj" ...
        fmt = fill.quant.get(fill.names[name][0])
        if fmt is not None and t.tensor_type.name not in FLOAT_TYPES:  # repacked from its blocks
            w = repack_gguf(t.data, t.tensor_type, shape, fmt.mode, name=t.name)
            if permuted and sub in heads:
                w = w.select_rows(torch.from_numpy(unpermute(np.arange(shape[0]), heads[sub])))
            fill.put(name, w, file, named=True)
        else:
            w = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(shape)
            if permuted and sub in heads:
                w = unpermute(w, heads[sub])
            fill.put(name, torch.from_numpy(np.require(w, requirements=("C", "W"))), file, named=True)
        del w
        _release(reader, t)
    fill.finish(file)
    model.quant_spec = quantize
    return model


def _formats(model: LlamaModel, fill, plan, spec: QuantSpec, file: str) -> dict:
    """Each quantized weight's format (engine/quantized.py's WeightFormat): its GGUF tensors' exact repack
    format (gguf_quant.stack_format), or `spec`'s for a weight stored as floats. Refusals name a tensor."""
    parts: dict[str, list] = {}
    for t, name, _ in plan:
        parts.setdefault(fill.names[name][0], []).append((t.name, t.tensor_type))
    out = {}
    for pname, f in model.weight_formats(spec).items():
        try:
            stacked = stack_format(parts[pname], spec.mode, group_size=spec.group_size, symmetric=spec.symmetric)
        except InputError as e:
            raise InputError(f"{file}: {e}") from None
        if stacked is None:  # floats: quantized as asked (weight_formats checked the group)
            out[pname] = f
        else:
            out[pname] = WeightFormat(*stacked)
    return out


def _drop_metadata(reader) -> None:
    """Free the reader's metadata once the config is read: GGUFReader holds every field as numpy views,
    one per tokenizer string and merge (SmolLM2-135M's: 98k strings, 75 MiB of objects), which would
    otherwise stay alive beside the weights being loaded; the tokenizer reads the file itself
    (gguf_tokenizer). The metadata's pages of the memory map are dropped too."""
    reader.fields.clear()
    gc.collect()
    mm = getattr(getattr(reader, "data", None), "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        end = int(reader.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        if end:
            mm.madvise(mmap.MADV_DONTNEED, 0, end)


def _release(reader, tensor) -> None:
    """Drop a tensor's pages of the file's memory map from this process (the page cache keeps them): a
    file read through once does not stay in the resident set beside the model made of it."""
    mm = getattr(getattr(reader, "data", None), "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def gguf_quantized_types(path: str | os.PathLike) -> dict[str, int]:
    """The quantized tensor types of a GGUF file and how many tensors have each ({} when every tensor is a
    float: F32, F16, BF16), from its tensor table (no tensor is read)."""
    file = find_gguf(path)
    if file is None:
        raise InputError(f"{path}: not a GGUF file")
    counts: dict[str, int] = {}
    for t in _reader(file).tensors:
        if t.tensor_type.name not in FLOAT_TYPES:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a GGUF file's metadata, built by transformers (`gguf_file=`), offline."""
    file = find_gguf(path)
    if file is None:
        raise InputError(f"{path}: not a GGUF file")
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - transformers is a dev extra
        raise InputError("a GGUF file's tokenizer needs transformers: pip install 'flashzo[dev]'") from e
    # NOTE: the fast tokenizer class directly, not AutoTokenizer: AutoTokenizer first builds the model's
    # config from the file (reading all of it once more): 13.8 s instead of 1.6 s for SmolLM2-135M's
    # file on the development machine, with the same tokens.
    try:
        return PreTrainedTokenizerFast.from_pretrained(os.path.dirname(os.path.abspath(file)),
                                                       gguf_file=os.path.basename(file), local_files_only=True)
    except Exception as e:
        raise InputError(f"{file}: transformers cannot build a tokenizer from its metadata ({type(e).__name__}: "
                         f"{e})") from e
