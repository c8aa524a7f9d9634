"""`self_extend`: Self-Extend (Jin et al. 2024, arXiv 2401.01325; docs/methods.md §8.1), a frozen attention kind.

For a query at position m and a key at j <= m, with neighbour window W and group size G:

- neighbours (m - j < W) are scored with their ordinary positions (m, j);
- every other key is scored with grouped positions: the query at floor(m/G) + W - W/G, the key at floor(j/G), so
  the effective distance floor(m/G) - floor(j/G) + W - W/G continues the neighbour distances past W and grows G
  times more slowly;
- one softmax over all keys, each score taken from the neighbour or the grouped computation (distance W - 1 is a
  neighbour, W is grouped: the official boundary).

G must divide W (the official prefill uses the float W/G, its flash decoding branch the integer W // G; they agree
only then), and W < L so that neighbour distances stay inside the pre-training window L. The longest sequence whose
grouped distances stay below L is (L - W)·G + W (`max_length`). The official optional query log-scaling
(`scale_base` > 0: q times max(1, ln(m + 1)/ln(scale_base))) is off by default, as in LCEG.

How it plugs in: like LM-Infinite, an attention function registered with transformers' `AttentionInterface`; the
model's attention layers hand it queries and keys rotated by RoPE at their true positions (the KV cache holds those
rotated keys, which keep everything Self-Extend needs: a pure rotation by (floor(j/G) - j)·θ moves a cached key to
its grouped position, and (floor(m/G) + W - W/G - m)·θ the query), so the base class's cached `greedy_generate`
(chunked prefill, one token per step) and `answer_logits` serve it unchanged. Rotations are computed from the rotary module's
current `inv_freq` (angles in float64), so the grouped scores carry the same cos/sin magnitude as the neighbour
ones, and any RoPE method that keeps transformers' rotate-half layout can be combined with it.

Cost: O(n²) like exact attention, with two score matrices (neighbour and grouped), computed in query blocks so that
no full n x n matrix per head is held. Decoding with the cache costs O(n) per token.

Limits: unpadded batches with positions contiguous from 0 (padding raises); full rotary dimension only.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from .attention import RotaryAttentionMethod, register_attention_function, repeat_kv

ATTN_IMPLEMENTATION = "ctxext_self_extend"  # the name registered with transformers' AttentionInterface
_BLOCK_ELEMENTS = 1 << 24  # score elements per query block (64 MiB of float32 per score matrix)


def max_length(group_size: int, window: int, base_window: int) -> int:
    """Longest sequence whose grouped distances stay inside the pre-training window: (L - W)·G + W."""
    return (base_window - window) * group_size + window


def effective_length(n: int, group_size: int, window: int) -> float:
    """W + (n - W)/G: the span of positions a sequence of n tokens occupies (the README's rule of thumb wants it
    at most about 1/2 to 2/3 of L)."""
    return window + max(0, n - window) / group_size


def _rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [..., T, d] (rotate-half layout) by the angles delta [T] x inv_freq, a pure rotation in float32
    whose angles are formed in float64."""
    angles = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(torch.float32)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(torch.float32)
    x = x.float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def self_extend_scores_attention(query, key, value, inv_freq, group_size: int, window: int, scaling: float,
                                 scale_base: float = -1, block: int | None = None, dropout: float = 0.0,
                                 training: bool = False) -> torch.Tensor:
    """Self-Extend attention of the last q_len positions of a causal sequence of n_kv tokens at positions
    0 .. n_kv - 1. query [b, h, q_len, d] and key [b, h_kv, n_kv, d] are rotated at their true positions with
    `inv_freq` [d/2]; value is [b, h_kv, n_kv, d]. Returns [b, q_len, h, d] in the query's dtype."""
    b, h, q_len, d = query.shape
    n_kv = key.shape[2]
    if inv_freq.numel() * 2 != d:
        raise ValueError(f"self_extend: needs the full rotary dimension (inv_freq has {inv_freq.numel()} "
                         f"frequencies for head_dim {d})")
    if q_len > n_kv:
        raise ValueError(f"self_extend: {q_len} queries but only {n_kv} keys")
    groups = h // key.shape[1]
    device = query.device
    first = n_kv - q_len
    shift = window - window // group_size  # W - W/G (G divides W)
    kpos = torch.arange(n_kv, device=device)
    grouped_needed = n_kv - 1 >= window  # some pair is at distance >= W
    k = repeat_kv(key.float(), groups)
    v = repeat_kv(value.float(), groups)
    if grouped_needed:
        k_group = repeat_kv(_rotate(key, kpos // group_size - kpos, inv_freq), groups)
    block = block or max(1, _BLOCK_ELEMENTS // max(1, b * h * n_kv))
    out = torch.empty(b, q_len, h, d, dtype=query.dtype, device=device)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        qpos = torch.arange(first + start, first + stop, device=device)
        hi = first + stop  # keys 0 .. hi - 1 can be seen by this block
        q = query[:, :, start:stop].float()
        if scale_base > 0:
            q = q * (torch.log(qpos.double() + 1) / math.log(scale_base)).clamp(min=1).float()[:, None]
        dist = qpos[:, None] - kpos[None, :hi]
        scores = torch.matmul(q, k[:, :, :hi].transpose(-1, -2)) * scaling
        if grouped_needed and int(qpos[-1]) >= window:
            q_group = _rotate(q, qpos // group_size + shift - qpos, inv_freq)
            grouped = torch.matmul(q_group, k_group[:, :, :hi].transpose(-1, -2)) * scaling
            scores = torch.where(dist >= window, grouped, scores)
        scores = scores.masked_fill(dist < 0, float("-inf"))
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=training)
        out[:, start:stop] = torch.matmul(probs, v[:, :, :hi]).transpose(1, 2).to(query.dtype)
    return out


def self_extend_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """The attention function registered as `ATTN_IMPLEMENTATION` (transformers' calling convention)."""
    params, inv_freq = METHOD.installed(module)
    if attention_mask is not None:
        raise ValueError("self_extend supports unpadded inputs only (got an attention mask with padding)")
    n_kv, q_len = key.shape[2], query.shape[2]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        expected = torch.arange(n_kv - q_len, n_kv, device=position_ids.device)
        if position_ids.shape[-1] != q_len or not bool((position_ids == expected).all()):
            raise ValueError("self_extend needs contiguous positions 0 .. n-1 (no left padding or packing)")
    out = self_extend_scores_attention(query, key, value, inv_freq, params["group_size"],
                                       params["window"], scaling, params["scale_base"], dropout=dropout,
                                       training=module.training)
    return out, None


register_attention_function(ATTN_IMPLEMENTATION, self_extend_attention)


class SelfExtend(RotaryAttentionMethod):
    name = "self_extend"
    attn_implementation = ATTN_IMPLEMENTATION
    description = ("Self-Extend: neighbour window W at true positions, floor-divided (group G) positions beyond it, "
                   "one softmax; frozen.")
    regimes = ("frozen",)

    def _defaults(self, base_window, train_len, regime):
        # LCEG: G = 64, W = 1024 at L = 4096. W keeps LCEG's ratio W = L/4; G is LCEG's 64 when it divides W (every
        # study but micro), else the largest power of two that does (docs/methods.md §8.1b).
        window = max(1, int(base_window) // 4)
        return {"group_size": math.gcd(64, window), "window": window, "scale_base": -1}

    def _validate(self, params, base_window, train_len):
        for key in ("group_size", "window"):
            value = params[key]
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"self_extend: {key} must be an integer >= 1, got {value!r}")
        group, window = int(params["group_size"]), int(params["window"])
        if window >= base_window:
            raise ValueError(f"self_extend: window={window} must be below the base window {base_window} (neighbour "
                             "distances must stay inside the pre-training window)")
        if window % group:
            raise ValueError(f"self_extend: group_size={group} must divide window={window} (the official prefill "
                             "and decoding formulas agree only then)")
        scale_base = params["scale_base"]
        if not isinstance(scale_base, Real) or isinstance(scale_base, bool) or not (scale_base == -1 or scale_base > 1):
            raise ValueError(f"self_extend: scale_base must be -1 (off) or a number > 1, got {scale_base!r}")
        return {"group_size": group, "window": window, "scale_base": scale_base}


METHOD = SelfExtend()
