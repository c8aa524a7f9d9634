"""Small helpers shared by the stage modules: JSON files written atomically, threads and the allocator, memory,
logging."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

# Every default works offline: no stage may reach a model or dataset hub unless the user configured one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_json(path: str | Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    """Write JSON to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)
    return path


FAILURE_FILE = "failed.json"
# Version of the JSON files the stages write and the store reads (eval/<task>.json, cell.json, failed.json, the
# data manifest); the store skips a file of another version with a message.
RESULT_SCHEMA_VERSION = 1


def run_cell_stage(stage: str, cfg: dict, cell_dir: Path, fn):
    """Run one stage of a cell, `fn()`. When the cell cannot complete (its loss diverged, it does not
    fit in memory) write `<cell_dir>/failed.json` with the reason and exit with status 1: Snakemake
    marks the job failed, `--keep-going` carries on with the other cells, and the store marks the cell
    'failed' with the reason. A leftover record of an earlier attempt is removed first."""
    import torch

    record = Path(cell_dir) / FAILURE_FILE
    record.unlink(missing_ok=True)
    try:
        return fn()
    except (FloatingPointError, MemoryError, torch.OutOfMemoryError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        write_json(record, {"schema_version": RESULT_SCHEMA_VERSION, "cell_id": cfg["cell_id"], "stage": stage, "reason": reason,
                            "config_hash": config_hash(cfg)})
        log(f"FAILED {cfg['cell_id']} ({stage}): {reason}; recorded in {record}")
        raise SystemExit(1) from exc


def config_hash(obj) -> str:
    """SHA-256 of a configuration's canonical JSON (sorted keys): what decides whether a stored result is current."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def configure_cpu(threads: int) -> int:
    """Set torch's CPU threads and, when the job computes on the CPU, have the C allocator keep freed memory
    (keep_freed_memory). Every stage calls it first. Returns the number of threads."""
    import torch

    from workflow.runtime import device

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    if device().type == "cpu":
        keep_freed_memory()
    return threads


# mallopt(3) parameters of glibc's allocator (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_ALLOCATION_LIMIT = 2**30   # bytes: larger allocations are still mapped and unmapped one by one


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every allocation up to HEAP_ALLOCATION_LIMIT from its heap and keep freed memory
    there, instead of mapping each large tensor afresh (glibc maps those above a threshold of at most 32 MiB) and
    returning it to the system when freed. A training step on the CPU frees and re-allocates the same large tensors
    (logits, their gradients), and every fresh mapping costs a page fault per 4 KiB page when it is first written
    (measured in README, "Real models, GPUs and clusters"). The process keeps its peak heap until it exits. Returns
    False where the C library has no mallopt (not glibc) and nothing was changed."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return all(mallopt(parameter, HEAP_ALLOCATION_LIMIT) for parameter in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


def peak_memory_mb() -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the resident-set peak."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def log(message: str) -> None:
    print(f"[ctxext] {message}", file=sys.stderr, flush=True)


def hardware() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def stage_parser(doc: str, out_help: str) -> argparse.ArgumentParser:
    """The command line shared by the model stages (base, finetune, evaluate); stages add their own."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--config", required=True, help="the job's resolved config (JSON file)")
    parser.add_argument("--data-dir", required=True, type=Path, help="the study's data directory")
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    return parser
