"""Test set-up. Runs before any test module imports a kernel module.

Without a GPU every Triton kernel runs under Triton's interpreter (DESIGN.md §5); the variable must be set
before ``triton.jit`` decorates the kernels, i.e. before ``flasht5.ops`` is first imported.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU runs reproducible and fast on 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
