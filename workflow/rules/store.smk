# Store stage: the only writer of metrics.duckdb. `update()` keeps the database in place (Snakemake
# would otherwise delete an output before rerunning its job): ingest upserts, never duplicates.
from pathlib import Path

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


def recorded_failures():
    """Cells whose fine-tuning or evaluation stopped under the current configuration: the stage wrote
    cells/<cell>/failed.json (diverged loss, too little memory) with the hash of the config it ran.
    Their results are not required, so after a `--keep-going` run a second `snakemake report` ingests
    and reports what exists, with these cells marked failed. A changed config retries them; so does
    asking for the cell's results explicitly (the stage removes the record when it starts)."""
    failed = []
    for cid, cell in CELLS.items():
        path = Path(R) / "cells" / cid / "failed.json"
        try:
            record = json.loads(path.read_text())
            stage = record["stage"]
            current = config_hash(stage_config(CFG, cell, stage))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.get("config_hash") == current:
            failed.append(cid)
    if failed:
        print(f"ctxext: {len(failed)} cell(s) failed earlier and are reported as failed: {', '.join(failed)}",
              file=sys.stderr)
    return failed


FAILED = recorded_failures()


rule ingest:
    input:
        study=f"{R}/study.json",
        cells=expand(f"{R}/cells/{{cell}}/cell.json", cell=CELLS),
        results=expand(f"{R}/cells/{{cell}}/eval/{{task}}.json", cell=[c for c in CELLS if c not in FAILED],
                       task=TASKS),
        failures=expand(f"{R}/cells/{{cell}}/failed.json", cell=FAILED),
    output:
        db=update(f"{R}/metrics.duckdb"),
    log:
        f"{R}/logs/ingest.log",
    conda:
        "../../envs/ctxext.yaml"
    shell:
        "{PY} -m workflow.stages.ingest --study-dir {R} --db {output.db} 2> >(tee -a {log} >&2)"
