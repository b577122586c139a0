"""Kernel launches of one training forward, per layer: q, k and v are one projection (one base
GEMM, one shrink, one expand for its adapted parts), so a change that adds launches shows here.

Counted at the engine's calls into the kernels (a plain GEMM: engine/invariant.py's linear, or the
fork's base_linear; perturbed_lora_linear_parts, perturbed_lora_add_), and each LoRA call's
launches as the kernels' own plan says a GPU runs them (the traffic model, bench/traffic.py).
"""

import collections
import os
import sys

import pytest
import torch

from flashzo.engine import Copy, Example, LoRAAdapter, LoRAConfig, OPTConfig, OPTModel
from flashzo.engine import model as engine_model
from flashzo.kernels import DeviceInfo, Segments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from traffic import lora_launches  # noqa: E402

CFG = OPTConfig(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=64)
EXAMPLES = [Example([1, 2, 3, 4], candidates=[[5], [6]], label=0), Example([1, 2, 7], candidates=[[5], [6]], label=1)]
COPIES = [Copy(0, 9, 1), Copy(0, 9, -1)]


class _Counter:
    """Wraps the engine's kernel entry points; counts calls per layer (the projection being run)."""

    def __init__(self, monkeypatch, model):
        self.calls = collections.Counter()
        self.layer = None
        project = engine_model.ForwardContext.project

        def projecting(ctx, proj, x):  # the layer of the projection being run
            self.layer = proj.layer_id
            return project(ctx, proj, x)

        monkeypatch.setattr(engine_model.ForwardContext, "project", projecting)
        head = model.head

        def counted_head(x):
            self.layer = "head"
            return head(x)

        monkeypatch.setattr(model, "head", counted_head)
        for owner, name in ((engine_model.invariant, "linear"), (engine_model, "base_linear")):
            real = getattr(owner, name)

            def gemm(*a, _real=real, **k):
                self.calls[(self.layer, "gemm")] += 1
                return _real(*a, **k)

            monkeypatch.setattr(owner, name, gemm)
        for name in ("perturbed_lora_linear_parts", "perturbed_lora_add_"):
            real = getattr(engine_model, name)

            def wrap(*a, _real=real, _name=name, **k):
                self.calls[(self.layer, _name)] += 1
                return _real(*a, **k)

            monkeypatch.setattr(engine_model, name, wrap)


@pytest.mark.parametrize("layers,fork_layer", [((0, 1, 2), 0), ((1, 2), 1)])
def test_one_training_forward_launches_per_layer(monkeypatch, layers, fork_layer):
    model = OPTModel.from_config(CFG, seed=0)
    model.set_attention_backend("torch")
    ad = LoRAAdapter.init(LoRAConfig(r=4, target_modules=("q_proj", "v_proj", "fc1"), layers=layers), CFG)
    batch = model.build_batch(EXAMPLES, COPIES, adapters=[ad], eps=1e-2)
    assert batch.inputs.fork_layer == fork_layer
    counter = _Counter(monkeypatch, model)
    model.score(batch)
    per_layer = {i: {k: n for (layer, k), n in counter.calls.items() if layer == i} for i in range(3)}
    for i in range(3):
        if i not in layers:  # below the fork: four plain GEMMs on the trunk
            assert per_layer[i] == {"gemm": 4}, (i, per_layer[i])
        elif i == fork_layer:  # qkv: the base once on the trunk, then the LoRA term of q and v on every copy
            assert per_layer[i] == {"gemm": 3, "perturbed_lora_add_": 1, "perturbed_lora_linear_parts": 1}, i
        else:  # qkv and fc1 each one stacked call (q and v in one), out_proj and fc2 plain GEMMs
            assert per_layer[i] == {"gemm": 2, "perturbed_lora_linear_parts": 2}, (i, per_layer[i])
    assert counter.calls[("head", "gemm")] == 1  # the LM head, over the rows a loss reads


def test_a_stacked_call_is_three_or_four_launches_on_a_gpu():
    """What one qkv call with q and v adapted launches on a GPU: the base GEMM, one shrink for both
    parts' u, (a split-K reduction when K is split), one expand for both parts' columns."""
    seg = Segments.from_lists([1024, 1024], [0, 0], [5, 5], [1, -1])
    for K in (64, 2048):
        launches = lora_launches(seg, K, 3 * K, [(0, K, 8), (2 * K, 3 * K, 8)], torch.bfloat16,
                                 device=DeviceInfo("cuda", 132))
        names = [ln.name for ln in launches]
        assert names[0] == "base GEMM" and names.count("shrink") == 1 and names.count("expand") == 1, names
        assert len(names) <= 4 and (("reduce" in names) == (len(names) == 4))
