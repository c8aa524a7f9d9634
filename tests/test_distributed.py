"""Multi-process fine-tuning (workflow.distributed): `torchrun --nproc_per_node 2` with gloo on the CPU trains
the micro study's CLEX cell on an FSDP2-sharded model, survives a SIGKILL by resuming from rank 0's full
checkpoint, and follows the loss curve of one process on the same global batch."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, finetune_args, read_log, run_module
from workflow import distributed

# One process and two see the same rows and, at every step, the same mean loss up to the order of float32
# additions (a sum over 8 rows vs two sums over 4, then gloo's sum of the two). Measured: at most 1e-6 (the
# log's rounding) over the 16 steps; Adam can amplify such differences in tiny gradients, so the bound is
# 1e-4, two orders of magnitude under the per-step change of the loss (about 1e-2), which a wrong share of
# rows or gradients summed instead of averaged would exceed at once.
LOSS_TOLERANCE = 1e-4


def _torchrun(stage, out, output):
    """Start the 2-process fine-tune writing to `out`; its output goes to the file `output` (a pipe nobody reads
    while we wait would fill up and stop it)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", *map(str, finetune_args(stage, out))]
    with open(output, "w") as fh:
        return subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill(proc):
    """SIGKILL the launcher and its workers unless they have already exited. torchrun starts each worker in
    a session of its own, so killing the launcher's process group would leave them running (and writing)."""
    if proc.poll() is not None:
        return
    launcher = psutil.Process(proc.pid)
    family = [*launcher.children(recursive=True), launcher]   # the workers first: nothing is written after
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def test_two_processes_match_one_and_resume_after_a_kill(stage):
    single = stage["root"] / "single"
    run = run_module(*finetune_args(stage, single))
    assert run.returncode == 0, run.stderr[-3000:]

    out = stage["root"] / "two"
    output = stage["root"] / "two.out"
    proc, log_path, deadline = _torchrun(stage, out, output), out / "train_log.jsonl", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log_path.exists() and log_path.read_text().count("\n") >= 5:
                break
            time.sleep(0.005)
    finally:
        _kill(proc)
    assert not (out / "model").exists() and (out / "ckpt" / "trainer.pt").exists(), "not killed mid-run"
    assert "model" in torch.load(out / "ckpt" / "trainer.pt", weights_only=True)   # rank 0's full state

    proc = _torchrun(stage, out, output)
    try:
        proc.wait(timeout=180)
    finally:   # a failed or interrupted test leaves no workers waiting for their peers
        _kill(proc)
    output = output.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("resuming from the checkpoint at step") == 2   # both ranks
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["resumed_from_step"] >= 3
    assert not (out / "ckpt").exists() and (out / "finetune_config.json").exists()

    one, two = read_log(single / "train_log.jsonl"), read_log(log_path)
    assert [r["step"] for r in two] == list(range(1, 17))
    assert [(r["lr"], r["tokens"]) for r in two] == [(r["lr"], r["tokens"]) for r in one]
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(gaps) <= LOSS_TOLERANCE, gaps

    # rank 0 wrote the whole model (CLEX's ODE included, the tied output layer once, as one process does).
    # Weights are compared by shape only: Adam divides tiny q/k gradients by their own scale, so float-order
    # differences grow there to ~1e-3 after 16 steps (measured) while the loss agrees to 1e-6.
    a, b = load_file(single / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and any("rotary_emb.ode" in k for k in b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_rows_are_split_evenly_among_processes(monkeypatch):
    batch = torch.arange(8)[:, None].expand(8, 3)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.rank_rows(batch)[:, 0].tolist() == [4, 5, 6, 7]
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="8 rows .* do not split evenly among 3 processes"):
        distributed.rank_rows(batch)
