"""`none`: the original RoPE, unchanged (the unmodified base model)."""
from __future__ import annotations

from .rope import RopeMethod, default_inv_freq


class NoScaling(RopeMethod):
    name = "none"
    description = "Original RoPE, no context extension (theta_i = b^(-2i/d))."
    changes_rope = False

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        return default_inv_freq(head_dim, base), 1.0


METHOD = NoScaling()
