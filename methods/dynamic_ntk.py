"""`dynamic_ntk`: Dynamic NTK (emozilla; HF `dynamic`) with an optional floor (Fu et al. / LCEG NTK-32K):
alpha(n) = factor * max(n, floor) / L - (factor - 1), base b'(n) = b * alpha(n)^(d/(d-2)).

Realised with transformers' native `dynamic` type: with alpha_train = alpha(floor), rope_theta =
b * alpha_train^(d/(d-2)), max_position_embeddings = floor and HF factor f = factor * floor / (L * alpha_train),
HF's alpha_hf(n) = f * max(n, floor) / floor - (f - 1) satisfies alpha_train * alpha_hf(n) = alpha(n) exactly.
A forward pre-hook resets the rotary state before every call, so each forward uses alpha of its own n
(HF alone keeps a grown inv_freq for later, shorter sequences: docs/methods.md §3.2e2).

Cached generation (docs/methods.md §3.2g). alpha(n) changes at *every* n above the floor, and HF's cache holds keys
rotated with the alpha of the forward that computed them, so a plain cached decode mixes keys of one alpha with
queries of another (§3.2e1), while re-encoding at each new alpha would cost a full forward per token. ctxext fixes
alpha at the prompt's length n for the whole generation: `fixed_length(model, n)` makes every forward use
alpha(n) (the prefill chunks, then every decoding step, via `generation_length`), so keys and queries always agree
and the result equals greedy decoding by full recomputation with alpha pinned at alpha(n) (tested). Up to the floor
alpha is constant, so there this is plain full recomputation; past it, g generated tokens keep the prompt's alpha
where recomputation would raise it by a relative ~g/n (32 tokens after a 64k prompt: 0.05%).
"""
from __future__ import annotations

import contextlib
import math
from numbers import Integral

from .rope import RopeMethod, default_inv_freq, is_number, rotary_module, set_rope

_HOOK_ATTR = "_ctxext_reset_hook"
_PIN_ATTR = "_ctxext_pinned_inv_freq"  # on the rotary module: the inv_freq every forward uses while pinned
_ROPE_TYPE_ATTR = "_ctxext_rope_type"  # on the rotary module: its own rope type ("dynamic")
_PINNED_TYPE = "ctxext_pinned"         # the rope type while pinned: transformers' dynamic update is skipped


def ntk_alpha(n: int, original_window: int, factor: float, floor: int) -> float:
    """alpha(n) = factor * max(n, floor) / original_window - (factor - 1)."""
    return factor * max(n, floor) / original_window - (factor - 1)


def _reset_rotary(module, *args, **kwargs) -> None:
    """Forward pre-hook: forget frequencies grown by an earlier, longer sequence; while a length is pinned
    (`DynamicNTK.fixed_length`), install its frequencies instead and skip transformers' dynamic update."""
    own_type = getattr(module, _ROPE_TYPE_ATTR, None) or module.rope_type
    setattr(module, _ROPE_TYPE_ATTR, own_type)
    pinned = getattr(module, _PIN_ATTR, None)
    if pinned is not None:
        module.register_buffer("inv_freq", pinned.to(module.original_inv_freq.device), persistent=False)
        module.rope_type = _PINNED_TYPE
        return
    module.rope_type = own_type
    module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
    module.max_seq_len_cached = module.original_max_seq_len


class DynamicNTK(RopeMethod):
    name = "dynamic_ntk"
    rope_type = "dynamic"
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
        set_rope(config, rope_type=self.rope_type, factor=float(factor * floor / (original_window * alpha_train)),
                 rope_theta=base * alpha_train ** (head_dim / (head_dim - 2)))

    def windows_of_config(self, rope_parameters, max_positions, base_window):
        """transformers' `dynamic`: max_position_embeddings is the original window, the target is it x factor."""
        if rope_parameters.get("original_max_position_embeddings") or not rope_parameters.get("factor"):
            return super().windows_of_config(rope_parameters, max_positions, base_window)
        return int(max_positions), round(max_positions * float(rope_parameters["factor"]))

    def install_hooks(self, model) -> None:
        rotary = rotary_module(model)
        old = getattr(rotary, _HOOK_ATTR, None)
        if old is not None:
            old.remove()
        _reset_rotary(rotary)
        setattr(rotary, _HOOK_ATTR, rotary.register_forward_pre_hook(_reset_rotary))

    @contextlib.contextmanager
    def fixed_length(self, model, n: int):
        """Inside, every forward uses alpha(n) (transformers' own `dynamic` frequencies at seq_len = n), whatever its
        own length; nests, and restores the per-forward alpha on exit."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary = rotary_module(model)
        if getattr(rotary, _HOOK_ATTR, None) is None:
            raise RuntimeError("dynamic_ntk: the reset hook is not installed (methods.restore(model))")
        own_type = getattr(rotary, _ROPE_TYPE_ATTR, None) or rotary.rope_type
        inv_freq, _ = ROPE_INIT_FUNCTIONS[own_type](model.config, rotary.original_inv_freq.device, seq_len=int(n))
        previous = getattr(rotary, _PIN_ATTR, None)
        setattr(rotary, _PIN_ATTR, inv_freq.float())
        try:
            yield
        finally:
            setattr(rotary, _PIN_ATTR, previous)
            _reset_rotary(rotary)

    def generation_length(self, model, n_prompt: int):
        """The prompt's alpha for every decoding step (see the module docstring)."""
        return self.fixed_length(model, n_prompt)


METHOD = DynamicNTK()
