"""Landmark attention (methods/landmark.py): grouped softmax against a naive reference, retrieval, the official
code's memory positions (scoring and placement) against numbers from its index formulas, memory inference against
a single pass and against a naive model-level implementation of the official algorithm, both fine-tuning
objectives, cached greedy generation against full recomputation, answer logits, checkpoint reload."""
from __future__ import annotations

import math

import pytest
import torch

from methods import attention_of, get_method, restore
from methods.landmark import (LandmarkMemory, grouped_logits, grouped_weights, insert_landmarks, memory_attention,
                              rotate, scoring_positions, select_blocks, slot_starts, window_length)
from tests.helpers import tiny_llama


def slot_positions(chosen, n_blocks, block, window_offset):
    """The positions [..., k', B] of the chosen blocks' tokens: token j of a block at its slot's start + j."""
    return slot_starts(chosen, n_blocks, block, window_offset)[..., None] + torch.arange(block)


# --- a naive reference, written independently of the implementation -------------------------------------------
def naive_grouped_weights(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """docs/methods.md §7(a), query by query: top-level softmax over the own block's regular keys up to the query and
    the landmarks of earlier blocks; an earlier block's landmark probability split by a softmax over its regular
    keys; zero weight on landmarks."""
    q_len = scores.shape[-1]
    weights = torch.zeros_like(scores)
    for q in range(q_len):
        own = q // block_size
        direct = [j for j in range(own * block_size, q + 1) if j % block_size != block_size - 1]
        gates = [g * block_size + block_size - 1 for g in range(own)]
        top = torch.softmax(scores[q, direct + gates], dim=0)
        for j, p in zip(direct, top[:len(direct)]):
            weights[q, j] = p
        for g, p in enumerate(top[len(direct):]):
            members = list(range(g * block_size, g * block_size + block_size - 1))
            weights[q, members] = p * torch.softmax(scores[q, members], dim=0)
    return weights


@pytest.mark.parametrize("q_len,block", [(12, 4), (13, 4), (9, 3), (5, 8)])
def test_grouped_softmax_matches_naive_reference(q_len, block):
    torch.manual_seed(q_len)
    scores = torch.randn(q_len, q_len) * 3
    got = grouped_weights(scores, block)
    want = naive_grouped_weights(scores, block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(q_len))                    # weights sum to 1
    landmarks = [j for j in range(q_len) if j % block == block - 1]
    assert got[:, landmarks].abs().sum() == 0                                      # landmarks: zero weight
    assert torch.triu(got, diagonal=1).abs().max() == 0                            # causal


def test_grouped_softmax_is_not_plain_softmax():
    scores = torch.randn(8, 8)
    plain = torch.softmax(scores.masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")), dim=-1)
    assert not torch.allclose(grouped_weights(scores, 4), plain)


def test_grouped_logits_of_the_last_queries_equal_those_rows_of_the_full_pass():
    torch.manual_seed(5)
    scores = torch.randn(2, 11, 11)
    full = grouped_logits(scores, 4)
    for q_len in (1, 2, 5, 11):          # a cached step: the newest q_len queries against every key of the window
        torch.testing.assert_close(grouped_logits(scores[:, -q_len:], 4), full[:, -q_len:])


# --- the official code's memory positions -------------------------------------------------------------------------
def official_positions(n_blocks, top_k, block, full_len, chosen):
    """llama_mem.py's index formulas in absolute positions (the memory holds the n_blocks complete blocks before
    `full_len`, the current window starts there): (landmark scoring positions [n], placement [k', B] of the sorted
    `chosen` blocks)."""
    k = min(top_k, n_blocks)
    prefix_len = full_len - (k + 1) * block
    mem_indices = [0] * (n_blocks - k) + list(range(1, k + 1))
    scoring = [i * block + (block - 1) + prefix_len for i in mem_indices]
    placement = [[s * block + (block if c >= n_blocks - k else 0) + j + prefix_len for j in range(block)]
                 for s, c in enumerate(chosen)]
    return scoring, placement


def test_memory_positions_of_the_issue_example():
    # k = 2, B = 4, five memory blocks, the window at (k + 1)·B = 12: blocks 0-2 are scored at distance 9 + t,
    # block 3 at 5 + t, block 4 at 1 + t from the window's token t (its true distance for the two most recent)
    memory = LandmarkMemory(4, 2, torch.ones(2), window=8)
    assert memory.window_offset == 12
    assert (memory.window_offset - scoring_positions(5, 2, 4, 12)).tolist() == [9, 9, 9, 5, 1]
    # placement: 3 slots [0, 12); a chosen block among the two most recent moves one slot to the right
    cases = {(0, 1): [0, 4], (0, 3): [0, 8], (1, 4): [0, 8], (3, 4): [4, 8], (2, 3): [0, 8], (0, 2): [0, 4]}
    for chosen, starts in cases.items():
        got = slot_positions(torch.tensor(chosen), 5, 4, 12)
        assert got.tolist() == [list(range(a, a + 4)) for a in starts], chosen
    # the two most recent blocks, when both are chosen, sit at their true places: block b of 5 at 12 - (5 - b)·4
    assert slot_positions(torch.tensor([3, 4]), 5, 4, 12)[:, 0].tolist() == [12 - 2 * 4, 12 - 1 * 4]


@pytest.mark.parametrize("n_blocks,top_k,block", [(5, 2, 4), (9, 3, 4), (12, 5, 64), (6, 1, 8), (3, 5, 4),
                                                  (5, 5, 4), (1, 2, 4), (6, 5, 7)])
def test_memory_positions_match_the_official_index_formulas(n_blocks, top_k, block):
    """Relative distances to the window's tokens: ctxext (window at (k + 1)·B) against llama_mem.py (absolute
    positions, the window at full_len = n·B)."""
    window_offset, full_len = (top_k + 1) * block, n_blocks * block
    k = min(top_k, n_blocks)
    choices = [tuple(sorted(torch.randperm(n_blocks, generator=torch.Generator().manual_seed(i))[:k].tolist()))
               for i in range(6)] + [tuple(range(k)), tuple(range(n_blocks - k, n_blocks))]
    for chosen in choices:
        scoring, placement = official_positions(n_blocks, top_k, block, full_len, chosen)
        ours_scoring = scoring_positions(n_blocks, top_k, block, window_offset)
        assert (window_offset - ours_scoring).tolist() == [full_len - p for p in scoring]
        ours = slot_positions(torch.tensor(chosen), n_blocks, block, window_offset)
        assert (window_offset - ours).tolist() == [[full_len - p for p in row] for row in placement]
        assert ours.min() >= 0 and ours.max() < window_offset
    if n_blocks <= top_k:   # every block at its true place, for scoring and placement
        true = [full_len - (b * block + block - 1) for b in range(n_blocks)]
        assert (window_offset - scoring_positions(n_blocks, top_k, block, window_offset)).tolist() == true


# --- memory attention on synthetic tensors ----------------------------------------------------------------------
def _random_memory(rows, heads, n_blocks, block, dim, top_k, seed=0):
    torch.manual_seed(seed)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    memory = LandmarkMemory(block, top_k, inv_freq, window=4 * block)
    memory.keys[0] = torch.randn(rows, heads, n_blocks, block, dim)
    memory.values[0] = torch.randn(rows, heads, n_blocks, block, dim)
    return memory, inv_freq


def _rotated_window(memory, rows, heads, q_len, dim, inv_freq, seed=1):
    torch.manual_seed(seed)
    positions = memory.window_offset + torch.arange(q_len)
    q, k, v = (torch.randn(rows, heads, q_len, dim) for _ in range(3))
    return rotate(q, positions, inv_freq), rotate(k, positions, inv_freq), v


def test_memory_attention_equals_full_grouped_attention_when_k_covers_every_block():
    rows, heads, block, dim, n_blocks, q_len = 2, 3, 4, 8, 3, 10
    memory, inv_freq = _random_memory(rows, heads, n_blocks, block, dim, top_k=5)
    q, k, v = _rotated_window(memory, rows, heads, q_len, dim, inv_freq)
    got = memory_attention(q, k, v, memory, layer=0, scaling=0.3)
    # full single-pass grouped attention over [memory blocks at their true places, window]
    mem_len = n_blocks * block
    first = memory.window_offset - mem_len
    block_starts = first + block * torch.arange(n_blocks)[:, None]            # the memory's keys are block-relative
    mem_keys = rotate(memory.keys[0], block_starts, inv_freq).flatten(2, 3)
    keys = torch.cat((mem_keys, k), dim=2)
    values = torch.cat((memory.values[0].flatten(2, 3), v), dim=2)
    queries = torch.cat((torch.zeros(rows, heads, mem_len, dim), q), dim=2)
    full = grouped_weights(queries @ keys.transpose(-1, -2) * 0.3, block) @ values
    torch.testing.assert_close(got, full[:, :, mem_len:], rtol=1e-4, atol=1e-5)
    # the newest 3 queries of the same window (a cached step) give the same rows
    torch.testing.assert_close(memory_attention(q[:, :, -3:], k, v, memory, layer=0, scaling=0.3), got[:, :, -3:],
                               rtol=1e-5, atol=1e-6)


def test_retrieval_attends_the_block_whose_landmark_scores_highest():
    rows, heads, block, dim, n_blocks, q_len, top_k = 1, 2, 4, 8, 6, 5, 1
    memory, inv_freq = _random_memory(rows, heads, n_blocks, block, dim, top_k=top_k)
    q, k, v = _rotated_window(memory, rows, heads, q_len, dim, inv_freq)
    # llama_mem.py's scoring positions for k = 1 (window at 2B = 8): block 5 at its true landmark position
    # 8 - B + B - 1 = 7, blocks 0-4 all at the position one block further, 3
    positions = scoring_positions(n_blocks, top_k, block, memory.window_offset)
    assert positions.tolist() == [3] * 5 + [7]
    # a planted block per head: its landmark key aligns with the head's first query at its scoring position
    target = [4, 1]
    for h, g in enumerate(target):
        direction = rotate(q[0, h, :1], -(positions[g:g + 1] - (block - 1)), inv_freq)[0]   # block-relative key
        memory.keys[0][0, h, g, -1] = 50 * direction / direction.norm()
    chosen = select_blocks(q, memory.keys[0], 1, inv_freq, positions)
    assert chosen.shape == (rows, heads, q_len, 1)
    for h, g in enumerate(target):
        assert chosen[0, h, 0, 0] == g
    # per token and head: the block whose landmark (at its scoring position) scores highest
    for h in range(heads):
        for t in range(q_len):
            scores = [float(q[0, h, t] @ rotate(memory.keys[0][0, h, g, -1:], positions[g:g + 1] - (block - 1),
                                                inv_freq)[0])
                      for g in range(n_blocks)]
            assert chosen[0, h, t, 0] == max(range(n_blocks), key=scores.__getitem__)
    # with values one-hot per block, the output shows which memory block was attended: the chosen one only
    memory.values[0] = torch.zeros(rows, heads, n_blocks, block, dim)
    for g in range(n_blocks):
        memory.values[0][:, :, g, :, g] = 1.0
    out = memory_attention(q, k, torch.zeros_like(v), memory, layer=0, scaling=1.0)
    for h in range(heads):
        for t in range(q_len):
            g = int(chosen[0, h, t, 0])
            assert out[0, h, t, g] > 0
            assert out[0, h, t, [b for b in range(n_blocks) if b != g]].abs().sum() == 0
    # k = 3: three blocks per token and head, sorted by original index
    positions3 = scoring_positions(n_blocks, 3, block, (3 + 1) * block)
    chosen3 = select_blocks(q, memory.keys[0], 3, inv_freq, positions3)
    assert chosen3.shape == (rows, heads, q_len, 3) and (chosen3.diff(dim=-1) > 0).all()


def test_exact_ties_go_to_the_more_recent_block():
    # layer 0: every landmark key is the same vector, so the older blocks, scored at one position, tie exactly. Small
    # integers and inv_freq 0 (no rotation) keep every score exact, so the ties are exact whatever the matmul does.
    gen = torch.Generator().manual_seed(2)
    dim, n_blocks, block, top_k = 8, 7, 4, 2
    keys = torch.randint(-2, 3, (1, 1, n_blocks, block, dim), generator=gen).float()
    keys[..., :5, -1, :] = torch.randint(-2, 3, (dim,), generator=gen).float()   # blocks 0-4: one landmark key
    q = torch.randint(-2, 3, (1, 1, 40, dim), generator=gen).float()
    positions = scoring_positions(n_blocks, top_k, block, (top_k + 1) * block)
    chosen = select_blocks(q, keys, top_k, torch.zeros(dim // 2), positions)
    tied = 0
    for t in range(40):
        scores = [int(q[0, 0, t].long() @ keys[0, 0, b, -1].long()) for b in range(n_blocks)]
        want = sorted(sorted(range(n_blocks), key=lambda b: (-scores[b], -b))[:top_k])
        assert chosen[0, 0, t].tolist() == want
        tied += scores[4] > sorted(scores[5:])[0]        # the tied older blocks reach the top k
    assert tied >= 5
    # every block tied: the k most recent
    assert select_blocks(q, torch.zeros(1, 1, n_blocks, block, dim), top_k, torch.zeros(dim // 2),
                         positions)[0, 0].unique(dim=0).tolist() == [[5, 6]]


@pytest.mark.parametrize("train_context,block,top_k", [(512, 64, 5), (256, 32, 5), (64, 8, 3), (100, 7, 4),
                                                       (40, 4, 6)])
def test_reassigned_positions_stay_within_the_training_context(train_context, block, top_k):
    window = window_length(train_context, block, top_k)
    assert window > 0 and window % block == 0
    memory = LandmarkMemory(block, top_k, torch.ones(2), window)
    queries = memory.window_offset + torch.arange(window)
    assert queries.max() == train_context - train_context % block - 1       # LCEG: (k + 1)·B + W = T
    for n_blocks in range(1, 3 * top_k):
        k = min(top_k, n_blocks)
        for chosen in (torch.arange(k), torch.arange(n_blocks - k, n_blocks)):
            slots = slot_positions(chosen, n_blocks, block, memory.window_offset)
            assert slots.min() >= 0 and slots.max() < memory.window_offset   # before the window
            assert len(set(slots.flatten().tolist())) == k * block
            assert queries.max() - slots.min() <= train_context - 1
        scored = scoring_positions(n_blocks, top_k, block, memory.window_offset)
        assert scored.min() >= 0 and queries.max() - scored.min() <= train_context - 1
    assert window_length(512, 64, 5) == 128  # LCEG


def test_rotate_inverse_and_relative():
    torch.manual_seed(0)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    pos = torch.arange(5) * 7
    torch.testing.assert_close(rotate(rotate(x, pos, inv_freq), -pos, inv_freq), x)
    a = (rotate(x, pos + 3, inv_freq) * rotate(y, pos, inv_freq)).sum(-1)
    b = (rotate(x, pos + 103, inv_freq) * rotate(y, pos + 100, inv_freq)).sum(-1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # positions broadcast against x.shape[:-1]: one position per element
    grid = torch.tensor([[0, 3, 9], [2, 2, 5]])
    many = torch.randn(2, 3, 8)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(rotate(many, grid, inv_freq)[i, j], rotate(many[i, j:j + 1], grid[i, j:j + 1],
                                                                                 inv_freq)[0])


# --- on a model --------------------------------------------------------------------------------------------------
def _model(heads=4, kv_heads=2, vocab=40, tie=True, seed=0, layers=2, **config):
    return tiny_llama(seed, vocab=vocab, hidden=32, intermediate=48, layers=layers, heads=heads, kv_heads=kv_heads,
                      window=40, tie_word_embeddings=tie, attn_implementation="sdpa", **config)


# B = 4, k = 6, T = 40: windows of 12 tokens, and after two windows the memory (6 blocks) is still <= k
PARAMS = {"mem_freq": 3, "top_k": 6, "train_context": 40}


def _landmark_model(in_loss=True, params=PARAMS, zero_landmark=False, **kw):
    model = get_method("landmark").apply(_model(**kw), 40, 40, "finetuned", **params, landmark_in_loss=in_loss)
    if zero_landmark:   # its layer-0 keys are then exactly 0: the ties of layer 0 are exact (see _official_logits)
        with torch.no_grad():
            model.get_input_embeddings().weight[model.config.ctxext_attention["landmark_id"]] = 0.0
    return model


def test_insert_landmarks():
    ids = torch.arange(10)[None] + 100
    out, regular = insert_landmarks(ids, 3, 7)
    assert out.tolist() == [[100, 101, 102, 7, 103, 104, 105, 7, 106, 107, 108, 7, 109]]
    assert out[0, regular].tolist() == ids[0].tolist()


def test_apply_adds_mean_initialised_landmark_row_and_records_it():
    model = _model(tie=False)
    mean_in = model.get_input_embeddings().weight.detach().mean(0).clone()
    mean_out = model.get_output_embeddings().weight.detach().mean(0).clone()
    get_method("landmark").apply(model, 40, 40, "finetuned", **PARAMS)
    record = model.config.ctxext_attention
    assert record["landmark_id"] == 40 and model.config.vocab_size == 41
    assert record["params"] == {**PARAMS, "landmark_in_loss": True}     # LCEG's objective by default
    torch.testing.assert_close(model.get_input_embeddings().weight[40].detach(), mean_in)
    torch.testing.assert_close(model.get_output_embeddings().weight[40].detach(), mean_out)
    assert attention_of(model).name == "landmark"


@pytest.mark.parametrize("tie,in_loss", [(True, True), (False, True), (True, False)])
def test_memory_inference_equals_single_pass_on_short_inputs(tie, in_loss):
    model = _landmark_model(in_loss, tie=tie)
    method = attention_of(model)
    torch.manual_seed(3)
    ids = torch.randint(0, 40, (2, 26))         # 26 regular + 8 landmarks = 34 tokens: windows of 12, 12, 10
    with torch.no_grad():
        single = method.single_pass_logits(model, ids)
        full = model(input_ids=insert_landmarks(ids, 3, 40)[0]).logits[..., :40]
    memory = method.logits(model, ids)
    assert memory.shape == (2, 26, 40)            # regular positions only, landmark column dropped
    torch.testing.assert_close(memory, single, rtol=1e-4, atol=1e-4)
    # which output predicts the next regular token: the regular token's own, or (LCEG's objective) the landmark's
    # after a block's last regular token; regular token i sits at i + i // 3
    for i in range(26):
        source = i + i // 3 + (1 if in_loss and i % 3 == 2 else 0)
        torch.testing.assert_close(memory[:, i], full[:, source], rtol=1e-4, atol=1e-4)
    # the perplexity of both computations
    loss = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:])
    assert math.isclose(loss(memory).item(), loss(single).item(), rel_tol=1e-5)


def test_memory_inference_on_long_inputs_retrieves_within_the_training_context():
    model = _landmark_model()
    torch.manual_seed(4)
    ids = torch.randint(0, 40, (1, 90))           # 90 + 30 landmarks: 10 windows, memory up to 27 blocks > k
    logits = attention_of(model).logits(model, ids)
    assert logits.shape == (1, 90, 40) and torch.isfinite(logits).all()
    with torch.no_grad():
        single = attention_of(model).single_pass_logits(model, ids)
    assert not torch.allclose(logits[:, -10:], single[:, -10:], atol=1e-3)  # retrieval, not full attention


# --- against a naive model-level implementation of the official algorithm -----------------------------------------
def _official_logits(model, tokens, block, top_k, train_context):
    """llama_mem.py's inference with memory, written naively (float64, token by token and head by head) from the
    model's weights: the input (landmarks inserted) in windows of T - (T mod B) - (k + 1)·B, absolute positions
    (RoPE base 10000 as tiny_llama), every past key kept un-rotated, memory = the complete blocks before the window.
    Scoring: the k' = min(k, n) most recent landmarks at their true positions, older ones at prefix + B - 1
    (prefix = full_len - (k' + 1)·B); top k' per token and head (the official code leaves exact ties to torch.topk;
    here, as in ctxext, the more recent block wins); placement of the sorted choice in slot s at prefix + s·B + j,
    + B for the k' most recent. Grouped softmax over the retrieved blocks, the window's earlier blocks (gated by
    their landmarks) and the own block's regular tokens up to the query. Returns logits [M, vocab]."""
    cfg = model.config
    weights = {name: p.detach().double() for name, p in model.named_parameters()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    window = train_context - train_context % block - (top_k + 1) * block

    def rot(x, position):
        angles = torch.cat((position * inv_freq, position * inv_freq))
        return x * angles.cos() + torch.cat((-x[dim // 2:], x[:dim // 2])) * angles.sin()

    def norm(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def softmax(scores):
        return torch.softmax(torch.stack(scores), dim=0)

    tokens = tokens.tolist()
    hidden = weights["model.embed_tokens.weight"][tokens]
    past_keys = [[] for _ in range(cfg.num_hidden_layers)]      # per layer: un-rotated [kv_heads, d] per token
    past_values = [[] for _ in range(cfg.num_hidden_layers)]
    for start in range(0, len(tokens), window):
        x = hidden[start:start + window]
        for layer in range(cfg.num_hidden_layers):
            w = lambda name: weights[f"model.layers.{layer}.{name}.weight"]
            a = norm(x, w("input_layernorm"))
            q = (a @ w("self_attn.q_proj").T).view(len(x), heads, dim)
            k = (a @ w("self_attn.k_proj").T).view(len(x), kv_heads, dim)
            v = (a @ w("self_attn.v_proj").T).view(len(x), kv_heads, dim)
            keys, values = past_keys[layer] + list(k), past_values[layer] + list(v)   # absolute index -> vector
            n_blocks = start // block
            out = torch.zeros(len(x), heads, dim, dtype=torch.float64)
            for i in range(len(x)):
                p = start + i
                for h in range(heads):
                    g = h // (heads // kv_heads)
                    qp = rot(q[i, h], p)
                    score = lambda j, pos: qp @ rot(keys[j][g], pos) / math.sqrt(dim)
                    direct, groups = [], []        # (score, value); (regular scores, landmark score, values)
                    if n_blocks:
                        recent = min(top_k, n_blocks)
                        prefix = start - (recent + 1) * block
                        index = lambda b: 0 if b < n_blocks - recent else b - (n_blocks - recent) + 1
                        landmark = [float(score(b * block + block - 1, prefix + index(b) * block + block - 1))
                                    for b in range(n_blocks)]
                        chosen = sorted(sorted(range(n_blocks), key=lambda b: (-landmark[b], -b))[:recent])
                        for s, b in enumerate(chosen):
                            first = prefix + s * block + (block if b >= n_blocks - recent else 0)
                            sc = [score(b * block + j, first + j) for j in range(block)]
                            groups.append((sc[:-1], sc[-1], [values[b * block + j][g] for j in range(block - 1)]))
                    for c in range(start // block, p // block):                # the window's earlier blocks
                        sc = [score(c * block + j, c * block + j) for j in range(block)]
                        groups.append((sc[:-1], sc[-1], [values[c * block + j][g] for j in range(block - 1)]))
                    for j in range(p // block * block, p + 1):                  # own block, regular keys
                        if j % block != block - 1:
                            direct.append((score(j, j), values[j][g]))
                    top = softmax([s for s, _ in direct] + [gate for _, gate, _ in groups])
                    result = sum(pr * val for pr, (_, val) in zip(top, direct))
                    for pr, (regular, _, vals) in zip(top[len(direct):], groups):
                        result = result + pr * sum(r * val for r, val in zip(softmax(regular), vals))
                    out[i, h] = result
            x = x + out.view(len(x), -1) @ w("self_attn.o_proj").T
            m = norm(x, w("post_attention_layernorm"))
            gate, up = m @ w("mlp.gate_proj").T, m @ w("mlp.up_proj").T
            x = x + (torch.nn.functional.silu(gate) * up) @ w("mlp.down_proj").T
            past_keys[layer] += list(k)
            past_values[layer] += list(v)
        hidden[start:start + window] = norm(x, weights["model.norm.weight"])
    head = weights["lm_head.weight"] if "lm_head.weight" in weights else weights["model.embed_tokens.weight"]
    return hidden @ head.T


@pytest.mark.parametrize("case", ["k+1 blocks, no ties", "many blocks, exact layer-0 ties"])
def test_memory_inference_equals_a_naive_implementation_of_the_official_algorithm(case):
    if case == "k+1 blocks, no ties":
        # k = 3, B = 4, T = 24: windows of 8; the third window sees k + 1 = 4 memory blocks: a single older block,
        # so no two landmark scores can tie (the landmark as apply() initialises it)
        params, n, layers, zero = {"mem_freq": 3, "top_k": 3, "train_context": 24}, 18, 2, False
    else:
        # k = 2, B = 4, T = 24: windows of 12 (3 blocks); up to 18 memory blocks. At layer 0 every landmark key is the
        # same, so the older blocks tie; a zero landmark row makes those keys exactly 0 in every forward (no rounding
        # difference between forwards of different lengths), and the tie rule decides, as in the reference
        params, n, layers, zero = {"mem_freq": 3, "top_k": 2, "train_context": 24}, 60, 3, True
    for in_loss in (True, False):
        model = _landmark_model(in_loss, params, zero_landmark=zero, layers=layers, seed=7, tie=False,
                                initializer_range=0.2)   # peaked attention: retrieval decides
        torch.manual_seed(11)
        ids = torch.randint(0, 40, (1, n))
        got = attention_of(model).logits(model, ids)
        tokens, _ = insert_landmarks(ids, 3, 40)
        want = _official_logits(model, tokens[0], 4, params["top_k"], 24)
        sources = [i + i // 3 + (1 if in_loss and i % 3 == 2 else 0) for i in range(n)]
        torch.testing.assert_close(got[0].double(), want[sources, :40], rtol=1e-4, atol=1e-4)


# --- objectives ---------------------------------------------------------------------------------------------------
def test_training_inputs_with_the_landmarks_in_the_loss():
    model = _landmark_model(True)
    batch = torch.randint(0, 40, (2, 10))
    inputs = attention_of(model).training_inputs(model, {"input_ids": batch, "labels": batch})
    ids, labels = inputs["input_ids"], inputs["labels"]
    assert ids.shape == (2, 13) and torch.equal(labels, ids)       # LCEG: labels = the inserted sequence
    loss = model(**inputs).loss
    with torch.no_grad():    # every position predicts the next token of the inserted sequence, landmarks included
        logits = model(input_ids=ids).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:])
    assert math.isclose(loss.item(), manual.item(), rel_tol=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad[40].abs().sum() > 0
    # a row of 9 = 3·3 tokens ends with a landmark, which LCEG's rows never have: no target there
    labels = attention_of(model).training_inputs(model, {"input_ids": batch[:, :9], "labels": batch[:, :9]})["labels"]
    assert labels.shape == (2, 12) and (labels[:, -1] == -100).all() and (labels[:, :-1] != -100).all()


def test_training_inputs_with_the_landmarks_out_of_the_loss():
    model = _landmark_model(False)
    batch = torch.randint(0, 40, (2, 10))
    inputs = attention_of(model).training_inputs(model, {"input_ids": batch, "labels": batch})
    ids, labels = inputs["input_ids"], inputs["labels"]
    assert ids.shape == (2, 13)
    # HF scores logits[p] against labels[p + 1]: every regular token predicts the next regular token
    _, regular = insert_landmarks(batch, 3, 40)
    for i in range(9):
        assert labels[:, regular[i] + 1].tolist() == batch[:, i + 1].tolist()
    assert (labels != -100).sum() == 2 * 9 and (labels == 40).sum() == 0
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad[40].abs().sum() > 0


@pytest.mark.parametrize("in_loss", [True, False])
def test_masked_labels_and_loss_weights_follow_their_tokens(in_loss):
    """Synthetic rows score only their answers (labels -100 elsewhere) and carry loss weights: after the landmarks
    are inserted, each scored target is the same token with the same weight; a landmark is scored only after a
    scored token (landmark_in_loss), and the weights keep their sum."""
    model = _landmark_model(in_loss)
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :6] = -100
    weights = torch.where(labels == -100, 0.0, torch.rand(2, 10, generator=torch.Generator().manual_seed(3)))
    weights[:, 0] = 0
    weights /= weights.sum()
    out = attention_of(model).training_inputs(model, {"input_ids": ids, "labels": labels, "loss_weights": weights})
    new_ids, new_labels, new_weights = out["input_ids"], out["labels"], out["loss_weights"]
    _, regular = insert_landmarks(ids, 3, 40)
    assert new_weights.sum().item() == pytest.approx(1.0)
    # the target after (new) position p is new_labels[p + 1]; the regular token i + 1 must keep its label and weight
    for i in range(9):
        nxt = regular[i + 1] if in_loss else regular[i] + 1
        assert new_labels[:, nxt].tolist() == labels[:, i + 1].tolist()
        ratio = new_weights[:, nxt] / weights[:, i + 1].clamp(min=1e-12)
        assert torch.allclose(ratio[labels[:, i + 1] != -100], ratio[labels[:, i + 1] != -100][0])
    landmarks = [p for p in range(new_ids.shape[1]) if p not in set(regular.tolist())]
    for p in landmarks:
        if in_loss and p < new_ids.shape[1] - 1:
            assert ((new_labels[:, p] == 40) == (new_labels[:, p - 1] != -100)).all()
        else:
            assert (new_labels[:, p] != 40).all()


# --- generation and answer logits ---------------------------------------------------------------------------------
GEN_PARAMS = {"mem_freq": 3, "top_k": 2, "train_context": 24}   # B = 4, windows of 12 tokens = 9 regular


@pytest.mark.parametrize("in_loss", [True, False])
def test_cached_greedy_generation_equals_full_recomputation(in_loss):
    model = _landmark_model(in_loss, GEN_PARAMS, zero_landmark=True, layers=3, seed=3, tie=False,
                            initializer_range=0.2)
    method = attention_of(model)
    torch.manual_seed(6)
    # 39 regular tokens + 13 landmarks = 52: four full windows (12 memory blocks > k) and an open one of 4 tokens;
    # 23 new tokens: the prompt ends with a landmark (39 = 13·3), 7 more are fed, and the window boundaries at 60 and
    # 72 are crossed (windows 4 -> 5 -> 6)
    prompt = torch.randint(0, 40, (2, 39))
    got = method.greedy_generate(model, prompt, 23)
    seq = prompt
    for _ in range(23):                          # full recomputation: windowed inference of the whole sequence
        seq = torch.cat((seq, method.logits(model, seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert got.shape == (2, 23) and got.dtype == torch.long
    assert got.tolist() == seq[:, 39:].tolist()
    assert min(len(set(row)) for row in got.tolist()) > 5     # not a degenerate constant continuation
    # stopping: called after every step; the end comes when every row has stopped; a stopped row's later positions
    # hold pad_id, or its last token
    calls = []
    stop = lambda g: calls.append(g.shape[1]) or torch.tensor([g.shape[1] >= 4, g.shape[1] >= 6])
    stopped = method.greedy_generate(model, prompt, 23, stop=stop)
    assert calls == [1, 2, 3, 4, 5, 6]
    assert stopped.tolist() == [got[0, :4].tolist() + [int(got[0, 3])] * 19, got[1, :6].tolist() + [int(got[1, 5])] * 17]
    padded = method.greedy_generate(model, prompt, 23, stop=stop, pad_id=-1)
    assert padded.tolist() == [got[0, :4].tolist() + [-1] * 19, got[1, :6].tolist() + [-1] * 17]
    assert method.greedy_generate(model, prompt, 0).shape == (2, 0)


def test_answer_logits_equal_logits_at_those_positions_and_run_the_output_layer_there_only():
    model = _landmark_model(True, GEN_PARAMS, layers=2)
    method = attention_of(model)
    torch.manual_seed(8)
    ids = torch.randint(0, 40, (2, 50))
    positions = torch.tensor([[49, 2, 30, 8], [0, 44, 45, 47]])   # 2, 8, 44 and 47 are the last of their blocks
    full = method.logits(model, ids)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        got = method.answer_logits(model, ids, positions)
    finally:
        hook.remove()
    assert got.shape == (2, 4, 40) and got.dtype == torch.float32 and seen == [torch.Size([2, 4, 32])]
    torch.testing.assert_close(got, full[torch.arange(2)[:, None], positions], rtol=1e-5, atol=1e-6)
    for bad in (torch.tensor([[50]]).expand(2, 1), torch.tensor([[-1]]).expand(2, 1), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="positions"):
            method.answer_logits(model, ids, bad)


# --- checkpoints and parameters -----------------------------------------------------------------------------------
def test_checkpoint_reload_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _landmark_model(tie=False)
    ids = torch.randint(0, 40, (1, 50))
    before = attention_of(model).logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = restore(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval())
    assert loaded.config.ctxext_attention == model.config.ctxext_attention
    torch.testing.assert_close(attention_of(loaded).logits(loaded, ids), before)


def test_checkpoints_from_before_the_switch_read_as_landmarks_out_of_the_loss():
    model = _landmark_model(False)
    ids = torch.randint(0, 40, (1, 20))
    want = attention_of(model).logits(model, ids)
    del model.config.ctxext_attention["params"]["landmark_in_loss"]
    torch.testing.assert_close(attention_of(model).logits(model, ids), want)


def test_bad_parameters_fail_clearly():
    method = get_method("landmark")
    with pytest.raises(ValueError, match="mem_freq"):
        method.resolve(256, 256, "finetuned", mem_freq=0)
    with pytest.raises(ValueError, match="top_k"):
        method.resolve(256, 256, "finetuned", top_k=2.5)
    with pytest.raises(ValueError, match="landmark_in_loss"):
        method.resolve(256, 256, "finetuned", mem_freq=31, landmark_in_loss=1)
    with pytest.raises(ValueError, match="mem_freq=63"):
        method.resolve(256, 256, "finetuned")        # (5 + 2) blocks of 64 do not fit a 256 context
    with pytest.raises(ValueError, match="regime"):
        method.resolve(256, 256, "frozen", mem_freq=31)
    with pytest.raises(ValueError, match="unknown parameter"):
        method.resolve(256, 256, "finetuned", mem_freq=31, block=3)
    assert method.resolve(256, 256, "finetuned", mem_freq=31) == {"mem_freq": 31, "top_k": 5, "train_context": 256,
                                                                  "landmark_in_loss": True}
    assert method.resolve(256, 256, "finetuned", mem_freq=31, landmark_in_loss=False)["landmark_in_loss"] is False
    with pytest.raises(ValueError, match="max_new_tokens"):
        method.greedy_generate(_landmark_model(), torch.zeros(1, 3, dtype=torch.long), -1)
