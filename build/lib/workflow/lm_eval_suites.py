"""Evaluation suites that run through lm-evaluation-harness in process (`simple_evaluate` with the
cell's model object, workflow.lm_eval_model.CellLM), written as tidy rows like every other task.

- ruler: our seeded RULER-style families (workflow/ruler.py, task files in workflow/lm_eval_tasks/);
  one row per (task, eval_len) with the mean score and its interval (Wilson where every score is 0/1,
  else a t-interval on the per-sample scores).
- lm_eval: any lm-eval task list of the study config (`eval.lm_eval.tasks`), e.g. lm-eval's own `ruler`
  for studies at >= 4k tokens, `longbench`, `longbench2`, `babilong`. Hub-backed datasets are checked
  before anything runs: offline (HF_DATASETS_OFFLINE, the default) a dataset that is not in the local
  cache stops the suite with a message naming it. `eval.lm_eval.data_files` maps a task to a local
  file in the dataset's own format, used instead of the hub.

lm-eval's response cache is off (a cache keyed by the model object would serve one cell's answers to
another); the chat template is applied when `eval.chat_template` is true (instruct models).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import workflow.common  # noqa: F401  (offline defaults first)
from workflow.common import log
from workflow.ruler import FAMILIES, metadata_family, task_metadata
from workflow.stats import score_interval, stderr_interval

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
RULER_PREFIX = "ctxext_"
LOCAL_BUILDERS = {"", "json", "csv", "parquet", "text", "arrow"}
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def score_row(task: str, eval_len: int, scores: list[float]) -> dict:
    """One tidy row from per-sample scores in [0, 1] (Wilson interval for 0/1 scores, else a t-interval)."""
    mean, low, high = score_interval(scores)
    return {"task": task, "eval_len": int(eval_len), "metric": "score", "value": mean, "n": len(scores),
            "ci_low": low, "ci_high": high}


def _evaluate(lm, tasks: list, task_manager, chat_template: bool) -> dict:
    import lm_eval

    if chat_template and not getattr(lm.tokenizer, "chat_template", None):
        raise ValueError("eval.chat_template is true but the model's tokenizer has no chat template (a base "
                         "model: set eval.chat_template=false)")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                   use_cache=None, cache_requests=False, apply_chat_template=bool(chat_template),
                                   bootstrap_iters=0, **SEEDS)


def run_ruler(lm, data_dir: Path, ev: dict) -> tuple[list[dict], dict]:
    """The ruler suite: every family of `eval.ruler.tasks` at every length of `eval.ruler.lengths`."""
    from lm_eval.tasks import TaskManager

    cfg = ev["ruler"]
    metadata = task_metadata(data_dir, cfg)
    runnable, skipped = [], []
    for family in cfg["tasks"]:
        docs, skips = metadata_family(family, metadata)
        for skip in skips:
            where = f" at length {skip['eval_len']}" if "eval_len" in skip else ""
            log(f"ruler: skipping {family}{where}: {skip['reason']}")
        skipped += skips
        if docs:
            runnable.append(family)
    if not runnable:
        raise ValueError(f"no RULER family fits any of the lengths {cfg['lengths']} with this tokenizer")
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata)
    res = _evaluate(lm, [RULER_PREFIX + f for f in runnable], tm, ev.get("chat_template", False))
    rows = []
    for family in runnable:
        by_len = defaultdict(list)
        for sample in res["samples"][RULER_PREFIX + family]:
            by_len[sample["doc"]["eval_len"]].append(float(sample["score"]))
        rows += [score_row(family, length, scores) for length, scores in sorted(by_len.items())]
    meta = {"skipped": skipped, "samples_per_length": int(cfg["samples"]), "seed": int(cfg["seed"]),
            "max_length": lm.max_length, "chat_template": bool(ev.get("chat_template", False)),
            "lm_eval_version": res.get("lm_eval_version"),
            "gen_toks": {f: FAMILIES[f].gen_toks for f in runnable}}
    return rows, meta


# ------------------------------------------------------------------------------------------------
# Any lm-eval task list
# ------------------------------------------------------------------------------------------------

def _leaf_configs(tm, name: str) -> list[dict]:
    """The configs of the leaf tasks of a task, group or tag name (as lm-eval's index has them)."""
    index = tm.task_index
    if name not in index:
        raise ValueError(f"eval.lm_eval.tasks: unknown lm-eval task {name!r}")
    entry = index[name]
    kind = entry.kind.name
    if kind == "TAG":
        return [c for n, e in index.items() if name in e.tags for c in _leaf_configs(tm, n)]
    if kind == "GROUP":
        members = entry.cfg.get("task") or []
        return [c for m in members for c in _leaf_configs(tm, m if isinstance(m, str) else m.get("task") or m["group"])]
    cfg = dict(entry.cfg or {})
    if "include" in cfg and entry.yaml_path is not None:  # the dataset is often named in the included file
        from lm_eval.utils import load_yaml_config

        cfg = {**load_yaml_config(str(entry.yaml_path)), **cfg}
    cfg.setdefault("task", name)
    return [cfg]


def hub_datasets(tm, names: list[str], data_files: dict) -> dict[str, str]:
    """{task: hub dataset} of the leaf tasks whose dataset_path names a hub dataset (not a local builder,
    not empty as in generated tasks, not redirected to a local file by `data_files`). Tasks that download
    inside their own code (lm-eval ruler's essay and QA variants) are not seen here."""
    out = {}
    for name in names:
        for cfg in _leaf_configs(tm, name):
            task = cfg["task"]
            if task in data_files or name in data_files:
                continue
            path = cfg.get("dataset_path") or ""
            if path not in LOCAL_BUILDERS:
                out[task] = path + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    return out


def check_hub_datasets(datasets_by_task: dict[str, str]) -> None:
    """Offline, stop before any compute when a hub dataset is not in the local datasets cache."""
    if not datasets_by_task or os.environ.get("HF_DATASETS_OFFLINE", "0") in ("0", "", "false", "False"):
        return
    import datasets

    missing = {}
    for task, spec in datasets_by_task.items():
        path, _, name = spec.partition(" (")
        try:
            datasets.load_dataset_builder(path, name.rstrip(")") or None)
        except Exception as exc:  # noqa: BLE001 (datasets raises several types for "not available")
            missing[task] = f"{spec}: {type(exc).__name__}"
    if missing:
        listed = "; ".join(f"{t} needs {m}" for t, m in sorted(missing.items()))
        raise RuntimeError(f"lm-eval datasets missing offline (HF_DATASETS_OFFLINE=1): {listed}. Download them "
                           f"where the hub is reachable (HF_DATASETS_OFFLINE=0), or point eval.lm_eval.data_files."
                           f"<task> at a local file in the dataset's format")


def _task_spec(tm, name: str, data_files: dict):
    """A task name, or for a task redirected to a local file, the task built from its registered config
    with a local json dataset in place of the hub one (lm-eval's task factory merges the overrides)."""
    if name not in data_files:
        return name
    entry = tm.task_index.get(name)
    if entry is None or entry.kind.name != "TASK":
        raise ValueError(f"eval.lm_eval.data_files.{name}: only a single lm-eval task (not a group or tag) can "
                         f"read a local file")
    split = entry.cfg.get("test_split") or entry.cfg.get("validation_split") or "test"
    overrides = {"dataset_path": "json", "dataset_name": None,
                 "dataset_kwargs": {"data_files": {split: str(Path(data_files[name]).resolve())}}}
    return tm._factory.build(entry, overrides=overrides, registry=tm.task_index)


def lm_eval_rows(results: dict, eval_len: int) -> list[dict]:
    """Tidy rows from simple_evaluate's `results`: one per task and metric. A metric named by a number
    (lm-eval's ruler: "4096") is a score at that length; any other at the model's max_length."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            length, name = (int(metric), "score") if metric.isdigit() else (eval_len, metric)
            if metric.isdigit() and value == -1:  # lm-eval ruler: no sample at this length
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            row = {"task": task, "eval_len": length, "metric": name if filt == "none" else f"{name},{filt}",
                   "value": float(value), "n": None}
            if isinstance(stderr, (int, float)) and math.isfinite(stderr):
                row.update(zip(("ci_low", "ci_high"), stderr_interval(value, stderr)))
            rows.append(row)
    return rows


def run_lm_eval(lm, data_dir: Path, ev: dict) -> tuple[list[dict], dict]:
    """The lm_eval suite: `eval.lm_eval.tasks` through lm-eval, with the study's tokenizer and lengths as
    task metadata (lm-eval's ruler sizes its prompts with them)."""
    from lm_eval.tasks import TaskManager

    cfg = ev["lm_eval"]
    names, data_files = list(cfg["tasks"]), dict(cfg.get("data_files") or {})
    if not names:
        raise ValueError("the lm_eval suite is selected but eval.lm_eval.tasks is empty")
    metadata = {"tokenizer": str(Path(data_dir).resolve() / "tokenizer"),
                "max_seq_lengths": [int(n) for n in cfg.get("lengths") or ev["lengths"]]}
    tm = TaskManager(metadata=metadata)
    check_hub_datasets(hub_datasets(tm, names, data_files))
    res = _evaluate(lm, [_task_spec(tm, n, data_files) for n in names], tm, ev.get("chat_template", False))
    n_samples = {t: v.get("effective", v.get("original")) for t, v in (res.get("n-samples") or {}).items()}
    rows = lm_eval_rows(res["results"], lm.max_length)
    for row in rows:
        row["n"] = n_samples.get(row["task"])
    meta = {"tasks": names, "data_files": data_files, "max_length": lm.max_length,
            "chat_template": bool(ev.get("chat_template", False)), "lm_eval_version": res.get("lm_eval_version")}
    return rows, meta
