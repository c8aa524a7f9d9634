"""The result files of a study (study.json, the manifest, each cell's cell.json, training log and summary,
failed.json and eval/<task>.json), read and validated into plain Python structures for the store
(`workflow.store`); no database involved. A file that cannot be ingested raises `BadFile`, which `collect` reports,
skips and counts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from workflow.checkpoints import CELL_REGIMES
from workflow.common import RESULT_SCHEMA_VERSION

BASE_CELL_ID = "base"     # train_log rows of the base model's pretraining


class BadFile(ValueError):
    """A result file that cannot be ingested; the message says why."""


def _load_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadFile(f"invalid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFile(f"unreadable ({exc})") from None
    if not isinstance(obj, dict):
        raise BadFile(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _require(obj: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BadFile(f"missing key(s) {', '.join(missing)}")


def _check_version(obj: dict) -> None:
    _require(obj, ("schema_version",))
    if obj["schema_version"] != RESULT_SCHEMA_VERSION:
        raise BadFile(f"schema_version {obj['schema_version']!r} is not the supported "
                      f"version {RESULT_SCHEMA_VERSION}")


def _number(value, what: str, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadFile(f"{what} must be a number, found {value!r}")
    return float(value)


def _integer(value, what: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BadFile(f"{what} must be an integer, found {value!r}")
    return int(value)


def read_cell(path: Path, cell_dir_name: str) -> dict:
    """Validated cell.json."""
    cell = _load_json(path)
    _check_version(cell)
    _require(cell, ("cell_id", "rope", "attention", "train_len", "regime"))
    if cell["cell_id"] != cell_dir_name:
        raise BadFile(f"cell_id {cell['cell_id']!r} does not match its folder {cell_dir_name!r}")
    if cell["regime"] not in CELL_REGIMES:
        raise BadFile(f"regime {cell['regime']!r} is not one of {', '.join(CELL_REGIMES)}")
    _integer(cell["train_len"], "train_len")
    _integer(cell.get("base_window"), "base_window", optional=True)
    seed = _integer(cell.get("seed"), "seed", optional=True)
    if seed is not None and seed < 0:
        raise BadFile(f"seed must be >= 0, found {seed}")
    if not isinstance(cell.get("group", cell["cell_id"]), str):
        raise BadFile(f"group must be a string, found {cell['group']!r}")
    return cell


def read_eval(path: Path, cell_id: str) -> tuple[str, list[tuple], float | None]:
    """Validated eval/<suite>.json: (suite, rows as tuples in metrics column order, wall_s).

    The file's `task` names the suite (ppl, passkey, ruler, ...). A row may name its own task within
    the suite (`"task": "niah_single_1"`); without one, the row's task is the suite itself."""
    obj = _load_json(path)
    _check_version(obj)
    _require(obj, ("cell_id", "task", "rows"))
    if obj["cell_id"] != cell_id:
        raise BadFile(f"cell_id {obj['cell_id']!r} does not match its cell {cell_id!r}")
    task = obj["task"]
    if task != path.stem:
        raise BadFile(f"task {task!r} does not match the file name {path.name!r}")
    if not isinstance(obj["rows"], list) or not obj["rows"]:
        raise BadFile("rows must be a non-empty list")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise BadFile("meta must be an object")
    wall_s = _number(meta.get("wall_s"), "meta.wall_s")
    rows = []
    for i, row in enumerate(obj["rows"]):
        if not isinstance(row, dict):
            raise BadFile(f"rows[{i}] is not an object")
        try:
            _require(row, ("eval_len", "metric", "value"))
            if not isinstance(row["metric"], str):
                raise BadFile(f"metric must be a string, found {row['metric']!r}")
            row_task = row.get("task", task)
            if not isinstance(row_task, str) or not row_task:
                raise BadFile(f"task must be a non-empty string, found {row_task!r}")
            rows.append((
                cell_id, row_task, _integer(row["eval_len"], "eval_len"),
                _number(row.get("depth"), "depth"), row["metric"], _number(row["value"], "value"),
                _integer(row.get("n"), "n", optional=True), _number(row.get("ci_low"), "ci_low"),
                _number(row.get("ci_high"), "ci_high"), wall_s,
            ))
        except BadFile as exc:
            raise BadFile(f"rows[{i}]: {exc}") from None
    return task, rows, wall_s


def read_train_log(path: Path, cell_id: str) -> list[tuple]:
    """Validated train_log.jsonl rows; a step logged twice (a resumed run) keeps its last line."""
    by_step: dict[int, tuple] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFile(f"unreadable ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadFile(f"line {lineno}: invalid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise BadFile(f"line {lineno}: expected a JSON object")
        try:
            _require(rec, ("step", "loss"))
            step = _integer(rec["step"], "step")
            by_step[step] = (
                cell_id, step, _number(rec["loss"], "loss"), _number(rec.get("lr"), "lr"),
                _number(rec.get("tokens_per_s"), "tokens_per_s"),
                _number(rec.get("peak_mem_mb"), "peak_mem_mb"),
                _number(rec.get("elapsed_s"), "elapsed_s"),
            )
        except BadFile as exc:
            raise BadFile(f"line {lineno}: {exc}") from None
    return [by_step[s] for s in sorted(by_step)]


def read_failure(path: Path, cell_id: str) -> dict:
    """Validated failed.json (see workflow.common.run_cell_stage)."""
    obj = _load_json(path)
    _check_version(obj)
    _require(obj, ("cell_id", "stage", "reason"))
    if obj["cell_id"] != cell_id:
        raise BadFile(f"cell_id {obj['cell_id']!r} does not match its cell {cell_id!r}")
    if not isinstance(obj["reason"], str):
        raise BadFile(f"reason must be a string, found {obj['reason']!r}")
    return obj


def read_train_summary(path: Path) -> dict:
    """Validated train_summary.json."""
    obj = _load_json(path)
    _require(obj, ("wall_s",))
    for key in ("wall_s", "tokens_per_s", "peak_mem_mb"):
        _number(obj.get(key), key)
    return obj


class _Reader:
    """Collects the study's files; each unreadable file is reported once and counted."""

    def __init__(self, study_dir: Path, echo: bool):
        self.study_dir = study_dir
        self.echo = echo
        self.files_read = 0
        self.skipped: list[str] = []

    def rel(self, path: Path) -> str:
        return path.relative_to(self.study_dir).as_posix()

    def read(self, path: Path, reader, *args):
        """reader(path, *args), or None (reported) when the file is bad; None silently if absent."""
        if not path.exists():
            return None
        try:
            value = reader(path, *args)
        except BadFile as exc:
            line = f"{self.rel(path)}: {exc}"
            self.skipped.append(line)
            if self.echo:
                print(f"store: WARNING skipped {line}", file=sys.stderr, flush=True)
            return None
        self.files_read += 1
        return value

    def skip(self, path: Path, problem: str) -> None:
        self.read(path, _raise, problem)


def _raise(_path: Path, problem: str):
    raise BadFile(problem)


def collect(study_dir: Path, echo: bool = True) -> tuple[dict, _Reader]:
    """Read every result file of a study into plain Python structures."""
    rd = _Reader(study_dir, echo)
    found = {
        "study": rd.read(study_dir / "study.json", _load_json),
        "manifest": rd.read(study_dir / "data" / "manifest.json", _load_json),
        "base_log": rd.read(study_dir / "base" / "train_log.jsonl", read_train_log, BASE_CELL_ID),
        "base_summary": rd.read(study_dir / "base" / "train_summary.json", read_train_summary),
        "cells": [],
    }
    cells_root = study_dir / "cells"
    for cell_dir in sorted(p for p in cells_root.glob("*") if p.is_dir()) if cells_root.is_dir() else []:
        cell_path = cell_dir / "cell.json"
        if not cell_path.exists():
            rd.skip(cell_dir, "no cell.json; the folder's results were not read")
            continue
        cell = rd.read(cell_path, read_cell, cell_dir.name)
        if cell is None:
            continue
        summary_path = cell_dir / "train_summary.json"
        entry = {
            "cell": cell,
            "log": rd.read(cell_dir / "train_log.jsonl", read_train_log, cell["cell_id"]),
            "summary": rd.read(summary_path, read_train_summary),
            "summary_bad": False,
            "failure": rd.read(cell_dir / "failed.json", read_failure, cell["cell_id"]),
            "evals": [],
        }
        entry["summary_bad"] = summary_path.exists() and entry["summary"] is None
        if entry["failure"] is not None:  # its result files (if any) are from an earlier run: not valid
            found["cells"].append(entry)
            continue
        for eval_path in sorted((cell_dir / "eval").glob("*.json")):
            parsed = rd.read(eval_path, read_eval, cell["cell_id"])
            if parsed is not None:
                task, rows, _ = parsed
                entry["evals"].append((task, rows, rd.rel(eval_path)))
        found["cells"].append(entry)
    return found, rd
