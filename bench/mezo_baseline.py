"""The baseline: one MeZO step the way the official MeZO code runs it, on Hugging Face models + PEFT LoRA.

Written from the published algorithm (Malladi et al. 2023, "Fine-Tuning Language Models with Just
Forward Passes", Algorithm 1, and the behaviour of princeton-nlp/MeZO's large_models trainer), not
copied from it. What a user gets by picking that code instead of flashzo:

    seed  <- a fresh random integer
    theta <- theta + eps z          z = torch.normal per trainable tensor, generator reseeded with seed
    l+    =  L(theta; batch)        a full transformers forward under inference_mode
    theta <- theta - 2 eps z        z regenerated from the same seed
    l-    =  L(theta; batch)
    theta <- theta + eps z          back to theta (in place; exact in fp32)
    g     =  (l+ - l-) / (2 eps)    read back to the host (.item())
    theta <- theta - lr (g z + weight_decay theta)      z regenerated once more

The trainable tensors are PEFT's LoRA A and B (r=8, alpha=16, q_proj and v_proj by default), in
`named_parameters()` order. The loss is MeZO's classification-as-LM objective: every candidate is
its own sequence (prompt + candidate), the batch is left-padded to a multiple of 8, the model
returns full logits [B, L, vocab], log_softmax over the vocabulary, the log-probs of each
candidate's tokens are averaged, and the loss is the cross-entropy of the label over the
candidates' averages, averaged over examples. LM targets: the token-weighted mean NLL of the target
tokens (one sequence per example). This is the task definition of flashzo's trainer (docs/design.md,
"Losses"), so the two losses agree on the same weights and batch (tests/test_bench_step.py).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from flashzo.engine import CausalLM, Example, LoRAAdapter, save_model
from flashzo.engine.family import family_of
from flashzo.engine.model import checkpoint_names

PAD_MULTIPLE = 8


# --------------------------------------------------------------------------------------------------
# Building the Hugging Face side from a flashzo model (identical weights and adapter)
# --------------------------------------------------------------------------------------------------

def hf_from_flashzo(model: CausalLM, adapter: LoRAAdapter, *, dtype: torch.dtype, device,
                    share_weights: bool = False, attn_implementation: str = "sdpa"):
    """transformers' model of `model`'s family (OPTForCausalLM, LlamaForCausalLM ...) with `model`'s weights,
    wrapped by PEFT with `adapter`'s A and B.

    share_weights=False: the flashzo model is written with flashzo.save_model to a temporary directory
    and read back by `from_pretrained` (an independent, bit-identical copy). share_weights=True: the
    HF modules are built on the meta device and given flashzo's parameter tensors themselves (no
    second copy in memory; the baseline perturbs only PEFT's own LoRA tensors, never these).
    PEFT's LoRA A/B are then overwritten with the adapter's (flashzo's adapter uses PEFT's names).
    Returns the PeftModel in eval mode, LoRA tensors trainable, everything else frozen.
    """
    import peft
    import transformers

    fam = family_of(model)
    if share_weights:
        if model.dtype != dtype:
            raise ValueError(f"share_weights needs the flashzo model in {dtype}, it is {model.dtype}")
        d = model.config.to_hf()
        cfg = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items()
                                                                    if k not in ("model_type", "architectures",
                                                                                 "torch_dtype")})
        cfg._attn_implementation = attn_implementation
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(cfg)
        params = dict(model.named_parameters())  # stacked projections give views of their rows
        state = {fam.hf_key(key): params[pname] if rows is None else params[pname][rows[0]:rows[1]]
                 for key, (pname, rows) in checkpoint_names(model).items()}
        missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
        tied = bool(d.get("tie_word_embeddings"))
        if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
            raise ValueError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
        if tied:
            hf.lm_head.weight = hf.get_input_embeddings().weight  # tied, as the checkpoints are
        for name, module in list(hf.named_modules()):  # rotary embeddings' buffers are computed, never loaded
            if hasattr(module, "inv_freq") and any(b.is_meta for b in module.buffers(recurse=False)):
                parent, _, leaf = name.rpartition(".")
                with torch.device("cpu"):
                    setattr(hf.get_submodule(parent), leaf, type(module)(module.config))
        leftover = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
        if leftover:
            raise ValueError(f"tensors left on the meta device: {leftover[:4]}")
    else:
        with tempfile.TemporaryDirectory(prefix="flashzo-bench-") as tmp:
            save_model(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype,
                                                                   attn_implementation=attn_implementation)
    hf = hf.to(device).eval()
    cfg = adapter.config
    layers = list(cfg.layers) if cfg.layers is not None else None
    lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                           layers_to_transform=layers, lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(hf, lcfg).eval()
    copy_adapter_into_peft(adapter, pm)
    return pm


@torch.no_grad()
def copy_adapter_into_peft(adapter: LoRAAdapter, peft_model) -> None:
    """Overwrite the PEFT model's LoRA A/B with the flashzo adapter's (same PEFT key names)."""
    ours = {k: v for k, v in adapter.named_tensors().items()}
    params = dict(peft_model.named_parameters())
    seen = set()
    for name, p in params.items():
        key = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if key in ours:
            p.copy_(ours[key].to(p.device, p.dtype))
            seen.add(key)
    missing = set(ours) - seen
    if missing:
        raise ValueError(f"PEFT model lacks adapter tensors {sorted(missing)[:4]}")


def peft_to_flat(peft_model, adapter: LoRAAdapter) -> torch.Tensor:
    """The PEFT model's LoRA tensors laid out like `adapter.buffer` (to compare the two sides)."""
    params = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters()}
    flat = torch.empty_like(adapter.buffer)
    views = adapter.unflatten(flat)
    for k, v in views.items():
        v.copy_(params[k].detach().to(v.device, torch.float32))
    return flat


# --------------------------------------------------------------------------------------------------
# The batch as MeZO collates it
# --------------------------------------------------------------------------------------------------

@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, L] left-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    option_len: list[int]  # per sequence: how many trailing tokens are scored
    num_options: list[int] | None  # per example (classification), None for LM targets
    labels: torch.Tensor | None  # [E] label of every example (classification)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def collate(examples: Sequence[Example], *, pad_token_id: int = 1, device=None,
            pad_to_multiple_of: int = PAD_MULTIPLE) -> PaddedBatch:
    """Every candidate a separate sequence (prompt + candidate), left padding to a multiple of 8."""
    seqs, option_len, num_options, labels = [], [], [], []
    classification = examples[0].candidates is not None
    for ex in examples:
        if (ex.candidates is not None) != classification:
            raise ValueError("a batch mixes classification and LM examples")
        prompt = [int(t) for t in ex.prompt]
        if classification:
            for cand in ex.candidates:
                seqs.append(prompt + [int(t) for t in cand])
                option_len.append(len(cand))
            num_options.append(len(ex.candidates))
            labels.append(int(ex.label))
        else:
            seqs.append(prompt + [int(t) for t in ex.target])
            option_len.append(len(ex.target))
    L = max(len(s) for s in seqs)
    L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s):] = 1
    return PaddedBatch(ids.to(device), mask.to(device), option_len,
                       num_options if classification else None,
                       torch.tensor(labels, dtype=torch.long, device=device) if classification else None)


# --------------------------------------------------------------------------------------------------
# The loss and the step
# --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def mezo_loss(model, batch: PaddedBatch) -> torch.Tensor:
    """MeZO's objective on a padded batch: a 0-dim tensor on the model's device (not read back)."""
    kw = {}
    if getattr(model.config, "model_type", "opt") != "opt":
        # rotary models take positions as given: a left-padded sequence starts at position 0 at its
        # first real token, as OPT computes from the mask itself
        kw["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw).logits  # [B, L, V]
    shift_logits = logits[:, :-1, :]  # position i predicts token i+1
    targets = batch.input_ids[:, 1:]
    scored = torch.zeros_like(targets, dtype=torch.bool)  # [B, L-1]: the option tokens
    for i, n in enumerate(batch.option_len):
        scored[i, -n:] = True
    log_probs = F.log_softmax(shift_logits, dim=-1)  # full vocabulary, the logits' dtype
    tok = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    tok = torch.where(scored, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
    if batch.num_options is None:  # LM: token-weighted mean NLL
        return -tok.float().sum() / scored.sum()
    per_seq = tok.float().sum(-1) / scored.sum(-1)  # [B] mean log-prob of each candidate
    loss, start = 0.0, 0
    if len(set(batch.num_options)) == 1:  # every example has k candidates: one batched CE
        k = batch.num_options[0]
        return F.cross_entropy(per_seq.view(-1, k), batch.labels)
    for e, k in enumerate(batch.num_options):
        loss = loss + F.cross_entropy(per_seq[start:start + k].unsqueeze(0), batch.labels[e:e + 1])
        start += k
    return loss / len(batch.num_options)


class MeZOBaseline:
    """The official MeZO step on a PEFT model: in-place +eps, -2eps, +eps, then the update."""

    def __init__(self, model, *, lr: float, eps: float, weight_decay: float = 0.0, seed: int = 0):
        self.model, self.lr, self.eps, self.weight_decay = model, lr, eps, weight_decay
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = self.params[0][1].device
        self.gen = torch.Generator(device=self.device)
        self.seeds = torch.Generator().manual_seed(seed)  # draws each step's seed
        self.zo_seed = 0

    @torch.no_grad()
    def perturb(self, scaling_factor: float) -> None:
        """theta += scaling_factor * eps * z, z regenerated from this step's seed, tensor by tensor."""
        self.gen.manual_seed(self.zo_seed)
        for _, p in self.params:
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scaling_factor * self.eps)

    @torch.no_grad()
    def update(self, projected_grad: float) -> None:
        self.gen.manual_seed(self.zo_seed)
        for name, p in self.params:
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
            if "bias" not in name and "layer_norm" not in name:
                p.data.sub_(self.lr * (projected_grad * z + self.weight_decay * p.data))
            else:
                p.data.sub_(self.lr * projected_grad * z)

    def step(self, batch: PaddedBatch) -> tuple[float, float]:
        """One MeZO step on a collated batch; returns (loss at +eps, projected gradient)."""
        self.zo_seed = int(torch.randint(0, 1_000_000_000, (1,), generator=self.seeds))
        self.perturb(+1.0)
        loss1 = mezo_loss(self.model, batch)
        self.perturb(-2.0)
        loss2 = mezo_loss(self.model, batch)
        projected_grad = float((loss1 - loss2) / (2 * self.eps))  # the host read-back
        self.perturb(+1.0)
        if math.isfinite(projected_grad):
            self.update(projected_grad)
        return float(loss1), projected_grad

