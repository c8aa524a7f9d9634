"""The evaluation tasks: one registry, read by config validation, the Snakefile (the evaluate rule's inputs and
outputs) and the evaluate stage (dispatch). A task is a function of an `EvalContext` returning tidy rows and a
meta dict; registering one is a decorator:

    @register("passkey", data_files=("passkey.jsonl",), description="...")
    def passkey(ctx): ...

Every row is {eval_len, depth, metric, value, n, ci_low, ci_high} (a suite's rows also carry their own `task`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workflow.common import read_json
from workflow.ruler import FAMILIES
from workflow.scoring import evaluate_ppl, evaluate_retrieval


class TaskConfigError(ValueError):
    """A task's part of the evaluation config is unusable (raised before any compute)."""


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[["EvalContext"], tuple[list[dict], dict]]
    data_files: tuple[str, ...]           # outputs of the data stage the task reads (besides the manifest and tokenizer)
    description: str
    validate: Callable[[dict], None]      # checks the task's part of `eval` (cross-field rules), or does nothing


TASKS: dict[str, Task] = {}


def _no_checks(ev: dict) -> None:
    return None


def register(name: str, *, data_files: tuple[str, ...] = (), description: str = "",
             validate: Callable[[dict], None] = _no_checks):
    """Decorator: register `fn(ctx) -> (rows, meta)` as the evaluation task `name`."""
    def add(fn):
        if name in TASKS:
            raise ValueError(f"evaluation task {name!r} is registered twice")
        TASKS[name] = Task(name, fn, tuple(data_files), description, validate)
        return fn
    return add


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskConfigError(f"unknown evaluation task {name!r}; valid: {', '.join(TASKS)}") from None


# The lm-eval suites import lm-evaluation-harness (seconds), so their modules are imported when a suite runs, not
# when the registry is read (at Snakemake parse time).
class EvalContext:
    """What a task gets: the cell's resolved evaluate config, its loaded model, where it came from, the data."""

    def __init__(self, cfg: dict, model, model_dir: Path, data_dir: Path):
        self.cfg, self.model, self.model_dir, self.data_dir = cfg, model, Path(model_dir), Path(data_dir)
        self.eval = cfg["eval"]

    @functools.cached_property
    def manifest(self) -> dict:
        return read_json(self.data_dir / "manifest.json")

    @functools.cached_property
    def lm(self):
        """The cell as an lm-eval model (built once, shared by the lm-eval suites)."""
        from workflow.lm_eval_model import CellLM, longest_eval_len

        ev = self.eval
        return CellLM(model=self.model, tokenizer=str(self.model_dir), max_gen_toks=ev["max_gen_toks"],
                      max_length=longest_eval_len(self.cfg) + ev["max_gen_toks"], batch_size=ev["gen_batch_size"])


# --- tasks ------------------------------------------------------------------------------------------------------
@register("ppl", data_files=("test.npy",),
          description="perplexity at every evaluation length on the same held-out spans (LCEG's all-token loss)")
def ppl(ctx: EvalContext):
    test = np.load(ctx.data_dir / "test.npy", mmap_mode="r")
    return evaluate_ppl(ctx.model, test, ctx.manifest["tokenizer"]["eos_id"], ctx.eval)


@register("passkey", data_files=("passkey.jsonl",),
          description="passkey retrieval over the length x depth grid (exact match of greedy decoding)")
def passkey(ctx: EvalContext):
    return evaluate_retrieval(ctx.model, ctx.data_dir / "passkey.jsonl", ctx.eval)


@register("needle", data_files=("needle.jsonl",),
          description="needle-in-a-haystack retrieval in held-out code over the length x depth grid")
def needle(ctx: EvalContext):
    return evaluate_retrieval(ctx.model, ctx.data_dir / "needle.jsonl", ctx.eval)


def _validate_ruler(ev: dict) -> None:
    ruler = ev["ruler"]
    unknown = [t for t in ruler["tasks"] if t not in FAMILIES]
    if unknown or not ruler["tasks"]:
        raise TaskConfigError(f"eval.ruler.tasks has unknown or no families {unknown}; valid: {', '.join(FAMILIES)}")
    for family, path in (ruler.get("qa_files") or {}).items():
        if family not in ("qa_1", "qa_2"):
            raise TaskConfigError(f"eval.ruler.qa_files.{family}: only qa_1 and qa_2 take a QA file")
        if path and not Path(path).is_file():
            raise TaskConfigError(f"eval.ruler.qa_files.{family}={path!r} is not a file")


@register("ruler", data_files=("test.npy",), validate=_validate_ruler,
          description="RULER's 13 task families from seeded generators, through lm-evaluation-harness")
def ruler(ctx: EvalContext):
    from workflow.lm_eval_suites import run_ruler

    return run_ruler(ctx.lm, ctx.data_dir, ctx.eval)


def _validate_lm_eval(ev: dict) -> None:
    cfg = ev["lm_eval"]
    if not cfg["tasks"]:
        raise TaskConfigError("eval.tasks lists lm_eval but eval.lm_eval.tasks is empty")
    for task, path in (cfg.get("data_files") or {}).items():
        if not Path(path).is_file():
            raise TaskConfigError(f"eval.lm_eval.data_files.{task}={path!r} is not a file")


@register("lm_eval", validate=_validate_lm_eval,
          description="any lm-evaluation-harness task list (eval.lm_eval.tasks)")
def lm_eval(ctx: EvalContext):
    from workflow.lm_eval_suites import run_lm_eval

    return run_lm_eval(ctx.lm, ctx.data_dir, ctx.eval)
