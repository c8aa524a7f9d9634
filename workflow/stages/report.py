"""Report stage: render a study's metrics.duckdb (opened read-only) into one self-contained HTML file, and beside it
its tables (report_tables/), its figures as standalone SVG (figures/) and the documents it links to (docs/); see
`workflow.report`.

    python -m workflow.stages.report --db results/tiny/metrics.duckdb --out results/tiny/report.html
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb

from workflow.report import render_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Render a study's metrics.duckdb into one HTML report.")
    parser.add_argument("--db", type=Path, required=True, help="results/<study>/metrics.duckdb")
    parser.add_argument("--out", type=Path, required=True, help="results/<study>/report.html")
    parser.add_argument("--ppl-clip", type=float, default=1e4,
                        help="perplexities above this are drawn at the top of the chart")
    args = parser.parse_args(argv)
    try:
        render_report(args.db, args.out, ppl_clip=args.ppl_clip)
    except (FileNotFoundError, duckdb.Error) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
