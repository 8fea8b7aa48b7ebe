"""Test configuration shared by every test in the suite.

Fixtures live in ``tests/fixtures/`` (one module per area) and are registered here.
"""
from __future__ import annotations

import os
import shutil

import pytest

# nnU-Net reads these at import time; tests never use the global nnU-Net folders.
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("TCP_NODELAY", "1")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.dicom_data",
    "tests.fixtures.node_fixtures",
    "tests.fixtures.postgres",
    "tests.fixtures.pki",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA and tool-marked tests when the tool is absent."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch import failure is reported elsewhere
        has_cuda = False
    tools = {"dcmtk": "storescu", "dciodvfy": "dciodvfy"}
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        for marker, exe in tools.items():
            if marker in item.keywords and shutil.which(exe) is None:
                # In CI `make test` installs the tools; a missing tool there is a failure.
                if os.environ.get("CI"):
                    raise pytest.UsageError(f"{exe} is required for '{marker}' tests but not on PATH")
                item.add_marker(pytest.mark.skip(reason=f"{exe} not installed"))
