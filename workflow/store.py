"""The store: ingest a study's result files into metrics.duckdb (the ingest stage, `workflow.stages.ingest`, is
the only writer of the database; the report only reads it).

Every ingest runs in one transaction: a failure leaves the previous database as it was. Result files
that cannot be read (invalid JSON, missing keys, unknown schema version) are named, skipped and
counted (`workflow.results_files` reads and validates them); the rows stored from them earlier are kept.
Re-running never duplicates rows.

Each fine-tuned cell is stored once per seed number of study.seeds (`cells.seed`; the seeds of one cell share
`cells.group_id`, the id without a seed suffix); frozen and checkpoint cells have no seed (`checkpoint` names a
checkpoint cell's checkpoint).

A cell whose fine-tuning or evaluation stopped (`cells/<cell>/failed.json`, written by the stage: a
diverged loss, a length that does not fit in memory) gets status 'failed' and the stage's reason in
`cells.status_reason`; its metrics are not stored (old ones are removed), its training log is.
"""
from __future__ import annotations

import json
import math
import os
import platform
import secrets
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from workflow.results_files import BASE_CELL_ID, collect

SCHEMA_VERSION = 4        # version of the database schema created below (2: metrics.suite,
                          # 3: cells.status_reason, 4: cells.seed, group_id and checkpoint)

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info(version INTEGER);
CREATE TABLE IF NOT EXISTS runs(
    run_id VARCHAR PRIMARY KEY, study VARCHAR, started_at TIMESTAMP, code_version VARCHAR,
    hardware VARCHAR, config JSON);
CREATE TABLE IF NOT EXISTS cells(
    cell_id VARCHAR PRIMARY KEY, study VARCHAR, rope VARCHAR, attention VARCHAR, train_len INTEGER,
    regime VARCHAR, base_window INTEGER, method_params JSON, config JSON, config_hash VARCHAR,
    code_version VARCHAR, train_wall_s DOUBLE, train_tokens_per_s DOUBLE, train_peak_mem_mb DOUBLE,
    status VARCHAR, status_reason VARCHAR, seed INTEGER, group_id VARCHAR, checkpoint VARCHAR);
CREATE TABLE IF NOT EXISTS train_log(
    cell_id VARCHAR, step INTEGER, loss DOUBLE, lr DOUBLE, tokens_per_s DOUBLE, peak_mem_mb DOUBLE,
    elapsed_s DOUBLE, PRIMARY KEY(cell_id, step));
CREATE TABLE IF NOT EXISTS metrics(
    cell_id VARCHAR, task VARCHAR, eval_len INTEGER, depth DOUBLE, metric VARCHAR, value DOUBLE,
    n INTEGER, ci_low DOUBLE, ci_high DOUBLE, wall_s DOUBLE, source VARCHAR, suite VARCHAR);
CREATE TABLE IF NOT EXISTS study(key VARCHAR PRIMARY KEY, value JSON);
CREATE TABLE IF NOT EXISTS benchmarks(
    run_id VARCHAR, study VARCHAR, measured_at TIMESTAMP, hardware VARCHAR, phase VARCHAR, cell_id VARCHAR,
    rope VARCHAR, attention VARCHAR, seq_len INTEGER, rows INTEGER, tokens_per_s DOUBLE, peak_mem_mb DOUBLE,
    mfu DOUBLE, flops_per_token DOUBLE, throughput_vs_base DOUBLE, memory_vs_base DOUBLE, config JSON,
    PRIMARY KEY(run_id, phase, cell_id, seq_len));
"""

TABLES = ("cells", "metrics", "train_log", "runs", "study")

EXPORT_QUERY = """
SELECT m.cell_id, c.group_id, c.seed, c.rope, c.attention, c.train_len, c.regime, m.suite, m.task, m.eval_len,
       m.depth, m.metric, m.value, m.n, m.ci_low, m.ci_high, m.wall_s, m.source
FROM metrics m LEFT JOIN cells c USING (cell_id)
ORDER BY m.cell_id, m.task, m.metric, m.eval_len, m.depth NULLS FIRST
"""


class StoreError(RuntimeError):
    """The database cannot be written (newer schema, locked, not a study directory)."""


# ----------------------------------------------------------------------------------------------
# Writing (all inside one transaction)
# ----------------------------------------------------------------------------------------------

def _finite(obj):
    """obj with NaN/inf floats replaced by None (JSON has no spelling for them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj) -> str | None:
    return None if obj is None else json.dumps(_finite(obj), sort_keys=True, default=str)


def schema_version(con) -> int | None:
    """The schema version recorded in an open database, or None for a fresh one."""
    has = con.execute("SELECT count(*) FROM information_schema.tables "
                      "WHERE table_name = 'schema_info'").fetchone()[0]
    if not has:
        return None
    return con.execute("SELECT max(version) FROM schema_info").fetchone()[0]


def create_schema(con) -> None:
    found = schema_version(con)
    if found is not None and found > SCHEMA_VERSION:
        raise StoreError(f"the database was written with schema version {found}, newer than this "
                         f"code's version {SCHEMA_VERSION}; update ctxext or use a new database file")
    con.execute(SCHEMA)
    if found is None:
        con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])
    elif found < SCHEMA_VERSION:
        migrate(con, found)


def migrate(con, found: int) -> None:
    """Bring an older database up to SCHEMA_VERSION in place (inside the ingest transaction)."""
    if found < 2:  # version 1 had no suite: every result file was one task
        con.execute("ALTER TABLE metrics ADD COLUMN IF NOT EXISTS suite VARCHAR")
        con.execute("UPDATE metrics SET suite = task WHERE suite IS NULL")
    if found < 3:  # version 2 had no failed cells, hence no reason
        con.execute("ALTER TABLE cells ADD COLUMN IF NOT EXISTS status_reason VARCHAR")
    if found < 4:  # version 3 had one run per cell (seed number 0 of a fine-tuned cell) and no checkpoint cells
        con.execute("ALTER TABLE cells ADD COLUMN IF NOT EXISTS seed INTEGER")
        con.execute("ALTER TABLE cells ADD COLUMN IF NOT EXISTS group_id VARCHAR")
        con.execute("ALTER TABLE cells ADD COLUMN IF NOT EXISTS checkpoint VARCHAR")
        con.execute("UPDATE cells SET seed = 0 WHERE regime = 'finetuned' AND seed IS NULL")
        con.execute("UPDATE cells SET group_id = cell_id WHERE group_id IS NULL")
    con.execute("DELETE FROM schema_info")
    con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])


BENCHMARK_COLUMNS = ("run_id", "study", "measured_at", "hardware", "phase", "cell_id", "rope", "attention", "seq_len",
                     "rows", "tokens_per_s", "peak_mem_mb", "mfu", "flops_per_token", "throughput_vs_base",
                     "memory_vs_base", "config")


def write_benchmarks(db_path: Path, rows: list[dict]) -> int:
    """Append the rows of one cost-benchmark run (workflow.tools.bench_cost) to the `benchmarks` table; a row is a dict
    with BENCHMARK_COLUMNS (config as a dict). Returns the number of rows written."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(db_path)) as con:
        con.execute("BEGIN")
        create_schema(con)
        con.executemany(f"INSERT OR REPLACE INTO benchmarks ({', '.join(BENCHMARK_COLUMNS)}) "
                        f"VALUES ({', '.join('?' for _ in BENCHMARK_COLUMNS)})",
                        [[_dumps(r[c]) if c == "config" else r[c] for c in BENCHMARK_COLUMNS] for r in rows])
        con.execute("COMMIT")
    return len(rows)


def _write_study(con, study: dict | None, manifest: dict | None, base_summary: dict | None) -> None:
    """One row per top-level key of study.json, plus the manifest and the base model's training."""
    facts = dict(study or {})
    if manifest is not None:
        facts["manifest"] = manifest
    if base_summary is not None:
        facts["base_train"] = base_summary
    for key, value in facts.items():
        con.execute("INSERT OR REPLACE INTO study VALUES (?, ?)", [key, _dumps(value)])


CELL_COLUMNS = ("cell_id, study, rope, attention, train_len, regime, base_window, method_params, config, "
                "config_hash, code_version, train_wall_s, train_tokens_per_s, train_peak_mem_mb, status, "
                "status_reason, seed, group_id, checkpoint")


def _write_cell(con, cell: dict, summary: dict | None, keep_old_summary: bool, study_name,
                failure: dict | None) -> None:
    train = [None, None, None]
    if summary is not None:
        train = [summary.get("wall_s"), summary.get("tokens_per_s"), summary.get("peak_mem_mb")]
    elif keep_old_summary:
        old = con.execute("SELECT train_wall_s, train_tokens_per_s, train_peak_mem_mb FROM cells "
                          "WHERE cell_id = ?", [cell["cell_id"]]).fetchone()
        train = list(old) if old else train
    con.execute(
        f"INSERT OR REPLACE INTO cells ({CELL_COLUMNS}) VALUES ({', '.join('?' for _ in CELL_COLUMNS.split(','))})",
        [cell["cell_id"], cell.get("study", study_name), cell["rope"], cell["attention"],
         int(cell["train_len"]), cell["regime"], cell.get("base_window"),
         _dumps(cell.get("method_params", {})), _dumps(cell.get("config", {})),
         cell.get("config_hash"), cell.get("code_version"), *train,
         "failed" if failure else "missing results",
         f"{failure['stage']}: {failure['reason']}" if failure else None,
         *cell_seed(cell), cell.get("checkpoint")])
    if failure:
        con.execute("DELETE FROM metrics WHERE cell_id = ?", [cell["cell_id"]])


def cell_seed(cell: dict) -> tuple[int | None, str]:
    """(seed number, group) of a cell record: a fine-tuned cell's seed number of study.seeds (0 when the record is
    older than seeds), None for the deterministic frozen and checkpoint cells; the group is the id of the cell
    without a seed suffix, which all seeds of one cell share."""
    seed = cell.get("seed")
    if seed is None and cell["regime"] == "finetuned":
        seed = 0
    return (None if seed is None else int(seed)), cell.get("group") or cell["cell_id"]


def _write_train_log(con, cell_id: str, rows: list[tuple]) -> None:
    con.execute("DELETE FROM train_log WHERE cell_id = ?", [cell_id])
    if rows:
        con.executemany("INSERT INTO train_log VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


METRIC_COLUMNS = ("cell_id, task, eval_len, depth, metric, value, n, ci_low, ci_high, wall_s, source, "
                  "suite")


def _write_metrics(con, cell_id: str, suite: str, rows: list[tuple], source: str) -> None:
    """Replace every row of one result file (one suite of one cell)."""
    con.execute("DELETE FROM metrics WHERE cell_id = ? AND suite = ?", [cell_id, suite])
    con.executemany(f"INSERT INTO metrics ({METRIC_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*row, source, suite) for row in rows])


def _update_status_and_totals(con) -> None:
    con.execute("""
        UPDATE cells SET status = CASE WHEN EXISTS (SELECT 1 FROM metrics m
                                                     WHERE m.cell_id = cells.cell_id)
                                       THEN 'ok' ELSE 'missing results' END
        WHERE status IS DISTINCT FROM 'failed'""")
    total = con.execute("""
        SELECT coalesce((SELECT sum(train_wall_s) FROM cells), 0)
             + coalesce((SELECT sum(wall_s) FROM (SELECT max(wall_s) AS wall_s FROM metrics
                                                  GROUP BY cell_id, suite)), 0)
             + coalesce((SELECT CAST(json_extract(value, '$.wall_s') AS DOUBLE) FROM study
                         WHERE key = 'base_train'), 0)""").fetchone()[0]
    con.execute("INSERT OR REPLACE INTO study VALUES ('total_compute_s', ?)", [_dumps(total)])


def _write_run(con, run_info: dict, study: dict | None, study_name: str) -> str:
    run_id = run_info.get("run_id") or (
        datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3))
    started = run_info.get("started_at") or datetime.now(timezone.utc).replace(tzinfo=None)
    con.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)", [
        run_id, study_name, started,
        run_info.get("code_version") or (study or {}).get("code_version") or "unknown",
        run_info.get("hardware") or describe_hardware(),
        _dumps(run_info.get("config", (study or {}).get("config")))])
    return run_id


def describe_hardware() -> str:
    return f"{platform.machine()} x{os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def export_metrics(con, export_dir: Path) -> list[Path]:
    """metrics joined with the cell axes as CSV and Parquet; each file replaced atomically."""
    export_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fmt in (("metrics.csv", "FORMAT csv, HEADER"), ("metrics.parquet", "FORMAT parquet")):
        final = export_dir / name
        tmp = export_dir / f".{name}.{secrets.token_hex(4)}.tmp"
        quoted = str(tmp).replace("'", "''")
        try:
            con.execute(f"COPY ({EXPORT_QUERY}) TO '{quoted}' ({fmt})")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(final)
    return written


def ingest(study_dir: Path, db_path: Path, run_info: dict | None = None,
           export_dir: Path | None = None, echo: bool = True) -> dict:
    """Ingest every result file of `study_dir` into `db_path`; returns counts (rows per table,
    files read, files skipped with their problems, run id)."""
    study_dir, db_path = Path(study_dir), Path(db_path)
    if not study_dir.is_dir():
        raise StoreError(f"study directory {study_dir} does not exist")
    found, rd = collect(study_dir, echo=echo)
    study = found["study"]
    study_name = (study or {}).get("name") or study_dir.name

    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(db_path))
    except duckdb.Error as exc:
        raise StoreError(f"cannot open {db_path} read-write: {exc}") from None
    try:
        con.begin()
        try:
            create_schema(con)
            _write_study(con, study, found["manifest"], found["base_summary"])
            if found["base_log"] is not None:
                _write_train_log(con, BASE_CELL_ID, found["base_log"])
            for entry in found["cells"]:
                cell = entry["cell"]
                _write_cell(con, cell, entry["summary"], entry["summary_bad"], study_name, entry["failure"])
                if entry["log"] is not None:
                    _write_train_log(con, cell["cell_id"], entry["log"])
                for task, rows, source in entry["evals"]:
                    _write_metrics(con, cell["cell_id"], task, rows, source)
            _update_status_and_totals(con)
            run_id = _write_run(con, run_info or {}, study, study_name)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        counts["cells_ok"] = con.execute(
            "SELECT count(*) FROM cells WHERE status = 'ok'").fetchone()[0]
        counts["cells_failed"] = con.execute(
            "SELECT cell_id, status_reason FROM cells WHERE status = 'failed' ORDER BY cell_id").fetchall()
        exports = export_metrics(con, Path(export_dir) if export_dir else study_dir / "exports")
    finally:
        con.close()
    counts.update(files_read=rd.files_read, skipped=len(rd.skipped), skipped_files=rd.skipped,
                  run_id=run_id, exports=[str(p) for p in exports])
    return counts
