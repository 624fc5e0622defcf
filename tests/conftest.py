"""Shared test setup. Fixtures for real servers live in tests/fixtures/, one module each."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Never reach for the Hugging Face hub from tests: fail in 0.1 s instead of retrying for ~47 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)

IN_CI = os.environ.get("CI") == "true"


def require(tool: str, why: str = "") -> str:
    """Path of a real tool (prometheus, weed, ...). Missing: skip locally, fail in CI."""
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} is not installed{': ' + why if why else ''} (bash .ci/run installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two cores here: keep torch from oversubscribing when tests run training."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(2)
    yield


@pytest.fixture
def tiny_wavemix(monkeypatch):
    """WaveMix shrunk to depth 1 and 16 channels (the paper's 3 levels, 'pachify', patch 4): the
    same architecture, built in milliseconds. The test skips where the extra is missing."""
    from service.backbones import wavemix

    tiny = {
        "depth": 1,
        "mult": 1,
        "ff_channel": 16,
        "final_dim": 16,
        "dropout": 0.5,
        "level": 3,
        "initial_conv": "pachify",
        "patch_size": 4,
    }
    monkeypatch.setattr(wavemix, "PAPER_CONFIG", tiny)
    return tiny


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """A test that skips without CUDA carries the 'cuda' marker, so `pytest -m cuda` runs
    exactly those (benchmarks/gpu_check.sh does, on a GPU)."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if "cuda" in str(mark.kwargs.get("reason", "")).lower():
                item.add_marker(pytest.mark.cuda)
