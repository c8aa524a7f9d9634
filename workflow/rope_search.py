"""LongRoPE's factor search for one cell (methods/longrope.py; docs/methods.md §13g), on the study's validation split.

The stage that applies the method runs it: the fine-tuning stage for a fine-tuned cell (on the base model, before
training, which then uses the found factors) and the evaluation's `cell_model` for a frozen cell. Each candidate
factor vector is scored by the mean next-token loss over all tokens of the first `search_tokens // train_len`
consecutive windows of `train_len` tokens of the validation stream (EOS-joined documents, like the fine-tuning rows),
the same windows for every candidate. The result goes into the model config (methods.longrope.set_factors: the
checkpoint of a fine-tuned cell reloads with it) and into `<cell>/longrope_search.json`: the cell's searched params,
the summary (initial and final loss, evaluations, best loss per generation, wall time) and a key of everything the
search depends on. A later load of the same cell with the same key reuses the file instead of searching again (the
lm-eval model, a resumed fine-tuning job); under several processes rank 0 searches and the others wait for its file.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from methods.longrope import METHOD as LONGROPE, search
from workflow import distributed
from workflow.common import config_hash, log, read_json, write_json
from workflow.runtime import autocast
from workflow.scoring import token_losses

SEARCH_FILE = "longrope_search.json"


def needs_search(model) -> bool:
    """Whether the model has LongRoPE applied with no factors given or found yet."""
    record = getattr(model.config, "ctxext", None) or {}
    return record.get("rope") == "longrope" and record["params"]["long_factor"] is None and "search" not in record


def search_key(cell: dict) -> str:
    """What the search result depends on: the cell's axes and method params, and the base model's config."""
    keep = ("rope", "attention", "train_len", "regime", "base_window", "method_params")
    return config_hash({**{k: cell[k] for k in keep}, "base": cell.get("base")})


def validation_windows(data_dir: Path, length: int, tokens: int) -> torch.Tensor:
    """[k, length] consecutive windows from the start of the validation stream, k = max(1, tokens // length) (fewer
    when the split is shorter; an error when it does not hold one window)."""
    stream = np.load(Path(data_dir) / "validation.npy", mmap_mode="r")
    wanted = max(1, tokens // length)
    have = len(stream) // length
    if have == 0:
        raise ValueError(f"longrope search: the validation split has {len(stream)} tokens, fewer than one window of "
                         f"{length}; enlarge data.split.validation")
    if have < wanted:
        log(f"longrope search: the validation split holds {have} windows of {length} tokens, not {wanted}")
    k = min(wanted, have)
    return torch.from_numpy(np.asarray(stream[:k * length]).astype(np.int64)).view(k, length)


def search_cell(model, cell: dict, data_dir: Path, cell_dir: Path, batch_tokens: int | None = None,
                loss_chunk: int | None = None, dtype: str = "float32") -> dict:
    """Find (or reuse) the cell's LongRoPE factors, install them on `model` and return the search record."""
    path = Path(cell_dir) / SEARCH_FILE
    key = search_key(cell)
    if distributed.active() and not distributed.is_main():
        # rank 0 searches and writes the file; the others wait for it by polling, not in a collective, whose timeout
        # a long search could exceed (if rank 0 fails, the launcher stops every process)
        found = _reuse(model, path, key)
        while found is None:
            time.sleep(2.0)
            found = _reuse(model, path, key)
        torch.distributed.barrier()
        return found
    found = _reuse(model, path, key)
    if found is None:
        if data_dir is None:
            raise ValueError(f"{cell['cell_id']}: no LongRoPE search recorded in {path}; searching needs data_dir "
                             "(the study's data directory, for its validation split)")
        found = _search(model, cell, data_dir, batch_tokens, loss_chunk, dtype)
        found["key"] = key
        LONGROPE.set_factors(model, found["long_factor"], search=found["summary"])
        write_json(path, found)
    if distributed.active():
        torch.distributed.barrier()
    return found


def _reuse(model, path: Path, key: str) -> dict | None:
    """Install the factors recorded in `path` if it was written for this key; None otherwise."""
    if path.is_file():
        found = read_json(path)
        if found.get("key") == key:
            LONGROPE.set_factors(model, found["long_factor"], search=found["summary"])
            log(f"longrope: reusing the searched factors in {path}")
            return found
    return None


def _search(model, cell: dict, data_dir: Path, batch_tokens: int | None, loss_chunk: int | None, dtype: str) -> dict:
    params = model.config.ctxext["params"]
    length = int(cell["train_len"])
    windows = validation_windows(data_dir, length, params["search_tokens"])
    rows = max(1, (batch_tokens or length) // length)
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def score(factors) -> float:
        total, count = 0.0, 0
        with autocast(model, dtype):
            for i in range(0, len(windows), rows):
                losses = token_losses(model, windows[i:i + rows], loss_chunk)
                total += float(losses.double().sum())
                count += losses.numel()
        return total / count

    log(f"longrope search for {cell['cell_id']}: {len(windows)} validation windows of {length} tokens per candidate, "
        f"population {params['search_population']}, {params['search_generations']} generations")
    result = search(model, score, population=params["search_population"], generations=params["search_generations"],
                    parents=params["search_parents"], mutations=params["search_mutations"],
                    crossovers=params["search_crossovers"], crossover_tries=params["search_crossover_tries"],
                    step=params["search_step"], seed=params["search_seed"], log=log)
    model.train(was_training)
    log(f"longrope search: loss {result['initial_loss']:.5f} -> {result['loss']:.5f} after {result['evaluations']} "
        f"candidates ({result['wall_s']:.0f} s)")
    summary = {k: v for k, v in result.items() if k != "long_factor"}
    return {"cell_id": cell["cell_id"], "long_factor": result["long_factor"],
            "params": model.config.ctxext["params"], "summary": {**summary, "windows": len(windows),
                                                                 "window_tokens": length}}
