"""Where and how the model stages compute: device, precision, attention kernel, memory savers.

Configured in `config/` (model.dtype, model.attn_implementation, <stage>.gradient_checkpointing,
<stage>.fused_adamw, eval.loss_chunk); every default works on a CPU. On a GPU, `dtype: auto` means bf16
autocast over float32 weights in training and bf16 weights in evaluation.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def device() -> torch.device:
    """The device the stages compute on: the first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(name: str, on: torch.device | None = None) -> torch.dtype:
    """The compute dtype of `model.dtype`: `auto` is bfloat16 on CUDA and float32 on the CPU."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    on = on or device()
    if name == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_attn_implementation(name: str) -> str:
    """`model.attn_implementation`, checked: flash_attention_2 needs the flash-attn package and a CUDA device."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation); use sdpa (the default) otherwise")
        if not torch.cuda.is_available():
            raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA device; use sdpa on the CPU")
    return name


def autocast(model, dtype_name: str):
    """Mixed-precision context for training: autocast to the compute dtype when it is lower than the weights'."""
    on = next(model.parameters()).device
    dtype = compute_dtype(dtype_name, on)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=on.type, dtype=dtype)


def prepare_training(model, stage_cfg: dict):
    """Gradient checkpointing when `stage_cfg.gradient_checkpointing` is on (recompute activations in backward)."""
    if stage_cfg.get("gradient_checkpointing"):
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def use_fused_adamw(model, stage_cfg: dict) -> bool:
    """Fused AdamW (one kernel for all parameters) when `stage_cfg.fused_adamw` is on and the weights are on CUDA."""
    return bool(stage_cfg.get("fused_adamw")) and next(model.parameters()).is_cuda
