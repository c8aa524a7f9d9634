"""`pi`: Position Interpolation (Chen et al. 2023): every frequency divided by s = target / original."""
from __future__ import annotations

from .rope import RopeMethod, default_inv_freq, set_rope


class PositionInterpolation(RopeMethod):
    name = "pi"
    rope_type = "linear"
    description = "Position Interpolation: theta_i / s, s = target/original (HF rope_type 'linear')."

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        scale = target_window / original_window
        return default_inv_freq(head_dim, base) / scale, 1.0

    def _configure(self, config, head_dim, base, original_window, target_window, params):
        set_rope(config, rope_type=self.rope_type, factor=float(target_window / original_window), rope_theta=base)
        config.max_position_embeddings = int(target_window)

    def windows_of_config(self, rope_parameters, max_positions, base_window):
        """transformers' `linear`: max_position_embeddings is the target window, the original is it / factor."""
        if rope_parameters.get("original_max_position_embeddings") or not rope_parameters.get("factor"):
            return super().windows_of_config(rope_parameters, max_positions, base_window)
        return round(max_positions / float(rope_parameters["factor"])), int(max_positions)


METHOD = PositionInterpolation()
