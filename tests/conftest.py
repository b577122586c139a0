"""Shared test set-up: Triton runs in its interpreter when there is no GPU."""

import os
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
