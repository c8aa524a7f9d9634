"""Shared test setup: the repository root is importable; everything runs offline on the CPU."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stage(tmp_path_factory):
    """The micro study's data and base stages (tests/stages.py), built once per test session."""
    from tests.stages import build_stage

    return build_stage(tmp_path_factory.mktemp("stages"))
