"""Attention kinds, the second axis of a cell: which keys each query sees.

`exact` is the model's own full causal attention. Approximate kinds (LM-Infinite, Landmark) subclass
`AttentionMethod`, register an attention function with transformers' `AttentionInterface` in
`install_hooks`, and record themselves in `model.config.ctxext_attention` so a saved checkpoint reloads with
the same attention (see `methods.restore`).
"""
from __future__ import annotations

from .rope import REGIMES, check_regime, check_windows, merge_params


class AttentionMethod:
    name = ""
    description = ""
    approximate = True
    regimes: tuple[str, ...] = REGIMES  # the regimes this attention kind supports

    # --- parameters -------------------------------------------------------------------------------------------
    def defaults(self, base_window: int, train_len: int, regime: str = "frozen") -> dict:
        """The attention kind's default parameters for this cell (a plain dict)."""
        check_windows(base_window, train_len)
        check_regime(regime)
        if regime not in self.regimes:
            raise ValueError(f"attention {self.name!r} supports regime(s) {', '.join(self.regimes)}, not {regime!r}")
        return self._defaults(base_window, train_len, regime)

    def resolve(self, base_window: int, train_len: int, regime: str = "frozen", **overrides) -> dict:
        """Defaults updated by `overrides`, validated; unknown names or bad values raise ValueError."""
        params = merge_params(self.defaults(base_window, train_len, regime), overrides, f"attention {self.name!r}")
        return self._validate(params, base_window, train_len)

    def _defaults(self, base_window: int, train_len: int, regime: str) -> dict:
        return {}

    def _validate(self, params: dict, base_window: int, train_len: int) -> dict:
        return params

    # --- model ------------------------------------------------------------------------------------------------
    def apply(self, model, base_window: int, train_len: int, regime: str = "frozen", **overrides):
        """Switch a loaded model to this attention kind (in place), record it in the config, return it."""
        params = self.resolve(base_window, train_len, regime, **overrides)
        if not self.approximate:
            return model
        if getattr(model.config, "ctxext_attention", None):
            raise ValueError(f"model already has an attention kind applied: {model.config.ctxext_attention}")
        model.config.ctxext_attention = {"attention": self.name, "base_window": int(base_window),
                                         "train_len": int(train_len), "regime": regime, "params": params}
        self.install_hooks(model)
        return model

    def install_hooks(self, model) -> None:
        """(Re-)install what the attention kind needs at run time from `model.config.ctxext_attention`;
        must be idempotent."""

    # --- inputs and outputs (kinds that change the token sequence, e.g. Landmark, override these) ------------
    def training_inputs(self, model, batch):
        """The keyword inputs of one training step on `batch` [rows, T] of regular tokens (its loss is `.loss`)."""
        return {"input_ids": batch, "labels": batch}

    def logits(self, model, input_ids):
        """Next-token logits [rows, T, vocab] at every regular token of `input_ids` [rows, T]."""
        return model(input_ids=input_ids).logits


class ExactAttention(AttentionMethod):
    name = "exact"
    description = "The model's own full causal attention (every query sees every earlier key)."
    approximate = False


EXACT = ExactAttention()
