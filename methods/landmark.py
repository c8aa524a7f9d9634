"""Landmark attention (Mohtashami & Jaggi 2023; docs/methods.md §7), the study's fine-tuned approximate attention.

- Tokens: a landmark token is inserted after every `mem_freq` regular tokens, so a block holds B = mem_freq + 1
  tokens, the landmark last. The token is one new embedding row (input and, when untied, output), initialised to
  the mean of the existing rows; its id is recorded in `config.ctxext_attention["landmark_id"]`.
- Grouped softmax (training and inference): a query attends directly to the regular tokens of its own block (up to
  itself); every earlier block is represented by its landmark in the same top-level softmax, and the landmark's
  probability is shared among the block's regular tokens by a softmax within the block. Landmarks get zero weight
  on the values. This equals one ordinary softmax over modified logits (`grouped_logits`): for a regular key j of
  an earlier block g, s_j - logsumexp_{regular j' in g}(s_j') + s_landmark(g).
- Inference with memory (`logits`, `answer_logits`, `greedy_generate`): the sequence (landmarks inserted) is
  processed in block-aligned windows of W = T - (T mod B) - (k + 1)·B tokens (T = training context, k = top_k), as
  the official code chunks it. Each layer keeps the keys and values of all complete blocks of earlier windows,
  the keys block-relative (rotated at 0 .. B - 1 within their block, so that placing a block at slot start P only
  needs the query rotated back by P: q · R(P + j)·k = (R(-P)·q) · (R(j)·k)). Positions are the official code's
  (`llama_mem.py`, `LlamaAttention.forward`: the `mem_indices`/`mem_pos` statements for scoring, the
  `selected_indices` ones for placement; l.361-365 and l.386-388 as the fidelity issue counts them), written
  relative to the window, which sits at (k + 1)·B + t; the n memory blocks end just before it. With k' = min(k, n) and
  prefix = (k + 1)·B - (k' + 1)·B (0 once n >= k):
  * scoring (`scoring_positions`): every query token and head scores every memory block by q · R(p)·k_landmark,
    the k' most recent landmarks at their true positions and every older one at the single position
    prefix + B - 1, just beyond them (one block further than the oldest of the k' recent ones);
  * selection (`select_blocks`): the top k' blocks per token and head, re-sorted by original index (an exact tie,
    e.g. between the older blocks of layer 0, whose landmark keys are all equal, goes to the more recent block; the
    official code leaves ties to torch.topk; keys computed in forwards of different lengths can differ in the last
    bit, and then rounding, not the rule, orders such blocks);
  * placement (`slot_starts`): the chosen block in sorted place s sits at prefix + s·B + j, one block further
    right (+ B) when it is among the k' most recent: k' + 1 block slots before the window.
  Every relative distance is therefore at most (k + 1)·B + W - 1 = T - (T mod B) - 1 <= T - 1. When the memory holds
  at most k blocks, every block is retrieved at its true relative distance, so the result equals one single pass
  (tested).
- Objective (`landmark_in_loss`, default True, LCEG's `include_landmark_in_loss=True`): the fine-tuning loss is the
  ordinary next-token loss over the sequence with landmarks inserted, so the regular token before a landmark is
  trained to predict the landmark and the landmark to predict the next regular token. The prediction of a regular
  token that follows a landmark is then read at the landmark (as the official generation does when
  include_landmark_in_loss is set). With False (the official flash-path objective): every regular token predicts
  the next regular token and the landmark positions are out of the loss.
- Everything reported to the user is at regular tokens: `logits` gives, for every regular token, the output that
  predicts the next regular token (see the objective) without the landmark column of the vocabulary.
- Generation (`greedy_generate`): the windows' keys and values are cached, so each new token costs one window's
  attention plus the retrieval; a landmark is fed right after the token that completes a block, exactly where the
  windowed inference of the longer sequence would have it, and a window that fills up moves into the memory. The
  result equals greedy decoding by full recomputation with `logits` (tested). (The official generation instead
  retrieves, for every new token, from all complete blocks before its own block.)

Registered with transformers' `AttentionInterface` as `ctxext_landmark`; the model's own decoder layers run
unchanged and the memory travels to the attention function as the `landmark_memory` keyword.
"""
from __future__ import annotations

from numbers import Integral

import torch

from .attention import AttentionMethod, check_ids, decode_greedily, repeat_kv

ATTN_NAME = "ctxext_landmark"
NEG_INF = float("-inf")


# --- tokens ---------------------------------------------------------------------------------------------------
def insert_landmarks(input_ids: torch.Tensor, mem_freq: int, landmark_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, N] regular tokens -> ([rows, M] tokens with a landmark after every `mem_freq` regular tokens,
    [N] index of each regular token in the new sequence)."""
    rows, n = input_ids.shape
    regular = torch.arange(n, device=input_ids.device)
    regular = regular + regular // mem_freq
    total = n + n // mem_freq
    out = torch.full((rows, total), landmark_id, dtype=input_ids.dtype, device=input_ids.device)
    out[:, regular] = input_ids
    return out, regular


def source_positions(n: int, mem_freq: int, landmark_in_loss: bool, device=None) -> torch.Tensor:
    """[n] index, in the sequence with landmarks inserted (`insert_landmarks`), of the output that predicts the regular
    token after regular token i: the token itself, or, with `landmark_in_loss`, the landmark that follows it when it
    completes a block (that landmark is trained to predict the next regular token)."""
    i = torch.arange(n, device=device)
    positions = i + i // mem_freq
    if landmark_in_loss:
        positions = positions + ((i + 1) % mem_freq == 0).long()
    return positions


def window_length(train_context: int, block_size: int, top_k: int) -> int:
    """Tokens per inference window: T - (T mod B) - (k + 1)·B (LCEG: 512 - 0 - 6·64 = 128); a multiple of B."""
    return train_context - train_context % block_size - (top_k + 1) * block_size


# --- rotation ---------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of `x` [..., d] by `positions`, broadcastable to x.shape[:-1] (e.g. [P] for x [..., P, d]; may be
    negative: the inverse rotation), computed directly from inv_freq in float32 (so a cos/sin magnitude of the rotary
    module is neither applied nor undone)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + _rotate_half(x) * sin


# --- grouped softmax --------------------------------------------------------------------------------------------
def earlier_block_logits(scores: torch.Tensor) -> torch.Tensor:
    """Logits [..., B] of complete earlier blocks (landmark last) -> the logits whose ordinary softmax, taken together
    with the other keys, gives the grouped-softmax weights: s_j - logsumexp(regular s) + s_landmark on the regular
    keys, -inf on the landmark (zero weight on its value)."""
    regular, gate = scores[..., :-1], scores[..., -1:]
    gated = regular - torch.logsumexp(regular, dim=-1, keepdim=True) + gate
    return torch.cat((gated, torch.full_like(gate, NEG_INF)), dim=-1)


def grouped_logits(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Grouped-softmax logits of one pass. `scores` [..., Q, K] are raw logits of a sequence of K keys that starts at a
    block boundary (key j is the landmark of its block iff j mod B = B - 1), the Q queries being its last Q tokens
    (Q = K without a cache); returns [..., Q, K] logits whose softmax over the last axis is landmark attention: own
    block's regular keys up to the query direct, earlier blocks gated by their landmarks, later keys and the own
    block's landmark excluded."""
    q_len, k_len = scores.shape[-2:]
    if q_len > k_len:
        raise ValueError(f"grouped_logits: {q_len} queries but only {k_len} keys (the queries are the last keys)")
    n_blocks = -(-k_len // block_size)
    pad = n_blocks * block_size - k_len
    padded = torch.nn.functional.pad(scores, (0, pad), value=NEG_INF) if pad else scores
    blocks = padded.unflatten(-1, (n_blocks, block_size))                       # [..., Q, nb, B]
    device = scores.device
    query = torch.arange(k_len - q_len, k_len, device=device)
    key = torch.arange(n_blocks * block_size, device=device).view(n_blocks, block_size)
    query_block = (query // block_size)[:, None, None]                          # [Q, 1, 1]
    key_block = (key // block_size)[None]                                       # [1, nb, B]
    regular = ((key % block_size) != block_size - 1)[None]
    earlier = (key_block < query_block) & regular                               # [Q, nb, B]
    current = (key_block == query_block) & (key[None] <= query[:, None, None]) & regular
    # earlier blocks (see earlier_block_logits): s_j + (s_landmark - logsumexp of the block's regular keys)
    shift = blocks[..., -1:] - torch.logsumexp(blocks[..., :-1], dim=-1, keepdim=True)   # [..., Q, nb, 1]
    out = (blocks + torch.where(earlier, shift, 0.0)).masked_fill(~(earlier | current), NEG_INF)
    return out.flatten(-2)[..., :k_len]


def grouped_weights(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Landmark attention weights [..., Q, K] from raw logits (see `grouped_logits`); each row sums to 1."""
    return torch.softmax(grouped_logits(scores, block_size), dim=-1)


# --- memory positions (llama_mem.py's index formulas, relative to the window) ------------------------------------
def scoring_positions(n_blocks: int, top_k: int, block_size: int, window_offset: int, device=None) -> torch.Tensor:
    """[n_blocks] positions at which each memory block's landmark key is rotated for scoring, the window starting at
    `window_offset`: the k' = min(k, n) most recent landmarks at their true positions, every older one at the one
    position prefix + B - 1 just beyond them (prefix = window_offset - (k' + 1)·B)."""
    recent = min(top_k, n_blocks)
    prefix = window_offset - (recent + 1) * block_size
    index = torch.zeros(n_blocks, dtype=torch.long, device=device)
    index[n_blocks - recent:] = torch.arange(1, recent + 1, device=device)
    return prefix + index * block_size + block_size - 1


def slot_starts(chosen: torch.Tensor, n_blocks: int, block_size: int, window_offset: int) -> torch.Tensor:
    """First positions [..., k'] of the slots of the chosen memory blocks `chosen` [..., k'] (sorted block indices,
    k' = min(k, n)): the block in sorted place s starts at prefix + s·B, plus B when it is among the k' most recent
    blocks; k' + 1 block slots [prefix, window_offset) just before the window."""
    recent = chosen.shape[-1]
    prefix = window_offset - (recent + 1) * block_size
    slot = torch.arange(recent, device=chosen.device) + (chosen >= n_blocks - recent).long()   # [..., k'] in 0..k'
    return prefix + slot * block_size


def select_blocks(query: torch.Tensor, memory_keys: torch.Tensor, top_k: int, inv_freq: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Top-k memory blocks per query token and head by the landmark score q · R(positions[b])·k_landmark(b), re-sorted
    by original block index; an exact tie goes to the more recent block. query [rows, H, Q, d] (rotated),
    memory_keys [rows, H, n, B, d] (block-relative: each block's keys rotated at 0 .. B - 1, so its landmark at
    B - 1), positions [n] (`scoring_positions`) -> [rows, H, Q, min(k, n)]."""
    block_size = memory_keys.shape[-2]
    landmarks = rotate(memory_keys[..., -1, :], positions - (block_size - 1), inv_freq)   # [rows, H, n, d]
    scores = query @ landmarks.transpose(-1, -2)                               # [rows, H, Q, n]
    n_blocks = scores.shape[-1]
    # a stable descending sort of the blocks from the most recent back: among equal scores the most recent comes first
    newest_first = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    chosen = n_blocks - 1 - newest_first[..., :min(top_k, n_blocks)]
    return chosen.sort(dim=-1).values


# --- memory -----------------------------------------------------------------------------------------------------
class LandmarkMemory:
    """Per-layer memory: the complete blocks of closed windows, keys block-relative (each block's keys rotated at
    positions 0 .. B - 1, as if the block started at 0) and values [rows, kv_heads, n_blocks, B, d], and the open
    window's keys (rotated at window_offset + t) and values [rows, kv_heads, t, d]. `close_window` moves the open
    window into the memory."""

    def __init__(self, block_size: int, top_k: int, inv_freq: torch.Tensor, window: int):
        self.block_size, self.top_k, self.inv_freq, self.window = block_size, top_k, inv_freq, window
        self.window_offset = (top_k + 1) * block_size   # the window's first position (after k + 1 block slots)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.window_keys: dict[int, torch.Tensor] = {}
        self.window_values: dict[int, torch.Tensor] = {}
        self.last_selection: dict[int, torch.Tensor] = {}  # layer -> [rows, heads, Q, k'] (for inspection/tests)

    def blocks(self, layer: int) -> int:
        return 0 if layer not in self.keys else self.keys[layer].shape[2]

    def open_length(self) -> int:
        """Tokens in the open window (the same in every layer)."""
        return next(iter(self.window_keys.values())).shape[2] if self.window_keys else 0

    def extend_window(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a forward's keys and values to the open window of `layer`; returns the whole open window."""
        if layer in self.window_keys:
            keys = torch.cat((self.window_keys[layer], keys), dim=2)
            values = torch.cat((self.window_values[layer], values), dim=2)
        self.window_keys[layer], self.window_values[layer] = keys, values
        return keys, values

    def close_window(self) -> None:
        """Move every layer's open window into the memory (its complete blocks, see `append`)."""
        for layer in list(self.window_keys):
            self.append(layer, self.window_keys.pop(layer), self.window_values.pop(layer))

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the complete blocks of a window: `keys` rotated at window positions window_offset + t are rotated
        back by their block's start, window_offset + t - (t mod B), so that they become block-relative. A trailing
        incomplete block is only allowed at the very end of the input (dropped)."""
        B = self.block_size
        complete = keys.shape[2] // B * B
        if complete == 0:
            return
        block_starts = self.window_offset + torch.arange(complete, device=keys.device) // B * B
        keys = rotate(keys[:, :, :complete], -block_starts, self.inv_freq).unflatten(2, (-1, B))
        values = values[:, :, :complete].unflatten(2, (-1, B))
        if layer in self.keys:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = keys, values


def gather_blocks(blocks: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """blocks [rows, H, n, B, d], chosen [rows, H, Q, k'] block indices -> [rows, H, Q, k', B, d]: row r, head h,
    query q, place s holds blocks[r, h, chosen[r, h, q, s]] (one index_select over the flattened blocks)."""
    rows, heads, n_blocks = blocks.shape[:3]
    base = torch.arange(rows * heads, device=chosen.device).view(rows, heads, 1, 1) * n_blocks
    picked = blocks.reshape(rows * heads * n_blocks, *blocks.shape[3:]).index_select(0, (base + chosen).flatten())
    return picked.view(*chosen.shape, *blocks.shape[3:])


def memory_attention(query, key, value, memory: LandmarkMemory, layer: int, scaling: float) -> torch.Tensor:
    """Landmark attention of the newest Q tokens of the open window, with memory. query [rows, H, Q, d]; key/value
    [rows, H, K, d]: the open window so far, these tokens last (rotated at window_offset + t, kv heads already
    repeated). Returns [rows, H, Q, d]."""
    window_logits = grouped_logits((query @ key.transpose(-1, -2)) * scaling, memory.block_size)
    n_blocks = memory.blocks(layer)
    if n_blocks == 0:
        return torch.softmax(window_logits, dim=-1) @ value
    groups = query.shape[1] // memory.keys[layer].shape[1]
    mem_keys = repeat_kv(memory.keys[layer], groups)                           # [rows, H, n, B, d]
    mem_values = repeat_kv(memory.values[layer], groups)
    scoring = scoring_positions(n_blocks, memory.top_k, memory.block_size, memory.window_offset, query.device)
    chosen = select_blocks(query, mem_keys, memory.top_k, memory.inv_freq, scoring)   # [rows, H, Q, k']
    memory.last_selection[layer] = chosen
    # q · R(start + j)·k_j = (R(-start)·q) · (R(j)·k_j): the block-relative keys need no rotation, only the query,
    # once per chosen block, by its slot's start
    starts = slot_starts(chosen, n_blocks, memory.block_size, memory.window_offset)          # [rows, H, Q, k']
    slot_queries = rotate(query[..., None, :].expand(*chosen.shape, -1), -starts, memory.inv_freq)
    picked_keys = gather_blocks(mem_keys, chosen)                                          # [rows, H, Q, k', B, d]
    picked_values = gather_blocks(mem_values, chosen)
    memory_logits = earlier_block_logits(torch.einsum("rhqsd,rhqsbd->rhqsb", slot_queries, picked_keys) * scaling)
    weights = torch.softmax(torch.cat((memory_logits.flatten(-2), window_logits), dim=-1), dim=-1)
    n_memory = memory_logits.shape[-2] * memory_logits.shape[-1]
    memory_weights = weights[..., :n_memory].unflatten(-1, memory_logits.shape[-2:])
    return torch.einsum("rhqsb,rhqsbd->rhqd", memory_weights, picked_values) + weights[..., n_memory:] @ value


def landmark_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                               landmark_memory: LandmarkMemory | None = None, **kwargs):
    """The `AttentionInterface` function: q/k arrive rotated, [rows, heads, Q, d]. Without `landmark_memory` it is
    the single-pass grouped softmax (training; the sequence starts at a block boundary, no cache, no padding:
    causality comes from the block structure, the mask is not used). With it, the next tokens of the open window of
    memory inference (their keys and values join the window)."""
    block_size = module.config.ctxext_attention["params"]["mem_freq"] + 1
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    if landmark_memory is None:
        probs = grouped_weights((query @ repeat_kv(key, groups).transpose(-1, -2)) * scaling, block_size)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out = probs @ repeat_kv(value, groups)
    else:
        key, value = landmark_memory.extend_window(module.layer_idx, key, value)
        out = memory_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), landmark_memory,
                               module.layer_idx, scaling)
    return out.transpose(1, 2).contiguous(), None


# --- the method -------------------------------------------------------------------------------------------------
def _positive_int(params: dict, name: str) -> None:
    value = params[name]
    if not isinstance(value, Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"landmark parameter {name} must be a positive integer, got {value!r}")


class LandmarkAttention(AttentionMethod):
    name = "landmark"
    description = ("Landmark attention: a landmark token closes every block of mem_freq tokens; grouped softmax; "
                   "at inference top-k block retrieval per token and head from a memory of earlier windows.")
    regimes = ("finetuned",)

    def _defaults(self, base_window: int, train_len: int, regime: str) -> dict:
        # LCEG: mem_freq 63 (block 64), top_k 5, include_landmark_in_loss=True; the training context is the length
        # the cell is fine-tuned at (the base window in the paper's cell, train_len: base).
        return {"mem_freq": 63, "top_k": 5, "train_context": int(train_len), "landmark_in_loss": True}

    def _validate(self, params: dict, base_window: int, train_len: int) -> dict:
        for name in ("mem_freq", "top_k", "train_context"):
            _positive_int(params, name)
        if not isinstance(params["landmark_in_loss"], bool):
            raise ValueError(f"landmark parameter landmark_in_loss must be true or false, got "
                             f"{params['landmark_in_loss']!r}")
        block = params["mem_freq"] + 1
        window = window_length(params["train_context"], block, params["top_k"])
        if window < block:
            raise ValueError(
                f"landmark inference window T - (T mod B) - (k+1)·B = {window} is below one block: train_context="
                f"{params['train_context']}, mem_freq={params['mem_freq']} (B={block}), top_k={params['top_k']}; "
                f"lower mem_freq or top_k so that (top_k + 2)·(mem_freq + 1) <= train_context")
        return params

    # --- model --------------------------------------------------------------------------------------------------
    def apply(self, model, base_window: int, train_len: int, regime: str = "finetuned", **overrides):
        """Add the landmark token (one embedding row, mean-initialised), record it, install the attention."""
        self.resolve(base_window, train_len, regime, **overrides)  # validate before touching the model
        if getattr(model.config, "ctxext_attention", None):
            raise ValueError(f"model already has an attention kind applied: {model.config.ctxext_attention}")
        embeddings = model.get_input_embeddings()
        landmark_id = embeddings.weight.shape[0]
        old_output = model.get_output_embeddings()
        tied = old_output is not None and old_output.weight is embeddings.weight
        output_mean = None if old_output is None else old_output.weight.detach().mean(dim=0)
        with torch.no_grad():
            input_mean = embeddings.weight.mean(dim=0)
            model.resize_token_embeddings(landmark_id + 1, mean_resizing=False)
            model.get_input_embeddings().weight[landmark_id] = input_mean
            if old_output is not None and not tied:
                model.get_output_embeddings().weight[landmark_id] = output_mean
        super().apply(model, base_window, train_len, regime, **overrides)
        model.config.ctxext_attention["landmark_id"] = int(landmark_id)
        return model

    def install_hooks(self, model) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, landmark_attention_forward)
        model.set_attn_implementation(ATTN_NAME)

    @staticmethod
    def _record(model) -> tuple[dict, int]:
        record = getattr(model.config, "ctxext_attention", None)
        if not record or record.get("attention") != "landmark" or "landmark_id" not in record:
            raise ValueError("the model has no landmark attention applied (config.ctxext_attention)")
        # checkpoints written before the switch existed trained without the landmarks in the loss
        return {"landmark_in_loss": False, **record["params"]}, record["landmark_id"]

    def training_inputs(self, model, batch: dict) -> dict:
        """Landmarks inserted into `batch` (input_ids and labels [rows, T] of regular tokens, -100 where nothing is
        scored; optionally loss_weights). With `landmark_in_loss` (LCEG) the labels are the inserted sequence itself:
        every position predicts the next token, landmarks included, where the regular token before a landmark is
        scored (a landmark at the very end of a row, which LCEG's rows never have, is no target); a landmark's loss
        weight is that token's, the weights rescaled to their old sum. Without, every regular token predicts the next
        regular token and the landmark positions are out of the loss. (HF shifts labels by one: logits[p] is scored
        against labels[p+1].)"""
        params, landmark_id = self._record(model)
        mem_freq = params["mem_freq"]
        ids, regular = insert_landmarks(batch["input_ids"], mem_freq, landmark_id)
        labels_in, weights_in = batch.get("labels", batch["input_ids"]), batch.get("loss_weights")
        if params["landmark_in_loss"]:
            labels = torch.full_like(ids, -100)
            labels[:, regular] = labels_in
            landmark = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
            landmark[regular] = False
            at = torch.nonzero(landmark).flatten()
            labels[:, at] = torch.where(labels[:, at - 1] != -100, landmark_id, -100)
            if landmark[-1]:
                labels[:, -1] = -100
            out = {"input_ids": ids, "labels": labels}
            if weights_in is not None:
                weights = torch.zeros(ids.shape, dtype=weights_in.dtype, device=ids.device)
                weights[:, regular] = weights_in
                weights[:, at] = torch.where(labels[:, at] != -100, weights[:, at - 1], 0.0)
                total = weights.sum()
                out["loss_weights"] = weights * (weights_in.sum() / total) if total > 0 else weights
            return out
        out = {"input_ids": ids}
        for key, value, fill in (("labels", labels_in, -100), ("loss_weights", weights_in, 0.0)):
            if value is None:
                continue
            target = torch.full(ids.shape, fill, dtype=value.dtype, device=ids.device)
            target[:, regular[:-1]] = value[:, 1:]
            out[key] = torch.cat((torch.full_like(target[:, :1], fill), target[:, :-1]), dim=1)
        return out

    # --- inference ----------------------------------------------------------------------------------------------
    @staticmethod
    def _memory(model, params: dict) -> LandmarkMemory:
        block, top_k = params["mem_freq"] + 1, params["top_k"]
        inv_freq = model.get_decoder().rotary_emb.inv_freq
        return LandmarkMemory(block, top_k, inv_freq, window_length(params["train_context"], block, top_k))

    @staticmethod
    def _feed(model, memory: LandmarkMemory, ids: torch.Tensor) -> torch.Tensor:
        """Run the next tokens `ids` [rows, m] (landmarks inserted) through the decoder window by window, the memory
        carried along (a window that fills up moves into it); returns their final hidden states [rows, m, hidden]."""
        decoder, pieces, start = model.get_decoder(), [], 0
        while start < ids.shape[1]:
            open_length = memory.open_length()
            piece = ids[:, start:start + memory.window - open_length]
            positions = memory.window_offset + open_length + torch.arange(piece.shape[1], device=ids.device)
            out = decoder(input_ids=piece, position_ids=positions.expand(piece.shape[0], -1), use_cache=False,
                          landmark_memory=memory)
            pieces.append(out.last_hidden_state)
            if memory.open_length() == memory.window:
                memory.close_window()
            start += piece.shape[1]
        return torch.cat(pieces, dim=1)

    def _hidden(self, model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(final hidden states [rows, M] of the windowed inference over `input_ids` with landmarks inserted,
        [N] index of the output that predicts the token after each regular token, landmark id)."""
        params, landmark_id = self._record(model)
        ids, _ = insert_landmarks(input_ids, params["mem_freq"], landmark_id)
        hidden = self._feed(model, self._memory(model, params), ids)
        sources = source_positions(input_ids.shape[1], params["mem_freq"], params["landmark_in_loss"],
                                   input_ids.device)
        return hidden, sources, landmark_id

    @torch.no_grad()
    def logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, N, vocab without the landmark] at the regular tokens of `input_ids` [rows, N],
        computed window by window with memory carried across windows."""
        hidden, sources, landmark_id = self._hidden(model, input_ids)
        return model.get_output_embeddings()(hidden[:, sources])[..., :landmark_id]

    @torch.no_grad()
    def answer_logits(self, model, input_ids: torch.Tensor, positions: torch.Tensor,
                      prefill_chunk: int | None = None) -> torch.Tensor:
        """Next-token logits [rows, k, vocab without the landmark] (float32) after the regular tokens `positions`
        [rows, k] (each in 0 .. N - 1) of `input_ids` [rows, N], as `logits` gives them there; the output layer runs on
        those k hidden states only. `prefill_chunk` (the common signature's) is not used: the windowed inference
        already runs one window per forward."""
        check_ids(input_ids)
        positions = torch.as_tensor(positions, dtype=torch.long, device=input_ids.device)
        n = input_ids.shape[1]
        if positions.dim() != 2 or positions.shape[0] != input_ids.shape[0]:
            raise ValueError(f"positions must be [rows, k] with rows = {input_ids.shape[0]}, got "
                             f"{tuple(positions.shape)}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
            raise ValueError(f"positions must lie in 0 .. {n - 1}, got {int(positions.min())} .. {int(positions.max())}")
        hidden, sources, landmark_id = self._hidden(model, input_ids)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        return model.get_output_embeddings()(hidden[rows, sources[positions]])[..., :landmark_id].float()

    @torch.no_grad()
    def greedy_generate(self, model, input_ids: torch.Tensor, max_new_tokens: int, stop=None,
                        pad_id: int | None = None, prefill_chunk: int | None = None) -> torch.Tensor:
        """Greedy continuation [rows, max_new_tokens] (int64) of `input_ids` [rows, N] (prompts of equal length): the
        windowed inference with its memory and open window cached, one forward per new token (two when it completes a
        block: the token and its landmark). The landmark column is never chosen. `stop(generated [rows, k]) ->
        BoolTensor[rows]` is called after every step and decoding ends once every row has stopped; a stopped row's
        later positions hold `pad_id`, or without one its last token repeated (`methods.attention.decode_greedily`). `prefill_chunk`
        (the common signature's) is not used: the prompt goes through the windowed inference."""
        check_ids(input_ids)
        if not isinstance(max_new_tokens, Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        params, landmark_id = self._record(model)
        mem_freq, in_loss = params["mem_freq"], params["landmark_in_loss"]
        rows, n = input_ids.shape
        if max_new_tokens == 0:
            return input_ids.new_zeros((rows, 0))
        memory = self._memory(model, params)
        head = model.get_output_embeddings()
        ids, _ = insert_landmarks(input_ids, mem_freq, landmark_id)
        first = head(self._feed(model, memory, ids)[:, int(source_positions(n, mem_freq, in_loss)[-1])])
        count = [n]   # regular tokens so far

        def step(token: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            completes = count[0] % mem_freq == 0
            feed = token[:, None] if not completes else torch.stack((token, torch.full_like(token, landmark_id)), 1)
            hidden = self._feed(model, memory, feed)
            return head(hidden[:, -1] if completes and in_loss else hidden[:, 0])[..., :landmark_id]

        return decode_greedily(first[..., :landmark_id], step, max_new_tokens, stop, pad_id)

    @torch.no_grad()
    def single_pass_logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Like `logits` but in one forward pass without memory (the training-time computation)."""
        params, landmark_id = self._record(model)
        ids, _ = insert_landmarks(input_ids, params["mem_freq"], landmark_id)
        sources = source_positions(input_ids.shape[1], params["mem_freq"], params["landmark_in_loss"],
                                   input_ids.device)
        return model(input_ids=ids, use_cache=False).logits[:, sources, :landmark_id]


METHOD = LandmarkAttention()
