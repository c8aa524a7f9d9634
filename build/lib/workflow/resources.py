"""Memory check before compute: estimate what the largest length of a job needs and stop with a clear
message (the length, the estimate and what is available) instead of an opaque out-of-memory kill.

The estimates are deliberately simple upper-bound-ish sums of the big tensors, for float32 on top of
the already loaded weights:

- evaluation (no gradients), B = max(1, batch_tokens // T) rows of T tokens: the hidden states and MLP
  activations of one layer at a time (B·T·(4·hidden + 3·intermediate)), the logits and their
  log-softmax (2·B·T·vocab), and with `eager` attention the score matrix of one layer
  (2·B·heads·T²; SDPA's fused kernels do not materialise it);
- training: gradients and AdamW's two moments (3 × parameters), every layer's saved activations
  (layers·B·T·(8·hidden + 3·intermediate)), the logits with their upcast and gradient (3·B·T·vocab),
  and with `eager` attention every layer's saved scores (2·layers·B·heads·T²).

Available memory is the device's free memory (torch.cuda.mem_get_info on a GPU); on the CPU the
system's available memory (psutil), capped by the cgroup's limit when the job runs in a container.
"""
from __future__ import annotations

from pathlib import Path

import torch

GIB = 2**30


class ResourceError(MemoryError):
    """A job would not fit in the memory of its device."""


def _config_sizes(model) -> dict:
    c = model.config
    return {"hidden": c.hidden_size, "intermediate": c.intermediate_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "vocab": c.vocab_size,
            "eager": getattr(c, "_attn_implementation", None) == "eager",
            "params": sum(p.numel() for p in model.parameters()),
            "device": next(model.parameters()).device,
            "bytes": next(model.parameters()).element_size()}


def estimate_eval_bytes(model, length: int, batch_tokens: int) -> dict:
    """Bytes an evaluation forward pass at `length` tokens needs beyond the loaded weights, by part."""
    s = _config_sizes(model)
    rows = max(1, batch_tokens // length)
    tokens = rows * length
    parts = {"activations": tokens * (4 * s["hidden"] + 3 * s["intermediate"]) * s["bytes"],
             "logits": 2 * tokens * s["vocab"] * 4}
    if s["eager"]:
        parts["attention scores"] = 2 * rows * s["heads"] * length * length * s["bytes"]
    return parts


def estimate_train_bytes(model, rows: int, length: int) -> dict:
    """Bytes a training step on `rows` × `length` tokens needs beyond the loaded weights, by part."""
    s = _config_sizes(model)
    tokens = rows * length
    parts = {"gradients and optimizer state": 3 * s["params"] * s["bytes"],
             "activations": s["layers"] * tokens * (8 * s["hidden"] + 3 * s["intermediate"]) * s["bytes"],
             "logits": 3 * tokens * s["vocab"] * 4}
    if s["eager"]:
        parts["attention scores"] = 2 * s["layers"] * rows * s["heads"] * length * length * s["bytes"]
    return parts


def _cgroup_free() -> int | None:
    """Free memory under a cgroup v2 limit, or None when there is no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory of `device` in bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = psutil.virtual_memory().available
    capped = _cgroup_free()
    return int(free if capped is None else min(free, capped))


def ensure_fits(parts: dict, what: str, device: torch.device | str = "cpu") -> None:
    """Raise ResourceError naming `what` (e.g. 'evaluation at length 4096') when the estimated need
    exceeds the available memory of `device`."""
    need, free = sum(parts.values()), available_bytes(device)
    if need > free:
        detail = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
        raise ResourceError(f"{what} does not fit in memory: it needs about {need / GIB:.2f} GiB ({detail}) "
                            f"beyond the loaded weights, but {free / GIB:.2f} GiB is available on {device}; "
                            "lower the length or batch_tokens, or use a larger device")


def ensure_eval_fits(model, lengths: list[int], batch_tokens: int) -> None:
    """Check the largest evaluation length (the most demanding one) before any evaluation."""
    longest = max(lengths)
    ensure_fits(estimate_eval_bytes(model, longest, batch_tokens), f"evaluation at length {longest}",
                next(model.parameters()).device)


def ensure_train_fits(model, batch: torch.Tensor) -> None:
    rows, length = batch.shape
    ensure_fits(estimate_train_bytes(model, rows, length), f"training at length {length} ({rows} rows a step)",
                next(model.parameters()).device)
