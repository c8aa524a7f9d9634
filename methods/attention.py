"""Attention kinds, the second axis of a cell: which keys each query sees.

`exact` is the model's own full causal attention. Approximate kinds (LM-Infinite, Landmark) subclass
`AttentionMethod`, register an attention function with transformers' `AttentionInterface` in
`install_hooks`, and record themselves in `model.config.ctxext_attention` so a saved checkpoint reloads with
the same attention (see `methods.restore`).

Evaluation goes through three methods of the kind (the defaults here are exact attention's):

- `logits(model, ids)`: next-token logits at every position (the training-time view; [rows, T, vocab]).
- `answer_logits(model, ids, positions)`: next-token logits at the given positions only: the output layer sees only
  the hidden states at `positions`, so no [rows, T, vocab] tensor ever exists. The input runs through the decoder
  in one pass without a cache, except for a kind with a bounded cache (`bounded_cache`, LM-Infinite), which runs it
  in chunks of `prefill_chunk` tokens through that cache. (A cache that keeps every key, exact attention's, holds
  all layers' keys and values of the whole input, more than the activations of one layer at a time that a
  cacheless pass holds: in a LLaMA-shaped model 2·layers·kv_heads·head_dim values per token against a few times
  the hidden and MLP widths, e.g. 11,520 against ~6,000 for SmolLM2-135M.)
- `greedy_generate(model, ids, max_new_tokens, stop)`: greedy decoding through a KV cache: the prompt is prefilled
  in chunks, then every step feeds one token per row and runs the output layer at that position only.

A kind's cache comes from `new_cache(model)` (exact attention: transformers' `DynamicCache`; LM-Infinite: a
bounded cache holding only what its Λ-shaped attention reads). RoPE methods whose frequencies depend on the
length take part through `RopeMethod.fixed_length` (the prefill gets the prompt's frequencies in every chunk) and
`RopeMethod.generation_length` (the frequencies of the decoding steps: Dynamic NTK fixes the prompt's α, CLEX
re-encodes when its scale t changes; docs/methods.md §3.2g, §5g). A kind that computes its logits its own way
(it overrides `logits`, e.g. Landmark, which inserts tokens) must override both methods too (the model's decoder
with a plain cache would not be that kind): the base class refuses it rather than fall back to a silent full
recomputation per token.
"""
from __future__ import annotations

import inspect
from numbers import Integral

import torch

from .rope import REGIMES, check_regime, check_windows, merge_params

DEFAULT_PREFILL_CHUNK = 4096  # tokens per prefill forward when the caller gives none (eval.prefill_chunk)


def check_prefill_chunk(prefill_chunk) -> int:
    """The prefill chunk to use: `prefill_chunk` if it is a positive integer, DEFAULT_PREFILL_CHUNK for None."""
    if prefill_chunk is None:
        return DEFAULT_PREFILL_CHUNK
    if not isinstance(prefill_chunk, Integral) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive integer (or None for {DEFAULT_PREFILL_CHUNK}), "
                         f"got {prefill_chunk!r}")
    return int(prefill_chunk)


def check_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a [rows, n] tensor with n >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")


def _rope_of(model):
    from . import rope_of  # the registry lives in the package (lazy: the package imports this module)

    return rope_of(model)


def _cache_keyword(decoder) -> str:
    """The decoder's keyword for the KV cache: `cache` from transformers 5.24 on, `past_key_values` before."""
    params = inspect.signature(type(decoder).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decode_greedily(first_logits: torch.Tensor, step, max_new_tokens: int, stop=None, pad_id: int | None = None
                    ) -> torch.Tensor:
    """The greedy loop every kind shares. `first_logits` [rows, vocab] are the next-token logits after the prompt;
    `step(tokens [rows]) -> [rows, vocab]` feeds one token per row and returns the logits after it.
    `stop(generated [rows, k]) -> BoolTensor[rows]` is called after every step; decoding ends when every row has
    stopped. A stopped row's later positions hold `pad_id`, or, without one, its last token (the one on which it
    stopped) repeated; the model is fed that last token for the row while the others go on (never the pad id, which
    need not be a token). Returns [rows, max_new_tokens] (int64)."""
    rows = first_logits.shape[0]
    device = first_logits.device
    out = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    last = torch.full((rows,), max_new_tokens - 1, dtype=torch.long, device=device)  # each row's last real position
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    logits = first_logits
    for k in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        if k and bool(done.any()):
            token = torch.where(done, out[:, k - 1], token)  # a stopped row is fed its last token again
        out[:, k] = token
        if stop is not None:
            now = torch.as_tensor(stop(out[:, :k + 1]), dtype=torch.bool, device=device).reshape(rows)
            last = torch.where(now & ~done, torch.full_like(last, k), last)
            done = done | now
            if bool(done.all()):
                break
        if k + 1 < max_new_tokens:
            logits = step(token)
    after = torch.arange(max_new_tokens, device=device)[None, :] > last[:, None]
    if bool(after.any()):
        fill = out[torch.arange(rows, device=device), last][:, None] if pad_id is None else int(pad_id)
        out = torch.where(after, fill, out)
    return out


class AttentionMethod:
    name = ""
    description = ""
    approximate = True
    regimes: tuple[str, ...] = REGIMES  # the regimes this attention kind supports
    bounded_cache = False  # True: new_cache() keeps a bounded number of keys, so answer_logits runs in chunks

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
    def training_inputs(self, model, batch: dict) -> dict:
        """The inputs of one training step on `batch` (input_ids and labels [rows, T] of regular tokens, -100 where
        nothing is scored; optionally loss_weights): the batch itself unless the kind changes the sequence."""
        return batch

    def logits(self, model, input_ids):
        """Next-token logits [rows, T, vocab] at every regular token of `input_ids` [rows, T]."""
        return model(input_ids=input_ids).logits

    # --- evaluation: logits where needed, cached generation ----------------------------------------------------
    def new_cache(self, model):
        """A fresh KV cache for one prefill + decoding of this kind (exact attention: transformers' DynamicCache,
        which keeps every key)."""
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def _refuse_own_logits(self, what: str) -> None:
        """A kind that computes its logits its own way (overrides `logits`) cannot run the model's decoder with a
        plain cache: it must implement the evaluation methods itself."""
        if type(self).logits is not AttentionMethod.logits:
            raise NotImplementedError(f"attention {self.name!r} computes its own logits and must implement {what} "
                                      "(the base class runs the model's decoder with a plain cache)")

    def _hidden_at(self, model, input_ids: torch.Tensor, positions: torch.Tensor, prefill_chunk: int,
                   cache=None) -> torch.Tensor:
        """Final hidden states [rows, k, hidden] at `positions` [rows, k] of `input_ids` [rows, n]: one decoder pass
        without a cache when n <= prefill_chunk and no cache is given, else chunk by chunk through `cache` (a new
        one when None), which then holds the whole prompt."""
        decoder = model.get_decoder()
        rows, n = input_ids.shape
        row_index = torch.arange(rows, device=input_ids.device)[:, None].expand_as(positions)
        if cache is None and n <= prefill_chunk:
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            return hidden[row_index, positions]
        cache = self.new_cache(model) if cache is None else cache
        keyword, out = _cache_keyword(decoder), None
        for start in range(0, n, prefill_chunk):
            stop = min(start + prefill_chunk, n)
            hidden = decoder(input_ids=input_ids[:, start:stop], use_cache=True, **{keyword: cache}).last_hidden_state
            if out is None:
                out = hidden.new_zeros(rows, positions.shape[1], hidden.shape[-1])
            inside = (positions >= start) & (positions < stop)
            if bool(inside.any()):
                out[inside] = hidden[row_index[inside], positions[inside] - start]
        return out

    @torch.no_grad()
    def answer_logits(self, model, input_ids: torch.Tensor, positions: torch.Tensor,
                      prefill_chunk: int | None = None) -> torch.Tensor:
        """Next-token logits [rows, k, vocab] (float32) at `positions` [rows, k] (int64, each in 0 .. n - 1) of
        `input_ids` [rows, n] (unpadded): equal to `logits(model, input_ids)` gathered at those positions, but the
        output layer runs on those k hidden states only. The decoder runs in one pass without a cache, or, for a
        kind with a bounded cache and an input longer than `prefill_chunk` (default DEFAULT_PREFILL_CHUNK), in
        chunks through that cache (see the module docstring)."""
        check_ids(input_ids)
        positions = torch.as_tensor(positions, dtype=torch.long, device=input_ids.device)
        if positions.dim() != 2 or positions.shape[0] != input_ids.shape[0]:
            raise ValueError(f"positions must be [rows, k] with rows = {input_ids.shape[0]}, got {tuple(positions.shape)}")
        n = input_ids.shape[1]
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
            raise ValueError(f"positions must lie in 0 .. {n - 1}, got {positions.min().item()} .. "
                             f"{positions.max().item()}")
        chunk = check_prefill_chunk(prefill_chunk)
        self._refuse_own_logits("answer_logits")
        with _rope_of(model).fixed_length(model, n):
            hidden = self._hidden_at(model, input_ids, positions, chunk if self.bounded_cache else n)
        return model.get_output_embeddings()(hidden).float()

    @torch.no_grad()
    def greedy_generate(self, model, input_ids: torch.Tensor, max_new_tokens: int, stop=None,
                        pad_id: int | None = None, prefill_chunk: int | None = None) -> torch.Tensor:
        """Greedy decoding of `max_new_tokens` tokens after `input_ids` [rows, n] through a KV cache: LongTensor
        [rows, max_new_tokens]. No padding ever enters the model, so the rows must be prompts of equal length (the
        caller groups them). `stop(generated [rows, k]) -> BoolTensor[rows]` is called after every step and decoding
        ends once every row has stopped; a stopped row's later positions hold `pad_id`, or without one its last
        token repeated (see `decode_greedily`). The prompt is prefilled in chunks of `prefill_chunk` tokens (default
        DEFAULT_PREFILL_CHUNK) under the RoPE method's `fixed_length(n)`, so that it gets the frequencies of one
        forward over the n prompt tokens; the decoding steps run under its `generation_length(n)`. Each step runs
        the output layer at the new position only. Equal, token for token, to greedy decoding by full recomputation
        (argmax of a full forward pass's last logits, appended, repeated), with Dynamic NTK's α fixed at the
        prompt's length (docs/methods.md §3.2g)."""
        check_ids(input_ids)
        if not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        chunk = check_prefill_chunk(prefill_chunk)
        rows, n = input_ids.shape
        if max_new_tokens == 0:
            return input_ids.new_zeros(rows, 0)
        self._refuse_own_logits("greedy_generate")
        rope, decoder, head = _rope_of(model), model.get_decoder(), model.get_output_embeddings()
        cache, keyword = self.new_cache(model), _cache_keyword(decoder)
        last = torch.full((rows, 1), n - 1, dtype=torch.long, device=input_ids.device)
        with rope.fixed_length(model, n):
            first = head(self._hidden_at(model, input_ids, last, chunk, cache=cache))[:, -1].float()

        def step(token):
            hidden = decoder(input_ids=token[:, None], use_cache=True, **{keyword: cache}).last_hidden_state
            return head(hidden[:, -1:])[:, -1].float()

        with rope.generation_length(model, n):
            return decode_greedily(first, step, max_new_tokens, stop, pad_id)


# --- kinds whose attention function reads the model's rotated keys and its rotary frequencies --------------------
_OWNER = "_ctxext_rotary_owner"  # attribute on each attention layer: weak reference to the module holding rotary_emb


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, h_kv, T, d] -> [b, h_kv * groups, T, d] (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def padding_only_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """Mask builder of a kind whose attention function builds causality itself: None for unpadded inputs, else the
    2-D padding mask, which that function rejects with a clear message."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def register_attention_function(name: str, function) -> None:
    """Register `function` with transformers' AttentionInterface under `name`, with the padding-only mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, padding_only_mask)


class RotaryAttentionMethod(AttentionMethod):
    """An attention kind realised by an attention function (registered as `attn_implementation`) that re-rotates
    the keys and queries the model's attention layers hand it, so it needs the rotary module's frequencies: every
    layer is pointed at the module that owns `rotary_emb` (a weak reference)."""

    attn_implementation = ""

    def install_hooks(self, model) -> None:
        """Point every attention layer at the module that owns the rotary embedding and switch the model's attention
        implementation to the kind's function (idempotent)."""
        import weakref

        inner = getattr(model, "model", model)
        if not hasattr(inner, "rotary_emb"):
            raise ValueError(f"{self.name}: {type(model).__name__} has no rotary embedding module (model.rotary_emb)")
        ref = weakref.ref(inner)
        for layer in inner.layers:
            setattr(layer.self_attn, _OWNER, ref)
        model.set_attn_implementation(self.attn_implementation)

    def installed(self, module) -> tuple[dict, torch.Tensor]:
        """(the kind's parameters, the rotary module's inv_freq) for an attention layer of a model the kind is
        installed on; RuntimeError otherwise."""
        record = getattr(module.config, "ctxext_attention", None) or {}
        owner = getattr(module, _OWNER, None)
        if record.get("attention") != self.name or owner is None or owner() is None:
            raise RuntimeError(f"{self.name} attention is not installed on this model; use "
                               f"methods.get_attention({self.name!r}).apply(model, ...) or methods.restore(model)")
        return record["params"], owner().rotary_emb.inv_freq


class ExactAttention(AttentionMethod):
    name = "exact"
    description = "The model's own full causal attention (every query sees every earlier key)."
    approximate = False


EXACT = ExactAttention()
