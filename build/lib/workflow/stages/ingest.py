"""Ingest stage: store every result file of a study in its DuckDB database (idempotent upsert; see
`workflow.store`) and print what was stored.

    python -m workflow.stages.ingest --study-dir results/tiny --db results/tiny/metrics.duckdb
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workflow.store import StoreError, ingest


def format_summary(counts: dict, study_dir: Path, db_path: Path) -> str:
    lines = [f"store: ingested {study_dir} into {db_path} (run {counts['run_id']})",
             f"  cells      {counts['cells']:>7}  ({counts['cells_ok']} with results, "
             f"{counts['cells'] - counts['cells_ok'] - len(counts['cells_failed'])} missing results, "
             f"{len(counts['cells_failed'])} failed)"]
    lines += [f"    failed: {cid}: {reason}" for cid, reason in counts["cells_failed"]]
    for table in ("metrics", "train_log", "study", "runs"):
        lines.append(f"  {table:<10} {counts[table]:>7} rows")
    lines.append(f"  files      {counts['files_read']:>7} read, {counts['skipped']} skipped")
    lines += [f"    skipped: {line}" for line in counts["skipped_files"]]
    lines.append("  exports    " + ", ".join(counts["exports"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Ingest a study's result files into DuckDB.")
    parser.add_argument("--study-dir", type=Path, required=True, help="results/<study>")
    parser.add_argument("--db", type=Path, required=True, help="the DuckDB file to upsert into")
    parser.add_argument("--exports", type=Path, default=None,
                        help="folder of metrics.csv/metrics.parquet (default: <study-dir>/exports)")
    parser.add_argument("--run-id", default=None, help="id of this run (default: time + random)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when any result file was skipped")
    args = parser.parse_args(argv)
    try:
        counts = ingest(args.study_dir, args.db, {"run_id": args.run_id}, export_dir=args.exports)
    except StoreError as exc:
        print(f"store: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(counts, args.study_dir, args.db))
    return 1 if args.strict and counts["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
