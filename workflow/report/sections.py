"""The report's sections: the named queries turned into the tables and figures of each section (perplexity,
retrieval, task suites, the reference study side by side, training and efficiency). The result sections show one row
per cell group (`group_of` maps each stored cell to its group): a cell fine-tuned with several seeds as the mean over
its seeds (workflow.report.seeds)."""
from __future__ import annotations

import math

from workflow import stats
from workflow.report.cells import paper_link
from workflow.report.charts import Series, heatmap, line_chart
from workflow.report.claims import Evidence
from workflow.report.formatting import fmt_duration, fmt_len, fmt_num, fmt_pct
from workflow.report.queries import Db
from workflow.report.seeds import paired_table, seed_means, spread_table
from workflow.report.style import Style

PPL = ("ppl", "ppl")                # (task, metric) of perplexity rows
ACCURACY = "accuracy"              # metric of retrieval rows (length x depth grid): exact match
GRADED = (("token_accuracy", "per-answer-token accuracy (%)", lambda v: f"{100 * v:.0f}", "high"),
          ("answer_logprob", "mean log-probability of the answer's tokens (nats)", lambda v: f"{v:.2f}", "high"))
BASE_TRAIN_ID = "base"             # train_log cell id of the base model's pretraining
TASK_ORDER = ("passkey", "needle")  # retrieval tasks shown first, in this order; others follow


def length_table(cells: list[dict], rows: list[dict], *, better: str, fmt) -> dict:
    """Rows = cells, columns = eval lengths; best per column, training length and beyond marked."""
    lengths = sorted({r["eval_len"] for r in rows})
    by_cell = {(r["cell_id"], r["eval_len"]): r for r in rows}
    best = {}
    for length in lengths:
        vals = [r["value"] for (c, l), r in by_cell.items() if l == length and r["value"] is not None
                and math.isfinite(r["value"])]
        if len(set(vals)) > 1:  # a column where every value ties has no best
            best[length] = min(vals) if better == "low" else max(vals)
    out_rows = []
    for cell in cells:
        has_any = any((cell["cell_id"], l) in by_cell for l in lengths)
        values = []
        for length in lengths:
            r = by_cell.get((cell["cell_id"], length))
            classes = ["num"]
            if length == cell["train_len"]:
                classes.append("at-train")
            elif cell["train_len"] is not None and length > cell["train_len"]:
                classes.append("beyond")
            title = ci = None
            if r is None or r["value"] is None:
                text = "—"
            else:
                text = fmt(r["value"])
                if r["value"] == best.get(length):
                    classes.append("best")
                seeds = r.get("n_seeds", 1)
                if r.get("ci_low") is not None and r.get("ci_high") is not None:
                    ci = f"{fmt(r['ci_low'])}–{fmt(r['ci_high'])}"
                    title = (f"mean of {seeds} seeds, 95% t-interval over the seeds {ci}" if seeds > 1
                             else f"95% CI {ci}, n = {r['n']}")
                elif seeds > 1:
                    title = f"mean of {seeds} seeds"
                elif r.get("n") is not None:
                    title = f"n = {r['n']}"
            values.append({"text": text, "classes": " ".join(classes), "title": title, "ci": ci,
                           "best": "best" in classes})
        out_rows.append({**cell, "missing": not has_any, "vals": values})
    return {"lengths": [{"value": l, "label": fmt_len(l)} for l in lengths], "rows": out_rows}


def perplexity_section(db: Db, cells: list[dict], base_window, ppl_clip: float, group_of: dict | None = None) -> dict:
    """Table 2 and Figure 1 (one row and curve per group; seed means with their t-interval over the seeds), and the
    seeds' spread (Table 2.1) and paired differences between methods (Table 2.2)."""
    runs = db.rows("length_values", *PPL)
    rows = seed_means(runs, group_of or {})
    series = []
    for c in cells:
        own = [r for r in rows if r["cell_id"] == c["cell_id"]]
        band = [(r["eval_len"], r["ci_low"], r["ci_high"]) for r in own
                if r["ci_low"] is not None and r["ci_high"] is not None]
        if own:
            series.append(Series(c["cell_id"], [(r["eval_len"], r["value"]) for r in own], c["style"],
                                 dashed=c["regime"] == "frozen", band=band))
    marks = {base_window: f"base {fmt_len(base_window)}"} if base_window else {}
    for c in cells:
        if c["train_len"] is not None:
            marks.setdefault(c["train_len"], f"train {fmt_len(c['train_len'])}")
    chart = line_chart(series, title="Perplexity by evaluation length", xlabel="evaluation length (tokens, log₂)",
                       ylabel="perplexity (log)", name="perplexity", x_kind="log2", y_kind="log10",
                       guides=sorted(marks.items()), clip=ppl_clip)
    return {"rows": rows, "runs": runs, "table": length_table(cells, rows, better="low", fmt=fmt_num), "chart": chart,
            "spread": spread_table(cells, runs, fmt_num), "pairs": paired_table(cells, runs)}


def effective_lengths(cells: list[dict], by_len: list[dict], base_cell: str | None, base_window) -> dict:
    """RULER's effective length, with the base model's accuracy inside its own window (the base cell at
    model.base_window, over all depths) as the reference: the threshold is the lower end of that accuracy's 95%
    Wilson interval over its n prompts (the accuracy itself when n is unknown), so that one miss in 50 prompts is not
    read as a loss of the window. A cell's effective length is the longest evaluated length up to which its
    accuracy stays at or above the threshold at every evaluated length (None: already below at the shortest)."""
    values = {(r["cell_id"], r["eval_len"]): r["value"] for r in by_len if r["value"] is not None}
    base = next((r for r in by_len if (r["cell_id"], r["eval_len"]) == (base_cell, base_window)), None)
    accuracy = None if base is None else base["value"]
    if accuracy is None or accuracy <= 0:
        return {"threshold": accuracy, "base_accuracy": accuracy, "base_n": None, "cells": {}}
    n = base.get("n")
    threshold = stats.wilson(round(accuracy * n), n)[0] if n else accuracy
    out = {}
    for c in cells:
        lengths = sorted(length for (cid, length) in values if cid == c["cell_id"])
        reached = None
        for length in lengths:
            if values[(c["cell_id"], length)] < threshold:
                break
            reached = length
        if lengths:
            out[c["cell_id"]] = {"length": reached, "all": reached == lengths[-1],
                                 "text": "—" if reached is None else (f"≥ {fmt_len(reached)}" if reached == lengths[-1]
                                                                      else fmt_len(reached))}
    return {"threshold": threshold, "base_accuracy": accuracy, "base_n": n, "cells": out}


def retrieval_section(db: Db, cells: list[dict], base_cell: str | None = None, base_window=None,
                      group_of: dict | None = None) -> dict:
    """Per length x depth task: exact-match table by length (mean over depths), the graded metrics by length, one
    heatmap per cell, mean accuracy per cell, each cell's effective length, and the spread over seeds by length."""
    out, group_of = {}, group_of or {}
    tasks = [r["task"] for r in db.rows("retrieval_tasks", ACCURACY)]
    for task in sorted(tasks, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t)):
        grid = seed_means(db.rows("retrieval_grid", task, ACCURACY), group_of, ("eval_len", "depth"))
        lengths = sorted({r["eval_len"] for r in grid})
        depths = sorted({r["depth"] for r in grid})
        panels, absent = [], []
        for c in cells:
            vals = {(r["eval_len"], r["depth"]): r["value"] for r in grid if r["cell_id"] == c["cell_id"]}
            if vals:
                panels.append(heatmap(vals, lengths, depths, title=c["cell_id"], xlabel="length (tokens)",
                                      ylabel="depth", name=f"{task}-{c['cell_id']}", style=c["style"]))
            else:
                absent.append(c["cell_id"])
        by_len_runs = db.rows("retrieval_by_length", task, ACCURACY)
        by_len = seed_means(by_len_runs, group_of)
        graded = []
        for metric, label, fmt, better in GRADED:
            rows = seed_means(db.rows("retrieval_by_length", task, metric), group_of)
            if rows:
                graded.append({"metric": metric, "label": label,
                               "table": length_table(cells, rows, better=better, fmt=fmt)})
        out[task] = {
            "grid": grid,
            "table": length_table(cells, by_len, better="high", fmt=lambda v: f"{100 * v:.0f}"),
            "graded": graded,
            "effective": effective_lengths(cells, by_len, base_cell, base_window),
            "panels": panels, "absent": absent,
            "means": {r["cell_id"]: r["value"] for r in seed_means(db.rows("retrieval_mean", task, ACCURACY), group_of,
                                                                   ())},
            "spread": spread_table(cells, by_len_runs, lambda v: f"{100 * v:.0f}"),
        }
    return out


def _loss_series(log_rows: list[dict], cid: str, name: str, style: Style, max_points: int = 1000, **kw):
    pts = [(r["step"], r["loss"]) for r in log_rows if r["cell_id"] == cid]
    stride = max(1, len(pts) // max_points)
    pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    return Series(name, pts, style, **kw) if pts else None


def training_section(db: Db, cells: list[dict], base_train: dict) -> dict:
    """Loss curves (base pretraining; all fine-tuned cells) and the cost table."""
    log_rows = db.rows("train_log")
    charts = []
    base = _loss_series(log_rows, BASE_TRAIN_ID, "base pretraining", Style("#333333"), markers=False)
    if base:
        charts.append(line_chart([base], title="Base model pretraining", xlabel="step",
                                 ylabel="training loss", name="training-base", height=280))
    tuned = [_loss_series(log_rows, c["cell_id"], c["cell_id"], c["style"])
             for c in cells if c["regime"] == "finetuned"]
    if any(tuned):
        charts.append(line_chart([s for s in tuned if s], title="Fine-tuning (every fine-tuned cell)",
                                 xlabel="step", ylabel="training loss", name="training-finetune", height=320))
    steps = {r["cell_id"]: r["steps"] for r in db.rows("train_steps")}
    eval_wall = {r["cell_id"]: r["eval_wall_s"] for r in db.rows("eval_wall")}
    table = []
    if base_train:
        table.append({"name": "base pretraining", "regime": "pretraining",
                      "steps": steps.get(BASE_TRAIN_ID, base_train.get("steps", "—")),
                      "wall": fmt_duration(base_train.get("wall_s")), "tps": fmt_num(base_train.get("tokens_per_s")),
                      "mem": fmt_num(base_train.get("peak_mem_mb")), "eval": "—"})
    for c in cells:
        table.append({"name": c["cell_id"], "regime": c["regime"], "steps": steps.get(c["cell_id"], "—"),
                      "wall": fmt_duration(c["train_wall_s"]), "tps": fmt_num(c["train_tokens_per_s"]),
                      "mem": fmt_num(c["train_peak_mem_mb"]), "eval": fmt_duration(eval_wall.get(c["cell_id"]))})
    return {"charts": charts, "table": table}


def benchmarks_section(db: Db) -> list[dict]:
    """The rows the benchmark tools wrote into the study's database, formatted (newest run last)."""
    out = []
    for r in db.rows("benchmarks"):
        ms = lambda v: "—" if v is None else f"{1000 * v:.1f}"  # noqa: E731
        out.append({"phase": r["phase"], "cell": r["cell_id"], "attention": r["attention"], "length": fmt_len(r["seq_len"]),
                    "tps": fmt_num(r["tokens_per_s"]), "mem": fmt_num(r["peak_mem_mb"]),
                    "mfu": "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                    "vs_base": "—" if r["throughput_vs_base"] is None else f"{r['throughput_vs_base']:.2f}×",
                    "mem_vs_base": "—" if r["memory_vs_base"] is None else f"{r['memory_vs_base']:.2f}×",
                    "prefill": ms(r["prefill_s"]), "decode": ms(r["decode_s_per_token"]),
                    "ratio": "—" if r["generate_over_forward"] is None else f"{r['generate_over_forward']:.2f}",
                    "hardware": r["hardware"]})
    return out


def task_suites_section(db: Db, cells: list[dict], group_of: dict | None = None) -> list[dict]:
    """Every suite other than ppl/passkey/needle: average over tasks by length, and per task by length."""
    out, group_of = [], group_of or {}
    fmt = lambda v: f"{100 * v:.1f}" if v is not None and abs(v) <= 1 else fmt_num(v)
    for suite in db.rows("task_suites"):
        name, metric = suite["suite"], suite["metric"]
        by_task = seed_means(db.rows("suite_by_task", name, metric), group_of, ("task", "eval_len"))
        tasks = sorted({r["task"] for r in by_task})
        out.append({
            "suite": name, "metric": metric, "n_tasks": suite["n_tasks"],
            "average": length_table(cells, seed_means(db.rows("suite_average", name, metric), group_of), better="high",
                                    fmt=fmt),
            "rows": by_task,
            "per_task": [{"task": t, "table": length_table(cells, [r for r in by_task if r["task"] == t],
                                                           better="high", fmt=fmt)} for t in tasks],
            "means": {r["cell_id"]: r["value"] for r in seed_means(db.rows("suite_mean", name, metric), group_of, ())},
        })
    return out


def reference_section(cells: list[dict], ev: Evidence, downstream: dict, paper: dict) -> dict:
    """Each cell that has a counterpart in the reference study, with the published numbers beside ours."""
    rows = []
    for c in cells:
        match = next((m["method"] for m in paper["match"] if (m["rope"], m["attention"], m["regime"])
                      == (c["rope"], c["attention"], c["regime"])), None)
        ref = paper["overview"].get(match, {}) if match else {}
        ours = {"ppl": fmt_num(ev.ppl.get((c["cell_id"], ev.longest)))}
        for name, means in downstream.items():
            ours[name] = fmt_pct(means.get(c["cell_id"]))
        rows.append({"cell_id": c["cell_id"], "status": c["status"], "paper_method": match or "—",
                     "ref": {k: "—" if ref.get(k) is None else f"{ref[k]:g}" for k in paper["overview_columns"]},
                     "ours": ours})
    return {"rows": rows, "columns": paper["overview_columns"], "study": paper["study"],
            "paper": paper_link({"arxiv": paper["arxiv"]}),
            "ours_columns": [f"ppl @{fmt_len(ev.longest)}" if ev.longest else "ppl", *downstream]}


