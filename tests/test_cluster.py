"""The real-model studies without the models: `snakemake -n` of smollm2 and llama2_7b, the resources of every model
rule, the multi-GPU launch command of the fine-tuning rule, and the SLURM submission built by
snakemake-executor-plugin-slurm (with stand-ins for sbatch/sacctmgr that record the call: no cluster here)."""
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO
from workflow.config import ConfigError, compose, expand_grid, launch_prefix


def snakemake(workdir, *args, env=None, ok=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if ok:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


@pytest.mark.parametrize("study,cells,jobs", [("smollm2", 16, 49), ("llama2_7b", 11, 34)])
def test_the_real_studies_dry_run_without_their_models(tmp_path, study, cells, jobs):
    out = snakemake(tmp_path, "-n", "-p", "--cores", "8", "--config", f"study={study}")
    assert re.search(rf"^total\s+{jobs}$", out, re.M), out[-2000:]
    assert f"{cells} cells" in out
    finetune = [line for line in out.splitlines() if "-m workflow.stages.finetune" in line]
    assert finetune
    resources = re.findall(r"resources: .*", out)
    want = compose(study)["resources"]
    assert any(f"gpu={want['finetune']['gpu']}, " in r and f"runtime={want['finetune']['runtime']}" in r
               for r in resources)
    if study == "llama2_7b":  # 8-GPU FSDP through accelerate, its config file found from any working directory
        prefix = f"accelerate launch --config_file {REPO}/config/accelerate/fsdp_8gpu.yaml -m workflow.stages.finetune"
        assert all(prefix in line for line in finetune), finetune[0][-400:]
    else:
        assert all(f"{sys.executable} -m workflow.stages.finetune" in line for line in finetune)
    assert not (tmp_path / "results").exists()  # a dry run touches nothing


def test_the_studies_follow_their_protocols():
    llama = compose("llama2_7b")
    ft = llama["finetune"]
    assert (ft["lr"], ft["schedule"], ft["warmup_steps"], ft["weight_decay"]) == (2e-5, "constant_with_warmup", 20, 0.0)
    assert ft["steps"] * ft["tokens_per_step"] >= 1e9  # LCEG's 1B tokens at 32k
    assert (llama["model"]["source"], llama["model"]["hub_id"], llama["model"]["base_window"]) == (
        "hub", "meta-llama/Llama-2-7b-hf", 4096)
    cells = {c["cell_id"]: c for c in expand_grid(llama)}
    assert cells["dynamic_ntk-exact-32768-ft"]["method_params"] == {"factor": 4.0, "floor": 32768}  # NTK-32K
    assert cells["dynamic_ntk-exact-32768-frozen"]["method_params"]["factor"] == 2.0  # NTK-Frozen
    assert cells["clex-exact-32768-ft"]["method_params"]["max_factor"] == 32
    assert cells["none-lm_infinite-4096-frozen"]["attention_params"] == {"n_local": 4096, "n_global": 10,
                                                                         "distance_cap": 4096}
    assert cells["none-landmark-4096-ft"]["attention_params"] == {"mem_freq": 63, "top_k": 5, "train_context": 512,
                                                                  "landmark_in_loss": True}
    smol = compose("smollm2")
    assert smol["study"]["train_lens"] == [16384, 32768] and smol["eval"]["lengths"][-1] == 65536
    assert smol["eval"]["tasks"] == compose("tiny")["eval"]["tasks"]
    assert {c["rope"] for c in expand_grid(smol)} == {c["rope"] for c in expand_grid(compose("tiny"))}
    with pytest.raises(ConfigError, match="model.source='hub' needs model.hub_id"):
        compose("llama2_7b", ["model.hub_id=null"])
    with pytest.raises(ConfigError, match="model.source must be one of"):
        compose("smollm2", ["model.source=ftp"])


def test_the_launch_prefix():
    assert launch_prefix("", "/usr/bin/python3") == "/usr/bin/python3"
    assert launch_prefix(None, "/opt/my env/python") == "'/opt/my env/python'"
    got = launch_prefix("torchrun --nproc_per_node 8 --rdzv-conf timeout={600}", "python")
    assert got == "torchrun --nproc_per_node 8 '--rdzv-conf' 'timeout={{600}}'".replace("'--rdzv-conf'", "--rdzv-conf")
    assert launch_prefix("accelerate launch --config_file config/accelerate/fsdp_8gpu.yaml", "python") == (
        f"accelerate launch --config_file {REPO}/config/accelerate/fsdp_8gpu.yaml")
    with pytest.raises(ConfigError, match="finetune.launcher="):
        launch_prefix("torchrun 'unclosed", "python")


FAKE_SBATCH = """#!/bin/bash
{ printf 'ARGS:'; printf ' %q' "$@"; printf '\\n'; cat; } >> "$FAKE_SBATCH_LOG"
echo "fake sbatch: recorded, not submitted" >&2
exit 1
"""


def test_the_slurm_profile_builds_the_8_gpu_submission(tmp_path):
    """Runs the llama2_7b fine-tuning job with --workflow-profile profiles/slurm; the plugin checks the account
    (sacctmgr) and calls sbatch, both stand-ins here, so the submission is recorded and nothing runs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sacctmgr").write_text("#!/bin/sh\necho CHANGE_ME\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    results = work / "results" / "llama2_7b"
    for name in ("data/manifest.json", "data/train.npy", "data/test.npy", "data/passkey.jsonl", "data/needle.jsonl"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).touch()
    (results / "base" / "model").mkdir(parents=True)  # after the data: up to date
    (results / "base" / "model_info.json").touch()
    log = tmp_path / "sbatch.log"
    out = snakemake(work, "results/llama2_7b/cells/yarn-exact-32768-ft/model",
                    "--workflow-profile", str(REPO / "profiles" / "slurm"),
                    "--slurm-init-seconds-before-status-checks", "1", "--config", "study=llama2_7b",
                    env={"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_SBATCH_LOG": str(log)}, ok=False)
    assert "fake sbatch: recorded" in out, out[-3000:]
    call = log.read_text()
    res = compose("llama2_7b")["resources"]["finetune"]
    assert f"--gpus={res['gpu']}" in call and f"-t {res['runtime']}" in call and f"--mem {res['mem_mb']}" in call
    assert "-A CHANGE_ME" in call and "-p gpu" in call
    assert "finetune:finetuned_cell=yarn-exact-32768-ft" in call  # the job the submission runs
    assert call.count("ARGS:") == 1  # only the fine-tuning job was due
