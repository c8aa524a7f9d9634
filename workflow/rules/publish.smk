# Publish: copy the report, its tables, figures and documents and the database to a static-hosting folder, with an index of
# every study there. `snakemake --cores all publish --config publish_dir=<dir>` (default: results/public).
# The rule has no output file, so naming it as the target always runs it.
rule publish:
    input:
        html=f"{R}/report.html",
        tables=f"{R}/report_tables",
        figures=f"{R}/figures",
        docs=f"{R}/docs",
        db=f"{R}/metrics.duckdb",
    params:
        dest=config.get("publish_dir", "results/public"),
    log:
        f"{R}/logs/publish.log",
    conda:
        "../../envs/ctxext.yaml"
    shell:
        "{PY} -m workflow.stages.publish --study-dir {R} --dest {params.dest:q} " + TEE
