# Report stage: one self-contained HTML file rendered from DuckDB (opened read-only), its tables as CSV and
# Parquet (report_tables/), every figure as a standalone SVG file (figures/) and a copy of the documents the report
# links to (docs/).
rule report:
    input:
        db=f"{R}/metrics.duckdb",
        # copied beside the report, which links to them
        docs=[f"{workflow.basedir}/docs/methods.md", f"{workflow.basedir}/docs/reference-study.md"],
    output:
        html=f"{R}/report.html",
        tables=directory(f"{R}/report_tables"),
        figures=directory(f"{R}/figures"),
        docs=directory(f"{R}/docs"),
    log:
        f"{R}/logs/report.log",
    conda:
        "../../envs/ctxext.yaml"
    shell:
        "{PY} -m workflow.stages.report --db {input.db} --out {output.html} 2> >(tee -a {log} >&2) && "
        "echo 'ctxext: report written to {output.html}' >&2"
