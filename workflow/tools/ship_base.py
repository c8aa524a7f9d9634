"""Ship a pretrained base model with the repository: copy a study's base model (results/<study>/base/model: config,
safetensors weights, tokenizer) to models/<name>/ with its pretraining log and a provenance record (the config it
was trained with, the corpus and the exact list of training documents, the commit, the training summary), so that
a study with `model.source: shipped` starts from it and its data stage can check that no held-out document was
seen in pretraining.

    snakemake --cores all results/tiny_scratch/base/model --config study=tiny_scratch
    python -m workflow.tools.ship_base --study-dir results/tiny_scratch --name tiny-base
"""
from __future__ import annotations

import argparse
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from workflow.common import read_json, write_json
from workflow.config import code_version
from workflow.modeling import PROVENANCE_FILE, SHIPPED_DIR

COPIED = ("train_log.jsonl", "train_summary.json", "model_info.json")


def provenance(study_dir: Path) -> dict:
    """What a shipped base model records about how it was made."""
    base = study_dir / "base"
    cfg = read_json(study_dir / "configs" / "base.json")
    manifest = read_json(study_dir / "data" / "manifest.json")
    return {
        "shipped_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(study_dir.resolve()),   # the checkout that ran the study
        "study": study_dir.name,
        "command": f"snakemake --cores all results/{study_dir.name}/base/model --config study={study_dir.name}",
        "model": cfg["model"], "pretrain": cfg["pretrain"],
        "data": {"source": manifest.get("source"), "description": manifest.get("description"),
                 "python_version": manifest.get("python_version"), "seed": manifest["seeds"]["split"],
                 "split": manifest.get("split_shares"), "synthetic": manifest.get("synthetic"),
                 "splits": manifest["splits"], "tokenizer": manifest["tokenizer"],
                 "train_files": manifest["files"]["train"]},
        "train": read_json(base / "train_summary.json"),
    }


def ship(study_dir: Path, name: str, dest_root: Path = SHIPPED_DIR) -> Path:
    study_dir = Path(study_dir)
    model = study_dir / "base" / "model"
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} holds no model (config.json): run the study's base stage first")
    record = provenance(study_dir)
    dest = Path(dest_root) / name
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns(".snakemake*"))  # not Snakemake's markers
    for file in COPIED:
        if (study_dir / "base" / file).is_file():
            shutil.copy2(study_dir / "base" / file, tmp / file)
    write_json(tmp / PROVENANCE_FILE, record)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-dir", type=Path, required=True, help="results/<study> whose base model to ship")
    parser.add_argument("--name", required=True, help="the folder under models/ (model.shipped)")
    args = parser.parse_args(argv)
    try:
        dest = ship(args.study_dir, args.name)
    except (FileNotFoundError, KeyError) as exc:
        print(f"ship_base: error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"ship_base: {dest} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
