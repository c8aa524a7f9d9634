"""Rendering: the template context built from the database, and what the report stage writes beside report.html:
the page itself, its tables (report_tables/), its figures as standalone SVG files (figures/) and a copy of the
documents it cites (docs/), so that its links resolve in a clone and wherever the folder is published."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from workflow.report.cells import describe_data, describe_training_data, describe_model, load_cells, load_reference
from workflow.report.charts import Chart
from workflow.report.claims import Evidence, claims_scoreboard, correlations, findings
from workflow.report.formatting import abbreviate, as_json, fmt_count, fmt_duration, fmt_len, pretty
from workflow.report.queries import Db, load_queries
from workflow.report.seeds import group_cells, seed_summary
from workflow.report.sections import (benchmarks_section, perplexity_section, reference_section, retrieval_section, task_suites_section,
                                      training_section)

REPO = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = REPO / "reports" / "templates"
EXPORT_DIR = "report_tables"                     # beside report.html: one CSV + Parquet per table
FIGURES_DIR = "figures"                          # beside report.html: one standalone SVG per figure
DOCS_DIR = "docs"                                # beside report.html: the documents the report links to
DOCS_SOURCE = REPO / "docs"
DOCS = ("methods.md", "reference-study.md")

PACKAGES = ("torch", "transformers", "lm-eval", "snakemake", "hydra-core", "duckdb", "jinja2", "scipy", "numpy")


def package_versions() -> list[tuple[str, str]]:
    from importlib import metadata
    out = []
    for name in PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return out


def rerun_command(study: str, cell: dict) -> str:
    """The shell command that recomputes one cell's results and the report (see README)."""
    stages = "finetune evaluate" if cell["regime"] == "finetuned" else "evaluate"
    return (f"snakemake results/{study}/cells/{cell['cell_id']}/eval/ppl.json --cores all "
            f"--forcerun {stages} --config study={study} && snakemake report --cores all --config study={study}")


def data_hashes(manifest: dict) -> list[dict]:
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    return [{"split": k, "files": v.get("files"), "tokens": fmt_count(v.get("tokens")),
             "file_list_sha256": v.get("file_list_sha256"), "text_sha256": v.get("text_sha256")}
            for k, v in splits.items() if isinstance(v, dict)]


def build_context(db: Db, ppl_clip: float) -> dict:
    """Everything the template shows, computed from the database (and the two reference files)."""
    methods, paper = load_reference()
    study = {r["key"]: as_json(r["value"]) for r in db.rows("study")}
    stored = load_cells(db, study.get("cells"), methods)  # every stored cell: one per seed of a fine-tuned cell
    cells = group_cells(stored)                            # one per cell: its seeds together (workflow.report.seeds)
    group_of = {c["cell_id"]: c["group"] for c in stored}
    base_window = study.get("base_window") or next((c["base_window"] for c in cells if c["base_window"]), None)
    base_cell = next((c["cell_id"] for c in cells if c["rope"] == "none" and c["attention"] == "exact"
                      and c["regime"] == "frozen"), None)
    ppl = perplexity_section(db, cells, base_window, ppl_clip, group_of)
    retrieval = retrieval_section(db, cells, base_cell, base_window, group_of)
    suites = task_suites_section(db, cells, group_of)
    downstream = {task: info["means"] for task, info in retrieval.items()}
    for s in suites:  # a suite with several metrics gets one score per metric
        several = sum(x["suite"] == s["suite"] for x in suites) > 1
        downstream[f"{s['suite']} ({s['metric']})" if several else s["suite"]] = s["means"]
    # A score that is the same for every cell (e.g. 0% everywhere) ranks nothing: findings and claims skip it.
    informative = {k: v for k, v in downstream.items() if len(set(v.values())) > 1}
    ev = Evidence(cells, {(r["cell_id"], r["eval_len"]): r["value"] for r in ppl["rows"] if r["value"] is not None},
                  informative, base_cell, base_window, paper["thresholds"])
    corr = correlations(ev, downstream, paper)
    claims = claims_scoreboard(ev, corr, paper)
    training = training_section(db, stored, study.get("base_train") or {})
    seeds = sorted({c["seed"] for c in stored if c["seed"] is not None})
    totals = db.one("compute_totals")
    runs = db.rows("runs")
    manifest = study.get("manifest") or study.get("data") or {}
    n_ft = sum(c["regime"] == "finetuned" for c in stored)
    code_version = study.get("code_version") or (runs[-1]["code_version"] if runs else "unknown")
    name = str(study.get("name") or (cells[0]["study"] if cells else "unnamed study"))
    configs = {r["cell_id"]: r for r in db.rows("cell_configs")}
    return {
        "name": name,
        "description": study.get("description"),
        "model": describe_model(study.get("model"), base_window),
        "data": describe_data(study.get("data") or manifest),
        "training_data": describe_training_data(study.get("config"), study.get("model")),
        "grid": {"cells": len(stored), "finetuned": n_ft, "frozen": sum(c["regime"] == "frozen" for c in stored),
                 "checkpoint": sum(c["regime"] == "checkpoint" for c in stored),
                 "not_ok": sum(not c["ok"] for c in stored),
                 "methods": sorted({c["method"] for c in cells if c["method"] != "—"}),
                 "targets": [fmt_len(n) for n in sorted({c["train_len"] for c in cells if c["train_len"]}
                                                        - {base_window})],
                 "eval_lens": [col["label"] for col in ppl["table"]["lengths"]]},
        "compute": {"total": fmt_duration(sum(v or 0 for v in totals.values())),
                    "pretrain": fmt_duration(totals.get("pretrain_s")),
                    "finetune": fmt_duration(totals.get("finetune_s")),
                    "eval": fmt_duration(totals.get("eval_s"))},
        "date": runs[-1]["started_at"][:10] if runs else "—",
        "code_version": code_version,
        "other_code_versions": sorted({c["code_version"] for c in cells if c["code_version"]} - {code_version}),
        "findings": findings(ev, corr, claims, retrieval, seed_summary(ppl["spread"], ppl["pairs"], ev.longest)),
        "cells": cells,
        "seeds": {"numbers": seeds, "seeded": any(c["seeded"] for c in cells),
                  "groups": sum(c["seeded"] for c in cells), "ppl_spread": ppl["spread"], "ppl_pairs": ppl["pairs"]},
        "ppl_table": ppl["table"], "ppl_chart": ppl["chart"],
        "retrieval": retrieval,
        "suites": suites,
        "correlations": [{**c, "tau_text": "—" if c["tau"] is None else f"{c['tau']:+.2f}",
                          "p_text": "—" if c["p"] is None else f"{c['p']:.3f}",
                          "paper_tau_text": "—" if c["paper_tau"] is None else f"{c['paper_tau']:+.4f}",
                          "paper_p_text": "—" if c["paper_p"] is None else f"{c['paper_p']:.4f}"} for c in corr],
        "longest": fmt_len(ev.longest) if ev.longest else "—",
        "reference": reference_section(cells, ev, downstream, paper),
        "claims": claims,
        "train_charts": training["charts"], "efficiency": training["table"], "benchmarks": benchmarks_section(db),
        "config_json": pretty(study["config"]) if study.get("config") is not None else None,
        "cell_configs": [{"cell_id": c["cell_id"], "status": c["status"],
                          "config": pretty(as_json(configs[c["cell_id"]]["config"])) if c["cell_id"] in configs
                          else None, "rerun": rerun_command(name, c) if c["regime"] != "—" else
                          f"snakemake --cores all --config study={name} report"} for c in stored],
        "manifest_json": pretty(abbreviate(manifest)) if manifest else None,
        "data_hashes": data_hashes(manifest),
        "packages": package_versions(),
        "runs": runs,
        "schema_version": db.one("schema_version").get("version"),
        "exports": export_tables(stored, ppl["rows"], retrieval, suites, corr, claims, training["table"], ppl),
        "figures": name_figures([ppl["chart"], *(p for r in retrieval.values() for p in r["panels"]),
                                 *training["charts"]]),
    }


def safe_name(name: str) -> str:
    """A file name made of letters, digits, '_', '.' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "figure"


def name_figures(charts: list[Chart]) -> list[Chart]:
    """Give every chart its file under figures/ (a safe, unique name; a clash gets -2, -3, ...)."""
    taken = set()
    for chart in charts:
        stem, k = safe_name(chart.name), 1
        while (f"{stem}-{k}" if k > 1 else stem).lower() in taken:
            k += 1
        stem = f"{stem}-{k}" if k > 1 else stem
        taken.add(stem.lower())
        chart.file = f"{FIGURES_DIR}/{stem}.svg"
    return charts


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Put the finished folder `tmp` in place of `dst` (a reader sees the old or the new folder, then the new)."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.replace(old)
    tmp.replace(dst)
    shutil.rmtree(old, ignore_errors=True)


def copy_docs(out_dir: Path, source: Path = DOCS_SOURCE, names: tuple[str, ...] = DOCS) -> list[Path]:
    """The documents the report cites (docs/methods.md, docs/reference-study.md), copied to out_dir/docs/."""
    missing = [name for name in names if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the report links to {', '.join(missing)}, not found in {source}")
    tmp = out_dir / f".{DOCS_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in names:
        shutil.copy2(source / name, tmp / name)
    _replace_dir(tmp, out_dir / DOCS_DIR)
    return [out_dir / DOCS_DIR / name for name in names]


def write_figures(charts: list[Chart], out_dir: Path, css: str) -> list[Path]:
    """Every chart as a standalone SVG file at out_dir/<chart.file>; the figures folder holds nothing else."""
    folder = out_dir / FIGURES_DIR
    tmp = out_dir / f".{FIGURES_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for chart in charts:
        (tmp / Path(chart.file).name).write_text(chart.document(css))
    _replace_dir(tmp, folder)
    return [out_dir / chart.file for chart in charts]


def export_tables(cells, ppl_rows, retrieval, suites, corr, claims, efficiency, ppl=None) -> dict[str, list[dict]]:
    """The report's tables as plain rows (numbers unformatted), one entry per exported file: `cells` one row per stored
    cell (each seed), the result tables one row per cell group and length as shown (seed means), the seeds' spread and
    paired differences where cells have several seeds."""
    keep = ("cell_id", "group", "seed", "method", "family", "regime", "train_len", "rope", "attention", "changes",
            "params_added", "params", "spec", "config_hash", "status", "checkpoint")
    value_keys = ("cell_id", "eval_len", "depth", "task", "value", "n", "ci_low", "ci_high", "n_seeds")
    shown = lambda rows: [{k: r[k] for k in value_keys if k in r} for r in rows]  # noqa: E731
    tables = {"cells": [{k: c.get(k) for k in keep} for c in cells], "perplexity": shown(ppl_rows)}
    if ppl is not None:
        tables["seed_spread_ppl"] = ppl["spread"]["records"]
        tables["seed_pairs_ppl"] = ppl["pairs"]["records"]
    for task, info in retrieval.items():
        tables[f"retrieval_{task}"] = shown(info["grid"])
        tables[f"seed_spread_{task}"] = info["spread"]["records"]
    for s in suites:
        tables[f"suite_{s['suite']}_{s['metric']}"] = shown(s["rows"])
    tables["correlation"] = [{k: c[k] for k in ("score", "n", "tau", "p", "paper_task", "paper_tau", "paper_p")}
                             for c in corr]
    tables["claims"] = [{"id": c["id"], "claim": c["claim"], "reference_numbers": c["evidence"],
                         "verdict": c["verdict"], "deciding_numbers": c["ours"], "cells": ", ".join(c["cells"])}
                        for c in claims]
    tables["efficiency"] = efficiency
    return tables


def write_exports(tables: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Each table as <name>.csv and <name>.parquet (DuckDB COPY); a table with no rows is skipped."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    con = duckdb.connect(":memory:")
    try:
        for name, rows in tables.items():
            if not rows:
                continue
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            con.register("export_rows", pd.DataFrame(rows))
            for ext, options in (("csv", "(HEADER)"), ("parquet", "(FORMAT parquet)")):
                path = out_dir / f"{safe}.{ext}"
                tmp = out_dir / f".{safe}.{ext}.tmp"
                con.execute(f"COPY export_rows TO '{tmp}' {options}")
                tmp.replace(path)
                written.append(path)
            con.unregister("export_rows")
    finally:
        con.close()
    return written


def make_env(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    return Environment(loader=FileSystemLoader(str(templates_dir)),
                       autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True,
                                                    default_for_string=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_report(db_path: Path, out_path: Path, ppl_clip: float = 1e4,
                  templates_dir: Path = TEMPLATES_DIR) -> None:
    """Render the study in `db_path` (opened read-only) into the self-contained HTML `out_path`, its tables into
    report_tables/, its figures into figures/ and the documents it links to into docs/ beside it."""
    db_path, out_path = Path(db_path), Path(out_path)
    if not db_path.exists():
        raise FileNotFoundError(f"no database at {db_path}; run the store stage first")
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        context = build_context(Db(con, load_queries()), ppl_clip)
    finally:
        con.close()
    env = make_env(templates_dir)
    chart_css = (templates_dir / "charts.css").read_text()
    css = Markup((templates_dir / "report.css").read_text() + "\n" + chart_css)
    html = env.get_template("report.html.j2").render(css=css, **context)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_exports(context["exports"], out_path.parent / EXPORT_DIR)
    write_figures(context["figures"], out_path.parent, chart_css)
    copy_docs(out_path.parent)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(out_path)
