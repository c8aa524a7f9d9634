"""Seeds (study.seeds): the grid's runs of each fine-tuned cell, the fine-tuning seed and corpus offset of each seed
number, the statistics over seeds, the store's seed columns (and the migration of a version-3 database) and the
report's seed tables."""
import math
import re
from html import escape

import duckdb
import numpy as np
import pytest
from scipy.stats import t as student_t
from tests.helpers import EVAL_LENGTHS, PPL, add_seed_runs, build_study

from workflow import report, stats, store
from workflow.batches import finetune_batches, seed_start_step
from workflow.config import ConfigError, cell_record, compose, expand_grid, stage_config
from workflow.report.formatting import fmt_num


# ---------------------------------------------------------------------------------------------- the grid
@pytest.fixture(scope="module")
def grids():
    """The micro study's cells with one seed (the default) and with seeds [0, 1, 2]."""
    one, three = compose("micro"), compose("micro", ["study.seeds=[0,1,2]"])
    return (one, expand_grid(one)), (three, expand_grid(three))


def test_default_is_one_seed_and_keeps_the_cells(grids):
    (cfg, cells), _ = grids
    assert cfg["study"]["seeds"] == [0]
    tuned = [c for c in cells if c["regime"] == "finetuned"]
    assert tuned and all(c["seed"] == 0 and c["group"] == c["cell_id"] for c in tuned)
    assert all(c["seed"] is None for c in cells if c["regime"] != "finetuned")


def test_each_fine_tuned_cell_runs_once_per_seed_and_frozen_once(grids):
    (_, one), (_, three) = grids
    expected = []
    for c in one:
        if c["regime"] == "finetuned":
            expected += [(c["cell_id"], 0, c["cell_id"]), (f"{c['cell_id']}-s1", 1, c["cell_id"]),
                         (f"{c['cell_id']}-s2", 2, c["cell_id"])]
        else:
            expected.append((c["cell_id"], None, c["cell_id"]))
    assert [(c["cell_id"], c["seed"], c["group"]) for c in three] == expected
    frozen = [c["cell_id"] for c in three if c["regime"] == "frozen"]
    assert frozen and len(frozen) == len(set(frozen)) == sum(c["regime"] == "frozen" for c in one)


def test_seed_zero_keeps_its_config_and_hash_and_other_seeds_shift_the_fine_tuning_seed(grids):
    (cfg1, one), (cfg3, three) = grids
    by_id = {c["cell_id"]: c for c in three}
    cell = next(c for c in one if c["regime"] == "finetuned")
    assert stage_config(cfg1, cell, "finetune") == stage_config(cfg3, by_id[cell["cell_id"]], "finetune")
    assert (cell_record(cfg1, cell, "v")["config_hash"]
            == cell_record(cfg3, by_id[cell["cell_id"]], "v")["config_hash"])
    base_seed = cfg3["finetune"]["seed"]
    for r in (1, 2):
        job = stage_config(cfg3, by_id[f"{cell['cell_id']}-s{r}"], "finetune")
        assert job["finetune"]["seed"] == base_seed + r and job["seed"] == r
        assert {k: v for k, v in job["finetune"].items() if k != "seed"} == \
            {k: v for k, v in cfg3["finetune"].items() if k != "seed"}


@pytest.mark.parametrize("seeds, problem", [
    ("[0,1,1]", "study.seeds repeats an item"),
    ("[0,-1]", "study.seeds[1] must be >= 0"),
    ("[0,1.5]", "study.seeds[1] must be an integer"),
    ("[0,one]", "study.seeds[1] must be an integer"),
    ("[]", "study.seeds must not be empty"),
])
def test_bad_seeds_are_rejected_naming_study_seeds(seeds, problem):
    with pytest.raises(ConfigError) as err:
        compose("micro", [f"study.seeds={seeds}"])
    assert problem in str(err.value)


# ---------------------------------------------------------------------------------------------- the corpus offset
def test_seed_start_step_is_zero_for_seed_zero_deterministic_and_within_the_stream():
    n_tokens, per_step = 100_000, 4096
    assert seed_start_step(0, 1234, n_tokens, per_step) == 0
    steps = [seed_start_step(r, 1234 + r, n_tokens, per_step) for r in range(1, 40)]
    assert steps == [seed_start_step(r, 1234 + r, n_tokens, per_step) for r in range(1, 40)]
    assert all(0 <= s < n_tokens // per_step for s in steps)
    assert len(set(steps)) > 5        # seeds start at different places
    assert seed_start_step(1, 5, 100, 4096) == 0   # a stream shorter than a step: its start


def test_every_training_length_of_one_seed_reads_the_same_tokens():
    tokens = np.arange(10_000, dtype=np.int64)
    per_step, start = 64, seed_start_step(3, 77, len(tokens), 64)
    assert start > 0
    first = start * per_step
    for seq_len in (8, 16, 32, 64):
        batch = finetune_batches(tokens, seq_len, per_step, start_step=start)
        rows = batch(0)["input_ids"].numpy()
        assert rows.shape == (per_step // seq_len, seq_len)
        np.testing.assert_array_equal(rows.reshape(-1), tokens[first:first + per_step])
        np.testing.assert_array_equal(batch(2)["input_ids"].numpy().reshape(-1),
                                      tokens[first + 2 * per_step:first + 3 * per_step])


def test_the_offset_wraps_at_the_end_of_the_stream():
    tokens = np.arange(100, dtype=np.int64)    # 12 rows of 8 tokens (4 tokens left over), 2 rows a step
    rows = finetune_batches(tokens, 8, 16, start_step=5)(0)["input_ids"].numpy()
    np.testing.assert_array_equal(rows, [tokens[80:88], tokens[88:96]])
    rows = finetune_batches(tokens, 8, 16, start_step=5)(1)["input_ids"].numpy()
    np.testing.assert_array_equal(rows, [tokens[0:8], tokens[8:16]])


# ---------------------------------------------------------------------------------------------- statistics
def test_spread_matches_numpy():
    values = [12.5, 14.0, 11.25, 13.5]
    s = stats.spread(values)
    assert s["n"] == 4 and s["min"] == 11.25 and s["max"] == 14.0
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["sd"] == pytest.approx(np.std(values, ddof=1))
    one = stats.spread([3.0])
    assert one["n"] == 1 and one["mean"] == one["min"] == one["max"] == 3.0 and math.isnan(one["sd"])
    assert stats.spread([])["n"] == 0 and math.isnan(stats.spread([])["mean"])


def _paired_by_hand(a, b, confidence=0.95):
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    half = student_t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return d.mean(), d.mean() - half, d.mean() + half


def test_paired_difference_matches_the_t_interval_by_hand():
    a, b = [10.0, 12.0, 11.5, 13.0], [9.0, 11.5, 9.0, 12.25]
    mean, low, high = _paired_by_hand(a, b)
    d = stats.paired_difference(a, b)
    assert d["n"] == 4
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((mean, low, high))
    # the p-value of the paired t-test, from the t statistic by hand
    diffs = np.subtract(a, b)
    t_stat = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(4))
    assert d["p"] == pytest.approx(2 * student_t.sf(abs(t_stat), 3))
    assert stats.paired_difference(a, b, confidence=0.9)["high"] < high


def test_paired_difference_with_too_few_pairs_or_a_constant_difference():
    one = stats.paired_difference([5.0], [3.0])
    assert one["n"] == 1 and one["mean"] == 2.0 and all(math.isnan(one[k]) for k in ("low", "high", "p"))
    none = stats.paired_difference([], [])
    assert none["n"] == 0 and math.isnan(none["mean"])
    same = stats.paired_difference([5.0, 6.0, 7.5], [4.0, 5.0, 6.5])
    assert same["mean"] == pytest.approx(1.0) and same["low"] == same["high"] == same["mean"] and math.isnan(same["p"])
    with pytest.raises(ValueError, match="same number of runs"):
        stats.paired_difference([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------- the store
SEEDED = "yarn-exact-512-ft"   # a cell added to the fixture study with three seeds


def _seeded_study(root):
    """build_study plus seeds 1 and 2 of pi-exact-512-ft and seeds 0-2 of yarn-exact-512-ft."""
    study = build_study(root / "results")
    pi = PPL["pi-exact-512-ft"]
    add_seed_runs(study, "pi-exact-512-ft", "pi", 512, {1: [v * 1.04 for v in pi], 2: [v * 0.97 for v in pi]})
    yarn = [29.0, 25.0, 22.0, 40.0, 150.0, 900.0]
    add_seed_runs(study, SEEDED, "yarn", 512, {0: yarn, 1: [v * 1.1 for v in yarn], 2: [v * 0.93 for v in yarn]})
    return study


def _query(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_ingest_stores_seed_and_group_and_reingest_adds_nothing(tmp_path):
    study = _seeded_study(tmp_path)
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    rows = _query(db, "SELECT cell_id, seed, group_id FROM cells ORDER BY cell_id")
    assert ("pi-exact-512-ft", 0, "pi-exact-512-ft") in rows
    assert ("pi-exact-512-ft-s2", 2, "pi-exact-512-ft") in rows
    assert (f"{SEEDED}-s1", 1, SEEDED) in rows
    assert ("none-exact-256-frozen", None, "none-exact-256-frozen") in rows
    before = _query(db, "SELECT (SELECT count(*) FROM cells), (SELECT count(*) FROM metrics)")
    store.ingest(study, db, echo=False)
    assert _query(db, "SELECT (SELECT count(*) FROM cells), (SELECT count(*) FROM metrics)") == before


# The cells table of schema version 3 (before seeds and checkpoint cells), as that version created it.
V3_CELLS = """CREATE TABLE cells(
    cell_id VARCHAR PRIMARY KEY, study VARCHAR, rope VARCHAR, attention VARCHAR, train_len INTEGER,
    regime VARCHAR, base_window INTEGER, method_params JSON, config JSON, config_hash VARCHAR,
    code_version VARCHAR, train_wall_s DOUBLE, train_tokens_per_s DOUBLE, train_peak_mem_mb DOUBLE,
    status VARCHAR, status_reason VARCHAR)"""


def test_a_version_3_database_is_migrated_to_seeds(tmp_path):
    study = build_study(tmp_path / "results")
    db = tmp_path / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    con = duckdb.connect(str(db))   # the same rows in a version-3 database: no seed, group_id or checkpoint
    columns = ", ".join(name for name, *_ in con.execute("DESCRIBE cells").fetchall()
                        if name not in ("seed", "group_id", "checkpoint"))
    con.execute(f"CREATE TABLE cells_v3 AS SELECT {columns} FROM cells")
    con.execute("DROP TABLE cells")
    con.execute(V3_CELLS)
    con.execute("INSERT INTO cells SELECT * FROM cells_v3")
    con.execute("DROP TABLE cells_v3")
    con.execute("UPDATE schema_info SET version = 3")
    con.close()
    assert "seed" not in {name for name, *_ in _query(db, "DESCRIBE cells")}
    n_cells = _query(db, "SELECT count(*) FROM cells")[0][0]

    con = duckdb.connect(str(db))
    store.migrate(con, store.schema_version(con))
    con.close()
    assert _query(db, "SELECT version FROM schema_info") == [(4,)]
    rows = _query(db, "SELECT cell_id, regime, seed, group_id, checkpoint FROM cells")
    assert len(rows) == n_cells
    for cell_id, regime, seed, group, checkpoint in rows:
        assert seed == (0 if regime == "finetuned" else None) and group == cell_id and checkpoint is None
    store.ingest(study, db, echo=False)   # and ingesting into it again adds no rows
    assert _query(db, "SELECT count(*) FROM cells")[0][0] == n_cells


# ---------------------------------------------------------------------------------------------- the report
@pytest.fixture(scope="module")
def seeded_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds-report")
    study = _seeded_study(root)
    db = study / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    out = study / "report.html"
    report.render_report(db, out)
    return out.read_text(), _query(db, "SELECT cell_id, eval_len, value FROM metrics WHERE metric = 'ppl'")


def _values(rows, group, length):
    """The perplexity of each run of `group` at `length`, by seed number."""
    runs = {cid: v for cid, n, v in rows if n == length and re.fullmatch(re.escape(group) + r"(-s\d+)?", cid)}
    return {int(cid.rsplit("-s", 1)[1]) if "-s" in cid[len(group):] else 0: v for cid, v in runs.items()}


def _signed(v):
    return ("+" if v > 0 else "") + fmt_num(float(v))


def test_report_shows_seed_means_spread_and_paired_intervals(seeded_report):
    html, rows = seeded_report
    assert "Spread over seeds" in html and "Table 2.1." in html and "Table 2.2." in html
    assert "3 seeds" in html
    length = EVAL_LENGTHS[3]
    pi, yarn = _values(rows, "pi-exact-512-ft", length), _values(rows, SEEDED, length)
    assert sorted(pi) == sorted(yarn) == [0, 1, 2]
    for values in (pi, yarn):
        v = list(values.values())
        mean, sd = np.mean(v), np.std(v, ddof=1)
        # Table 2.1: the mean, then min–max and the sd over seeds
        assert escape(f"{fmt_num(min(v))}–{fmt_num(max(v))} · sd {fmt_num(float(sd))}") in html
        half = student_t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v))
        # Table 2: the mean with the t-interval of the mean over the seeds
        assert escape(f"{fmt_num(mean - half)}–{fmt_num(mean + half)}") in html
        assert f">{escape(fmt_num(float(mean)))}<" in html
    seeds = sorted(pi)
    mean, low, high = _paired_by_hand([pi[s] for s in seeds], [yarn[s] for s in seeds])
    assert escape(f"pi-exact-512-ft − {SEEDED}") in html
    assert escape(f"{_signed(low)} to {_signed(high)}") in html
    assert escape(_signed(mean)) in html


def test_a_one_seed_report_says_there_is_no_seed_spread(tmp_path):
    study = build_study(tmp_path / "results")
    db = study / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    out = study / "report.html"
    report.render_report(db, out)
    html = out.read_text()
    assert "no seed spread is shown" in html and "Table 2.1." not in html and "seeds</span>" not in html
