"""Shared test helpers: the ../shared folder (fixtures and CALVIN data) is read in place and tests that need it
skip, saying why, where it is absent (a user's fresh clone)."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def shared_path(*parts: str) -> str:
    """Path of a file or folder under ../shared; skips the calling test if it does not exist."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found: the ../shared data folder is not beside this checkout")
    return path
