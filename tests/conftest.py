"""Shared test set-up: Triton runs in its interpreter when there is no GPU; the families' random models."""

import os
import signal
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: the kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the checkout's root on sys.path, where kernels/ would shadow the PyPI package
# `kernels` that transformers probes for; flashzo is imported from its installed mapping instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402

# The tests that interrupt a run send it SIGINT. A shell starts a background job (`pytest &`, a CI
# script's) with SIGINT ignored, which Python and every process started from it would inherit: the
# tests then saw runs that never stop. Python's own handler here (a handler, unlike "ignored", is not
# inherited across exec: the children start with the default and install Python's again).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """(family, name of tests/helpers.py's FAMILY_CONFIGS) -> (transformers model, the same model loaded by
    flashzo from a checkpoint), seed 2, built once per session (OPT with 3 layers, so that an adapter's
    `layers` can skip one)."""
    from helpers import hf_family_model, write_checkpoint

    from flashzo.engine import load_model

    cache = {}

    def get(family: str, name: str):
        if (family, name) not in cache:
            hf = hf_family_model(family, name, seed=2, **({"num_hidden_layers": 3} if family == "opt" else {}))
            path = write_checkpoint(hf, tmp_path_factory.mktemp(f"{family}_{name}"), "safetensors")
            cache[family, name] = hf, load_model(path)
        return cache[family, name]

    return get
