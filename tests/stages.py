"""The micro study's data and base stages built once in a tmp dir, for tests that run a fine-tune job as a
real subprocess (tests/test_reliability.py, tests/test_distributed.py); the `stage` fixture is in conftest."""
import json
import subprocess
import sys

from tests.conftest import REPO
from workflow.config import compose, expand_grid, stage_config

OVERRIDES = ["pretrain.steps=4", "finetune.steps=16", "finetune.checkpoint_every=3"]
CLEX = "clex-exact-256-ft"     # samples a random scale each step: resumption must restore the RNG
FROZEN = "ntk-exact-256-frozen"


def run_module(*args, **kwargs):
    """`python -m <args>` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


def build_stage(root) -> dict:
    """The micro study's data and a 4-step base model under `root`, plus the resolved configs of its jobs."""
    cfg = compose("micro", OVERRIDES)
    cells = {c["cell_id"]: c for c in expand_grid(cfg)}
    files = {}
    for name, obj in {"data": stage_config(cfg, stage="data"), "base": stage_config(cfg, stage="base"),
                      "finetune": stage_config(cfg, cells[CLEX], "finetune"),
                      "evaluate": stage_config(cfg, cells[FROZEN], "evaluate")}.items():
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(obj, sort_keys=True))
    for args in (("workflow.data", "--config", files["data"], "--out", root / "data"),
                 ("workflow.base", "--config", files["base"], "--data-dir", root / "data", "--out", root / "base")):
        run = run_module(*args)
        assert run.returncode == 0, run.stderr[-3000:]
    return {"root": root, "cfg": cfg, "cells": cells, "files": files}


def finetune_args(stage, out, base=None):
    """The arguments after `-m` of the CLEX cell's fine-tune job writing to `out`."""
    return ["workflow.finetune", "--config", stage["files"]["finetune"], "--data-dir", stage["root"] / "data",
            "--base", base or stage["root"] / "base" / "model", "--out", out]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
