# Base stage: pretrain the base model from scratch (or import a checkpoint directory).
rule base:
    input:
        manifest=f"{R}/data/manifest.json",
        train=f"{R}/data/train.npy",
    output:
        model=directory(f"{R}/base/model"),
        info=f"{R}/base/model_info.json",
    params:
        cfg=json.dumps(stage_config(CFG, stage="base"), sort_keys=True),
        cfg_file=f"{R}/configs/base.json",
    resources:
        **RESOURCES["base"],
    log:
        f"{R}/logs/base.log",
    benchmark:
        f"{R}/benchmarks/base.tsv"
    conda:
        "../../envs/ctxext.yaml"
    threads: CFG["pretrain"]["threads"]
    shell:
        WRITE_CONFIG + " && {PY} -m workflow.stages.base --config {params.cfg_file} --data-dir {R}/data --out {R}/base "
        "--threads {threads} " + TEE
