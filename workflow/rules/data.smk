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
    log:
        f"{R}/logs/data.log",
    threads: 2
    run:
        path = job_config("data", params.cfg)
        shell(f"OMP_NUM_THREADS={threads} {PY} -m workflow.data --config {path} --out {R}/data {tee(log)}")
