"""Checkpoint cells (regime checkpoint, workflow.checkpoints): a given Hugging Face checkpoint evaluated as it is, its
axes read from its config, its tokenizer checked against the study's, a hub id offline stopped before any compute."""
import json
import math
import subprocess
import sys
import time

import pytest
from tests.helpers import OVERRIDES, REPO, stdlib_tokenizer, tiny_llama
from transformers import AutoTokenizer, LlamaConfig

from workflow import checkpoints
from workflow.config import ConfigError, compose, expand_grid, stage_config
from workflow.modeling import save_model_dir
from workflow.stages.evaluate import evaluate_cell

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
        "beta_fast": 32.0, "beta_slow": 1.0}


def _save_checkpoint(where, tokenizer, rope_parameters=YARN, window=256):
    """A random tiny LlamaForCausalLM with `rope_parameters`, saved with `tokenizer` as a checkpoint directory."""
    model = tiny_llama(vocab=len(tokenizer), window=window, rope_parameters=rope_parameters)
    return save_model_dir(model, tokenizer, where)


def _grid(entry: str) -> list[str]:
    return [*OVERRIDES, f"grid=[{entry}]"]


@pytest.fixture(scope="module")
def yarn_checkpoint(stage, tmp_path_factory):
    """A YaRN checkpoint (64 -> 256 tokens) with the micro study's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(stage["root"] / "data" / "tokenizer")
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "yarn-model", tokenizer)


def test_a_checkpoint_entry_becomes_one_cell_with_the_axes_of_its_config(yarn_checkpoint):
    cfg = compose("micro", _grid(f"{{regime: checkpoint, checkpoint: '{yarn_checkpoint}', name: yarnish}}")
                  + ["study.seeds=[0,1]"])
    (cell,) = expand_grid(cfg)                     # deterministic: one cell whatever the seeds
    assert cell["cell_id"] == "yarnish-ckpt" and cell["group"] == "yarnish-ckpt" and cell["seed"] is None
    assert (cell["rope"], cell["attention"], cell["regime"]) == ("yarn", "exact", "checkpoint")
    assert (cell["base_window"], cell["train_len"]) == (64, 256)
    assert cell["method_params"]["factor"] == 4.0 and cell["method_params"]["beta_fast"] == 32.0
    assert cell["checkpoint"] == str(yarn_checkpoint) and cell["checkpoint_source"] == "local"
    job = stage_config(cfg, cell, "evaluate")
    assert job["finetune"] is None and "pretrain" not in job["base"]    # evaluated as it is


@pytest.mark.parametrize("rope_parameters, window, expected", [
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 256, ("pi", 64, 256)),
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 128, ("dynamic_ntk", 128, 256)),
    ({"rope_type": "default", "rope_theta": 10000.0}, 64, ("none", 64, 64)),
    ({"rope_type": "default", "rope_theta": 80000.0}, 256, ("ntk", 64, 256)),
    (YARN, 256, ("yarn", 64, 256)),
])
def test_the_rope_method_and_windows_come_from_the_config(rope_parameters, window, expected):
    config = LlamaConfig(max_position_embeddings=window, rope_parameters=rope_parameters)
    axes = checkpoints.rope_of_config(config, 10000.0, 64, "grid[0].checkpoint")
    assert (axes["rope"], axes["base_window"], axes["train_len"]) == expected


def test_a_rope_type_no_method_writes_is_rejected():
    config = LlamaConfig(max_position_embeddings=256)
    config.rope_parameters = {"rope_type": "su", "rope_theta": 1e4}   # a type transformers may know, no method writes
    with pytest.raises(checkpoints.CheckpointError, match=r"grid\[2\].checkpoint: rope type 'su'"):
        checkpoints.rope_of_config(config, 10000.0, 64, "grid[2].checkpoint")


def test_evaluating_a_checkpoint_cell_gives_metrics(stage, yarn_checkpoint, tmp_path):
    cfg = compose("micro", _grid(f"{{regime: checkpoint, checkpoint: '{yarn_checkpoint}', name: yarnish}}"))
    (cell,) = expand_grid(cfg)
    job = stage_config(cfg, cell, "evaluate")
    job["eval"] = {**job["eval"], "lengths": [32, 64, 128]}   # micro-sized: three lengths of perplexity
    out = tmp_path / "cells" / cell["cell_id"] / "eval"
    out.mkdir(parents=True)
    evaluate_cell(job, stage["root"] / "data", None, out, tasks=["ppl"])
    rows = json.loads((out / "ppl.json").read_text())["rows"]
    ppl = {r["eval_len"]: r["value"] for r in rows if r["metric"] == "ppl"}
    assert sorted(ppl) == [32, 64, 128] and all(math.isfinite(v) and v > 1 for v in ppl.values())


def test_a_checkpoint_with_another_tokenizer_stops_before_any_compute(stage, tmp_path):
    other, _ = stdlib_tokenizer(vocab=300)
    where = _save_checkpoint(tmp_path / "other-model", other)
    cfg = compose("micro", _grid(f"{{regime: checkpoint, checkpoint: '{where}', name: other}}"))
    (cell,) = expand_grid(cfg)
    out = tmp_path / "cells" / cell["cell_id"] / "eval"
    out.mkdir(parents=True)
    with pytest.raises(checkpoints.CheckpointError) as err:
        evaluate_cell(stage_config(cfg, cell, "evaluate"), stage["root"] / "data", None, out, tasks=["ppl"])
    message = str(err.value)
    assert "cell other-ckpt" in message and "the checkpoint's tokenizer is not the study's" in message
    assert str(stage["root"] / "data" / "tokenizer") in message and str(where) in message
    assert not list(out.iterdir())


def test_a_hub_id_offline_fails_fast_naming_the_grid_entry(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        expand_grid(compose("micro", [*OVERRIDES, "grid=[{rope: none, attention: exact, regime: frozen, train_len: 64},"
                                      " {regime: checkpoint, checkpoint: someorg/long-model-32k, name: hub}]"]))
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "grid[1].checkpoint='someorg/long-model-32k'" in message and "HF_HUB_OFFLINE" in message
    assert "set the grid entry's checkpoint to the directory" in message


@pytest.mark.parametrize("entry, problem", [
    ("{regime: checkpoint, checkpoint: '%s', name: x, rope: yarn}",
     "grid[0]: a checkpoint entry takes rope from the checkpoint's config; remove it"),
    ("{regime: checkpoint, checkpoint: '%s', name: x, rope: yarn, train_len: 256}",
     "grid[0]: a checkpoint entry takes rope, train_len from the checkpoint's config; remove them"),
    ("{regime: checkpoint, checkpoint: '%s'}", "grid[0].name is required but missing"),
    ("{rope: yarn, attention: exact, regime: frozen, train_len: 256, checkpoint: '%s'}",
     "grid[0]: checkpoint belongs to a checkpoint entry"),
    ("{regime: checkpoint, checkpoint: '%s/missing', name: x}", "is neither a directory nor a Hugging Face hub id"),
])
def test_bad_checkpoint_entries_are_rejected(yarn_checkpoint, entry, problem):
    with pytest.raises(ConfigError) as err:
        expand_grid(compose("micro", _grid(entry % yarn_checkpoint)))
    assert problem in str(err.value)


def test_the_workflow_evaluates_a_checkpoint_cell_without_fine_tuning_or_model(yarn_checkpoint, tmp_path):
    """A dry run: the checkpoint cell has an evaluate job (its files its inputs, no --model) and no fine-tune job."""
    grid = f"grid=[{{rope: pi, attention: exact, regime: finetuned, train_len: 128}}, " \
           f"{{regime: checkpoint, checkpoint: '{yarn_checkpoint}', name: yarnish}}]"
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
                          "-p", "--cores", "1", "report", "--config", "study=micro",
                          f"overrides={json.dumps([grid])}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    out = run.stdout + run.stderr
    evaluate = [line for line in out.splitlines() if "workflow.stages.evaluate" in line]
    ours = [line for line in evaluate if "cells/yarnish-ckpt/eval" in line]
    assert len(ours) == 1 and "--model" not in ours[0]
    assert any("cells/pi-exact-128-ft/eval" in line and "--model" in line for line in evaluate)
    finetunes = [line for line in out.splitlines() if "workflow.stages.finetune" in line]
    assert finetunes and not any("yarnish" in line for line in finetunes)


def test_each_method_reads_its_windows_back_from_a_transformers_config():
    from methods import get_method
    assert get_method("pi").windows_of_config({"rope_type": "linear", "factor": 4.0}, 1024, 64) == (256, 1024)
    assert get_method("dynamic_ntk").windows_of_config({"rope_type": "dynamic", "factor": 4.0}, 256, 64) == (256, 1024)
    assert get_method("yarn").windows_of_config({"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 512}, 2048, 64) == (512, 2048)
    assert get_method("pi").windows_of_config({"rope_type": "linear", "factor": 2.0,
                                               "original_max_position_embeddings": 300}, 1024, 64) == (300, 1024)
    assert get_method("ntk").windows_of_config({"rope_type": "default", "rope_theta": 5e5}, 4096, 256) == (256, 4096)
