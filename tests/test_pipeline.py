"""End to end: the `micro` study through Snakemake, as a user runs it (data -> base -> fine-tune ->
evaluate -> DuckDB -> report), then reruns, a single-cell rerun and a repeated ingest."""
import re
import subprocess
import sys

import duckdb
import pytest

from tests.helpers import REPO
from workflow.config import compose, expand_grid

pytestmark = pytest.mark.slow
CELLS = [c["cell_id"] for c in expand_grid(compose("micro"))]


def snakemake(workdir, *args, timeout=900):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run.stdout + run.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("micro")
    output = snakemake(workdir, "report", "--config", "study=micro")
    return workdir, workdir / "results" / "micro", output


def counts(db):
    with duckdb.connect(str(db), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("cells", "metrics", "train_log")}


def test_the_study_produces_a_database_and_a_report(study):
    _, results, _ = study
    assert (results / "report.html").exists()
    with duckdb.connect(str(results / "metrics.duckdb"), read_only=True) as con:
        assert sorted(r[0] for r in con.execute("SELECT cell_id FROM cells").fetchall()) == sorted(CELLS)
        per_cell = dict(con.execute("SELECT cell_id, count(DISTINCT suite) FROM metrics GROUP BY 1").fetchall())
        assert per_cell == {c: 4 for c in CELLS}  # ppl, passkey, needle, ruler
        ruler = con.execute("SELECT DISTINCT task FROM metrics WHERE suite = 'ruler' ORDER BY 1").fetchall()
        assert [r[0] for r in ruler] == ["fwe", "niah_multikey_2", "niah_single_1", "niah_single_2", "vt"]
        logged = {r[0] for r in con.execute("SELECT DISTINCT cell_id FROM train_log").fetchall()}
        assert logged == {"base", *(c for c in CELLS if c.endswith("-ft"))}
        ppl = con.execute("SELECT min(value), max(value) FROM metrics WHERE metric = 'ppl'").fetchone()
        assert 1.0 < ppl[0] <= ppl[1] < float("inf")
    html = (results / "report.html").read_text()
    for cid in CELLS:
        assert cid in html
    for cid in CELLS:
        assert (results / "cells" / cid / "cell.json").exists()


def test_rerun_is_a_no_op_and_ingest_is_idempotent(study):
    workdir, results, _ = study
    before = counts(results / "metrics.duckdb")
    assert "Nothing to be done" in snakemake(workdir, "report", "--config", "study=micro")
    subprocess.run([sys.executable, "-m", "workflow.stages.ingest", "--study-dir", str(results), "--db",
                    str(results / "metrics.duckdb")], check=True, cwd=REPO, capture_output=True)
    assert counts(results / "metrics.duckdb") == before
    snakemake(workdir, "report", "--forcerun", "ingest", "--config", "study=micro")   # the workflow's ingest again
    assert counts(results / "metrics.duckdb") == before


def test_a_single_cell_can_be_rerun(study):
    workdir, _, _ = study
    target = "results/micro/cells/pi-exact-128-ft/eval/ppl.json"
    out = snakemake(workdir, target, "--forcerun", "finetune", "evaluate", "--config", "study=micro", "-n")
    jobs = re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+wildcards: \w+=(\S+)", out, flags=re.M)
    assert sorted(jobs) == [("evaluate", "pi-exact-128-ft"), ("finetune", "pi-exact-128-ft")], out
