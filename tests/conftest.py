"""Shared test setup: the repository root is importable; everything runs offline on the CPU. Helpers live in
tests/helpers.py (imported as `tests.helpers`)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stage(tmp_path_factory):
    """The micro study's data and base stages (tests.helpers.build_stage), built once per test session."""
    from tests.helpers import build_stage

    return build_stage(tmp_path_factory.mktemp("stages"))
