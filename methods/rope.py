"""Shared RoPE helpers and the base class of every frequency method.

A method turns (head_dim, base, original_window, target_window, seq_len) into RoPE inverse frequencies and a
cos/sin magnitude (`frequencies`, pure, float32, no transformers), and realises the same thing on a loaded
LLaMA model through transformers' native rope types (`apply`), recording what it did in `config.ctxext`.
"""
from __future__ import annotations

import contextlib
import math
from numbers import Integral, Real

import torch

REGIMES = ("finetuned", "frozen")


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """Original RoPE inverse frequencies b^(-2i/d), i = 0 .. d/2 - 1, in float32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return 1.0 / (base ** exponent)


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_windows(original_window, target_window) -> None:
    """Both windows are positive integers and the scale target/original is at least 1."""
    for key, value in (("original_window", original_window), ("target_window", target_window)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if target_window < original_window:
        raise ValueError(f"target_window={target_window} is below original_window={original_window} "
                         f"(scale {target_window / original_window:g} < 1)")


def check_regime(regime) -> None:
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r} is not valid; valid: {', '.join(REGIMES)}")


def merge_params(defaults: dict, overrides: dict, owner: str) -> dict:
    """`defaults` updated by `overrides`; a name that is not a default raises ValueError naming `owner`
    (e.g. "method 'yarn'") and the valid names."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for {owner}; valid: {valid}")
    return {**defaults, **overrides}


def check_rope_inputs(head_dim, base) -> None:
    if not isinstance(head_dim, Integral) or isinstance(head_dim, bool) or head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim must be an even integer >= 4, got {head_dim!r}")
    if not is_number(base) or base <= 1:
        raise ValueError(f"base must be a number > 1, got {base!r}")


def rotary_dim(config) -> int:
    """The rotary dimension d: head_dim times the partial rotary factor (1 for LLaMA)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def rotary_module(model):
    """The model's rotary embedding module (`model.model.rotary_emb` for LlamaForCausalLM)."""
    return getattr(model, "model", model).rotary_emb


def set_rope(config, **entries) -> None:
    """Replace `config.rope_parameters` by `entries`, keeping a partial rotary factor if the model has one."""
    old = config.rope_parameters or {}
    keep = {"partial_rotary_factor": old["partial_rotary_factor"]} if "partial_rotary_factor" in old else {}
    config.rope_parameters = {**keep, **entries}
    config.validate_rope()


def rebuild_rotary(model):
    """Re-create the rotary embedding module from the (changed) model config, on the same device."""
    inner = getattr(model, "model", model)
    old = inner.rotary_emb
    inner.rotary_emb = type(old)(config=model.config).to(old.inv_freq.device)
    return inner.rotary_emb


def verify_rotary(rotary, inv_freq: torch.Tensor, scale: float, name: str) -> None:
    """Raise if the rotary module's frequencies or cos/sin magnitude differ from the method's maths."""
    actual = rotary.inv_freq.detach().float().cpu()
    rtol = 1e-5 if rotary.inv_freq.dtype == torch.float32 else 1e-2
    if actual.shape != inv_freq.shape or not torch.allclose(actual, inv_freq, rtol=rtol, atol=0.0):
        raise RuntimeError(f"{name}: transformers' rotary inv_freq {actual.tolist()} differs from the "
                           f"method's {inv_freq.tolist()} (check the rope config keys for this transformers version)")
    if not math.isclose(float(rotary.attention_scaling), scale, rel_tol=1e-9):
        raise RuntimeError(f"{name}: transformers' rotary attention_scaling {rotary.attention_scaling} "
                           f"differs from the method's cos/sin scale {scale}")


class RopeMethod:
    """Base class: subclasses set `name`/`description` and implement `_defaults`, `_frequencies`, `_configure`."""

    name = ""
    description = ""
    changes_rope = True  # False: apply() leaves the rotary module untouched
    # The transformers rope type apply() writes into config.rope_parameters: how a checkpoint's own config names the
    # method (None: not recognisable from the config alone, e.g. CLEX's own rotary module).
    rope_type: str | None = "default"

    # --- parameters -------------------------------------------------------------------------------------------
    def defaults(self, original_window: int, target_window: int, regime: str = "finetuned") -> dict:
        """The method's default overrides for this extension, fully resolved (a plain dict)."""
        check_windows(original_window, target_window)
        check_regime(regime)
        return self._defaults(original_window, target_window, regime)

    def resolve(self, original_window: int, target_window: int, regime: str = "finetuned", **overrides) -> dict:
        """Defaults updated by `overrides`, validated; unknown names or bad values raise ValueError."""
        params = merge_params(self.defaults(original_window, target_window, regime), overrides,
                              f"method {self.name!r}")
        return self._validate(params, original_window, target_window)

    def _defaults(self, original_window: int, target_window: int, regime: str) -> dict:
        return {}

    def _validate(self, params: dict, original_window: int, target_window: int) -> dict:
        return params

    # --- maths ------------------------------------------------------------------------------------------------
    def frequencies(self, head_dim: int, base: float, original_window: int, target_window: int,
                    seq_len: int | None = None, regime: str = "finetuned", **overrides) -> tuple[torch.Tensor, float]:
        """(inv_freq float32 [head_dim // 2], cos/sin scale) of this method; `seq_len` only matters if dynamic."""
        check_rope_inputs(head_dim, base)
        if seq_len is not None and (not isinstance(seq_len, Integral) or seq_len <= 0):
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        params = self.resolve(original_window, target_window, regime, **overrides)
        inv_freq, scale = self._frequencies(head_dim, float(base), original_window, target_window, seq_len, params)
        return inv_freq.to(torch.float32), float(scale)

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        raise NotImplementedError

    # --- model ------------------------------------------------------------------------------------------------
    def apply(self, model, original_window: int, target_window: int, regime: str = "finetuned", **overrides):
        """Patch a loaded HF LLaMA model in place (config + rotary module), record `config.ctxext`, return it."""
        config = model.config
        if getattr(config, "ctxext", None):
            raise ValueError(f"model already has a context-extension method applied: {config.ctxext}")
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"apply() expects a model with the original RoPE, got rope_type={rope_type!r}")
        base = float(config.rope_parameters["rope_theta"])
        head_dim = rotary_dim(config)
        check_rope_inputs(head_dim, base)
        params = self.resolve(original_window, target_window, regime, **overrides)
        if self.changes_rope:
            self._configure(config, head_dim, base, original_window, target_window, params)
            rebuild_rotary(model)
        inv_freq, scale = self._frequencies(head_dim, base, original_window, target_window, None, params)
        verify_rotary(rotary_module(model), inv_freq, scale, self.name)
        config.ctxext = {"rope": self.name, "original_window": int(original_window),
                         "target_window": int(target_window), "params": params}
        self.install_hooks(model)
        return model

    def _configure(self, config, head_dim, base, original_window, target_window, params) -> None:
        raise NotImplementedError

    def windows_of_config(self, rope_parameters: dict, max_positions: int, base_window: int) -> tuple[int, int]:
        """(original, target) window that a checkpoint's transformers config states for this method, read back as
        transformers' convention has it (a checkpoint without ctxext's own record, e.g. a published one):
        `original_max_position_embeddings` to `max_position_embeddings` where the config has both, else the
        study's base window to `max_position_embeddings`. Methods whose rope type encodes it otherwise override."""
        original = rope_parameters.get("original_max_position_embeddings")
        return (int(original) if original else int(base_window)), int(max_positions)

    def install_hooks(self, model) -> None:
        """Re-install runtime hooks the method needs (none by default); must be idempotent."""

    # --- generation with a KV cache (methods.attention: greedy_generate, answer_logits) -------------------------
    def fixed_length(self, model, n: int):
        """A context manager: inside it, every forward of `model` uses the frequencies of a sequence of total length
        `n`, whatever its own length, so that a prompt of n tokens prefilled in chunks gets exactly the frequencies of
        one forward pass over it. A no-op for the methods whose frequencies do not depend on the length (all but
        Dynamic NTK and CLEX)."""
        return contextlib.nullcontext()

    def generation_length(self, model, n_prompt: int):
        """A context manager around the decoding steps of cached greedy generation after an `n_prompt`-token prompt:
        the frequencies those steps use. Default: each forward's own total length (what the cache sees), which is
        all that a length-independent method needs; Dynamic NTK fixes the prompt's length for the whole generation
        (docs/methods.md §3.2g), CLEX keeps each step's own length and re-encodes when its scale changes (§5g)."""
        return contextlib.nullcontext()
