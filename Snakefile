# ctxext: fine-tune and evaluate every cell of a long-context extension study, store every number in
# DuckDB and render a paper-style HTML report.
#
#   snakemake --cores all report                                  # the default study (tiny)
#   snakemake --cores all report --config study=micro             # another study
#   snakemake --cores all report --config overrides='["finetune.steps=50"]'   # Hydra overrides
#   snakemake -n --cores all report                               # list every job/cell
#   snakemake --cores all publish --config publish_dir=site       # copy report + tables + DB to site/<study>/
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, workflow.basedir)
from workflow.common import config_hash
from workflow.tasks import get_task
from workflow.config import ConfigError, cell_record, launch_prefix, code_version, compose, expand_grid, stage_config
from workflow.checkpoints import CHECKPOINT
from workflow.checkpoints import local_files as checkpoint_files

shell.executable("/bin/bash")
# Jobs run `python -m workflow.<stage>` from the working directory: put this checkout first on their
# path, so they run the code of this Snakefile, not another installed copy of ctxext.
shell.prefix(f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

try:
    CFG = compose(config.get("study"), config.get("overrides", []))
    CELLS = {cell["cell_id"]: cell for cell in expand_grid(CFG)}
except ConfigError as exc:
    # The message alone and exit status 1: Snakemake would print any exception raised here with a traceback.
    raise SystemExit(f"ctxext configuration error: {exc}")

STUDY = CFG["study"]["name"]
R = f"results/{STUDY}"
# The jobs' Python: this interpreter, or with `--sdm conda` the `python` of the rule's environment (envs/ctxext.yaml,
# which installs the project from this checkout: CTXEXT_REPO).
CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PY = "python" if CONDA else sys.executable
if CONDA:
    os.environ["CTXEXT_REPO"] = workflow.basedir
TASKS = CFG["eval"]["tasks"]
FINETUNED = [c for c, cell in CELLS.items() if cell["regime"] == "finetuned"]
VERSION = code_version()
# Cluster resources of each model rule (gpu, mem_mb, runtime in minutes), from config/resources/.
RESOURCES = CFG["resources"]
# The fine-tuning command: `python -m workflow.stages.finetune`, or under finetune.launcher (e.g. accelerate/torchrun
# for multi-GPU FSDP), whose module runner then takes the place of python.
LAUNCH_FINETUNE = launch_prefix(CFG["finetune"].get("launcher"), PY, workflow.basedir)

SEEDS = CFG["study"]["seeds"]
N_CHECKPOINTS = sum(cell["regime"] == CHECKPOINT for cell in CELLS.values())
print(f"ctxext study {STUDY!r}: {len(CELLS)} cells ({len(FINETUNED)} fine-tuned"
      + (f", each seed of {SEEDS}" if SEEDS != [0] else "") + (f"; {N_CHECKPOINTS} checkpoint" if N_CHECKPOINTS else "")
      + f"): {', '.join(CELLS)}", file=sys.stderr)


# Shell snippets shared by the rules. Each job first writes its resolved config (a rule param, so a
# config change reruns exactly the jobs it affects) to results/<study>/configs/, then runs its stage
# module; stderr goes both to the job's log file and to the terminal, so progress stays visible.
WRITE_CONFIG = "mkdir -p {R}/configs && printf '%s\\n' {params.cfg:q} > {params.cfg_file}"
TEE = "2> >(tee -a {log} >&2)"


wildcard_constraints:
    cell="|".join(CELLS),
    finetuned_cell="|".join(FINETUNED) if FINETUNED else "^$",


include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/store.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/publish.smk"


# Light rules run in the Snakemake process, never as cluster jobs (on SLURM they would queue for the GPU partition).
localrules:
    cell_config,
    study_info,
    ingest,
    report,
    publish,


rule all:
    default_target: True
    input:
        f"{R}/report.html",
