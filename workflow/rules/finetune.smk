# Fine-tune stage: one job per fine-tuned cell, the same recipe for every method.
rule finetune:
    input:
        manifest=f"{R}/data/manifest.json",
        base=f"{R}/base/model",
    output:
        model=directory(f"{R}/cells/{{finetuned_cell}}/model"),
    params:
        cfg=lambda w: json.dumps(stage_config(CFG, CELLS[w.finetuned_cell], "finetune"), sort_keys=True),
        cfg_file=f"{R}/configs/finetune-{{finetuned_cell}}.json",
    resources:
        **RESOURCES["finetune"],
    log:
        f"{R}/logs/finetune/{{finetuned_cell}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{finetuned_cell}}.tsv"
    conda:
        "../../envs/ctxext.yaml"
    threads: CFG["finetune"]["threads"]
    # fine-tuning jobs go before the evaluations that are ready at the start (the frozen cells'), so that no cell's
    # fine-tuning and evaluation are left to run one after the other at the end on an otherwise idle machine
    priority: 10
    shell:
        WRITE_CONFIG + " && " + LAUNCH_FINETUNE + " -m workflow.stages.finetune --config {params.cfg_file} --data-dir {R}/data "
        "--base {input.base} --out {R}/cells/{wildcards.finetuned_cell} --threads {threads} " + TEE
