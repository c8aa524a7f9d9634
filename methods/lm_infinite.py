"""`lm_infinite`: LM-Infinite's Λ-shaped attention with a distance ceiling (Han et al. 2023; docs/methods.md §6).

A query at position m sees

- the `n_local` most recent keys (m - j < n_local) at their true relative positions, and
- the first `n_global` tokens (j < n_global) that have left that local window, placed at relative distance
  min(m - j, distance_cap) ("distance ceiling"),

in one joint softmax; every other key is dropped. A global token still inside the local window is counted once
(as a local key). For n <= n_local nothing is dropped or moved, so the model is exactly the base model.

The distance of a global token is min(m - j, cap). With cap <= n_local (the paper's and LCEG's setting, and
the default cap = n_local) every global token that is not local has m - j >= n_local >= cap, so it sits at
exactly cap, as in the official code. The official code uses min(cap, n - 1) for all queries of a forward
pass instead, which depends on the sequence length and so would make cached decoding differ from
recomputation when cap > n_local; this module uses the per-query form, which never does.

How it plugs in: an attention function registered with transformers' `AttentionInterface` under
`ATTN_IMPLEMENTATION`; `install_hooks` switches the model to it (`set_attn_implementation`). The model's
attention layers hand it queries and keys already rotated by RoPE at their true positions (the cache holds
rotated keys). Local scores use them as they are. For a capped score the key is rotated back to position 0
and the query to position cap, both with pure rotations by the rotary module's current `inv_freq`, so the
score is exactly <R(cap θ) q, k> times the cos/sin magnitude squared (e.g. YaRN's mscale²), the same
magnitude as the local scores. This works with any RoPE method that keeps transformers' rotation layout.

Cost: queries are processed in blocks; each block attends to its band of at most block + n_local - 1 keys plus
the n_global global keys. Time O(n (block + n_local + n_global)), extra memory O(block (block + n_local +
n_global)) per head: no n x n mask or score matrix is built. Decoding costs O(n_local + n_global) per token.

KV cache (`new_cache`, used by `greedy_generate` and `answer_logits` of `methods.attention`): `LambdaCacheLayer`
keeps only what the Λ-shaped attention can still read, the first n_global keys and the last n_local - 1 (the next
query sees those and itself), so memory per decoding step is constant in the prompt's length. The cache holds keys
as transformers rotates them, at their true positions; a forward over such a cache hands the attention function
the n_global kept first keys followed by a contiguous run of keys ending at the last query, and the function
reads where the run starts from the query positions (`position_ids`): the run's key i sits at position
(last position + 1) - (run length) + i. Local scores need the true relative positions, which the rotated keys
keep; capped scores rotate keys back to 0 from their known positions, so no un-rotated copy is needed (§6e3).

Limits: batches must be unpadded and positions contiguous from 0 (padding raises); full rotary dimension only.
"""
from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from .attention import RotaryAttentionMethod, register_attention_function, repeat_kv

ATTN_IMPLEMENTATION = "ctxext_lm_infinite"  # the name registered with transformers' AttentionInterface


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [..., T, d] by `angles` [T, d/2] in transformers' rotate-half layout (dimension k pairs with
    k + d/2); a pure rotation (no cos/sin magnitude). Computed in float32."""
    x = x.float()
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def block_size(n_local: int) -> int:
    """Query block length: n_local clamped to [64, 1024] (small blocks for big windows keep memory low)."""
    return max(64, min(int(n_local), 1024))


def lm_infinite_scores_attention(query, key, value, inv_freq, n_local: int, n_global: int, distance_cap: int,
                                 scaling: float, block: int | None = None, dropout: float = 0.0,
                                 training: bool = False, gap: int = 0) -> torch.Tensor:
    """LM-Infinite attention of the last q_len positions of a causal sequence of n_kv + gap tokens at positions
    0 .. n_kv + gap - 1, of which the keys of positions n_global .. n_global + gap - 1 are left out (a bounded cache
    dropped them: nothing reads them).

    query [b, h, q_len, d] and key [b, h_kv, n_kv, d] are rotated by RoPE at their true positions, value is
    [b, h_kv, n_kv, d], inv_freq [d/2] the frequencies they were rotated with. With `gap` = 0 key i sits at
    position i; with gap > 0 the first n_global keys sit at 0 .. n_global - 1 and key i >= n_global at i + gap,
    and every query's local window must lie inside the contiguous run (gap > 0 needs n_kv >= n_global + n_local -
    1 + q_len). Returns [b, q_len, h, d] in the query's dtype (the layout transformers' attention functions return).
    """
    b, h, q_len, d = query.shape
    n_kv = key.shape[2]
    if inv_freq.numel() * 2 != d:
        raise ValueError(f"lm_infinite: needs the full rotary dimension (inv_freq has {inv_freq.numel()} "
                         f"frequencies for head_dim {d})")
    if q_len > n_kv:
        raise ValueError(f"lm_infinite: {q_len} queries but only {n_kv} keys")
    if gap < 0 or (gap and n_kv < n_global + n_local - 1 + q_len):
        raise ValueError(f"lm_infinite: a gap of {gap} positions after the {n_global} global keys needs at least "
                         f"n_global + n_local - 1 + q_len = {n_global + n_local - 1 + q_len} keys, got {n_kv}")
    groups = h // key.shape[1]
    device = query.device
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    first = n_kv + gap - q_len  # absolute position of the first query
    block = min(q_len, block or block_size(n_local))
    n_glob = min(n_global, n_kv)
    has_global = n_glob > 0 and n_kv + gap - 1 >= n_local  # some query sees a global token outside its window
    if has_global:
        gpos = torch.arange(n_glob, device=device)
        k_glob = key[:, :, :n_glob]
        k_glob0 = repeat_kv(rotate(k_glob, -gpos[:, None].float() * inv_freq), groups)  # rotated to position 0
        k_glob = repeat_kv(k_glob.float(), groups)
        v_glob = repeat_kv(value[:, :, :n_glob].float(), groups)

    out = torch.empty(b, q_len, h, d, dtype=query.dtype, device=device)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        qpos = torch.arange(first + start, first + stop, device=device)
        lo, hi = max(0, first + start - n_local + 1), first + stop  # the band of keys this block can see locally
        q = query[:, :, start:stop].float()
        k = repeat_kv(key[:, :, lo - gap:hi - gap].float(), groups)   # with a gap, lo >= n_global + gap
        v = repeat_kv(value[:, :, lo - gap:hi - gap].float(), groups)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        dist = qpos[:, None] - torch.arange(lo, hi, device=device)[None, :]
        scores = scores.masked_fill((dist < 0) | (dist >= n_local), float("-inf"))
        if has_global and first + stop - 1 >= n_local:
            gdist = qpos[:, None] - gpos[None, :]
            q_cap = rotate(q, (distance_cap - qpos)[:, None].float() * inv_freq)  # query moved to position cap
            glob = torch.matmul(q_cap, k_glob0.transpose(-1, -2)) * scaling
            if distance_cap > n_local:  # global tokens closer than the cap keep their true distance
                true = torch.matmul(q, k_glob.transpose(-1, -2)) * scaling
                glob = torch.where(gdist >= distance_cap, glob, true)
            glob = glob.masked_fill(gdist < n_local, float("-inf"))  # still local (or future): counted once
            scores = torch.cat([glob, scores], dim=-1)
            v = torch.cat([v_glob, v], dim=-2)
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=training)
        out[:, start:stop] = torch.matmul(probs, v).transpose(1, 2).to(query.dtype)
    return out


def lm_infinite_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                          **kwargs):
    """The attention function registered as `ATTN_IMPLEMENTATION` (transformers' calling convention)."""
    params, inv_freq = METHOD.installed(module)
    if attention_mask is not None:
        raise ValueError("lm_infinite supports unpadded inputs only (got an attention mask with padding)")
    n_kv, q_len = key.shape[2], query.shape[2]
    position_ids = kwargs.get("position_ids")
    gap = 0
    if position_ids is not None:
        total = int(position_ids.reshape(-1, position_ids.shape[-1])[0, -1]) + 1 if position_ids.numel() else n_kv
        gap = total - n_kv  # > 0: a bounded cache (LambdaCacheLayer) left out the middle keys
        expected = torch.arange(total - q_len, total, device=position_ids.device)
        if position_ids.shape[-1] != q_len or gap < 0 or not bool((position_ids == expected).all()):
            raise ValueError("lm_infinite needs contiguous positions 0 .. n-1 (no left padding or packing)")
    out = lm_infinite_scores_attention(query, key, value, inv_freq, params["n_local"],
                                       params["n_global"], params["distance_cap"], scaling, dropout=dropout,
                                       training=module.training, gap=gap)
    return out, None


class LambdaCacheLayer(DynamicLayer):
    """One layer's KV cache for LM-Infinite: after every update it keeps the first `n_global` keys and values and the
    last `n_local - 1` (all of them while there are at most n_global + n_local - 1), rotated at their true positions.
    `update` returns the kept keys followed by the new ones, which is everything the new queries read; see the module
    docstring for how the attention function places them. `get_seq_length` is the number of tokens seen, so the
    model numbers new positions from it."""

    def __init__(self, n_local: int, n_global: int):
        super().__init__()
        self.n_local, self.n_global = int(n_local), int(n_global)
        self.cumulative_length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        tail = self.n_local - 1
        if self.cumulative_length > self.n_global + tail:  # drop what no later query can see
            pieces = [slice(0, self.n_global)] + ([slice(keys.shape[-2] - tail, None)] if tail else [])
            self.keys = torch.cat([keys[..., p, :] for p in pieces], dim=-2)
            self.values = torch.cat([values[..., p, :] for p in pieces], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if not self.is_initialized else self.keys.shape[-2]
        return kept + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Only emptying the whole cache is possible (CLEX re-encodes a sequence that way): the dropped keys are gone."""
        if tokens_to_remove == 0:
            return
        if tokens_to_remove != -self.cumulative_length:
            raise NotImplementedError("lm_infinite: a bounded cache can only be emptied, not cropped by "
                                      f"{tokens_to_remove} tokens")
        self.reset()
        self.cumulative_length = 0


register_attention_function(ATTN_IMPLEMENTATION, lm_infinite_attention)


class LMInfinite(RotaryAttentionMethod):
    name = "lm_infinite"
    attn_implementation = ATTN_IMPLEMENTATION
    description = ("LM-Infinite: n_local recent keys plus the first n_global tokens at a capped distance, "
                   "one softmax, linear memory.")
    regimes = ("frozen",)
    bounded_cache = True  # LambdaCacheLayer: answer_logits of a long input runs in chunks, memory O(chunk)

    def _defaults(self, base_window, train_len, regime):
        return {"n_local": int(base_window), "n_global": 10, "distance_cap": int(base_window)}

    def _validate(self, params, base_window, train_len):
        for key, least in (("n_local", 1), ("n_global", 0), ("distance_cap", 1)):
            value = params[key]
            if not isinstance(value, Integral) or isinstance(value, bool) or value < least:
                raise ValueError(f"lm_infinite: {key} must be an integer >= {least}, got {value!r}")
        return {key: int(value) for key, value in params.items()}

    def new_cache(self, model):
        """A cache of `LambdaCacheLayer`s (one per decoder layer): n_global + n_local - 1 keys per layer at most."""
        params = model.config.ctxext_attention["params"]
        layers = [LambdaCacheLayer(params["n_local"], params["n_global"])
                  for _ in range(model.config.num_hidden_layers)]
        return Cache(layers=layers)


METHOD = LMInfinite()
