"""Benchmark: the cost of greedy generation per attention kind and prompt length: prefill time, per-token decoding
time, the ratio of (prefill + the new tokens) to one forward pass over the prompt (what every generated token cost
when generation re-ran the full forward pass), and peak memory; beside them, for exact attention, lm-eval's stock
HF model (`lm_eval.models.huggingface.HFLM._model_generate`: transformers' `generate` with its KV cache), the ctxext
lm-eval model (`CellLM._model_generate`, stop checks included) and optionally generation by full recomputation, all
on the same model in the same run. Rows go to the DuckDB table `benchmarks` (phases `generate`, `generate_lm_eval`,
`generate_hflm`, `generate_recompute`; workflow.store.write_benchmarks) when --db is given.

The model is the study's base model (--model) or randomly initialised weights in the study's shape (cost does not
depend on the weights); prompts are random tokens, and exactly --new-tokens tokens are generated (stopping only
where the benchmark asks for it). Every attention kind reachable through `methods.attention_of(model)` can be
named with --kinds (exact, lm_infinite, landmark, or kinds added later), with the parameters of the study's grid
cell for it (base RoPE). Times are medians of --repeats runs after one warm-up (the per-token decoding time is the
median difference between generating all new tokens and generating one, timed back to back, divided by the
new tokens after the first); peak memory is what a call adds to
the memory in use when it starts: on CUDA the allocator's peak, on the CPU the growth of the peak resident set,
measured in a child process started with MALLOC_MMAP_THRESHOLD_=65536 (see workflow.tools.bench_attention). Not a
test: numbers depend on the machine.

    python -m workflow.tools.bench_generation                                     # tiny shape, vocab 4096, CPU
    python -m workflow.tools.bench_generation --db /tmp/bench.duckdb --lengths 1024 2048 4096
    python -m workflow.tools.bench_generation --study smollm2 --vocab-size 49152 --device cuda --dtype bfloat16 \\
        --lengths 16384 32768 65536 --recompute-max 0          # SmolLM2's shape on a GPU
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from methods import attention_of, get_attention
from methods.attention import check_prefill_chunk
from workflow.common import configure_cpu, hardware
from workflow.config import cell_id, compose, expand_grid
from workflow.measure import measure_peak, measure_time
from workflow.modeling import apply_cell_method, build_scratch_model, load_model

REPO = Path(__file__).resolve().parents[2]
PATHS = {"ctxext": "generate", "lm-eval ctxext": "generate_lm_eval", "lm-eval HFLM": "generate_hflm",
         "recompute": "generate_recompute"}  # path -> phase of the benchmarks table
TARGET_LEN, TARGET_RATIO, TARGET_VS_HFLM = 4096, 3.0, 0.9


def bench_tokenizer(model_dir: Path | None, vocab_size: int):
    """The base model's tokenizer, or one trained here on a few standard-library modules (lm-eval's models need a
    tokenizer; its vocabulary is at most the model's)."""
    if model_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    import sysconfig

    from workflow import corpus

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("argparse.py", "typing.py", "inspect.py")]
    tokenizer, _ = corpus.train_tokenizer(texts, vocab_size, 2, None)
    return tokenizer


class _Sized:
    """The little of a tokenizer that build_scratch_model reads (a length and the special ids)."""

    def __init__(self, size: int, tokenizer):
        self.size = size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                   tokenizer.pad_token_id)

    def __len__(self) -> int:
        return self.size


def kind_cell(cfg: dict, kind: str) -> dict:
    """The study's grid cell with the base RoPE and attention `kind` (its parameters), or one built from the kind's
    defaults when the grid has none."""
    for cell in expand_grid(cfg):
        if cell["rope"] == "none" and cell["attention"] == kind:
            return cell
    window, regime = cfg["model"]["base_window"], get_attention(kind).regimes[0]
    return {"cell_id": cell_id("none", kind, window, regime), "rope": "none", "attention": kind,
            "train_len": window, "regime": regime, "base_window": window, "method_params": {},
            "attention_params": {}}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, device: str) -> float:
    """Wall time (s) of one call (for the full recomputation, too slow to repeat)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def paired_times(short, long, device: str, repeats: int) -> tuple[float, float, float]:
    """(median time of `short`, of `long`, median of the differences long - short), the two timed back to back in
    every repeat after one warm-up of each, so that a slow phase of a shared machine hits both alike."""
    short(), long()
    pairs = [(_once(short, device), _once(long, device)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(b - a for a, b in pairs))


@torch.no_grad()
def run_benchmark(cfg: dict, base, tokenizer, lengths, kinds, new_tokens: int, prefill_chunk: int, repeats: int,
                  device: str, recompute_max: int, hflm: bool = True, measure=("time", "memory"),
                  verbose: bool = True) -> list[dict]:
    """One row per (kind, path, n): {attention, path, cell_id, n, prefill_s, decode_s, generate_s, forward_s,
    ratio, peak_mb, generated} (None where `measure` leaves it out)."""
    from lm_eval.models.huggingface import HFLM

    from workflow.lm_eval_model import CellLM

    timed, mem = "time" in measure, "memory" in measure
    seconds = (lambda fn: measure_time(fn, device, repeats) / 1000) if timed else (lambda fn: None)
    rows = []
    models = {}
    for kind in kinds:
        cell = kind_cell(cfg, kind)
        models[kind] = (cell, apply_cell_method(copy.deepcopy(base), cell).to(device).eval())
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(3, len(tokenizer), (1, n), generator=g).to(device)
        mask = torch.ones_like(ids)
        for kind in kinds:
            cell, model = models[kind]
            method = attention_of(model)
            forward = lambda: method.logits(model, ids)  # noqa: E731  (one full forward pass, all logits)
            prefill = lambda: method.greedy_generate(model, ids, 1, prefill_chunk=prefill_chunk)  # noqa: E731
            generate = lambda: method.greedy_generate(model, ids, new_tokens, prefill_chunk=prefill_chunk)  # noqa: E731
            forward_s = seconds(forward)
            prefill_s, generate_s, decode_s = (paired_times(prefill, generate, device, repeats) if timed
                                               else (None, None, None))
            common = {"attention": kind, "cell_id": cell["cell_id"], "n": n, "forward_s": forward_s,
                      "generated": new_tokens}
            rows.append({**common, "path": "ctxext", "prefill_s": prefill_s, "generate_s": generate_s,
                         "decode_s": None if not timed else decode_s / max(1, new_tokens - 1),
                         "peak_mb": measure_peak(generate, device) if mem else None})
            if kind == "exact":
                lm = CellLM(model=model, tokenizer=tokenizer, max_length=n + new_tokens, max_gen_toks=new_tokens,
                            prefill_chunk=prefill_chunk)
                cell_lm = lambda: lm._model_generate(ids, n + new_tokens, [], attention_mask=mask)  # noqa: E731
                made = int((cell_lm()[0, n:] != lm.tokenizer.pad_token_id).sum()) if timed else new_tokens
                rows.append({**common, "path": "lm-eval ctxext", "prefill_s": None, "decode_s": None,
                             "generate_s": seconds(cell_lm), "generated": made,
                             "peak_mb": measure_peak(cell_lm, device) if mem else None})
                if hflm:
                    stock = HFLM(pretrained=model, tokenizer=tokenizer, max_length=n + new_tokens, batch_size=1)
                    hf = lambda: stock._model_generate(ids, n + new_tokens, [], attention_mask=mask,  # noqa: E731
                                                       do_sample=False, min_new_tokens=new_tokens)
                    rows.append({**common, "path": "lm-eval HFLM", "prefill_s": None, "decode_s": None,
                                 "generate_s": seconds(hf), "peak_mb": measure_peak(hf, device) if mem else None})
                if n <= recompute_max:
                    def recompute():
                        x = ids
                        for _ in range(new_tokens):
                            x = torch.cat([x, method.logits(model, x)[:, -1:].argmax(-1)], dim=1)
                    rows.append({**common, "path": "recompute", "prefill_s": None, "decode_s": None,
                                 "generate_s": _once(recompute, device) if timed else None,
                                 "peak_mb": measure_peak(recompute, device) if mem else None})
            if verbose:
                for r in rows[-4:]:
                    if r["attention"] == kind and r["n"] == n:
                        print(f"  {kind:>12} {r['path']:>15} n={n:>6} {_ms(r['generate_s']):>10} ms", flush=True)
    for r in rows:
        r["ratio"] = r["generate_s"] / r["forward_s"] if timed and r["generate_s"] and r["forward_s"] else None
        ref = next((x for x in rows if x["path"] == "lm-eval HFLM" and x["n"] == r["n"]), None)
        r["vs_hflm"] = (ref["generate_s"] / r["generate_s"]) if ref and timed and r["generate_s"] else None
        r["memory_vs_hflm"] = (r["peak_mb"] / ref["peak_mb"]) if ref and r["peak_mb"] and ref["peak_mb"] else None
    return rows


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.1f}"


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


def summary(rows: list[dict], new_tokens: int) -> str:
    """The table, then the targets: at a 4096-token prompt (prefill + new tokens) costs at most 3 forward passes
    for every kind, and exact attention generates at least 0.9x as fast as lm-eval's stock HF model."""
    head = (f"{'attention':<12}{'path':<16}{'n':>7}{'prefill ms':>12}{'decode ms/tok':>15}{f'{new_tokens} new ms':>12}"
            f"{'forward ms':>12}{'gen/forward':>13}{'vs HFLM':>9}{'peak MiB':>10}")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["n"], r["attention"], list(PATHS).index(r["path"]))):
        peak = "—" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        note = "" if r["generated"] == new_tokens else f"  (stopped after {r['generated']} tokens)"
        lines.append(f"{r['attention']:<12}{r['path']:<16}{r['n']:>7}{_ms(r['prefill_s']):>12}"
                     f"{_ms(r['decode_s']):>15}{_ms(r['generate_s']):>12}{_ms(r['forward_s']):>12}"
                     f"{_x(r['ratio']):>13}{_x(r['vs_hflm']):>9}{peak:>10}{note}")
    at = [r for r in rows if r["n"] == TARGET_LEN and r["path"] == "ctxext" and r["ratio"] is not None]
    if at:
        worst = max(at, key=lambda r: r["ratio"])
        verdict = "PASS" if worst["ratio"] <= TARGET_RATIO else "FAIL"
        lines.append(f"target: prefill + {new_tokens} tokens <= {TARGET_RATIO:g} forward passes at {TARGET_LEN} tokens, "
                     f"every kind: {verdict} (worst {worst['attention']}: {worst['ratio']:.2f})")
    exact = [r for r in rows if r["path"] in ("ctxext", "lm-eval ctxext") and r["attention"] == "exact"
             and r["vs_hflm"] is not None]
    if exact:
        worst = min(exact, key=lambda r: r["vs_hflm"])
        verdict = "PASS" if worst["vs_hflm"] >= TARGET_VS_HFLM else "FAIL"
        lines.append(f"target: exact attention >= {TARGET_VS_HFLM:g}x lm-eval's stock HF model's speed: {verdict} "
                     f"(worst {worst['path']} at {worst['n']}: {worst['vs_hflm']:.2f}x)")
    return "\n".join(lines)


def benchmark_rows(rows: list[dict], study: str, settings: dict, new_tokens: int) -> list[dict]:
    """Rows of the DuckDB table `benchmarks` (workflow.store.BENCHMARK_COLUMNS)."""
    run_id, now, hw = uuid.uuid4().hex[:12], dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), hardware()
    out = []
    for r in rows:
        tokens_per_s = r["generated"] / r["generate_s"] if r["generate_s"] else None
        out.append({"run_id": run_id, "study": study, "measured_at": now, "hardware": hw, "phase": PATHS[r["path"]],
                    "cell_id": r["cell_id"], "rope": "none", "attention": r["attention"], "seq_len": r["n"], "rows": 1,
                    "tokens_per_s": tokens_per_s, "peak_mem_mb": r["peak_mb"], "mfu": None, "flops_per_token": None,
                    "throughput_vs_base": r["vs_hflm"], "memory_vs_base": r["memory_vs_hflm"],
                    "config": {**settings, "new_tokens": new_tokens, "generated": r["generated"],
                               "prefill_s": r["prefill_s"], "decode_s_per_token": r["decode_s"],
                               "generate_s": r["generate_s"], "forward_s": r["forward_s"],
                               "generate_over_forward": r["ratio"], "base": "lm-eval HFLM, exact attention"}})
    return out


def _memory_rows(argv) -> dict:
    """Run the memory pass in a child process with glibc's mmap threshold fixed at 64 KiB."""
    argv = [a for i, a in enumerate(argv) if a != "--db" and (i == 0 or argv[i - 1] != "--db")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-m", "workflow.tools.bench_generation", *argv, "--memory-child"],
                          env=env, capture_output=True, text=True, check=True, cwd=REPO)
    return {(r["attention"], r["path"], r["n"]): r["peak_mb"]
            for r in json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="tiny", help="model shape, grid cells and eval.prefill_chunk (default tiny)")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides")
    parser.add_argument("--model", type=Path, default=None, help="a base model directory (default: random weights)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the random model (no --model)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--kinds", nargs="+", default=["exact", "lm_infinite"], help="attention kinds")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="default: the study's eval.prefill_chunk")
    parser.add_argument("--recompute-max", type=int, default=4096,
                        help="time generation by full recomputation up to this prompt length (0: never)")
    parser.add_argument("--no-hflm", action="store_true", help="skip lm-eval's stock HF model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--db", type=Path, default=None, help="DuckDB file to add the rows to (table benchmarks)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("vocab_size", "new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.lengths):
        parser.error(f"--lengths must be positive, got {args.lengths}")
    for kind in args.kinds:
        try:
            get_attention(kind)
        except ValueError as exc:
            parser.error(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    configure_cpu(args.threads)
    cfg = compose(args.study, args.overrides)
    chunk = check_prefill_chunk(args.prefill_chunk if args.prefill_chunk is not None
                                else cfg["eval"].get("prefill_chunk"))
    dtype = getattr(torch, args.dtype)
    tokenizer = bench_tokenizer(args.model, args.vocab_size)
    if args.model is not None:
        base = load_model(args.model, cfg["model"].get("attn_implementation", "sdpa"), "float32")
    else:
        base = build_scratch_model(cfg["model"], _Sized(args.vocab_size, tokenizer), seed=0)
    base = base.to(dtype=dtype).eval()
    bench = (cfg, base, tokenizer, args.lengths, args.kinds, args.new_tokens, chunk, args.repeats, args.device,
             args.recompute_max, not args.no_hflm)
    if args.memory_child:  # the CPU memory pass: rows as JSON on stdout
        print(json.dumps(run_benchmark(*bench, measure=("memory",), verbose=False)))
        return 0
    shape = {k: cfg["model"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads")}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.threads} thread(s))"
    print(f"generation benchmark on {device_name}, {args.dtype}: study {cfg['study']['name']} shape {shape}, vocab "
          f"{base.config.vocab_size}, {'random weights' if args.model is None else args.model}; prompts of "
          f"{args.lengths} random tokens, batch 1, {args.new_tokens} new tokens, prefill_chunk {chunk}")
    if args.device == "cpu":
        print("memory pass (child process, MALLOC_MMAP_THRESHOLD_=65536) ...", flush=True)
        memory = _memory_rows(argv)
        print("time pass ...", flush=True)
        rows = run_benchmark(*bench, measure=("time",))
        for r in rows:
            r["peak_mb"] = memory.get((r["attention"], r["path"], r["n"]))
        for r in rows:
            ref = next((x for x in rows if x["path"] == "lm-eval HFLM" and x["n"] == r["n"]), None)
            r["memory_vs_hflm"] = (r["peak_mb"] / ref["peak_mb"]) if ref and r["peak_mb"] and ref["peak_mb"] else None
    else:
        rows = run_benchmark(*bench)
    print(summary(rows, args.new_tokens))
    if args.db:
        from workflow.store import write_benchmarks

        settings = {"overrides": args.overrides, "model": str(args.model) if args.model else "random init",
                    "vocab_size": base.config.vocab_size, "dtype": args.dtype, "device": device_name,
                    "prefill_chunk": chunk, "repeats": args.repeats}
        n = write_benchmarks(args.db, benchmark_rows(rows, cfg["study"]["name"], settings, args.new_tokens))
        print(f"{n} rows written to {args.db} (table benchmarks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
