"""`llama3`: Llama 3.1's RoPE scaling (Meta, "The Llama 3 Herd of Models", arXiv 2407.21783; docs/methods.md §14),
realised with transformers' native rope type `llama3`.

Every frequency is sorted by its wavelength λ_i = 2π/θ_i against the original window L:

- λ_i < L / high_freq_factor (fast dimensions, many turns inside the window): kept, θ'_i = θ_i;
- λ_i > L / low_freq_factor (slow dimensions, less than one turn per low_freq_factor windows): interpolated as
  PI, θ'_i = θ_i / factor;
- in between: a blend that is linear in the number of turns r_i = L / λ_i,
  smooth_i = (r_i − low_freq_factor) / (high_freq_factor − low_freq_factor),
  θ'_i = (1 − smooth_i) · θ_i / factor + smooth_i · θ_i.

The cos/sin magnitude stays 1 (no temperature). Meta's Llama 3.1 values are factor 8, low_freq_factor 1,
high_freq_factor 4, L = 8192; ctxext's default factor is the cell's scale s = target / L (as for PI), the
other two are Meta's.
"""
from __future__ import annotations

import math

import torch

from .rope import RopeMethod, default_inv_freq, is_number, set_rope


def llama3_inv_freq(head_dim: int, base: float, original_window: int, factor: float, low_freq_factor: float,
                    high_freq_factor: float) -> torch.Tensor:
    """Llama 3.1's scaled inverse frequencies [head_dim // 2], float32 (the three bands of the module docstring)."""
    theta = default_inv_freq(head_dim, base)
    wavelength = 2 * math.pi / theta
    turns = original_window / wavelength
    smooth = (turns - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * theta / factor + smooth * theta
    fast = wavelength < original_window / high_freq_factor
    slow = wavelength > original_window / low_freq_factor
    return torch.where(fast, theta, torch.where(slow, theta / factor, blended))


class Llama3(RopeMethod):
    name = "llama3"
    rope_type = "llama3"
    description = ("Llama 3.1 rope scaling: fast dims kept, slow dims / factor, a blend linear in turns per window "
                   "between (HF rope_type 'llama3').")

    def _defaults(self, original_window, target_window, regime):
        return {"factor": target_window / original_window, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

    def _validate(self, params, original_window, target_window):
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if not is_number(params[key]) or params[key] <= 0:
                raise ValueError(f"llama3: {key} must be a number > 0, got {params[key]!r}")
        if params["factor"] < 1:
            raise ValueError(f"llama3: factor must be >= 1, got {params['factor']!r}")
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ValueError(f"llama3: high_freq_factor={params['high_freq_factor']!r} must be greater than "
                             f"low_freq_factor={params['low_freq_factor']!r}")
        return {key: float(value) for key, value in params.items()}

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        return llama3_inv_freq(head_dim, base, original_window, params["factor"], params["low_freq_factor"],
                               params["high_freq_factor"]), 1.0

    def _configure(self, config, head_dim, base, original_window, target_window, params):
        config.max_position_embeddings = int(target_window)
        set_rope(config, rope_type=self.rope_type, factor=float(params["factor"]),
                 low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
                 original_max_position_embeddings=int(original_window), rope_theta=base)


METHOD = Llama3()
