# Store stage: the only writer of metrics.duckdb. `update()` keeps the database in place (Snakemake
# would otherwise delete an output before rerunning its job): ingest upserts, never duplicates.
rule study_info:
    input:
        manifest=f"{R}/data/manifest.json",
        model=f"{R}/base/model_info.json",
    output:
        f"{R}/study.json",
    params:
        cfg=json.dumps(CFG, sort_keys=True),
        version=VERSION,
    run:
        from workflow.common import read_json, write_json

        cfg = json.loads(params.cfg)
        write_json(output[0], {
            "name": STUDY, "description": cfg["study"]["description"],
            "base_window": cfg["model"]["base_window"], "train_lens": cfg["study"]["train_lens"],
            "eval_lengths": cfg["eval"]["lengths"], "model": read_json(input.model),
            "data": read_json(input.manifest), "config": cfg, "cells": list(CELLS),
            "code_version": params.version,
        })


rule ingest:
    input:
        study=f"{R}/study.json",
        cells=expand(f"{R}/cells/{{cell}}/cell.json", cell=CELLS),
        results=expand(f"{R}/cells/{{cell}}/eval/{{task}}.json", cell=CELLS, task=TASKS),
    output:
        db=update(f"{R}/metrics.duckdb"),
    log:
        f"{R}/logs/ingest.log",
    shell:
        "{PY} -m workflow.store --study-dir {R} --db {output.db} 2> >(tee -a {log} >&2)"
