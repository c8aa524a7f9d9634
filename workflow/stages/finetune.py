"""Fine-tune stage: apply a cell's method to the base model and train it with the controlled recipe
(the same tokens, order, steps, optimiser, schedule and seed for every method; a seed number r > 0 of
study.seeds fine-tunes with seed finetune.seed + r and starts the corpus rows at a seeded step). Saves
`<cell>/model` so that it reloads with plain `AutoModelForCausalLM.from_pretrained`.

    python -m workflow.stages.finetune --config finetune.json --data-dir results/tiny/data \
        --base results/tiny/base/model --out results/tiny/cells/yarn-exact-1024-ft

Under `torchrun`/`accelerate launch` (`finetune.launcher`) each process trains its share of every step's rows
on an FSDP2-sharded model (`workflow.distributed`); rank 0 writes the outputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from methods import attention_of
from workflow.batches import finetune_batches, seed_start_step, synthetic_row_length
from workflow import distributed, rope_search
from workflow.common import configure_cpu, log, read_json, run_cell_stage, stage_parser, write_json
from workflow.modeling import apply_cell_method, load_model, save_model_dir
from workflow.synthetic import row_maker
from workflow.train import remove_checkpoint, train


def finetune_cell(cfg: dict, data_dir: Path, base_dir: Path, out: Path) -> dict:
    from transformers import AutoTokenizer

    ft, model_cfg = cfg["finetune"], cfg["base"]["model"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    # float32 master weights on the device; model.dtype is the autocast compute dtype (auto: bf16 on CUDA)
    model = load_model(base_dir, model_cfg.get("attn_implementation", "sdpa"), "float32", to_device=True)
    torch.manual_seed(ft["seed"])  # a method's new parameters (CLEX's ODE) start the same in every run
    model = apply_cell_method(model, cfg)
    if rope_search.needs_search(model):  # LongRoPE: its factors are searched on the base model; training then uses them
        rope_search.search_cell(model, cfg, data_dir, out, cfg["train_len"], None, model_cfg.get("dtype", "float32"))
    tokens = np.load(data_dir / "train.npy", mmap_mode="r")
    # synthetic rows in fine-tuning: finetune.synthetic's shares (the reference study fine-tunes on text only)
    rows = row_maker(tokenizer, tokens, cfg["base"]["data"]["synthetic"], ft["synthetic"], ft["seed"])
    # seed number r > 0 (study.seeds): the fine-tuning seed is finetune.seed + r (already in `ft`) and the corpus rows
    # start at a seeded step of the stream (the same for every method and length); r = 0 reads from the start
    start = seed_start_step(cfg.get("seed") or 0, ft["seed"], len(tokens), ft["tokens_per_step"])
    if start:
        log(f"{cfg['cell_id']}: seed number {cfg['seed']} (fine-tuning seed {ft['seed']}): corpus rows from step "
            f"{start} of the stream")
    # finetune.synthetic.length: synthetic rows of the training length, or of the base window written into the
    # training-length rows (the pretraining mix replayed: retrieval gaps stay within the base window)
    synthetic_len = synthetic_row_length(ft["synthetic"]["length"], model_cfg["base_window"])
    batches = finetune_batches(tokens, cfg["train_len"], ft["tokens_per_step"], rows, start, synthetic_len,
                               ft["seed"])
    attention = attention_of(model)  # e.g. Landmark inserts its tokens (in the loss or not: landmark_in_loss)
    summary = train(model, batches, {**ft, "dtype": model_cfg.get("dtype", "float32")}, out, label=f"finetune {cfg['cell_id']}",
                    inputs_fn=lambda batch: attention.training_inputs(model, batch))
    # an attention kind that trains something other than the model it evaluates (LongLoRA: adapters merged, full
    # attention restored) finishes here, before the model is saved
    finish = getattr(attention, "finish_training", None)
    if distributed.active():
        weights = distributed.full_model_state(model)   # every process takes part; rank 0 gets the weights
        if distributed.is_main():
            if finish is not None:
                weights = finish(model, state_dict=weights)
            save_model_dir(model, tokenizer, out / "model", state_dict=weights)
        torch.distributed.barrier()
    else:
        if finish is not None:
            finish(model)
        save_model_dir(model, tokenizer, out / "model")
    if distributed.is_main():
        remove_checkpoint(out)
        write_json(out / "finetune_config.json", cfg)
    return summary


def main(argv=None) -> None:
    parser = stage_parser(__doc__, "the cell's directory")
    parser.add_argument("--base", required=True, type=Path, help="the base model directory")
    args = parser.parse_args(argv)
    configure_cpu(args.threads)
    cfg = read_json(args.config)
    distributed.init_from_env()   # before the model is loaded: on CUDA it picks this process's GPU
    try:
        run_cell_stage("finetune", cfg, args.out, lambda: finetune_cell(cfg, args.data_dir, args.base, args.out))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
