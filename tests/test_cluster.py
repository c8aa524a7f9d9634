"""The real-model studies without the models: `snakemake -n` of smollm2 and llama2_7b, the resources, logs and
benchmarks of every model rule, the multi-GPU launch command of the fine-tuning rule, the SLURM submission built by
snakemake-executor-plugin-slurm and the light rules kept off the cluster (with stand-ins for sbatch/sacctmgr that
record the call: no cluster here), and the conda environment of `--sdm conda` (with a stand-in for conda)."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO
from workflow.config import ConfigError, compose, expand_grid, launch_prefix

MODEL_RULES = ("data", "base", "finetune", "evaluate")
LIGHT_RULES = ("cell_config", "study_info", "ingest", "report", "publish")


def snakemake(workdir, *args, env=None, ok=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if ok:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def listed_jobs(out):
    """(rule, local, {field: value}) of every job a Snakemake run prints (`localrule` when it runs in-process)."""
    return [(m[2], bool(m[1]), dict(re.findall(r"^    (\w+): (.*)$", m[3], re.M)))
            for m in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)*)", out, re.M)]


@pytest.mark.parametrize("study,cells,jobs", [("smollm2", 18, 55), ("llama2_7b", 12, 37)])
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
    listed = listed_jobs(out)
    assert len(listed) == jobs_total(out) == jobs
    for rule, _, fields in listed:  # every job that runs a command logs; every model job also writes its benchmark
        if rule in ("all", "study_info"):  # no command: a target, and a few lines of Python in the Snakemake process
            assert "log" not in fields and "benchmark" not in fields, (rule, fields)
            continue
        if rule in ("data", "base"):
            assert fields["log"] == f"results/{study}/logs/{rule}.log", fields
        assert fields["log"].startswith(f"results/{study}/logs/"), (rule, fields)
        if rule in MODEL_RULES:
            cell = fields.get("wildcards", "").partition("=")[2]
            assert fields["benchmark"] == f"results/{study}/benchmarks/{rule}{'/' + cell if cell else ''}.tsv", fields
        else:
            assert "benchmark" not in fields, (rule, fields)
    assert not (tmp_path / "results").exists()  # a dry run touches nothing


def jobs_total(out):
    return int(re.search(r"^total\s+(\d+)$", out, re.M)[1])


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


def test_the_light_rules_run_in_the_snakemake_process_under_slurm(tmp_path):
    """With the SLURM profile and every model output in place, the whole rest of the llama2_7b study (cell records,
    study info, ingest, report, publish) runs in the Snakemake process: `localrule` jobs, sbatch never called."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sacctmgr").write_text("#!/bin/sh\necho CHANGE_ME\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    results = work / "results" / "llama2_7b"
    cfg = compose("llama2_7b")
    cells = [c["cell_id"] for c in expand_grid(cfg)]
    layers = [  # outputs of data, base, finetune and evaluate, each layer newer than the one before
        [f"data/{n}" for n in ("manifest.json", "train.npy", "test.npy", "passkey.jsonl", "needle.jsonl")],
        ["base/model/", "base/model_info.json"],
        [f"cells/{c}/model/" for c in cells if c.endswith("-ft")],
        [f"cells/{c}/eval/{t}.json" for c in cells for t in cfg["eval"]["tasks"]]]
    for age, layer in enumerate(layers):
        for name in layer:
            path = results / name
            if name.endswith("/"):
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            os.utime(path, (1e9 + age * 100, 1e9 + age * 100))
    log = tmp_path / "sbatch.log"
    out = snakemake(work, "publish", "--workflow-profile", str(REPO / "profiles" / "slurm"), "--keep-going",
                    "--slurm-init-seconds-before-status-checks", "1", "--config", "study=llama2_7b",
                    env={"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_SBATCH_LOG": str(log)}, ok=False)
    ran = listed_jobs(out)
    assert {rule for rule, _, _ in ran} == set(LIGHT_RULES), out[-3000:]
    assert all(local for _, local, _ in ran) and len(ran) == len(cells) + 4
    assert not log.exists(), log.read_text()[:2000]  # nothing was submitted
    assert (work / "results" / "public" / "llama2_7b" / "report.html").is_file()


def rule_directives():
    """{rule: (rule file, {directive: its text})} from workflow/rules/*.smk."""
    rules = {}
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for m in re.finditer(r"^rule (\w+):\n((?:(?:    .*)?\n)*)", path.read_text(), re.M):
            rules[m[1]] = (path, dict(re.findall(r"^    (\w+):\n((?:        .*\n)*)", m[2], re.M)))
    return rules


def test_every_rule_that_runs_python_declares_the_conda_environment():
    rules = rule_directives()
    assert set(rules) == {*MODEL_RULES, *LIGHT_RULES}
    python = {name for name, (_, d) in rules.items() if re.search(r"\{PY\}|LAUNCH_FINETUNE", d.get("shell", ""))}
    assert python == {*MODEL_RULES, "ingest", "report", "publish"}
    for name, (path, directives) in rules.items():
        if name in python:  # relative to the rule file, as Snakemake reads it
            env = directives["conda"].strip().strip('",')
            assert (path.parent / env).resolve() == REPO / "envs" / "ctxext.yaml", name
        else:
            assert "conda" not in directives, name  # printf, or a run: block (which cannot take one)
        if "shell" in directives:
            assert "log" in directives, name
        assert ("benchmark" in directives) == (name in MODEL_RULES), name


FAKE_CONDA = """#!/bin/sh
# conda stand-in: answers what Snakemake asks before it creates environments; records every call
echo "$*" >> "$FAKE_CONDA_LOG"
case "$1 $2" in
  "info --json") echo '{"conda_prefix": "/nonexistent/conda", "platform": "linux-64"}';;
  "--version "*) echo "conda 24.11.3";;
  "config --get") echo '{"get": {"channel_priority": "strict"}}';;
  *) echo "fake conda: not run: $*" >&2; exit 1;;
esac
"""


def test_sdm_conda_finds_the_environment_and_runs_its_python(tmp_path):
    """`snakemake -n --sdm conda` with a conda stand-in: the environment file the rules name resolves to
    envs/ctxext.yaml, and the jobs run the environment's `python`, not this interpreter."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "conda").write_text(FAKE_CONDA)
    (fake / "conda").chmod(0o755)
    calls = tmp_path / "conda.log"
    out = snakemake(tmp_path / "work", "-n", "-p", "--cores", "1", "report", "--sdm", "conda", "--config", "study=micro",
                    env={"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_CONDA_LOG": str(calls)})
    (env,) = re.findall(r"^Conda environment (\S+) will be created", out, re.M)
    assert os.path.realpath(env) == str(REPO / "envs" / "ctxext.yaml")
    commands = [line for line in out.splitlines() if " -m workflow.stages." in line]
    records = len(expand_grid(compose("micro"))) + 1
    assert len(commands) == jobs_total(out) - records  # all but the cell records and the study info
    assert all(re.search(r"(^Shell command: |&& )python -m workflow\.stages\.", c) for c in commands), commands
    assert sys.executable not in out
    assert not any(line.split()[:2] == ["env", "create"] for line in calls.read_text().splitlines())


def test_the_conda_environment_pins_torch_first_and_installs_this_checkout():
    env = yaml.safe_load((REPO / "envs" / "ctxext.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    readme_torch = re.search(r"pip install (torch==\S+) &&", (REPO / "README.md").read_text())[1]
    assert pip == [readme_torch, "-e ${CTXEXT_REPO}"]
    assert "CTXEXT_REPO" in (REPO / "Snakefile").read_text()
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
         "--report", "-", "-q", "-r", "/dev/stdin"], input="\n".join(pip[1:]) + "\n", capture_output=True, text=True,
        timeout=300, env={**os.environ, "CTXEXT_REPO": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    (item,) = json.loads(run.stdout)["install"]  # pip expands ${CTXEXT_REPO}: this checkout, editable
    assert item["metadata"]["name"] == "ctxext" and item["download_info"]["url"] == REPO.as_uri()
    assert item["download_info"]["dir_info"]["editable"]
