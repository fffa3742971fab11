"""Optional test dependencies (PyTorch, ONNX): skipped when absent, except in CI, which installs them (.ci/run)."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, install: str) -> ModuleType:
    """Import ``module``; skip the test without it, fail when CI is set."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
