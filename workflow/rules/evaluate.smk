# Evaluate stage: one job per cell; one JSON file of tidy rows per task. The cell's resolved config
# is written beside its results (cell.json).
# A checkpoint cell (regime checkpoint, workflow.checkpoints) evaluates its own checkpoint, not the base model: its
# local files are the rule's inputs (none for a hub id; the stage fetches the snapshot, or stops offline) and the stage
# takes no --model.
def cell_model_dir(wildcards):
    regime = CELLS[wildcards.cell]["regime"]
    if regime == "finetuned":
        return f"{R}/cells/{wildcards.cell}/model"
    return [] if regime == CHECKPOINT else f"{R}/base/model"


def model_arg(wildcards, input):
    return "" if CELLS[wildcards.cell]["regime"] == CHECKPOINT else f"--model {shlex.quote(str(input.model))}"


rule cell_config:
    output:
        f"{R}/cells/{{cell}}/cell.json",
    params:
        record=lambda w: json.dumps(cell_record(CFG, CELLS[w.cell], VERSION), sort_keys=True),
    log:
        f"{R}/logs/cell_config/{{cell}}.log",
    shell:
        "printf '%s\\n' {params.record:q} > {output} 2> {log}"


rule evaluate:
    input:
        manifest=f"{R}/data/manifest.json",
        # the data files the study's tasks read (workflow.tasks registry)
        data=sorted({f"{R}/data/{name}" for task in TASKS for name in get_task(task).data_files}),
        model=cell_model_dir,
        checkpoint=lambda w: checkpoint_files(CELLS[w.cell]),
    output:
        expand(f"{R}/cells/{{{{cell}}}}/eval/{{task}}.json", task=TASKS),
    params:
        cfg=lambda w: json.dumps(stage_config(CFG, CELLS[w.cell], "evaluate"), sort_keys=True),
        cfg_file=f"{R}/configs/evaluate-{{cell}}.json",
        model=model_arg,
    resources:
        **RESOURCES["evaluate"],
    log:
        f"{R}/logs/evaluate/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{cell}}.tsv"
    conda:
        "../../envs/ctxext.yaml"
    threads: CFG["eval"]["threads"]
    shell:
        WRITE_CONFIG + " && {PY} -m workflow.stages.evaluate --config {params.cfg_file} --data-dir {R}/data "
        "{params.model} --out {R}/cells/{wildcards.cell}/eval --threads {threads} " + TEE
