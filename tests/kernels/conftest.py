"""Kernel tests run on the GPU when there is one, else on the Triton CPU interpreter at small shapes."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # The Triton interpreter trips a numpy deprecation on every scalar; it says nothing about our code.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")
