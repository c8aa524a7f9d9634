"""Faults injected into real stage processes: a fine-tune killed with SIGKILL resumes bit-for-bit, a
diverging fine-tune and an evaluation too large for memory stop with a failure record, and a recorded
failure lets Snakemake report the rest of the grid."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, CLEX, FROZEN, OVERRIDES, finetune_args as _finetune, read_log as _log, run_module as _run
from workflow import resources
from workflow.common import config_hash
from workflow.config import stage_config
from workflow.stages import evaluate


def test_killed_finetune_resumes_to_the_same_weights_and_loss_curve(stage):
    full = stage["root"] / "full"
    run = _run(*_finetune(stage, full))
    assert run.returncode == 0, run.stderr[-3000:]

    killed = stage["root"] / "killed"
    proc = subprocess.Popen([sys.executable, "-m", *map(str, _finetune(stage, killed))], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path, deadline = killed / "train_log.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.exists() and log_path.read_text().count("\n") >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model").exists() and (killed / "ckpt" / "trainer.pt").exists(), "not killed mid-run"
    # a kill in the middle of a write leaves half a line behind; resumption must cope with it too
    with open(log_path, "a") as fh:
        fh.write('{"step": 2')

    run = _run(*_finetune(stage, killed))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from the checkpoint at step" in run.stderr
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 3
    a, b = load_file(full / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    full_log, resumed_log = _log(full / "train_log.jsonl"), _log(log_path)
    assert [r["step"] for r in resumed_log] == list(range(1, 17))
    assert [(r["loss"], r["lr"]) for r in resumed_log] == [(r["loss"], r["lr"]) for r in full_log]
    assert not (killed / "ckpt").exists()


def test_diverging_finetune_records_the_failure_and_exits_non_zero(stage):
    base = stage["root"] / "nan_base"
    subprocess.run(["cp", "-r", str(stage["root"] / "base" / "model"), str(base)], check=True)
    weights = load_file(base / "model.safetensors")
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name][3:5] = float("nan")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = stage["root"] / "nan_cell"
    out.mkdir()
    (out / "failed.json").write_text("{}")   # a stale record is replaced
    run = _run(*_finetune(stage, out, base))
    assert run.returncode == 1
    assert "FAILED clex-exact-256-ft (finetune): FloatingPointError" in run.stderr
    record = json.loads((out / "failed.json").read_text())
    assert record["stage"] == "finetune" and record["cell_id"] == CLEX
    assert "loss became nan at step 1" in record["reason"]
    # the hash the Snakefile compares with: the same job config, resolved at parse time
    assert record["config_hash"] == config_hash(stage_config(stage["cfg"], stage["cells"][CLEX], "finetune"))
    assert not (out / "model").exists()


def test_evaluation_that_does_not_fit_stops_naming_the_length(stage, monkeypatch, capsys):
    cell_dir = stage["root"] / "cells" / FROZEN
    args = ["--config", str(stage["files"]["evaluate"]), "--data-dir", str(stage["root"] / "data"),
            "--model", str(stage["root"] / "base" / "model"), "--out", str(cell_dir / "eval")]
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 2**20)   # 1 MiB left
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(args)
    assert exit_.value.code == 1
    reason = json.loads((cell_dir / "failed.json").read_text())["reason"]
    assert reason.startswith("ResourceError: evaluation at length 512 does not fit in memory")
    assert "0.00 GiB is available" in reason and "logits" in reason
    assert not (cell_dir / "eval").exists()
    assert "FAILED ntk-exact-256-frozen (evaluate)" in capsys.readouterr().err

    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 2**40)
    evaluate.main(args)   # enough memory: it runs and clears the failure record
    assert not (cell_dir / "failed.json").exists()
    assert {p.name for p in (cell_dir / "eval").iterdir()} == {f"{t}.json" for t in stage["cfg"]["eval"]["tasks"]}


def test_memory_estimates_grow_with_length_and_count_eager_scores():
    from tests.helpers import tiny_llama

    sdpa, eager = tiny_llama(), tiny_llama(attn_implementation="eager")
    short, long = resources.estimate_eval_bytes(sdpa, 1024, 1024), resources.estimate_eval_bytes(sdpa, 8192, 1024)
    assert sum(long.values()) == 8 * sum(short.values()) and "attention scores" not in long
    scores = resources.estimate_eval_bytes(eager, 8192, 1024)["attention scores"]
    assert scores == 2 * 4 * 8192 * 8192 * 4   # 2 copies x heads x T x T x float32
    train = resources.estimate_train_bytes(sdpa, 4, 64)
    assert train["gradients and optimizer state"] == 3 * 4 * sum(p.numel() for p in sdpa.parameters())
    assert resources.available_bytes() > 0


def _dry_run(workdir, *extra):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n",
           "--cores", "2", "report", "--config", "study=micro", f"overrides={json.dumps(OVERRIDES)}", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def _jobs(out):
    """(rule, wildcard value or None) of every job of a dry run."""
    jobs = set()
    for block in re.split(r"^rule ", out, flags=re.M)[1:]:
        wildcard = re.search(r"^\s+wildcards: \w+=(\S+)", block, flags=re.M)
        jobs.add((block.split(":")[0], wildcard.group(1) if wildcard else None))
    return jobs


def test_recorded_failure_lets_the_rest_of_the_grid_be_reported(stage, tmp_path):
    """After a --keep-going run in which a cell failed, `snakemake report` ingests what exists; a
    record written under another configuration does not count (the cell is retried)."""
    cell_dir = tmp_path / "results" / "micro" / "cells" / CLEX
    cell_dir.mkdir(parents=True)
    record = {"schema_version": 1, "cell_id": CLEX, "stage": "finetune", "reason": "FloatingPointError: nan",
              "config_hash": config_hash(stage_config(stage["cfg"], stage["cells"][CLEX], "finetune"))}
    (cell_dir / "failed.json").write_text(json.dumps(record))
    out = _dry_run(tmp_path)
    assert f"reported as failed: {CLEX}" in out
    planned = _jobs(out)
    assert ("finetune", CLEX) not in planned and ("evaluate", CLEX) not in planned
    assert ("cell_config", CLEX) in planned and ("ingest", None) in planned
    finetuned = sum(c["regime"] == "finetuned" for c in stage["cells"].values())
    assert sum(rule == "finetune" for rule, _ in planned) == finetuned - 1   # every other fine-tuned cell

    record["config_hash"] = "from another configuration"
    (cell_dir / "failed.json").write_text(json.dumps(record))
    out = _dry_run(tmp_path)
    assert "reported as failed" not in out
    assert ("finetune", CLEX) in _jobs(out) and ("evaluate", CLEX) in _jobs(out)
