"""The report: render metrics.duckdb (opened read-only) into one self-contained HTML file (run by the report stage,
`workflow.stages.report`).

The package, by concern:

- `queries` runs the named SQL queries of queries.sql (all the report's SQL) against the database;
- `cells` describes the study's cells (method labels, the method overview from reports/reference/methods.yaml);
- `sections` turns the query results into each section's tables and figures;
- `claims` holds the evidence, the rank correlations, the rules of the claims scoreboard and the findings;
- `charts` is the SVG chart library (scales, axes, line chart, heat map);
- `formatting` writes numbers, lengths, durations and JSON;
- `render` builds the template context, writes the exported tables and renders the page.

The page is reports/templates/report.html.j2 with report.css and charts.css inlined; the charts are inline SVG (no
JavaScript, no external resources), and each is also written as a standalone SVG file into figures/; the documents the
report cites are copied into docs/ beside it.
"""
from workflow.report.render import (DOCS, DOCS_DIR, EXPORT_DIR, FIGURES_DIR, TEMPLATES_DIR, build_context, make_env,
                                    render_report)

__all__ = ["DOCS", "DOCS_DIR", "EXPORT_DIR", "FIGURES_DIR", "TEMPLATES_DIR", "build_context", "make_env",
           "render_report"]
