"""Long-context extension methods: one module per method, one registry.

    from methods import get_method, METHODS, restore
    inv_freq, scale = get_method("yarn").frequencies(head_dim=64, base=1e4, original_window=4096,
                                                     target_window=32768, seq_len=16384)
    model = get_method("yarn").apply(model, original_window=4096, target_window=32768)
"""
from __future__ import annotations

from . import clex, dynamic_ntk, landmark, llama3, lm_infinite, longlora, longrope, none, ntk, pi, self_extend, yarn
from .attention import EXACT, AttentionMethod
from .rope import REGIMES, RopeMethod

METHODS: dict[str, RopeMethod] = {m.METHOD.name: m.METHOD for m in (none, pi, ntk, dynamic_ntk, yarn, clex, llama3,
                                                                                longrope)}

# Attention kinds a cell may combine with a RoPE method ("exact": the model's own full attention).
ATTENTION_METHODS: dict[str, AttentionMethod] = {m.name: m for m in (EXACT, lm_infinite.METHOD, landmark.METHOD,
                                                                   self_extend.METHOD, longlora.METHOD)}
ATTENTIONS: tuple[str, ...] = tuple(ATTENTION_METHODS)


def get_method(name: str) -> RopeMethod | AttentionMethod:
    """The registered RoPE method or attention kind called `name`; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        pass
    try:
        return ATTENTION_METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join([*METHODS, *ATTENTION_METHODS])}") from None


def get_attention(name: str) -> AttentionMethod:
    """The registered attention kind called `name`; ValueError listing the valid names otherwise."""
    try:
        return ATTENTION_METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown attention {name!r}; valid: {', '.join(ATTENTION_METHODS)}") from None


def attention_of(model) -> AttentionMethod:
    """The attention kind recorded in `model.config.ctxext_attention` (exact attention when none is)."""
    record = getattr(model.config, "ctxext_attention", None)
    return get_attention(record["attention"]) if record else EXACT


def rope_of(model) -> RopeMethod:
    """The RoPE method recorded in `model.config.ctxext` (`none`, the original RoPE, when none is)."""
    record = getattr(model.config, "ctxext", None)
    return METHODS[record["rope"]] if record else METHODS["none"]


def restore(model):
    """Re-install the runtime hooks of the RoPE method recorded in `model.config.ctxext` and of the attention
    kind recorded in `model.config.ctxext_attention` (no-op without them)."""
    record = getattr(model.config, "ctxext", None)
    if record:
        METHODS[record["rope"]].install_hooks(model)
    attention = getattr(model.config, "ctxext_attention", None)
    if attention:
        get_attention(attention["attention"]).install_hooks(model)
    return model


__all__ = ["ATTENTIONS", "attention_of", "ATTENTION_METHODS", "AttentionMethod", "METHODS", "REGIMES", "RopeMethod",
           "get_attention", "get_method", "restore", "rope_of"]
