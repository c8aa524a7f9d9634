"""Long-context extension methods: one module per method, one registry.

    from methods import get_method, METHODS, restore
    inv_freq, scale = get_method("yarn").frequencies(head_dim=64, base=1e4, original_window=4096,
                                                     target_window=32768, seq_len=16384)
    model = get_method("yarn").apply(model, original_window=4096, target_window=32768)
"""
from __future__ import annotations

from . import dynamic_ntk, none, ntk, pi, yarn
from .rope import REGIMES, RopeMethod

METHODS: dict[str, RopeMethod] = {m.METHOD.name: m.METHOD for m in (none, pi, ntk, dynamic_ntk, yarn)}

# Attention kinds a cell may combine with a RoPE method ("exact": the model's own full attention).
ATTENTIONS: tuple[str, ...] = ("exact",)


def get_method(name: str) -> RopeMethod:
    """The registered method called `name`; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None


def restore(model):
    """Re-install the runtime hooks of the method recorded in `model.config.ctxext` (no-op without it)."""
    record = getattr(model.config, "ctxext", None)
    if record:
        get_method(record["rope"]).install_hooks(model)
    return model


__all__ = ["ATTENTIONS", "METHODS", "REGIMES", "RopeMethod", "get_method", "restore"]
