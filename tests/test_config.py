"""Configuration: Hydra composition, validation before compute, and the grid of cells."""
import subprocess
import sys

import pytest

from tests.helpers import REPO
from workflow.config import ConfigError, cell_id, cell_record, compose, expand_grid

TINY_CELLS = {
    "none-exact-256-frozen",
    *(f"{m}-exact-{n}-ft" for m in ("pi", "ntk", "dynamic_ntk", "yarn", "clex") for n in (512, 1024)),
    *(f"{m}-exact-1024-frozen" for m in ("ntk", "dynamic_ntk", "yarn")),
    "none-lm_infinite-256-frozen",
    "none-landmark-256-ft",
}


def test_tiny_grid_is_exactly_the_configured_cells():
    cells = expand_grid(compose("tiny"))
    assert {c["cell_id"] for c in cells} == TINY_CELLS
    assert len(cells) == 16


# The rows of config/grids/extended.yaml beyond the paper grid, in the micro study (base window 64, 128/256).
EXTENDED_MICRO_CELLS = {
    "none-self_extend-64-frozen",
    *(f"{m}-{n}-ft" for m in ("pi-longlora", "longrope-exact", "llama3-exact") for n in (128, 256)),
    "longrope-exact-256-frozen", "llama3-exact-256-frozen",
}


def test_micro_has_the_tiny_grid_shape_plus_the_extended_rows():
    cfg = compose("micro")
    cells = expand_grid(cfg)
    base = cfg["model"]["base_window"]
    assert len(cells) == 16 + 9
    assert {c["cell_id"] for c in cells} == {
        c.replace("-256-", f"-{base}-").replace("-512-", "-128-").replace("-1024-", "-256-")
        for c in TINY_CELLS} | EXTENDED_MICRO_CELLS


def test_the_extended_grid_starts_with_the_paper_grid():
    import yaml

    grids = REPO / "config" / "grids"
    paper = yaml.safe_load((grids / "paper_rope.yaml").read_text())["grid"]
    extended = yaml.safe_load((grids / "extended.yaml").read_text())["grid"]
    assert extended[:len(paper)] == paper and len(extended) > len(paper)


def test_overrides_reach_the_resolved_config():
    cfg = compose("micro", ["finetune.steps=3", "eval.lengths=[32,64]"])
    assert cfg["finetune"]["steps"] == 3 and cfg["eval"]["lengths"] == [32, 64]


def test_method_params_are_resolved_per_regime():
    cells = {c["cell_id"]: c for c in expand_grid(compose("tiny"))}
    assert cells["dynamic_ntk-exact-1024-frozen"]["method_params"]["factor"] == 2
    assert cells["dynamic_ntk-exact-1024-ft"]["method_params"]["factor"] == 2   # ceil(4 / 2)
    assert cells["yarn-exact-512-ft"]["method_params"]["beta_fast"] == 32
    # CLEX: max_factor 4 x the training scale (as upstream; LCEG's 32 at 4k -> 32k)
    assert cells["clex-exact-512-ft"]["method_params"] == {"max_factor": 8, "param_factor": 1, "act": "silu",
                                                           "time_dt": 0.01}
    assert cells["clex-exact-1024-ft"]["method_params"]["max_factor"] == 16


def test_landmark_cell_is_fine_tuned_at_the_base_window_with_study_block_size():
    for study, mem_freq in (("tiny", 31), ("micro", 7)):
        cfg = compose(study)
        base = cfg["model"]["base_window"]
        cell = {c["cell_id"]: c for c in expand_grid(cfg)}[f"none-landmark-{base}-ft"]
        assert (cell["rope"], cell["attention"], cell["regime"], cell["train_len"]) == (
            "none", "landmark", "finetuned", base)
        assert cell["attention_params"] == {"mem_freq": mem_freq, "top_k": 5, "train_context": base}


def test_bad_landmark_parameters_stop_before_compute():
    cfg = compose("tiny", ["method.landmark.mem_freq=63"])   # (5 + 2) blocks of 64 do not fit 256
    with pytest.raises(ConfigError, match="mem_freq"):
        expand_grid(cfg)
    cfg = compose("tiny", ["grid=[{rope: none, attention: landmark, regime: frozen, train_len: base}]"])
    with pytest.raises(ConfigError, match="regime"):
        expand_grid(cfg)


def test_cell_record_has_config_and_hash():
    cfg = compose("micro")
    cell = expand_grid(cfg)[1]
    record = cell_record(cfg, cell, "abc")
    assert record["cell_id"] == cell["cell_id"] and len(record["config_hash"]) == 64
    changed = cell_record(compose("micro", ["finetune.lr=0.5"]), cell, "abc")
    assert changed["config_hash"] != record["config_hash"]


@pytest.mark.parametrize("override, message", [
    ("grid=[{rope: nope, attention: exact, regime: frozen, train_len: 512}]", "rope='nope'"),
    ("grid=[{rope: pi, attention: sideways, regime: frozen, train_len: 512}]", "attention='sideways'"),
    ("grid=[{rope: pi, attention: exact, regime: frozen, train_len: 128}]", "train_len=128 must be above"),
    ("grid=[{rope: pi, attention: exact, regime: melted, train_len: 512}]", "regime='melted'"),
    ("eval.lengths=[128,-4]", "eval.lengths[1]"),
    ("model.source=hf_dir", "model.path=None"),
    (("model.source=hf_dir", "model.path=/nonexistent/llama"), "model.path='/nonexistent/llama' is not a Hugging Face"),
    ("eval.lengths=[128,0]", "eval.lengths[1] must be a positive integer, got 0"),
    ("eval.lengths=[128,abc]", "eval.lengths[1] must be a positive integer, got 'abc'"),
    ("eval.lengths=[128,256.5]", "eval.lengths[1] must be a positive integer, got 256.5"),
    ("grid=[{rope: ntk, attention: exact, regime: frozen, train_len: 512, params: {alpha: 0.5}}]",
     "alpha must be a number >= 1, got 0.5"),                                       # scale factor below 1
    ("grid=[{rope: dynamic_ntk, attention: exact, regime: frozen, train_len: 512, params: {factor: 0.5}}]",
     "factor must be a number >= 1, got 0.5"),
    ("grid=[{rope: none, attention: landmark, regime: frozen, train_len: base}]", "regime"),  # frozen but needs training
    ("grid=[{rope: none, attention: exact, regime: finetuned, train_len: base}]", "a fine-tuned cell needs a method"),
    ("finetune.lr=inf", "finetune.lr must be a positive finite number, got inf"),
    ("pretrain.schedule=zigzag", "pretrain.schedule='zigzag' is not known; valid: cosine, constant_with_warmup"),
    ("finetune.checkpoint_every=0", "finetune.checkpoint_every must be a positive integer, got 0"),
    ("finetune.tokens_per_step=1000", "finetune.tokens_per_step=1000 must be a multiple of grid[1].train_len=512"),
    ("grid=[{rope: yarn, attention: exact, regime: frozen, train_len: 512, params: {beta_quick: 3}}]", "beta_quick"),
])
def test_bad_config_stops_with_a_clear_message(override, message):
    with pytest.raises(ConfigError) as err:
        expand_grid(compose("tiny", list(override) if isinstance(override, tuple) else [override]))
    assert message in str(err.value)


def test_unknown_method_message_lists_valid_names():
    with pytest.raises(ConfigError, match="valid: none, pi, ntk, dynamic_ntk, yarn"):
        expand_grid(compose("tiny", ["grid=[{rope: nope, attention: exact, regime: frozen, train_len: 512}]"]))


def test_cell_id_slug():
    assert cell_id("yarn", "exact", 1024, "finetuned") == "yarn-exact-1024-ft"
    assert cell_id("none", "exact", 256, "frozen") == "none-exact-256-frozen"


def _dry_run(tmp_path, *extra):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
           "--cores", "2", "report", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_dry_run_lists_every_cell(tmp_path):
    run = _dry_run(tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    for cid in TINY_CELLS:
        assert f"cell={cid}" in out or f"finetuned_cell={cid}" in out, cid
    assert out.count("rule finetune:") == 11 and out.count("rule evaluate:") == 16


def test_dry_run_fails_early_on_bad_config(tmp_path):
    run = _dry_run(tmp_path, "--config", "overrides=[\"grid=[{rope: nope, attention: exact, regime: frozen, "
                   "train_len: 512}]\"]")
    assert run.returncode != 0
    assert "rope='nope' is not a known method" in run.stdout + run.stderr


@pytest.mark.parametrize("override, message", [
    ("eval.lengths=[128,-4]", "eval.lengths[1] must be a positive integer, got -4"),
    ("model.path=/nonexistent/llama", "model.path='/nonexistent/llama' is not a Hugging Face checkpoint"),
])
def test_dry_run_fails_before_any_job_on_bad_values(tmp_path, override, message):
    extra = '"model.source=hf_dir", ' if override.startswith("model.path") else ""
    run = _dry_run(tmp_path, "--config", f'overrides=[{extra}"{override}"]')
    assert run.returncode != 0
    assert message in run.stdout + run.stderr and "rule data:" not in run.stdout
    assert not (tmp_path / "results").exists()


def test_attention_params_are_validated_against_the_attention_kind():
    cfg = compose("micro")
    cfg["grid"] = [{"rope": "none", "attention": "exact", "regime": "frozen", "train_len": "base",
                    "attention_params": {"n_local": 8}}]
    with pytest.raises(ConfigError, match=r"grid\[0\].*attention 'exact'.*unknown parameter"):
        expand_grid(cfg)
    cfg["grid"][0]["attention"] = "window"
    with pytest.raises(ConfigError, match="valid: exact, lm_infinite"):
        expand_grid(cfg)


def test_lm_infinite_cells_combine_with_any_rope_and_are_frozen_only():
    cells = {c["cell_id"]: c for c in expand_grid(compose("tiny"))}
    assert cells["none-lm_infinite-256-frozen"]["attention_params"] == {"n_local": 256, "n_global": 10,
                                                                         "distance_cap": 256}
    cfg = compose("tiny")
    cfg["grid"] = [{"rope": "yarn", "attention": "lm_infinite", "regime": "frozen", "train_len": 1024,
                    "attention_params": {"n_global": 4}}]
    (cell,) = expand_grid(cfg)
    assert cell["cell_id"] == "yarn-lm_infinite-1024-frozen" and cell["method_params"]["beta_fast"] == 32
    assert cell["attention_params"] == {"n_local": 256, "n_global": 4, "distance_cap": 256}
    cfg["grid"][0]["regime"] = "finetuned"
    with pytest.raises(ConfigError, match=r"grid\[0\].*lm_infinite.*supports regime\(s\) frozen"):
        expand_grid(cfg)
    cfg["grid"][0].update(regime="frozen", attention_params={"n_local": 0})
    with pytest.raises(ConfigError, match="n_local must be an integer >= 1"):
        expand_grid(cfg)
    cfg["grid"] = [{"rope": "none", "attention": "lm_infinite", "regime": "frozen", "train_len": 512}]
    with pytest.raises(ConfigError, match="train_len must be 256"):
        expand_grid(cfg)


@pytest.mark.parametrize("override,message", [
    ("eval.ruler.tasks=[niah_single_9]", "eval.ruler.tasks has unknown or no families"),
    ("eval.ruler.lengths=[0]", r"eval.ruler.lengths\[0\] must be a positive integer"),
    ("eval.ruler.qa_files.qa_1=/nowhere.jsonl", "eval.ruler.qa_files.qa_1='/nowhere.jsonl' is not a file"),
    ("eval.tasks=[ppl,lm_eval]", "eval.lm_eval.tasks is empty"),
    ("eval.chat_template=maybe", "eval.chat_template must be true or false"),
])
def test_bad_evaluation_suite_settings_stop_early(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("micro", [override])
