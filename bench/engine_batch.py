"""Everything bench/ reads from flashzo's step data (engine/batch.py's StepBatch): the plain
numbers the step benchmark's FLOP counts and the sharing report's token counts are made of, and the
inference forward the step benchmark's floor runs. The other bench scripts use flashzo only through
its public API (OPTModel, LoRAAdapter, MeZOTrainer, build_batch)."""

from __future__ import annotations

from dataclasses import dataclass

from flashzo.engine import Copy
from flashzo.engine.loss import copy_losses


@dataclass(frozen=True)
class BatchCounts:
    rows: int  # signed rows (all copies): what the layers at and above the fork compute
    trunk_rows: int  # rows the layers below the fork compute once for every copy (0: no fork)
    fork_layer: int | None  # the first layer that computes the signed rows (None: no fork)
    token_layers: int  # rows computed, summed over layers (the trunk's rows below the fork)
    attention_keys: int  # (query row, key) pairs the attention computes, summed over layers
    logit_rows: int  # rows whose next-token log-probs a loss reads: the LM head's rows
    skipped_projection_rows: int  # q/k/v projection rows the fork layer takes from the trunk
    skipped_projection_flops: int  # what computing those rows for every copy would have cost


def _attention_keys(meta) -> int:
    """Keys each query row attends in one layer (its page table, causal), summed over rows."""
    qo, kv = meta.qo_indptr_host, meta.kv_indptr_host
    keys = 0
    for s in range(len(qo) - 1):
        n, m = qo[s + 1] - qo[s], kv[s + 1] - kv[s]
        keys += n * (m - n) + n * (n + 1) // 2
    return keys


def batch_counts(batch, adapter, num_layers: int) -> BatchCounts:
    """The counts of a batch built with `adapter` for a model of `num_layers` layers."""
    L = num_layers
    inputs, stats = batch.inputs, batch.stats
    below = min(inputs.fork_layer, L) if inputs.trunk_meta is not None else 0
    keys = (L - below) * _attention_keys(inputs.meta)
    if inputs.trunk_meta is not None:
        keys += below * _attention_keys(inputs.trunk_meta)
    skipped = skipped_flops = 0
    if stats.fork_layer is not None and stats.fork_layer < L:  # the fork layer's unadapted q/k/v: trunk rows only
        shared = [n for n in ("q_proj", "k_proj", "v_proj") if (stats.fork_layer, n) not in adapter.slots]
        skipped = len(shared) * (stats.num_tokens - stats.trunk_tokens)
        cfg = adapter.model_config
        skipped_flops = sum(2 * k * n for k, n in (cfg.lora_shape(m) for m in shared)) * (stats.num_tokens
                                                                                          - stats.trunk_tokens)
    return BatchCounts(rows=stats.num_tokens, trunk_rows=stats.trunk_tokens, fork_layer=stats.fork_layer,
                       token_layers=stats.token_layers, attention_keys=keys,
                       logit_rows=batch.readout.rows.numel(), skipped_projection_rows=skipped,
                       skipped_projection_flops=skipped_flops)


def step_counts(model, trainer, examples) -> BatchCounts:
    """The one forward of trainer.step(examples): both signs of every perturbation."""
    batch = model.build_batch(examples, trainer.copies(), adapters=[trainer.adapter], eps=trainer.config.eps,
                              sharing=trainer.config.sharing)
    return batch_counts(batch, trainer.adapter, model.config.num_hidden_layers)


def _infer_batch(model, adapter, examples):
    return model.build_batch(examples, [Copy()], adapters=[adapter])  # one copy, sign 0


def infer_counts(model, adapter, examples) -> BatchCounts:
    return batch_counts(_infer_batch(model, adapter, examples), adapter, model.config.num_hidden_layers)


def infer_loss(model, adapter, examples) -> float:
    """One plain inference forward of the batch: one copy, sign 0, the adapter unperturbed."""
    batch = _infer_batch(model, adapter, examples)
    return copy_losses(batch.readout, model.score(batch), examples).loss[0]
