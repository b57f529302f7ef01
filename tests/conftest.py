"""Shared test helpers: the ../shared folder (fixtures and CALVIN data) is read in place and tests that need it
skip, saying why, where it is absent (a user's fresh clone). GR1_SHARED=/path points them at a copy elsewhere (the
GPU check carries one to a machine where ../shared is not beside the checkout).

Tests that take a device run on the CPU and, marked `cuda`, on the GPU: `pytest -m cuda` selects the GPU half,
which skips, saying why, where torch.cuda is not available."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GR1_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NO_CUDA = "torch.cuda is not available"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                  pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]


def shared_path(*parts: str) -> str:
    """Path of a file or folder under ../shared (or $GR1_SHARED); skips the calling test if it does not exist."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found: the ../shared data folder is not beside this checkout (or set GR1_SHARED)")
    return path


def strict_device(name: str) -> torch.device:
    """The device of a DEVICES parameter, with TF32 off on CUDA: matrix products in true fp32, so that CUDA results
    can be held to CPU tolerances (TF32 keeps 10 mantissa bits)."""
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)
