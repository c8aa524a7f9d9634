"""Cost benchmark: fine-tuning tokens/s and model FLOPs utilisation per method and training length, evaluation
tokens/s and peak memory per method and evaluation length, and each method's overhead relative to the
unmodified model at the same length, all measured in one run on random tokens (cost does not depend on the
weights or the text). Rows go to the `benchmarks` table of a DuckDB file (workflow.store.write_benchmarks).

The cells, lengths, model shape and training recipe are the study's (Hydra config); the model is the study's
base model directory when given (--model), else a randomly initialised model of the study's shape. MFU counts
6·N FLOPs per token (N: the parameters doing matmuls; the input embedding only when tied to the output layer)
plus the attention matmuls, 12·layers·(heads·head_dim)·T per token (PaLM's MFU, Chowdhery et al. 2022, App. B),
divided by the device's peak (config/benchmark.yaml, or --peak-tflops; n/a on a CPU without one). Peak memory is
what a call adds to the memory in use when it starts (CUDA allocator peak; on the CPU, resident-set growth, rough).
On a GPU it prints pass/fail against the targets in config/benchmark.yaml. Not a test: numbers depend on the machine.

    python -m workflow.tools.bench_cost --study smollm2 --model results/smollm2/base/model --db results/smollm2/metrics.duckdb
    python -m workflow.tools.bench_cost --study micro --db /tmp/bench.duckdb --cells none-exact-64-frozen pi-exact-128-ft
    python -m workflow.tools.bench_cost --study smollm2 --phases eval --eval-lens 65536 --cells none-lm_infinite-8192-frozen \
        --vocab-size 49152 --db /tmp/bench.duckdb       # random weights in SmolLM2's shape
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import time
import uuid
from pathlib import Path

import torch
import yaml

from workflow.checkpoints import CHECKPOINT
from workflow.common import configure_cpu, hardware, log
from workflow.config import CONFIG_DIR, compose, expand_grid
from workflow.measure import measure_peak
from workflow.modeling import apply_cell_method, build_scratch_model, count_parameters, load_model
from workflow.runtime import autocast, compute_dtype, device, prepare_training
from workflow.scoring import token_losses
from workflow.store import write_benchmarks
from workflow.train import optimizer_for

from methods import METHODS, attention_of


def flops_per_token(model, seq_len: int, training: bool) -> float:
    """Model FLOPs per token: 2·N (forward) or 6·N (training) plus the attention matmuls at length seq_len."""
    c = model.config
    n = count_parameters(model)
    if not c.tie_word_embeddings:  # an untied input embedding is a lookup, not a matmul
        n -= model.get_input_embeddings().weight.numel()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = 2 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len  # forward: QK^T and AV
    return (3 if training else 1) * (2 * n + attention)


def _sync(on: torch.device) -> None:
    if on.type == "cuda":
        torch.cuda.synchronize()


def _random_rows(vocab: int, rows: int, seq_len: int, on: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq_len), generator=g).to(on)


def bench_finetune(base, cell: dict, seq_len: int, rows: int, ft: dict, steps: int, on: torch.device) -> dict:
    """Tokens/s, peak memory and FLOPs/token of fine-tuning steps (forward, backward, AdamW) of one cell."""
    model = apply_cell_method(copy.deepcopy(base), cell).to(on)
    prepare_training(model, ft)
    model.train()
    optimizer = optimizer_for(model, ft)
    attention = attention_of(model)
    batch = _random_rows(model.config.vocab_size, rows, seq_len, on, seed=seq_len)

    def step():
        with autocast(model, ft["dtype"]):
            loss = model(**attention.training_inputs(model, {"input_ids": batch, "labels": batch})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = measure_peak(step, on.type)  # also the warm-up step
    _sync(on)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(on)
    tokens_per_s = rows * seq_len * steps / (time.perf_counter() - t0)
    fpt = flops_per_token(model, seq_len, training=True)
    del model, optimizer
    return {"tokens_per_s": tokens_per_s, "peak_mem_mb": peak, "flops_per_token": fpt}


@torch.no_grad()
def bench_eval(base, cell: dict, seq_len: int, loss_chunk: int | None, repeats: int, dtype: torch.dtype,
               on: torch.device) -> dict:
    """Tokens/s and peak memory of the evaluation loss (workflow.scoring.token_losses) of one cell, one row."""
    model = apply_cell_method(copy.deepcopy(base), cell).to(device=on, dtype=dtype).eval()
    batch = _random_rows(model.config.vocab_size, 1, seq_len, on, seed=seq_len)
    run = lambda: token_losses(model, batch, loss_chunk)  # noqa: E731
    peak = measure_peak(run, on.type)  # also the warm-up
    _sync(on)
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(on)
    tokens_per_s = seq_len * repeats / (time.perf_counter() - t0)
    fpt = flops_per_token(model, seq_len, training=False)
    del model
    return {"tokens_per_s": tokens_per_s, "peak_mem_mb": peak, "flops_per_token": fpt}


def reference_cell(cell: dict) -> dict:
    """The unmodified model (base RoPE, exact attention) in the shape of `cell`'s record."""
    return {**cell, "cell_id": "none-exact", "rope": "none", "attention": "exact", "method_params": {},
            "attention_params": {}}


def peak_tflops(bench_cfg: dict, on: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if on.type != "cuda":
        return None
    name = torch.cuda.get_device_name(on)
    return next((v for k, v in bench_cfg["peak_tflops"].items() if k in name), None)


def run(cfg: dict, bench_cfg: dict, model_dir: Path | None, cells_wanted: list[str] | None, train_lens, eval_lens,
        rows: int, peak: float | None, on: torch.device, vocab_size: int = 32000,
        phases=("finetune", "eval")) -> list[dict]:
    model_cfg, ft, ev = cfg["model"], dict(cfg["finetune"]), cfg["eval"]
    ft["dtype"] = model_cfg.get("dtype", "float32")
    if model_dir:
        base = load_model(model_dir, model_cfg.get("attn_implementation", "sdpa"), "float32")
    else:
        base = build_scratch_model(model_cfg, _Sized(vocab_size), seed=0)
    # one cell per method: a seed repeat costs what its first seed costs, and a checkpoint cell is not a method applied
    # to this base model
    cells = [c for c in expand_grid(cfg) if c["regime"] != CHECKPOINT and not c.get("seed")]
    if cells_wanted:
        unknown = set(cells_wanted) - {c["cell_id"] for c in cells}
        if unknown:
            raise SystemExit(f"--cells: {sorted(unknown)} not in the {cfg['study']['name']} grid")
        cells = [c for c in cells if c["cell_id"] in cells_wanted]
    eval_dtype = compute_dtype(model_cfg.get("dtype", "float32"), on)
    out = []
    for phase in phases:
        jobs = []
        for cell in cells:
            if phase == "finetune" and cell["regime"] != "finetuned":
                continue
            lengths = [cell["train_len"]] if phase == "finetune" else eval_lens
            for n in lengths:
                if phase == "finetune" and train_lens and n not in train_lens:
                    continue
                jobs.append((cell, n))
        if not jobs:
            continue
        for n in sorted({n for _, n in jobs}):  # the unmodified model at every measured length, first
            jobs.insert(0, (reference_cell(jobs[0][0]), n))
        done = {}
        for cell, n in jobs:
            if (cell["cell_id"], n) in done:
                continue
            log(f"bench {phase} {cell['cell_id']} at {n} tokens")
            if phase == "finetune":
                r = bench_finetune(base, cell, n, rows, ft, bench_cfg["steps"], on)
            else:
                r = bench_eval(base, cell, n, ev.get("loss_chunk"), bench_cfg["repeats"], eval_dtype, on)
            r.update({"phase": phase, "cell_id": cell["cell_id"], "rope": cell["rope"], "attention": cell["attention"],
                      "seq_len": n, "rows": rows if phase == "finetune" else 1})
            r["mfu"] = (r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)) if peak else None
            done[(cell["cell_id"], n)] = r
        for r in done.values():
            ref = done[("none-exact", r["seq_len"])]
            r["throughput_vs_base"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_vs_base"] = r["peak_mem_mb"] / ref["peak_mem_mb"] if ref["peak_mem_mb"] else None
            out.append(r)
    return out


class _Sized:
    """The little of a tokenizer that build_scratch_model reads (a length and the special ids)."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = [f"{'phase':<9}{'cell':<34}{'len':>7}{'tokens/s':>12}{'vs base':>9}{'peak MiB':>11}{'vs base':>9}{'MFU':>8}"]
    for r in rows:
        lines.append(f"{r['phase']:<9}{r['cell_id']:<34}{r['seq_len']:>7}{r['tokens_per_s']:>12.1f}"
                     f"{r['throughput_vs_base']:>8.3f}x{r['peak_mem_mb']:>11.1f}{_fmt(r['memory_vs_base'], '.3f') + 'x':>9}"
                     f"{'n/a' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%':>8}")
    return "\n".join(lines)


def check_targets(rows: list[dict], targets: dict) -> list[str]:
    """One line per GPU target: PASS/FAIL with the measured number, or 'not measured'."""
    out = []
    rope = [r for r in rows if r["attention"] == "exact" and r["rope"] in METHODS and r["rope"] != "none"
            and r["cell_id"] != "none-exact"]
    if rope:
        worst = min(rope, key=lambda r: r["throughput_vs_base"])
        ok = worst["throughput_vs_base"] >= 1 - targets["rope_throughput_overhead"]
        out.append(f"{'PASS' if ok else 'FAIL'} RoPE methods within {100 * targets['rope_throughput_overhead']:.0f}% of "
                   f"the unmodified model's tokens/s: worst {worst['cell_id']} {worst['phase']} at {worst['seq_len']}: "
                   f"{worst['throughput_vs_base']:.3f}x")
    else:
        out.append("not measured: RoPE-method throughput")
    mfu = [r for r in rows if r["phase"] == "finetune" and r["seq_len"] == targets["finetune_mfu_len"] and r["mfu"]]
    if mfu:
        best = min(r["mfu"] for r in mfu)
        out.append(f"{'PASS' if best >= targets['finetune_mfu'] else 'FAIL'} fine-tuning MFU >= "
                   f"{100 * targets['finetune_mfu']:.0f}% at {targets['finetune_mfu_len']}: lowest {100 * best:.1f}%")
    else:
        out.append(f"not measured: fine-tuning MFU at {targets['finetune_mfu_len']}")
    lm = [r for r in rows if r["phase"] == "eval" and r["attention"] == "lm_infinite"
          and r["seq_len"] == targets["lm_infinite_memory_len"] and r["memory_vs_base"] is not None]
    if lm:
        worst = max(r["memory_vs_base"] for r in lm)
        ok = worst <= targets["lm_infinite_memory_ratio"]
        out.append(f"{'PASS' if ok else 'FAIL'} LM-Infinite peak memory <= {targets['lm_infinite_memory_ratio']} x exact "
                   f"at {targets['lm_infinite_memory_len']}: {worst:.3f}x")
    else:
        out.append(f"not measured: LM-Infinite memory at {targets['lm_infinite_memory_len']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="micro")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides, e.g. finetune.steps=5")
    parser.add_argument("--model", type=Path, default=None, help="the study's base model directory (default: random "
                        "weights in the study's shape)")
    parser.add_argument("--cells", nargs="*", default=None, help="cell ids of the grid (default: all)")
    parser.add_argument("--train-lens", type=int, nargs="*", default=None, help="default: the study's")
    parser.add_argument("--eval-lens", type=int, nargs="*", default=None, help="default: the study's eval.lengths")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of the random model (no --model)")
    parser.add_argument("--phases", nargs="+", choices=["finetune", "eval"], default=["finetune", "eval"])
    parser.add_argument("--rows", type=int, default=1, help="rows per fine-tuning step (default 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: config)")
    parser.add_argument("--db", type=Path, required=True, help="DuckDB file to add the rows to (table benchmarks)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    configure_cpu(args.threads)
    cfg = compose(args.study, args.overrides)
    bench_cfg = yaml.safe_load((CONFIG_DIR / "benchmark.yaml").read_text())
    on = device()
    peak = peak_tflops(bench_cfg, on, args.peak_tflops)
    rows = run(cfg, bench_cfg, args.model, args.cells, args.train_lens, args.eval_lens or cfg["eval"]["lengths"],
               args.rows, peak, on, args.vocab_size, args.phases)
    run_id, now, hw = uuid.uuid4().hex[:12], dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), hardware()
    settings = {"overrides": args.overrides, "model": str(args.model) if args.model else "random init",
                "peak_tflops": peak, "dtype": str(compute_dtype(cfg["model"].get("dtype", "float32"), on)),
                "attn_implementation": cfg["model"].get("attn_implementation", "sdpa"),
                "gradient_checkpointing": bool(cfg["finetune"].get("gradient_checkpointing")),
                "loss_chunk": cfg["eval"].get("loss_chunk"), **{k: bench_cfg[k] for k in ("steps", "repeats")}}
    for r in rows:
        r.update({"run_id": run_id, "study": cfg["study"]["name"], "measured_at": now, "hardware": hw,
                  "config": settings})
    print(f"cost benchmark of study {cfg['study']['name']!r} on {hw}, run {run_id}"
          f" (peak {peak or 'n/a'} TFLOP/s; 'vs base' = the unmodified model at the same length)")
    print(table(rows))
    if on.type == "cuda":
        print("GPU targets (config/benchmark.yaml):")
        print("\n".join("  " + line for line in check_targets(rows, bench_cfg["targets"])))
    else:
        print("GPU targets not checked: no CUDA device (CPU numbers do not speak to them)")

    n = write_benchmarks(args.db, rows)
    print(f"{n} rows written to {args.db} (table benchmarks, run_id {run_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
