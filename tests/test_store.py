"""The store stage: schema, idempotent upsert, bad files skipped, crash safety, exports."""
import json
import subprocess
import sys

import duckdb
import pytest
from tests.helpers import EXPECTED_COUNTS, MISSING_CELL, build_study

from workflow import store
from workflow.stages import ingest

TABLES = ("schema_info", "runs", "cells", "train_log", "metrics", "study")


def snapshot(db, tables=TABLES) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}
    finally:
        con.close()


def query(db, sql, params=()):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture
def study(tmp_path):
    return build_study(tmp_path / "results")


def test_ingest_creates_tables_with_expected_rows(study, tmp_path):
    db = tmp_path / "metrics.duckdb"
    counts = store.ingest(study, db, echo=False)
    for table, n in EXPECTED_COUNTS.items():
        assert counts[table] == n, table
    assert counts["runs"] == 1 and counts["skipped"] == 0
    assert query(db, "SELECT version FROM schema_info") == [(store.SCHEMA_VERSION,)]
    status = dict(query(db, "SELECT cell_id, status FROM cells"))
    assert status.pop(MISSING_CELL) == "missing results"
    assert set(status.values()) == {"ok"}
    assert query(db, "SELECT count(*) FROM train_log WHERE cell_id = 'base'") == [(60,)]
    keys = {k for (k,) in query(db, "SELECT key FROM study")}
    assert {"name", "base_window", "eval_lengths", "model", "data", "config", "code_version",
            "manifest", "base_train", "total_compute_s"} <= keys
    # pretraining 300 s + fine-tuning (131.2 + 131.2 + 182.4 s) + evaluation 3 cells x (12 + 5 + 5 + 7 ruler) s
    total = json.loads(query(db, "SELECT value FROM study WHERE key = 'total_compute_s'")[0][0])
    assert total == pytest.approx(300 + 131.2 * 2 + 182.4 + 3 * 29)
    frozen = query(db, "SELECT train_wall_s, regime FROM cells WHERE cell_id = 'none-exact-256-frozen'")
    assert frozen == [(None, "frozen")]
    src = query(db, "SELECT DISTINCT source FROM metrics WHERE cell_id = 'pi-exact-512-ft' AND task = 'ppl'")
    assert src == [("cells/pi-exact-512-ft/eval/ppl.json",)]


def test_ingest_twice_gives_identical_rows(study, tmp_path):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    first = snapshot(db, ("cells", "train_log", "metrics"))
    counts = store.ingest(study, db, echo=False)
    assert snapshot(db, ("cells", "train_log", "metrics")) == first
    assert counts["runs"] == 2
    for table, n in EXPECTED_COUNTS.items():
        assert counts[table] == n


def test_rerun_replaces_changed_results(study, tmp_path):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    path = study / "cells" / "yarn-exact-1024-ft" / "eval" / "ppl.json"
    obj = json.loads(path.read_text())
    obj["rows"] = obj["rows"][:2]
    path.write_text(json.dumps(obj))
    store.ingest(study, db, echo=False)
    rows = query(db, "SELECT eval_len, metric FROM metrics WHERE cell_id = 'yarn-exact-1024-ft' "
                     "AND task = 'ppl' ORDER BY metric")
    assert rows == [(128, "loss"), (128, "ppl")]


def test_truncated_file_is_reported_and_old_rows_survive(study, tmp_path, capsys):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    before = snapshot(db, ("metrics", "train_log"))
    cell = study / "cells" / "pi-exact-512-ft"
    text = (cell / "eval" / "ppl.json").read_text()
    (cell / "eval" / "ppl.json").write_text(text[: len(text) // 2])
    log = (cell / "train_log.jsonl").read_text()
    (cell / "train_log.jsonl").write_text(log[: len(log) // 2])
    counts = store.ingest(study, db)
    err = capsys.readouterr().err
    assert counts["skipped"] == 2
    assert "cells/pi-exact-512-ft/eval/ppl.json" in err and "invalid JSON" in err
    assert "cells/pi-exact-512-ft/train_log.jsonl" in err
    assert any("eval/ppl.json" in line for line in counts["skipped_files"])
    assert snapshot(db, ("metrics", "train_log")) == before
    assert query(db, "SELECT status FROM cells WHERE cell_id = 'pi-exact-512-ft'") == [("ok",)]


def test_unknown_schema_version_and_missing_keys_are_skipped(study, tmp_path, capsys):
    yarn = study / "cells" / "yarn-exact-1024-ft" / "eval"
    obj = json.loads((yarn / "passkey.json").read_text())
    obj["schema_version"] = 999
    (yarn / "passkey.json").write_text(json.dumps(obj))
    obj = json.loads((yarn / "needle.json").read_text())
    del obj["rows"][3]["value"]
    (yarn / "needle.json").write_text(json.dumps(obj))
    db = tmp_path / "metrics.duckdb"
    counts = store.ingest(study, db)
    err = capsys.readouterr().err
    assert counts["skipped"] == 2
    assert "passkey.json: schema_version 999" in err
    assert "needle.json: rows[3]: missing key(s) value" in err
    suites = query(db, "SELECT DISTINCT suite FROM metrics WHERE cell_id = 'yarn-exact-1024-ft' ORDER BY suite")
    assert suites == [("ppl",), ("ruler",)]


def test_corrupt_cell_json_skips_the_cell(study, tmp_path, capsys):
    (study / "cells" / "pi-exact-512-ft" / "cell.json").write_text("{not json")
    counts = store.ingest(study, tmp_path / "metrics.duckdb")
    assert "cells/pi-exact-512-ft/cell.json: invalid JSON" in capsys.readouterr().err
    assert counts["cells"] == EXPECTED_COUNTS["cells"] - 1


def test_failure_mid_ingest_leaves_db_as_it_was(study, tmp_path, monkeypatch):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    before = snapshot(db)
    path = study / "cells" / "yarn-exact-1024-ft" / "eval" / "ppl.json"
    obj = json.loads(path.read_text())
    for row in obj["rows"]:
        row["value"] *= 2
    path.write_text(json.dumps(obj))
    real, calls = store._write_metrics, []

    def failing(*args, **kwargs):
        calls.append(args[1:3])
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_write_metrics", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.ingest(study, db, echo=False)
    assert len(calls) == 5
    assert snapshot(db) == before


def test_newer_schema_is_refused(study, tmp_path, capsys):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    con = duckdb.connect(str(db))
    con.execute("UPDATE schema_info SET version = 99")
    con.close()
    before = snapshot(db)
    with pytest.raises(store.StoreError, match="schema version 99"):
        store.ingest(study, db, echo=False)
    assert ingest.main(["--study-dir", str(study), "--db", str(db)]) == 2
    assert "newer than this code's version" in capsys.readouterr().err
    assert snapshot(db) == before


def test_db_is_closed_after_ingest(study, tmp_path):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    code = ("import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
            "con.execute('INSERT INTO runs (run_id) VALUES (?)', ['other']); con.close()")
    done = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_exports_hold_every_metric_row(study, tmp_path):
    counts = store.ingest(study, tmp_path / "metrics.duckdb", echo=False)
    csv, parquet = study / "exports" / "metrics.csv", study / "exports" / "metrics.parquet"
    assert csv.exists() and parquet.exists()
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM read_csv('{csv}')").fetchone()[0] == counts["metrics"]
    n, ropes = con.execute(f"SELECT count(*), count(DISTINCT rope) FROM read_parquet('{parquet}')").fetchone()
    assert (n, ropes) == (counts["metrics"], 3)
    assert not list((study / "exports").glob(".*tmp"))


def test_cli_prints_summary(study, tmp_path, capsys):
    db = tmp_path / "metrics.duckdb"
    assert ingest.main(["--study-dir", str(study), "--db", str(db), "--run-id", "r1"]) == 0
    out = capsys.readouterr().out
    assert "run r1" in out and "missing results" in out and f"{EXPECTED_COUNTS['metrics']} rows" in out
    (study / "cells" / "pi-exact-512-ft" / "eval" / "needle.json").write_text("[]")
    assert ingest.main(["--study-dir", str(study), "--db", str(db), "--strict"]) == 1
    assert query(db, "SELECT count(*) FROM runs") == [(2,)]


def _write_suite(study, cell_id, rows):
    path = study / "cells" / cell_id / "eval" / "ruler.json"
    path.write_text(json.dumps({"schema_version": 1, "cell_id": cell_id, "task": "ruler",
                                "rows": rows, "meta": {"wall_s": 4.0}}))


def test_rows_name_their_task_within_a_suite(study, tmp_path):
    db = tmp_path / "metrics.duckdb"
    cell = "pi-exact-512-ft"
    _write_suite(study, cell, [
        {"task": "niah_single_1", "eval_len": 256, "metric": "score", "value": 1.0, "n": 2},
        {"task": "vt", "eval_len": 256, "metric": "score", "value": 0.5, "n": 2}])
    store.ingest(study, db, echo=False)
    got = query(db, "SELECT suite, task, value FROM metrics WHERE cell_id = ? AND suite = 'ruler' ORDER BY task",
                [cell])
    assert got == [("ruler", "niah_single_1", 1.0), ("ruler", "vt", 0.5)]
    assert query(db, "SELECT DISTINCT suite FROM metrics WHERE task = 'ppl'") == [("ppl",)]
    # A rerun with fewer tasks replaces the whole suite of that cell (no stale task left behind).
    _write_suite(study, cell, [{"task": "vt", "eval_len": 256, "metric": "score", "value": 0.0, "n": 2}])
    store.ingest(study, db, echo=False)
    got = query(db, "SELECT task, value FROM metrics WHERE cell_id = ? AND suite = 'ruler'", [cell])
    assert got == [("vt", 0.0)]


def test_bad_row_task_skips_the_file(study, tmp_path, capsys):
    _write_suite(study, "pi-exact-512-ft", [{"task": 3, "eval_len": 256, "metric": "score", "value": 1.0}])
    counts = store.ingest(study, tmp_path / "metrics.duckdb")
    assert counts["skipped"] == 1 and "ruler.json: rows[0]: task must be" in capsys.readouterr().err


def _ingest_as_older_version(study, db, version: int, undo: str) -> None:
    """Ingest, then turn the database back into one of an older schema version (`undo` removes what came later)."""
    store.ingest(study, db, echo=False)
    con = duckdb.connect(str(db))
    con.execute(undo)
    con.execute("UPDATE schema_info SET version = ?", [version])
    con.close()


def test_version_1_database_is_migrated_in_place(study, tmp_path):
    for path in study.glob("cells/*/eval/ruler.json"):  # schema 1 had no per-row task names
        path.unlink()
    db = tmp_path / "metrics.duckdb"
    _ingest_as_older_version(study, db, 1, "ALTER TABLE metrics DROP COLUMN suite")
    before = query(db, "SELECT count(*) FROM metrics")[0][0]
    store.ingest(study, db, echo=False)
    assert query(db, "SELECT version FROM schema_info") == [(store.SCHEMA_VERSION,)]
    assert query(db, "SELECT count(*) FROM metrics")[0][0] == before
    assert query(db, "SELECT count(*) FROM metrics WHERE suite IS NULL OR suite <> task") == [(0,)]


def test_failed_cell_is_marked_with_its_reason_and_has_no_metrics(study, tmp_path, capsys):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    cell = "pi-exact-512-ft"   # its old result files stay on disk; they are not valid any more
    (study / "cells" / cell / "failed.json").write_text(json.dumps({
        "schema_version": 1, "cell_id": cell, "stage": "finetune", "config_hash": "x",
        "reason": "FloatingPointError: finetune pi-exact-512-ft: loss became nan at step 7; stopping"}))
    counts = store.ingest(study, db, echo=False)
    assert query(db, "SELECT status, status_reason FROM cells WHERE cell_id = ?", [cell]) == [
        ("failed", "finetune: FloatingPointError: finetune pi-exact-512-ft: loss became nan at step 7; stopping")]
    assert query(db, "SELECT count(*) FROM metrics WHERE cell_id = ?", [cell]) == [(0,)]
    assert query(db, "SELECT count(*) FROM train_log WHERE cell_id = ?", [cell]) != [(0,)]   # the curve stays
    assert counts["cells_failed"] == [(cell, query(db, "SELECT status_reason FROM cells WHERE cell_id = ?",
                                                   [cell])[0][0])]
    assert query(db, "SELECT count(*) FROM cells WHERE status = 'ok'") == [(EXPECTED_COUNTS["cells"] - 2,)]
    assert "1 failed" in ingest.format_summary(counts, study, db)
    (study / "cells" / cell / "failed.json").unlink()   # a successful rerun removes the record
    store.ingest(study, db, echo=False)
    assert query(db, "SELECT status, status_reason FROM cells WHERE cell_id = ?", [cell]) == [("ok", None)]


def test_bad_failure_record_is_skipped_visibly(study, tmp_path, capsys):
    (study / "cells" / "pi-exact-512-ft" / "failed.json").write_text('{"schema_version": 1, "cell_id": "pi')
    counts = store.ingest(study, tmp_path / "metrics.duckdb")
    assert "cells/pi-exact-512-ft/failed.json: invalid JSON" in capsys.readouterr().err
    assert counts["skipped"] == 1 and counts["cells_failed"] == []


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(schema_version=0), "schema_version 0 is not the supported version 1"),   # older writer
    (lambda o: o.pop("schema_version"), "missing key(s) schema_version"),
    (lambda o: o["rows"][0].update(value="12.5"), "rows[0]: value must be a number, found '12.5'"),
    (lambda o: o["rows"][1].update(eval_len=128.5), "rows[1]: eval_len must be an integer, found 128.5"),
    (lambda o: o["rows"][2].update(metric=7), "rows[2]: metric must be a string, found 7"),
    (lambda o: o.update(rows={"eval_len": 128}), "rows must be a non-empty list"),
    (lambda o: o.update(cell_id="yarn-exact-1024-ft"), "cell_id 'yarn-exact-1024-ft' does not match its cell"),
    (lambda o: o.update(meta=[1]), "meta must be an object"),
])
def test_wrong_types_and_old_schema_versions_are_skipped_and_old_rows_kept(study, tmp_path, capsys, edit,
                                                                          message):
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    before = snapshot(db, ("metrics",))
    path = study / "cells" / "pi-exact-512-ft" / "eval" / "ppl.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    counts = store.ingest(study, db)
    assert f"cells/pi-exact-512-ft/eval/ppl.json: {message}" in capsys.readouterr().err
    assert counts["skipped"] == 1
    assert snapshot(db, ("metrics",)) == before


def test_version_2_database_gains_status_reason_in_place(study, tmp_path):
    db = tmp_path / "metrics.duckdb"
    _ingest_as_older_version(study, db, 2, "ALTER TABLE cells DROP COLUMN status_reason")
    store.ingest(study, db, echo=False)
    assert query(db, "SELECT version FROM schema_info") == [(store.SCHEMA_VERSION,)]
    assert query(db, "SELECT count(*) FROM cells WHERE status_reason IS NULL") == [(EXPECTED_COUNTS["cells"],)]
