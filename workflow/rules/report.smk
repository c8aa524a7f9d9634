# Report stage: one self-contained HTML file rendered from DuckDB (opened read-only).
rule report:
    input:
        db=f"{R}/metrics.duckdb",
    output:
        html=f"{R}/report.html",
        tables=directory(f"{R}/report_tables"),
    log:
        f"{R}/logs/report.log",
    conda:
        "../../envs/ctxext.yaml"
    shell:
        "{PY} -m workflow.stages.report --db {input.db} --out {output.html} 2> >(tee -a {log} >&2) && "
        "echo 'ctxext: report written to {output.html}' >&2"
