"""The publish stage: report, tables and database copied for static hosting, with an index of studies."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import HOSTILE, build_study, link_problems

from workflow import report, store
from workflow.stages import publish

REPO = Path(__file__).resolve().parent.parent


def _rendered_study(root: Path, name: str, hostile: bool = False) -> Path:
    study = build_study(root, name=name, hostile=hostile)
    store.ingest(study, study / "metrics.duckdb", echo=False)
    report.render_report(study / "metrics.duckdb", study / "report.html")
    return study


def test_publish_copies_every_study_and_indexes_them(tmp_path):
    site = tmp_path / "site"
    first = _rendered_study(tmp_path / "results", "alpha")
    second = _rendered_study(tmp_path / "results", "beta", hostile=True)
    assert publish.main(["--study-dir", str(first), "--dest", str(site)]) == 0
    index = (site / "index.html").read_text()
    assert 'href="alpha/report.html"' in index and "beta" not in index
    publish.publish(second, site)
    for name, src in (("alpha", first), ("beta", second)):
        out = site / name
        assert (out / "report.html").read_bytes() == (src / "report.html").read_bytes()
        assert (out / "metrics.duckdb").stat().st_size == (src / "metrics.duckdb").stat().st_size
        assert (out / report.EXPORT_DIR / "perplexity.parquet").exists()
        assert (out / "exports" / "metrics.csv").exists()
        figures = sorted(p.name for p in (src / report.FIGURES_DIR).iterdir())
        assert figures and sorted(p.name for p in (out / report.FIGURES_DIR).iterdir()) == figures
        assert sorted(p.name for p in (out / report.DOCS_DIR).iterdir()) == sorted(report.DOCS)
        assert link_problems((out / "report.html").read_text(), out) == []  # every link resolves where published
    index = (site / "index.html").read_text()
    assert 'href="alpha/report.html"' in index and 'href="beta/report.html"' in index
    assert 'href="beta/report_tables/claims.csv"' in index
    assert HOSTILE not in index and "<script" not in index.lower()
    assert not list(site.rglob(".*.tmp"))
    # republishing replaces, never duplicates
    publish.publish(first, site)
    assert sorted(p.name for p in site.iterdir()) == ["alpha", "beta", "index.html"]


def test_publish_without_a_report_fails_clearly(tmp_path, capsys):
    assert publish.main(["--study-dir", str(tmp_path / "nothing"), "--dest", str(tmp_path / "site")]) == 2
    assert "run the report stage first" in capsys.readouterr().err


def test_snakemake_publish_target_dry_run(tmp_path):
    snakemake = Path(sys.executable).with_name("snakemake")
    if not snakemake.exists():
        snakemake = shutil.which("snakemake")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n", "-p",
                          "publish", "--cores", "1", "--config", "study=micro", f"publish_dir={tmp_path / 'site'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "rule publish:" in out and re.search(r"^publish\s+1$", out, flags=re.M)
    assert f"-m workflow.stages.publish --study-dir results/micro --dest {tmp_path / 'site'}" in out
    assert "results/micro/report_tables" in out  # the report rule declares its exported tables
    assert "results/micro/figures" in out  # ... and its standalone figures
    assert "results/micro/docs" in out  # ... and the documents it links to
