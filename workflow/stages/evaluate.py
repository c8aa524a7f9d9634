"""Evaluate stage: score one cell on every task of the study (`eval.tasks`, dispatched through the registry in
`workflow.tasks`) and write one JSON file of tidy rows per task (`<cell>/eval/<task>.json`). A checkpoint cell
(regime `checkpoint`, workflow.checkpoints) evaluates its checkpoint as it is, after checking its tokenizer against
the study's; it takes no --model.

    python -m workflow.stages.evaluate --config evaluate.json --data-dir results/tiny/data \
        --model results/tiny/cells/yarn-exact-1024-ft/model --out results/tiny/cells/yarn-exact-1024-ft/eval
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from workflow import checkpoints
from workflow.checkpoints import CHECKPOINT
from workflow.common import (RESULT_SCHEMA_VERSION, configure_cpu, log, peak_memory_mb, read_json, run_cell_stage,
                             stage_parser, write_json)
from workflow.modeling import cell_model
from workflow.resources import ensure_eval_fits
from workflow.tasks import EvalContext, get_task


def headline(task: str, rows: list[dict]) -> str:
    """One log line of a task's rows: perplexity or score per length, accuracy per length at the first depth."""
    first_depth = rows[0].get("depth") if rows else None
    return ", ".join(f"{r.get('task', task)}@{r['eval_len']}:{r['value']:.3g}" for r in rows
                     if r["metric"] in ("ppl", "score") or (r["metric"] == "accuracy" and r.get("depth") == first_depth))


def evaluate_cell(cfg: dict, data_dir: Path, model_dir: Path | None, out_dir: Path,
                  tasks: list[str] | None = None) -> None:
    ev = cfg["eval"]
    tasks = [get_task(name) for name in (tasks or ev["tasks"])]
    if cfg["regime"] == CHECKPOINT:  # its directory (a hub id: the snapshot), its tokenizer checked: before any compute
        model_dir = checkpoints.prepare(cfg, data_dir)
    model = cell_model(cfg, model_dir, data_dir, out_dir.parent)
    ensure_eval_fits(model, ev["lengths"] + ev["retrieval"]["lengths"], ev["batch_tokens"])
    ctx = EvalContext(cfg, model, model_dir, data_dir)
    for task in tasks:
        t0 = time.perf_counter()
        rows, meta = task.run(ctx)
        wall = time.perf_counter() - t0
        meta.update({"wall_s": round(wall, 2), "peak_mem_mb": round(peak_memory_mb(), 1),
                     "threads": torch.get_num_threads()})
        write_json(out_dir / f"{task.name}.json", {"schema_version": RESULT_SCHEMA_VERSION, "cell_id": cfg["cell_id"],
                                                   "task": task.name, "rows": rows, "meta": meta})
        log(f"{cfg['cell_id']} {task.name} ({wall:.0f} s): {headline(task.name, rows)}")


def main(argv=None) -> None:
    parser = stage_parser(__doc__, "the cell's eval directory")
    parser.add_argument("--model", type=Path, help="fine-tuned cell model, or the base model (not for a checkpoint "
                                                   "cell: its config names the checkpoint)")
    args = parser.parse_args(argv)
    configure_cpu(args.threads)
    cfg = read_json(args.config)
    if args.model is None and cfg["regime"] != CHECKPOINT:
        parser.error(f"--model is required for a cell of regime {cfg['regime']!r}")
    try:
        run_cell_stage("evaluate", cfg, args.out.parent, lambda: evaluate_cell(cfg, args.data_dir, args.model, args.out))
    except checkpoints.CheckpointError as exc:   # missing, offline, another tokenizer: the message, no traceback
        log(f"{cfg['cell_id']}: {exc}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
