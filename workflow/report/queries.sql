-- Every query of the report, one named section each ("-- name: <key>"). workflow/report/queries.py runs
-- them by name against metrics.duckdb opened read-only; `?` marks a bound parameter.

-- name: schema_version
SELECT max(version) AS version FROM schema_info;

-- name: study
SELECT key, value FROM study ORDER BY key;

-- name: cells
-- Frozen cells first (the unmodified base leads), then by training length and method, the seeds of a cell together
-- (seed number 0 first), checkpoint cells last.
SELECT cell_id, study, rope, attention, train_len, regime, base_window, method_params,
       json_extract(config, '$.attention_params') AS attention_params, config_hash, code_version, train_wall_s,
       train_tokens_per_s, train_peak_mem_mb, status, status_reason, seed, group_id, checkpoint
FROM cells
ORDER BY regime = 'checkpoint', regime = 'finetuned', train_len, rope <> 'none', rope, attention, group_id,
         seed NULLS FIRST, cell_id;

-- name: length_values
-- One value per (cell, eval_len) of a length-only metric (no depth), e.g. perplexity.
SELECT cell_id, eval_len, value, n, ci_low, ci_high
FROM metrics
WHERE task = ? AND metric = ? AND depth IS NULL
ORDER BY cell_id, eval_len;

-- name: retrieval_tasks
-- Suites measured on a length x depth grid whose rows are the suite itself (passkey, needle).
SELECT DISTINCT task FROM metrics
WHERE metric = ? AND depth IS NOT NULL AND task = suite
ORDER BY task;

-- name: retrieval_grid
SELECT cell_id, eval_len, depth, value, n
FROM metrics
WHERE task = ? AND metric = ? AND depth IS NOT NULL
ORDER BY cell_id, eval_len, depth;

-- name: retrieval_by_length
-- Mean over depths per (cell, eval_len), weighted by the samples behind each depth.
SELECT cell_id, eval_len,
       sum(value * coalesce(n, 1)) / sum(coalesce(n, 1)) AS value,
       sum(n) AS n, NULL AS ci_low, NULL AS ci_high
FROM metrics
WHERE task = ? AND metric = ? AND depth IS NOT NULL
GROUP BY cell_id, eval_len
ORDER BY cell_id, eval_len;

-- name: retrieval_mean
-- Mean over all lengths and depths per cell.
SELECT cell_id, sum(value * coalesce(n, 1)) / sum(coalesce(n, 1)) AS value
FROM metrics
WHERE task = ? AND metric = ? AND depth IS NOT NULL
GROUP BY cell_id;

-- name: task_suites
-- Every other suite (RULER-style, lm-eval ...): one entry per (suite, metric).
SELECT suite, metric, count(DISTINCT task) AS n_tasks
FROM metrics
WHERE suite NOT IN ('ppl', 'passkey', 'needle')
GROUP BY suite, metric
ORDER BY suite, metric;

-- name: suite_by_task
-- Per (cell, task, eval_len) of one suite and metric: mean over depths (weighted by samples), with
-- the interval when the row is a single measurement.
SELECT cell_id, task, eval_len,
       sum(value * coalesce(n, 1)) / sum(coalesce(n, 1)) AS value, sum(n) AS n,
       CASE WHEN count(*) = 1 THEN min(ci_low) END AS ci_low,
       CASE WHEN count(*) = 1 THEN min(ci_high) END AS ci_high
FROM metrics
WHERE suite = ? AND metric = ?
GROUP BY cell_id, task, eval_len
ORDER BY task, cell_id, eval_len;

-- name: suite_average
-- Per (cell, eval_len): the unweighted mean over the suite's tasks (as RULER reports its average).
SELECT cell_id, eval_len, avg(value) AS value, count(*) AS n_tasks, NULL AS n, NULL AS ci_low, NULL AS ci_high
FROM (SELECT cell_id, task, eval_len, sum(value * coalesce(n, 1)) / sum(coalesce(n, 1)) AS value
      FROM metrics WHERE suite = ? AND metric = ?
      GROUP BY cell_id, task, eval_len)
GROUP BY cell_id, eval_len
ORDER BY cell_id, eval_len;

-- name: suite_mean
-- Per cell: the mean over tasks and lengths of one suite and metric (the downstream score of the
-- rank correlation).
SELECT cell_id, avg(value) AS value
FROM metrics WHERE suite = ? AND metric = ?
GROUP BY cell_id;

-- name: tasks_per_cell
SELECT cell_id, task FROM metrics GROUP BY cell_id, task ORDER BY cell_id, task;

-- name: eval_wall
-- Evaluation wall time per cell: each result file's (suite's) wall time counted once.
SELECT cell_id, sum(wall_s) AS eval_wall_s
FROM (SELECT cell_id, suite, max(wall_s) AS wall_s FROM metrics GROUP BY cell_id, suite)
GROUP BY cell_id;

-- name: compute_totals
SELECT coalesce((SELECT CAST(json_extract(value, '$.wall_s') AS DOUBLE) FROM study
                 WHERE key = 'base_train'), 0) AS pretrain_s,
       coalesce((SELECT sum(train_wall_s) FROM cells), 0) AS finetune_s,
       coalesce((SELECT sum(wall_s) FROM (SELECT max(wall_s) AS wall_s FROM metrics
                                          GROUP BY cell_id, suite)), 0) AS eval_s;

-- name: train_steps
SELECT cell_id, count(*) AS steps, max(elapsed_s) AS elapsed_s FROM train_log GROUP BY cell_id;

-- name: train_log
SELECT cell_id, step, loss FROM train_log ORDER BY cell_id, step;

-- name: cell_configs
SELECT cell_id, config, config_hash, code_version FROM cells ORDER BY cell_id;

-- name: runs
SELECT run_id, study, strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started_at, code_version, hardware
FROM runs
ORDER BY started_at, run_id;

-- name: benchmarks
-- Rows the benchmark tools (workflow/tools/bench_cost, bench_generation) wrote into this study's database: the latest
-- measurement of each phase, cell, length and hardware (a re-run benchmark replaces the earlier one; the table keeps both).
SELECT phase, cell_id, attention, seq_len, tokens_per_s, peak_mem_mb, mfu, throughput_vs_base, memory_vs_base,
       hardware, measured_at,
       json_extract(config, '$.generate_over_forward')::DOUBLE AS generate_over_forward,
       json_extract(config, '$.prefill_s')::DOUBLE AS prefill_s,
       json_extract(config, '$.decode_s_per_token')::DOUBLE AS decode_s_per_token,
       json_extract(config, '$.new_tokens')::INTEGER AS new_tokens
FROM benchmarks
QUALIFY row_number() OVER (PARTITION BY phase, cell_id, attention, seq_len, hardware ORDER BY measured_at DESC) = 1
ORDER BY phase, attention, seq_len, cell_id;
