# Data stage: corpus, tokenizer, token files and the retrieval sets of the study.
rule data:
    output:
        manifest=f"{R}/data/manifest.json",
        train=f"{R}/data/train.npy",
        test=f"{R}/data/test.npy",
        passkey=f"{R}/data/passkey.jsonl",
        needle=f"{R}/data/needle.jsonl",
    params:
        cfg=json.dumps(stage_config(CFG, stage="data"), sort_keys=True),
        cfg_file=f"{R}/configs/data.json",
    resources:
        **RESOURCES["data"],
    log:
        f"{R}/logs/data.log",
    benchmark:
        f"{R}/benchmarks/data.tsv"
    conda:
        "../../envs/ctxext.yaml"
    threads: 2
    shell:
        WRITE_CONFIG + " && {PY} -m workflow.stages.data --config {params.cfg_file} --out {R}/data " + TEE
