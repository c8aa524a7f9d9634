"""The training loop shared by pretraining (base stage) and fine-tuning: AdamW, a warm-up + cosine or
constant schedule, gradient clipping, a JSON line per step, periodic checkpoints, and resumption from
the last checkpoint when a killed job is restarted.

Batches come from `batch_fn(step)`, a pure function of the step, so a resumed run sees exactly the
rows the uninterrupted run would have seen.

Under a multi-process launch (`workflow.distributed`) the model is sharded with FSDP2, each process trains on
its share of every step's rows, the logged loss is the mean over processes, and only rank 0 writes the log,
the checkpoints and the summary. A checkpoint then holds full (gathered) state dicts keyed by parameter
name, so a restarted run resumes from it with any number of processes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from workflow import distributed
from workflow.common import log, peak_memory_mb, write_json
from workflow.resources import ensure_train_fits
from workflow.runtime import autocast, prepare_training, use_fused_adamw


SCHEDULES = ("cosine", "constant_with_warmup", "warmup_stable_decay")  # the values of <stage>.schedule (lr_at)


def lr_at(step: int, cfg: dict) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine decay to
    lr * min_lr_ratio (schedule `cosine`), constant (schedule `constant_with_warmup`), or constant and then a linear
    decay to lr * min_lr_ratio over the last `decay_fraction` of the steps (schedule `warmup_stable_decay`)."""
    base, warmup, total = cfg["lr"], cfg["warmup_steps"], cfg["steps"]
    if step < warmup:
        return base * (step + 1) / warmup
    schedule, floor = cfg["schedule"], base * cfg["min_lr_ratio"]
    if schedule == "constant_with_warmup":
        return base
    if schedule == "warmup_stable_decay":
        decay_start = total - int(round(cfg["decay_fraction"] * total))
        if step < decay_start:
            return base
        return base - (base - floor) * (step - decay_start + 1) / max(1, total - decay_start)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_for(model, cfg: dict) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), fused=use_fused_adamw(model, cfg) or None)


def _save_checkpoint(ckpt_dir: Path, model, optimizer, step: int) -> None:
    """Atomically replace `ckpt_dir` with the model and optimizer state after `step` steps. Under several
    processes every process takes part in gathering the full state and rank 0 writes it."""
    from safetensors.torch import save_model

    if distributed.active():
        model_state, optimizer_state = distributed.full_state(model, optimizer)
        if distributed.is_main():
            _replace_checkpoint(ckpt_dir, lambda tmp: torch.save(
                {"model": model_state, "optimizer": optimizer_state, "step": step, "rng": torch.get_rng_state(),
                 "world_size": distributed.world_size()}, tmp / "trainer.pt"))
        torch.distributed.barrier()   # nobody runs ahead of a checkpoint that is still being written
        return

    # Tensors and plain containers only, so that it loads with torch.load(weights_only=True). The RNG
    # state makes a resumed run draw what the uninterrupted run would have (CLEX samples its scale).
    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": torch.get_rng_state()},
                   tmp / "trainer.pt")

    _replace_checkpoint(ckpt_dir, write)


def _replace_checkpoint(ckpt_dir: Path, write: Callable[[Path], None]) -> None:
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt_dir: Path, model, optimizer) -> int:
    from safetensors.torch import load_model

    state = torch.load(ckpt_dir / "trainer.pt", weights_only=True)
    if "model" in state:   # written under several processes: full state dicts keyed by name
        if not distributed.active():
            raise RuntimeError(f"{ckpt_dir} was written by a run of {state['world_size']} processes; resume it "
                               "under the same finetune.launcher, or delete it to start again")
        distributed.load_full_state(model, optimizer, state["model"], state["optimizer"])
    elif distributed.active():
        raise RuntimeError(f"{ckpt_dir} was written by a single-process run; resume it with finetune.launcher='', "
                           "or delete it to start again")
    else:
        load_model(model, str(ckpt_dir / "model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Keep only the log lines of steps already covered by the checkpoint (no duplicates on resume).
    A line cut short by a kill is dropped with the other lines after the checkpoint."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    log_path.write_text("".join(k + "\n" for k in kept))


def step_loss(model, inputs: dict) -> torch.Tensor:
    """The loss of one step: the model's own mean over the scored tokens (labels != -100), or, when the inputs
    carry `loss_weights` (workflow.batches: they sum to 1 over the global batch), the weighted sum of the token
    losses (times the number of processes, whose gradients FSDP averages)."""
    weights = inputs.get("loss_weights")
    if weights is None:
        return model(**inputs).loss
    logits = model(input_ids=inputs["input_ids"]).logits[:, :-1].float()
    labels = inputs["labels"][:, 1:].reshape(-1)
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0),
                                                   reduction="none")
    weights = torch.where(labels == -100, 0.0, weights[:, 1:].reshape(-1).to(token_loss.dtype))
    return (token_loss * weights).sum() * distributed.world_size()


def train(model, batch_fn: Callable[[int], dict], cfg: dict, work_dir: Path, label: str,
          inputs_fn: Callable[[dict], dict] | None = None) -> dict:
    """Train `model` in place for cfg['steps'] steps. Writes work_dir/train_log.jsonl and a checkpoint
    under work_dir/ckpt every cfg['checkpoint_every'] steps; resumes from it if present. Returns the
    summary (also written to work_dir/train_summary.json). `batch_fn(step)` gives a batch dict
    (workflow.batches: input_ids, labels, optionally loss_weights); `inputs_fn` turns it into the model's
    inputs (default: the batch itself); an attention kind may insert tokens (Landmark)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, log_path = work_dir / "ckpt", work_dir / "train_log.jsonl"
    main = distributed.is_main()
    torch.manual_seed(cfg["seed"])
    prepare_training(model, cfg)
    if distributed.active():
        distributed.shard(model)
    model.train()
    optimizer = optimizer_for(model, cfg)
    start, resumed = 0, None
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if main and not ckpt_dir.exists() and (old / "trainer.pt").exists():  # killed between _save_checkpoint's renames
        os.replace(old, ckpt_dir)
    if distributed.active():
        torch.distributed.barrier()   # the others look for the checkpoint only once rank 0 has repaired it
        rows = batch_fn   # each process trains on its share of the step's rows
        batch_fn = lambda step: distributed.rank_rows(rows(step))  # noqa: E731
    if (ckpt_dir / "trainer.pt").exists():
        start = resumed = _load_checkpoint(ckpt_dir, model, optimizer)
        log(f"{label}: resuming from the checkpoint at step {start}")
    if main:
        _truncate_log(log_path, start)
    ensure_train_fits(model, batch_fn(start)["input_ids"])

    steps, tokens_total, losses = cfg["steps"], 0, []
    t_start = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=label, mininterval=5.0, unit="step",
               dynamic_ncols=True, disable=not main)
    with open(log_path if main else os.devnull, "a") as log_file:
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {key: value.to(model.device) for key, value in batch_fn(step).items()}
            inputs = inputs_fn(batch) if inputs_fn is not None else batch
            with autocast(model, cfg.get("dtype", "float32")):
                loss = step_loss(model, inputs)
            # the global batch's loss: with loss weights, the processes' losses average to the global weighted
            # sum; without, every process's rows have the same number of scored tokens, so the mean of the
            # processes' means is the mean over all rows (and all processes stop together)
            shown = distributed.mean_across(loss) if distributed.active() else loss
            if not torch.isfinite(shown):
                raise FloatingPointError(f"{label}: loss became {shown.item()} at step {step + 1}; stopping")
            loss.backward()
            if cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens = batch["input_ids"].numel() * distributed.world_size()
            tokens_total += tokens
            losses.append(shown.item())
            record = {"step": step + 1, "loss": round(shown.item(), 6), "lr": lr, "tokens": tokens,
                      "tokens_per_s": round(tokens / dt, 1), "peak_mem_mb": round(peak_memory_mb(), 1),
                      "elapsed_s": round(time.perf_counter() - t_start, 3)}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            bar.set_postfix(loss=f"{shown.item():.3f}", refresh=False)
            if (step + 1) % cfg["checkpoint_every"] == 0 and step + 1 < steps:
                _save_checkpoint(ckpt_dir, model, optimizer, step + 1)
    bar.close()
    wall = time.perf_counter() - t_start
    model.eval()
    summary = {"steps": steps, "tokens": tokens_total, "wall_s": round(wall, 2),
               "tokens_per_s": round(tokens_total / wall, 1) if wall > 0 else None,
               "final_loss": losses[-1] if losses else None, "peak_mem_mb": round(peak_memory_mb(), 1),
               "threads": torch.get_num_threads(), "resumed_from_step": resumed,
               "processes": distributed.world_size()}
    if main:
        write_json(work_dir / "train_summary.json", summary)
    log(f"{label}: {steps} steps, final loss {summary['final_loss']}, {summary['tokens_per_s']} tokens/s, "
        f"{wall:.0f} s")
    return summary


def remove_checkpoint(work_dir: Path) -> None:
    """Drop the resumption checkpoint once the final model is saved."""
    shutil.rmtree(Path(work_dir) / "ckpt", ignore_errors=True)
