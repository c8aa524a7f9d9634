"""Cells fine-tuned with several seeds (study.seeds): the groups of a cell's seeds, the seed means the report's tables,
figures, findings and claims show, the spread of each cell over its seeds and the paired comparison of two methods
over the same seeds (statistics in workflow.stats).

A group is every stored run of one cell (`cells.group_id`: the id without a seed suffix). A group of one run is the
cell itself, so a one-seed study reports exactly as before. A group of several runs shows in the tables as the mean
over its seeds, with the Student-t interval of that mean over the seeds in place of the per-sample interval (which does
not cover training noise); Tables 2.1 and 3.x.s give its mean, sd and min–max per length, Table 2.2 the difference
between two methods trained at the same length, seed by seed (the seeds of one number share the data order and the
fine-tuning seed, so they pair)."""
from __future__ import annotations

import itertools
import math

from workflow import stats
from workflow.report.formatting import fmt_len, fmt_num
from workflow.report.style import cell_style
from workflow.report.charts import legend_key

VALUE_KEYS = ("value", "n", "ci_low", "ci_high")


def group_cells(cells: list[dict]) -> list[dict]:
    """One entry per group of `cells` (in their order): the first run's description with the group's id, its runs
    (`members`), their seed numbers (`seeds`), `seeded` when it has several runs, and the status of the group (ok
    when any run has results; `status_text` says how many). Each group gets its own style; its runs share it."""
    by_id, groups = {}, []
    for c in cells:
        group = by_id.get(c["group"])
        if group is None:
            group = by_id[c["group"]] = {**c, "cell_id": c["group"], "members": []}
            groups.append(group)
        group["members"].append(c)
    for i, g in enumerate(groups):
        members = g["members"]
        g["seeds"] = [m["seed"] for m in members if m["seed"] is not None]
        g["seeded"] = len(members) > 1
        g["style"] = cell_style(i)  # the same colour and marker in every figure, for the group and each of its runs
        g["color"] = g["style"].color
        g["key"] = legend_key(g["style"], dashed=g["regime"] == "frozen")
        for m in members:
            m["style"], m["color"], m["key"] = g["style"], g["color"], g["key"]
        if g["seeded"]:
            ok = [m for m in members if m["ok"]]
            g["ok"] = bool(ok)
            g["status"] = "ok" if ok else members[0]["status"]
            g["status_text"] = g["status"] if len(ok) in (0, len(members)) else (
                f"ok for {len(ok)} of {len(members)} seeds; " + "; ".join(
                    f"{m['cell_id']}: {m['status_text']}" for m in members if not m["ok"]))
    return groups


def seed_means(rows: list[dict], group_of: dict[str, str], keys: tuple[str, ...] = ("eval_len",)) -> list[dict]:
    """Per-run rows (cell_id, *keys, value, n, ci_low, ci_high, ...) as one row per (group, *keys): a group's single
    run as it is; several runs as their mean, with the 95% Student-t interval of the mean over the runs as ci_low and
    ci_high, `n_seeds` and the runs' values (`seed_values`); other columns are the first run's."""
    out, index = [], {}
    for row in rows:
        group = group_of.get(row["cell_id"], row["cell_id"])
        key = (group, *(row.get(k) for k in keys))
        if key not in index:
            index[key] = {**row, "cell_id": group, "runs": []}
            out.append(index[key])
        index[key]["runs"].append(row)
    for entry in out:
        runs = entry.pop("runs")
        entry["n_seeds"] = len(runs)
        if len(runs) == 1:
            continue
        values = [r["value"] for r in runs if r["value"] is not None]
        entry["seed_values"] = values
        entry["ci_low"] = entry["ci_high"] = None
        if not values:
            entry["value"] = None
        elif not all(math.isfinite(v) for v in values):
            entry["value"] = math.fsum(values) / len(values)   # inf (or nan) stays what it is, without an interval
        else:
            mean, low, high = stats.t_interval(values)
            entry["value"] = mean
            if math.isfinite(low):
                entry["ci_low"], entry["ci_high"] = low, high
    return out


def _runs(group: dict, rows: list[dict]) -> dict[tuple[int | None, int], float]:
    """{(seed, eval_len): value} of a group's runs that have a finite value."""
    seed_of = {m["cell_id"]: m["seed"] for m in group["members"]}
    return {(seed_of[r["cell_id"]], r["eval_len"]): r["value"] for r in rows
            if r["cell_id"] in seed_of and r["value"] is not None and math.isfinite(r["value"])}


def spread_table(groups: list[dict], rows: list[dict], fmt) -> dict:
    """Rows = groups with several seeds, columns = lengths: the mean over seeds, with min–max and sd beneath (the
    length_table layout); `records` holds the numbers (one per group and length) for the exported table."""
    lengths = sorted({r["eval_len"] for r in rows})
    table_rows, records = [], []
    for g in groups:
        if not g["seeded"]:
            continue
        runs = _runs(g, rows)
        vals = []
        for length in lengths:
            values = [v for (_, n), v in runs.items() if n == length]
            classes = ["num"] + (["at-train"] if length == g["train_len"] else
                                 ["beyond"] if g["train_len"] is not None and length > g["train_len"] else [])
            if not values:
                vals.append({"text": "—", "classes": " ".join(classes), "title": None, "ci": None, "best": False})
                continue
            s = stats.spread(values)
            records.append({"cell": g["cell_id"], "rope": g["rope"], "attention": g["attention"],
                            "train_len": g["train_len"], "eval_len": length, **s})
            sd = "—" if math.isnan(s["sd"]) else fmt(s["sd"])
            vals.append({"text": fmt(s["mean"]), "classes": " ".join(classes), "best": False,
                         "ci": f"{fmt(s['min'])}–{fmt(s['max'])} · sd {sd}",
                         "title": f"{s['n']} seeds: mean {fmt(s['mean'])}, sd {sd}, min {fmt(s['min'])}, "
                                  f"max {fmt(s['max'])}"})
        table_rows.append({**g, "missing": not any(v["text"] != "—" for v in vals), "vals": vals})
    return {"lengths": [{"value": l, "label": fmt_len(l)} for l in lengths], "rows": table_rows, "records": records}


def paired_table(groups: list[dict], rows: list[dict]) -> dict:
    """Every pair of fine-tuned groups with several seeds at the same training length (in the groups' order): per
    length the mean difference in perplexity (first − second) over the seed numbers both have, with its paired
    t-interval and p-value (workflow.stats.paired_difference); `sig` where the interval excludes 0."""
    tuned = [g for g in groups if g["regime"] == "finetuned" and g["seeded"] and g["ok"]]
    lengths = sorted({r["eval_len"] for r in rows})
    out_rows, records = [], []
    for a, b in itertools.combinations(tuned, 2):
        if a["train_len"] != b["train_len"]:
            continue
        ra, rb = _runs(a, rows), _runs(b, rows)
        vals, any_value = [], False
        for length in lengths:
            common = sorted(s for (s, n) in ra if n == length and (s, length) in rb)
            if len(common) < 2:
                vals.append({"text": "—", "classes": "num", "title": None, "ci": None, "sig": False})
                continue
            d = stats.paired_difference([ra[(s, length)] for s in common], [rb[(s, length)] for s in common])
            any_value = True
            records.append({"first": a["cell_id"], "second": b["cell_id"], "train_len": a["train_len"],
                            "eval_len": length, "seeds": len(common), **d})
            bounded = not math.isnan(d["low"])
            sig = bounded and (d["low"] > 0 or d["high"] < 0)
            ci = f"{_signed(d['low'])} to {_signed(d['high'])}" if bounded else None
            p = "—" if math.isnan(d["p"]) else f"{d['p']:.3f}"
            vals.append({"text": _signed(d["mean"]), "classes": "num" + (" sig" if sig else ""), "sig": sig, "ci": ci,
                         "title": f"{len(common)} seeds ({', '.join(map(str, common))}): mean difference "
                                  f"{_signed(d['mean'])}, 95% paired t-interval {ci or '—'}, p = {p}"})
        if any_value:
            out_rows.append({"first": a, "second": b, "train_len": a["train_len"], "vals": vals})
    return {"lengths": [{"value": l, "label": fmt_len(l)} for l in lengths], "rows": out_rows, "records": records}


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + fmt_num(v)


def seed_summary(spread: dict, pairs: dict, longest: int | None) -> dict | None:
    """What the findings say about seeds at the longest length: each seeded group's range over its seeds relative to
    its mean, and how many method pairs differ there beyond the run-to-run spread."""
    at = [r for r in spread["records"] if r["eval_len"] == longest and r["mean"]]
    if not at:
        return None
    rel = {r["cell"]: (r["max"] - r["min"]) / r["mean"] for r in at}
    paired = [r for r in pairs["records"] if r["eval_len"] == longest and not math.isnan(r["low"])]
    return {"longest": longest, "relative_range": rel, "pairs": len(paired),
            "differ": sum(1 for r in paired if r["low"] > 0 or r["high"] < 0),
            "seeds": sorted({r["n"] for r in at})}
