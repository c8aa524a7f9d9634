"""`ntk`: static NTK-aware scaling (bloc97): base b' = b * alpha^(d/(d-2)), alpha defaults to s."""
from __future__ import annotations

import math

from .rope import RopeMethod, default_inv_freq, is_number, rotary_module, set_rope


def ntk_base(base: float, head_dim: int, alpha: float) -> float:
    """The NTK-aware base b * alpha^(d/(d-2)): the last frequency is divided by exactly alpha."""
    return base * alpha ** (head_dim / (head_dim - 2))


class NTKAware(RopeMethod):
    name = "ntk"
    rope_type = "default"
    description = "Static NTK-aware scaling: base b*alpha^(d/(d-2)), alpha = s by default (rope_theta change only)."

    def _defaults(self, original_window, target_window, regime):
        return {"alpha": target_window / original_window}

    def _validate(self, params, original_window, target_window):
        if not is_number(params["alpha"]) or params["alpha"] < 1:
            raise ValueError(f"ntk: alpha must be a number >= 1, got {params['alpha']!r}")
        return params

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        return default_inv_freq(head_dim, ntk_base(base, head_dim, params["alpha"])), 1.0

    def _configure(self, config, head_dim, base, original_window, target_window, params):
        # A new base and no scaling entry: changing both would scale twice (docs/methods.md §3.1e3).
        set_rope(config, rope_type=self.rope_type, rope_theta=ntk_base(base, head_dim, params["alpha"]))
        config.max_position_embeddings = int(target_window)

    def apply(self, model, original_window, target_window, regime="finetuned", **overrides):
        model = super().apply(model, original_window, target_window, regime, **overrides)
        new_base = model.config.rope_parameters["rope_theta"]
        head_dim = len(rotary_module(model).inv_freq) * 2
        last = float(rotary_module(model).inv_freq[-1])
        expected = new_base ** (-(head_dim - 2) / head_dim)
        if not math.isclose(last, expected, rel_tol=1e-5):
            raise RuntimeError(f"ntk: inv_freq[-1] = {last}, expected b'^(-(d-2)/d) = {expected}")
        return model


METHOD = NTKAware()
