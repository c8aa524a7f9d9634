# Evaluate stage: one job per cell; one JSON file of tidy rows per task. The cell's resolved config
# is written beside its results (cell.json).
def cell_model_dir(wildcards):
    if CELLS[wildcards.cell]["regime"] == "finetuned":
        return f"{R}/cells/{wildcards.cell}/model"
    return f"{R}/base/model"


rule cell_config:
    output:
        f"{R}/cells/{{cell}}/cell.json",
    params:
        record=lambda w: json.dumps(cell_record(CFG, CELLS[w.cell], VERSION), sort_keys=True),
    run:
        from workflow.common import write_json

        write_json(output[0], json.loads(params.record))


rule evaluate:
    input:
        manifest=f"{R}/data/manifest.json",
        passkey=f"{R}/data/passkey.jsonl",
        needle=f"{R}/data/needle.jsonl",
        model=cell_model_dir,
    output:
        expand(f"{R}/cells/{{{{cell}}}}/eval/{{task}}.json", task=TASKS),
    params:
        cfg=lambda w: json.dumps(stage_config(CFG, CELLS[w.cell], "evaluate"), sort_keys=True),
    log:
        f"{R}/logs/evaluate/{{cell}}.log",
    threads: CFG["eval"]["threads"]
    run:
        path = job_config(f"evaluate-{wildcards.cell}", params.cfg)
        shell(f"{PY} -m workflow.evaluate --config {path} --data-dir {R}/data --model {input.model} "
              f"--out {R}/cells/{wildcards.cell}/eval --threads {threads} {tee(log)}")
