"""Publish stage: copy a study's report, its exported tables, its figures, the documents it links to and its
database into a folder ready for static hosting (<dest>/<study>/), and (re)write <dest>/index.html listing every study published there."""
from __future__ import annotations

import argparse
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from markupsafe import Markup

from workflow.report import DOCS_DIR, EXPORT_DIR, FIGURES_DIR, TEMPLATES_DIR, make_env

# What a study folder contributes: the report, its tables, its figures (standalone SVG), the documents it links to,
# the store's metric exports, the database.
ITEMS = ("report.html", EXPORT_DIR, FIGURES_DIR, DOCS_DIR, "exports", "metrics.duckdb")


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or folder through a temporary name, so a reader never sees half a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
    else:
        shutil.copy2(src, tmp)
    tmp.replace(dst)


def write_index(dest: Path, templates_dir: Path = TEMPLATES_DIR) -> Path:
    """index.html listing every <dest>/<study>/report.html with its files."""
    studies = []
    for report in sorted(dest.glob("*/report.html")):
        folder = report.parent
        tables = sorted(p.name for p in (folder / EXPORT_DIR).glob("*.csv")) if (folder / EXPORT_DIR).is_dir() else []
        studies.append({"name": folder.name, "tables": tables,
                         "db": (folder / "metrics.duckdb").exists(),
                         "updated": datetime.fromtimestamp(report.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M")})
    css = Markup((templates_dir / "report.css").read_text())
    html = make_env(templates_dir).get_template("index.html.j2").render(css=css, studies=studies,
                                                                       export_dir=EXPORT_DIR)
    out = dest / "index.html"
    tmp = out.with_name(".index.html.tmp")
    tmp.write_text(html)
    tmp.replace(out)
    return out


def publish(study_dir: Path, dest: Path) -> Path:
    """Copy results/<study>/{report.html, report_tables, figures, docs, exports, metrics.duckdb} to <dest>/<study>/."""
    study_dir, dest = Path(study_dir), Path(dest)
    if not (study_dir / "report.html").exists():
        raise FileNotFoundError(f"no report at {study_dir / 'report.html'}; run the report stage first")
    target = dest / study_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for item in ITEMS:
        if (study_dir / item).exists():
            _copy(study_dir / item, target / item)
    write_index(dest)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Copy a study's report, tables and database to a hosting folder.")
    parser.add_argument("--study-dir", type=Path, required=True, help="results/<study>")
    parser.add_argument("--dest", type=Path, required=True, help="the folder to publish into")
    args = parser.parse_args(argv)
    try:
        target = publish(args.study_dir, args.dest)
    except FileNotFoundError as exc:
        print(f"publish: error: {exc}", file=sys.stderr)
        return 2
    print(f"publish: {target} (index: {args.dest / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
