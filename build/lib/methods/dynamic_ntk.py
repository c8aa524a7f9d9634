"""`dynamic_ntk`: Dynamic NTK (emozilla; HF `dynamic`) with an optional floor (Fu et al. / LCEG NTK-32K):
alpha(n) = factor * max(n, floor) / L - (factor - 1), base b'(n) = b * alpha(n)^(d/(d-2)).

Realised with transformers' native `dynamic` type: with alpha_train = alpha(floor), rope_theta =
b * alpha_train^(d/(d-2)), max_position_embeddings = floor and HF factor f = factor * floor / (L * alpha_train),
HF's alpha_hf(n) = f * max(n, floor) / floor - (f - 1) satisfies alpha_train * alpha_hf(n) = alpha(n) exactly.
A forward pre-hook resets the rotary state before every call, so each forward uses alpha of its own n
(HF alone keeps a grown inv_freq for later, shorter sequences: docs/methods.md §3.2e2).
"""
from __future__ import annotations

import math
from numbers import Integral

from .rope import RopeMethod, default_inv_freq, is_number, rotary_module, set_rope

_HOOK_ATTR = "_ctxext_reset_hook"


def ntk_alpha(n: int, original_window: int, factor: float, floor: int) -> float:
    """alpha(n) = factor * max(n, floor) / original_window - (factor - 1)."""
    return factor * max(n, floor) / original_window - (factor - 1)


def _reset_rotary(module, *args, **kwargs) -> None:
    """Forward pre-hook: forget frequencies grown by an earlier, longer sequence."""
    module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
    module.max_seq_len_cached = module.original_max_seq_len


class DynamicNTK(RopeMethod):
    name = "dynamic_ntk"
    description = ("Dynamic NTK: base b*alpha(n)^(d/(d-2)), alpha(n) = f*max(n, floor)/L - (f-1), "
                   "recomputed from each forward's length (HF rope_type 'dynamic').")

    def _defaults(self, original_window, target_window, regime):
        if regime == "frozen":  # LCEG NTK-Frozen: plain HF dynamic, factor 2
            return {"factor": 2.0, "floor": int(original_window)}
        # LCEG NTK-32K/64K: half the scale, floored at the training window
        return {"factor": float(math.ceil(target_window / original_window / 2)), "floor": int(target_window)}

    def _validate(self, params, original_window, target_window):
        factor, floor = params["factor"], params["floor"]
        if not is_number(factor) or factor < 1:
            raise ValueError(f"dynamic_ntk: factor must be a number >= 1, got {factor!r}")
        if floor == "original":
            floor = original_window
        elif floor == "target":
            floor = target_window
        if not isinstance(floor, Integral) or isinstance(floor, bool) or floor < original_window:
            raise ValueError(f"dynamic_ntk: floor must be 'original', 'target' or an integer >= original_window "
                             f"({original_window}), got {params['floor']!r}")
        return {"factor": factor, "floor": int(floor)}

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        alpha = ntk_alpha(seq_len or 0, original_window, params["factor"], params["floor"])
        return default_inv_freq(head_dim, base * alpha ** (head_dim / (head_dim - 2))), 1.0

    def _configure(self, config, head_dim, base, original_window, target_window, params):
        factor, floor = params["factor"], params["floor"]
        alpha_train = ntk_alpha(floor, original_window, factor, floor)
        config.max_position_embeddings = floor
        set_rope(config, rope_type="dynamic", factor=float(factor * floor / (original_window * alpha_train)),
                 rope_theta=base * alpha_train ** (head_dim / (head_dim - 2)))

    def install_hooks(self, model) -> None:
        rotary = rotary_module(model)
        old = getattr(rotary, _HOOK_ATTR, None)
        if old is not None:
            old.remove()
        _reset_rotary(rotary)
        setattr(rotary, _HOOK_ATTR, rotary.register_forward_pre_hook(_reset_rotary))


METHOD = DynamicNTK()
