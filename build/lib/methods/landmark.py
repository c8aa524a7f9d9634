"""Landmark attention (Mohtashami & Jaggi 2023; docs/methods.md §7), the study's fine-tuned approximate attention.

- Tokens: a landmark token is inserted after every `mem_freq` regular tokens, so a block holds B = mem_freq + 1
  tokens, the landmark last. The token is one new embedding row (input and, when untied, output), initialised to
  the mean of the existing rows; its id is recorded in `config.ctxext_attention["landmark_id"]`.
- Grouped softmax (training and inference): a query attends directly to the regular tokens of its own block (up to
  itself); every earlier block is represented by its landmark in the same top-level softmax, and the landmark's
  probability is shared among the block's regular tokens by a softmax within the block. Landmarks get zero weight
  on the values. This equals one ordinary softmax over modified logits (`grouped_logits`): for a regular key j of
  an earlier block g, s_j - logsumexp_{regular j' in g}(s_j') + s_landmark(g).
- Inference with memory (`logits`): the sequence (landmarks inserted) is processed in block-aligned windows of
  W = T - (T mod B) - (k + 1)·B tokens (T = training context, k = top_k). Each layer keeps the keys (un-rotated,
  i.e. pre-RoPE) and values of all complete blocks of earlier windows. Every query token and head scores every
  memory block by q · (its landmark key, rotated at the common synthetic position B - 1), keeps the top k blocks
  (re-sorted by original index) and sees them at re-assigned contiguous positions: right-aligned in the k block
  slots [0, k·B) just before the window, which sits at positions k·B + t. Every relative distance is therefore at
  most k·B + W - 1 <= T - B - 1. The grouped softmax spans the retrieved blocks and the window. When the memory
  holds at most k blocks, every block is retrieved at its true relative distance, so the result equals one
  single pass (tested).
- Everything reported to the user is at regular tokens: `logits` drops the landmark positions (the prediction of
  the token after a landmark comes from the regular token before it) and the landmark column of the vocabulary;
  the fine-tuning loss (`training_inputs`) excludes the landmark positions.

Registered with transformers' `AttentionInterface` as `ctxext_landmark`; the model's own decoder layers run
unchanged and the memory travels to the attention function as the `landmark_memory` keyword.
"""
from __future__ import annotations

from numbers import Integral

import torch

from .attention import AttentionMethod

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


def window_length(train_context: int, block_size: int, top_k: int) -> int:
    """Tokens per inference window: T - (T mod B) - (k + 1)·B (LCEG: 512 - 0 - 6·64 = 128); a multiple of B."""
    return train_context - train_context % block_size - (top_k + 1) * block_size


# --- rotation ---------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of `x` [..., P, d] by `positions` [P] (may be negative: the inverse rotation), computed
    directly from inv_freq in float32 (so a cos/sin magnitude of the rotary module is neither applied nor undone)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
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
    """Single-pass grouped-softmax logits. `scores` [..., Q, Q] are raw causal logits of a sequence that starts at a
    block boundary (key j is the landmark of its block iff j mod B = B - 1); returns [..., Q, Q] logits whose softmax
    over the last axis is landmark attention: own block's regular keys up to the query direct, earlier blocks gated
    by their landmarks, later keys and the own block's landmark excluded."""
    q_len, k_len = scores.shape[-2:]
    if q_len != k_len:
        raise ValueError(f"grouped_logits needs as many queries as keys (no cache), got {q_len} and {k_len}")
    n_blocks = -(-k_len // block_size)
    pad = n_blocks * block_size - k_len
    padded = torch.nn.functional.pad(scores, (0, pad), value=NEG_INF) if pad else scores
    blocks = padded.unflatten(-1, (n_blocks, block_size))                       # [..., Q, nb, B]
    device = scores.device
    query = torch.arange(q_len, device=device)
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
    """Landmark attention weights [..., Q, Q] from raw logits (see `grouped_logits`); each row sums to 1."""
    return torch.softmax(grouped_logits(scores, block_size), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# --- memory -----------------------------------------------------------------------------------------------------
class LandmarkMemory:
    """Per-layer memory of complete blocks: un-rotated keys and values [rows, kv_heads, n_blocks, B, d]."""

    def __init__(self, block_size: int, top_k: int, inv_freq: torch.Tensor):
        self.block_size, self.top_k, self.inv_freq = block_size, top_k, inv_freq
        self.window_offset = top_k * block_size         # the window's first position (after the k retrieval slots)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.last_selection: dict[int, torch.Tensor] = {}  # layer -> [rows, heads, Q, k'] (for inspection/tests)

    def blocks(self, layer: int) -> int:
        return 0 if layer not in self.keys else self.keys[layer].shape[2]

    def slot_positions(self, n_selected: int, device=None) -> torch.Tensor:
        """[n_selected, B] re-assigned positions of the selected blocks: right-aligned in the k slots before the
        window, i.e. slot s at (k - n_selected + s)·B + offset."""
        first = self.top_k - n_selected
        slots = torch.arange(first, self.top_k, device=device)[:, None] * self.block_size
        return slots + torch.arange(self.block_size, device=device)[None, :]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the complete blocks of a window: `keys` rotated at window positions window_offset + t are
        un-rotated first. A trailing incomplete block is only allowed at the very end of the input (dropped)."""
        B = self.block_size
        complete = keys.shape[2] // B * B
        if complete == 0:
            return
        positions = self.window_offset + torch.arange(complete, device=keys.device)
        keys = rotate(keys[:, :, :complete], -positions, self.inv_freq).unflatten(2, (-1, B))
        values = values[:, :, :complete].unflatten(2, (-1, B))
        if layer in self.keys:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        self.keys[layer], self.values[layer] = keys, values


def select_blocks(query: torch.Tensor, memory_keys: torch.Tensor, top_k: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Top-k memory blocks per query token and head by the landmark score q · R(B - 1)·k_landmark (every landmark at
    the same synthetic position), re-sorted by original block index. query [rows, H, Q, d] (rotated), memory_keys
    [rows, H, n, B, d] (un-rotated) -> [rows, H, Q, min(k, n)] block indices."""
    block_size = memory_keys.shape[-2]
    landmarks = rotate(memory_keys[..., -1, :], torch.tensor([block_size - 1], device=query.device), inv_freq)
    scores = query @ landmarks.transpose(-1, -2)                               # [rows, H, Q, n]
    chosen = scores.topk(min(top_k, scores.shape[-1]), dim=-1).indices
    return chosen.sort(dim=-1).values


def memory_attention(query, key, value, memory: LandmarkMemory, layer: int, scaling: float) -> torch.Tensor:
    """Landmark attention of one window with memory. query [rows, H, Q, d], key/value [rows, H, Q, d] (the window,
    rotated at window_offset + t, kv heads already repeated). Returns [rows, H, Q, d]."""
    window_logits = grouped_logits((query @ key.transpose(-1, -2)) * scaling, memory.block_size)
    n_blocks = memory.blocks(layer)
    if n_blocks == 0:
        return torch.softmax(window_logits, dim=-1) @ value
    groups = query.shape[1] // memory.keys[layer].shape[1]
    mem_keys = _repeat_kv(memory.keys[layer], groups)                           # [rows, H, n, B, d]
    mem_values = _repeat_kv(memory.values[layer], groups)
    chosen = select_blocks(query, mem_keys, memory.top_k, memory.inv_freq)      # [rows, H, Q, k']
    memory.last_selection[layer] = chosen
    rows = torch.arange(query.shape[0], device=query.device)[:, None, None, None]
    heads = torch.arange(query.shape[1], device=query.device)[None, :, None, None]
    picked_keys = mem_keys[rows, heads, chosen]                                 # [rows, H, Q, k', B, d]
    picked_values = mem_values[rows, heads, chosen]
    positions = memory.slot_positions(chosen.shape[-1], device=query.device)   # [k', B]
    picked_keys = rotate(picked_keys.flatten(-3, -2), positions.flatten(), memory.inv_freq).unflatten(-2,
                                                                                                   positions.shape)
    memory_logits = earlier_block_logits(torch.einsum("rhqd,rhqsbd->rhqsb", query, picked_keys) * scaling)
    weights = torch.softmax(torch.cat((memory_logits.flatten(-2), window_logits), dim=-1), dim=-1)
    n_memory = memory_logits.shape[-2] * memory_logits.shape[-1]
    memory_weights = weights[..., :n_memory].unflatten(-1, memory_logits.shape[-2:])
    return torch.einsum("rhqsb,rhqsbd->rhqd", memory_weights, picked_values) + weights[..., n_memory:] @ value


def landmark_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                               landmark_memory: LandmarkMemory | None = None, **kwargs):
    """The `AttentionInterface` function: q/k arrive rotated, [rows, heads, Q, d]. Without `landmark_memory` it is
    the single-pass grouped softmax (training; the sequence starts at a block boundary, no cache, no padding:
    causality comes from the block structure, the mask is not used). With it, one window of memory inference."""
    block_size = module.config.ctxext_attention["params"]["mem_freq"] + 1
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    if landmark_memory is None:
        probs = grouped_weights((query @ _repeat_kv(key, groups).transpose(-1, -2)) * scaling, block_size)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out = probs @ _repeat_kv(value, groups)
    else:
        out = memory_attention(query, _repeat_kv(key, groups), _repeat_kv(value, groups), landmark_memory,
                               module.layer_idx, scaling)
        landmark_memory.append(module.layer_idx, key, value)
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
        # LCEG: mem_freq 63 (block 64), top_k 5; the training context is the length the cell is fine-tuned at
        # (the base window in the paper's cell, train_len: base).
        return {"mem_freq": 63, "top_k": 5, "train_context": int(train_len)}

    def _validate(self, params: dict, base_window: int, train_len: int) -> dict:
        for name in ("mem_freq", "top_k", "train_context"):
            _positive_int(params, name)
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
        return record["params"], record["landmark_id"]

    def training_inputs(self, model, batch: torch.Tensor) -> dict:
        """Landmarks inserted; labels such that every regular token predicts the next regular token and the
        landmark positions are out of the loss (HF shifts labels by one: logits[p] is scored against labels[p+1])."""
        params, landmark_id = self._record(model)
        ids, regular = insert_landmarks(batch, params["mem_freq"], landmark_id)
        target = torch.full_like(ids, -100)
        target[:, regular[:-1]] = batch[:, 1:]
        labels = torch.cat((torch.full_like(target[:, :1], -100), target[:, :-1]), dim=1)
        return {"input_ids": ids, "labels": labels}

    @torch.no_grad()
    def logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, N, vocab without the landmark] at the regular tokens of `input_ids` [rows, N],
        computed window by window with memory carried across windows."""
        params, landmark_id = self._record(model)
        block, top_k = params["mem_freq"] + 1, params["top_k"]
        window = window_length(params["train_context"], block, top_k)
        ids, regular = insert_landmarks(input_ids, params["mem_freq"], landmark_id)
        inv_freq = getattr(model, "model", model).rotary_emb.inv_freq
        memory = LandmarkMemory(block, top_k, inv_freq)
        pieces = []
        for start in range(0, ids.shape[1], window):
            chunk = ids[:, start:start + window]
            positions = memory.window_offset + torch.arange(chunk.shape[1], device=ids.device)
            out = model(input_ids=chunk, position_ids=positions.expand(chunk.shape[0], -1), use_cache=False,
                        landmark_memory=memory)
            pieces.append(out.logits[..., :landmark_id])
        return torch.cat(pieces, dim=1)[:, regular]

    def single_pass_logits(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Like `logits` but in one forward pass without memory (the training-time computation)."""
        params, landmark_id = self._record(model)
        ids, regular = insert_landmarks(input_ids, params["mem_freq"], landmark_id)
        return model(input_ids=ids, use_cache=False).logits[:, regular, :landmark_id]


METHOD = LandmarkAttention()
