"""workflow.tools.ship_base: a study's base model copied under models/<name> with its log and provenance, loadable
as a shipped model; a study without a base model is refused with a message."""
import json

from helpers import tiny_llama
from workflow.common import read_json, write_json
from workflow.modeling import PROVENANCE_FILE
from workflow.tools import ship_base


def _study_with_base(root):
    study = root / "results" / "st"
    model = study / "base" / "model"
    tiny_llama().save_pretrained(model)
    (model / ".snakemake_timestamp").write_text("")            # Snakemake's marker of a directory output
    write_json(study / "configs" / "base.json", {"data": {}, "model": {"base_window": 64}, "pretrain": {"steps": 3}})
    write_json(study / "data" / "manifest.json", {
        "source": "stdlib", "seeds": {"split": 7}, "splits": {"train": 2, "validation": 1, "test": 1},
        "tokenizer": {"vocab_size": 128}, "files": {"train": ["a.py", "b.py"], "test": ["c.py"]}})
    write_json(study / "base" / "train_summary.json", {"steps": 3, "final_loss": 4.2})
    (study / "base" / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    return study


def test_ship_copies_the_model_its_log_and_a_provenance_record(tmp_path):
    study = _study_with_base(tmp_path)
    dest = ship_base.ship(study, "st-base", dest_root=tmp_path / "models")
    assert dest == tmp_path / "models" / "st-base"
    assert {"config.json", "model.safetensors", "train_log.jsonl", "train_summary.json", PROVENANCE_FILE} <= {
        p.name for p in dest.iterdir()}
    assert not list(dest.glob(".snakemake*")), "Snakemake's markers are not part of a shipped model"
    record = read_json(dest / PROVENANCE_FILE)
    assert record["data"]["train_files"] == ["a.py", "b.py"] and record["data"]["seed"] == 7
    assert record["pretrain"] == {"steps": 3} and record["train"]["final_loss"] == 4.2
    assert record["command"] == "snakemake --cores all results/st/base/model --config study=st"
    # shipping again replaces the folder (no leftovers of the old copy, no temporary folder beside it)
    (dest / "stale.txt").write_text("old")
    ship_base.ship(study, "st-base", dest_root=tmp_path / "models")
    assert not (dest / "stale.txt").exists() and [p.name for p in (tmp_path / "models").iterdir()] == ["st-base"]


def test_a_study_without_a_base_model_is_refused(tmp_path, capsys):
    assert ship_base.main(["--study-dir", str(tmp_path / "results" / "none"), "--name", "x"]) == 2
    assert "holds no model" in capsys.readouterr().err
