"""`yarn`: YaRN (Peng et al. 2023), code form: per-dimension ramp between original and PI frequencies,
plus the cos/sin magnitude mscale = 0.1 ln s + 1 (docs/methods.md section 4)."""
from __future__ import annotations

import math

import torch

from .rope import RopeMethod, default_inv_freq, is_number, set_rope


def correction_dim(num_rotations: float, head_dim: int, base: float, original_window: int) -> float:
    """D(r) = d ln(L / (2 pi r)) / (2 ln b): the dimension index completing r rotations over L."""
    return head_dim * math.log(original_window / (2 * math.pi * num_rotations)) / (2 * math.log(base))


def correction_range(head_dim: int, base: float, original_window: int, beta_fast: float, beta_slow: float):
    """(low, high) ramp bounds: floor(D(beta_fast)) clamped at 0, ceil(D(beta_slow)) clamped at d - 1."""
    low = max(math.floor(correction_dim(beta_fast, head_dim, base, original_window)), 0)
    high = min(math.ceil(correction_dim(beta_slow, head_dim, base, original_window)), head_dim - 1)
    return low, high


def mscale(scale: float) -> float:
    """YaRN cos/sin magnitude: 0.1 ln s + 1 for s > 1, else 1 (logits get its square)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


class YaRN(RopeMethod):
    name = "yarn"
    rope_type = "yarn"
    description = "YaRN: ramp from original (fast dims) to PI (slow dims) frequencies, cos/sin x (0.1 ln s + 1)."

    def _defaults(self, original_window, target_window, regime):
        return {"beta_fast": 32.0, "beta_slow": 1.0}

    def _validate(self, params, original_window, target_window):
        fast, slow = params["beta_fast"], params["beta_slow"]
        for key in ("beta_fast", "beta_slow"):
            if not is_number(params[key]) or params[key] <= 0:
                raise ValueError(f"yarn: {key} must be a number > 0, got {params[key]!r}")
        if fast <= slow:
            raise ValueError(f"yarn: beta_fast={fast!r} must be greater than beta_slow={slow!r}")
        return params

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        scale = target_window / original_window
        low, high = correction_range(head_dim, base, original_window, params["beta_fast"], params["beta_slow"])
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0.0, 1.0)
        gamma = 1.0 - ramp  # extrapolation weight: 1 keeps the original frequency
        theta = default_inv_freq(head_dim, base)
        return (1.0 - gamma) * (theta / scale) + gamma * theta, mscale(scale)

    def _configure(self, config, head_dim, base, original_window, target_window, params):
        # transformers treats max_position_embeddings / original_max_position_embeddings as the implicit
        # factor; keep them consistent so no version silently falls back to another factor (apply() then checks
        # the rebuilt rotary module against this method's frequencies and mscale).
        config.max_position_embeddings = int(target_window)
        set_rope(config, rope_type=self.rope_type, factor=float(target_window / original_window),
                 original_max_position_embeddings=int(original_window),
                 beta_fast=float(params["beta_fast"]), beta_slow=float(params["beta_slow"]), rope_theta=base)


METHOD = YaRN()
