"""Benchmark: time and peak memory of one attention call, exact vs LM-Infinite, at growing sequence length.

Kinds: `eager` (exact attention as transformers' eager path computes it: an n x n causal mask and score
matrix), `sdpa` (exact, `scaled_dot_product_attention`, what the study's models use) and `lm_infinite`
(`methods.lm_infinite`, blockwise). Inputs are one layer's rotated q/k/v at the tiny study's shapes by default
(4 heads of 32 dims, base window 256); each call is timed (median of `--repeats` after one warm-up) and its peak
memory measured as what it adds to the peak: on CUDA `torch.cuda.max_memory_allocated`; on CPU the growth of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each call), measured in a
child process started with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every freed buffer of 64 KiB or
more to the system (otherwise reused heap memory hides allocations; that setting slows small allocations, so
times come from this process). Prints a table and the growth of each kind per doubling of n. Not a test:
numbers depend on the machine (Linux only on CPU).

    python -m workflow.tools.bench_attention                       # CPU, 1 thread, n = 256 .. 8192
    python -m workflow.tools.bench_attention --lengths 1024 4096 16384 --kinds sdpa lm_infinite --json bench.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from methods.lm_infinite import lm_infinite_scores_attention
from workflow.measure import measure_peak, measure_time

KINDS = ("eager", "sdpa", "lm_infinite")


def attention_call(kind: str, q, k, v, n_local: int, n_global: int, cap: int, inv_freq):
    """A closure running one attention call of `kind` on q, k, v [1, h, n, d] (the result is dropped)."""
    scaling = q.shape[-1] ** -0.5
    if kind == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        module = SimpleNamespace(num_key_value_groups=1, training=False)

        def run():
            n = q.shape[2]
            mask = torch.full((n, n), float("-inf"), device=q.device, dtype=q.dtype).triu(1)[None, None]
            eager_attention_forward(module, q, k, v, mask, scaling=scaling)
        return run
    if kind == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    if kind == "lm_infinite":
        return lambda: lm_infinite_scores_attention(q, k, v, inv_freq, n_local, n_global, cap, scaling)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


@torch.no_grad()
def run_benchmark(lengths, kinds, heads=4, head_dim=32, n_local=256, n_global=10, cap=None, repeats=3,
                  device="cpu", eager_max=8192, dtype=torch.float32, measure=("time", "memory"),
                  verbose=True) -> list[dict]:
    """One row per (kind, n): {kind, n, ms, peak_mb} (None for what `measure` leaves out)."""
    rows = []
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        for kind in kinds:
            if kind == "eager" and n > eager_max:
                continue
            fn = attention_call(kind, q, k, v, n_local, n_global, cap or n_local, inv_freq)
            peak = measure_peak(fn, device) if "memory" in measure else None
            ms = measure_time(fn, device, repeats) if "time" in measure else None
            rows.append({"kind": kind, "n": n, "ms": ms, "peak_mb": peak})
            if verbose:
                print(f"  {kind:>11}  n={n:>6}  {ms or float('nan'):10.1f} ms  {peak or 0.0:9.1f} MiB", flush=True)
        del q, k, v
    return rows


def _num(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def summary(rows: list[dict], kinds) -> str:
    """Table: per n, each kind's time and peak memory and the exact / LM-Infinite ratios; then growth per
    doubling of n (the ratio of a kind's numbers at 2n and at n)."""
    by = {(r["kind"], r["n"]): r for r in rows}
    lengths = sorted({r["n"] for r in rows})
    head = "n".rjust(7) + "".join(f"{k + ' ms':>16}{k + ' MiB':>17}" for k in kinds)
    exact = [k for k in kinds if k != "lm_infinite"]
    if "lm_infinite" in kinds:
        head += "".join(f"{k + '/lminf mem':>18}{k + '/lminf time':>19}" for k in exact)
    lines = [head]
    for n in lengths:
        line = f"{n:>7}"
        for k in kinds:
            r = by.get((k, n))
            line += f"{_num(r and r['ms']):>16}{_num(r and r['peak_mb']):>17}"
        lm = by.get(("lm_infinite", n))
        for k in exact if lm else []:
            r = by.get((k, n))
            mem = f"{r['peak_mb'] / lm['peak_mb']:.1f}x" if r and r["peak_mb"] is not None and lm["peak_mb"] else "—"
            tim = f"{r['ms'] / lm['ms']:.1f}x" if r and r["ms"] is not None and lm["ms"] else "—"
            line += f"{mem:>18}{tim:>19}"
        lines.append(line)
    lines.append("growth per doubling of n (value at 2n / value at n):")
    for k in kinds:
        steps = [(by[(k, n)], by[(k, 2 * n)]) for n in lengths if (k, n) in by and (k, 2 * n) in by]
        if steps:
            mem = ", ".join(f"{b['peak_mb'] / a['peak_mb']:.1f}" if a["peak_mb"] and b["peak_mb"] is not None
                            else "—" for a, b in steps)
            tim = ", ".join(f"{b['ms'] / a['ms']:.1f}" if a["ms"] and b["ms"] is not None else "—" for a, b in steps)
            lines.append(f"  {k:>11}  memory x[{mem}]  time x[{tim}]")
    return "\n".join(lines)


def cpu_memory_rows(argv) -> list[dict]:
    """Run the memory pass in a child process with glibc's mmap threshold fixed at 64 KiB."""
    import os
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--json" in argv:  # the child prints its rows instead
        i = argv.index("--json")
        del argv[i:i + 2]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-m", "workflow.tools.bench_attention", *argv, "--memory-child"], env=env,
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--n-local", type=int, default=256)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--distance-cap", type=int, default=None, help="default: n_local")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--eager-max", type=int, default=8192, help="skip eager above this n (n x n memory)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("heads", "head_dim", "n_local", "repeats", "threads", "eager_max"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.lengths):
        parser.error(f"--lengths must be positive, got {args.lengths}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.threads} thread(s))"
    common = (args.lengths, args.kinds, args.heads, args.head_dim, args.n_local, args.n_global, args.distance_cap,
              args.repeats, args.device, args.eager_max, getattr(torch, args.dtype))
    if args.memory_child:  # the CPU memory pass (see the module docstring): rows as JSON on stdout
        print(json.dumps(run_benchmark(*common, measure=("memory",), verbose=False)))
        return 0
    print(f"attention benchmark on {device_name}, {args.dtype}: batch 1, {args.heads} heads x {args.head_dim}, "
          f"lm_infinite n_local={args.n_local} n_global={args.n_global} cap={args.distance_cap or args.n_local}")
    if args.device == "cpu":
        print("memory pass (child process, MALLOC_MMAP_THRESHOLD_=65536) ...", flush=True)
        memory = {(r["kind"], r["n"]): r["peak_mb"] for r in cpu_memory_rows(argv)}
        print("time pass ...", flush=True)
        rows = run_benchmark(*common, measure=("time",), verbose=False)
        for r in rows:
            r["peak_mb"] = memory[(r["kind"], r["n"])]
    else:
        rows = run_benchmark(*common)
    print(summary(rows, args.kinds))
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
