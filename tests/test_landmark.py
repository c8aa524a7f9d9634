"""Landmark attention (methods/landmark.py): grouped softmax against a naive reference, retrieval, position
re-assignment, memory inference against a single pass, fine-tuning inputs, checkpoint reload."""
from __future__ import annotations

import math

import pytest
import torch

from methods import attention_of, get_method, restore
from methods.landmark import (LandmarkMemory, grouped_weights, insert_landmarks, memory_attention, rotate,
                              select_blocks, window_length)
from tests.helpers import tiny_llama


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


# --- memory attention on synthetic tensors ----------------------------------------------------------------------
def _random_memory(rows, heads, n_blocks, block, dim, top_k, seed=0):
    torch.manual_seed(seed)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    memory = LandmarkMemory(block, top_k, inv_freq)
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
    mem_keys = rotate(memory.keys[0].flatten(2, 3), first + torch.arange(mem_len), inv_freq)
    keys = torch.cat((mem_keys, k), dim=2)
    values = torch.cat((memory.values[0].flatten(2, 3), v), dim=2)
    queries = torch.cat((torch.zeros(rows, heads, mem_len, dim), q), dim=2)
    full = grouped_weights(queries @ keys.transpose(-1, -2) * 0.3, block) @ values
    torch.testing.assert_close(got, full[:, :, mem_len:], rtol=1e-4, atol=1e-5)


def test_retrieval_attends_the_block_whose_landmark_scores_highest():
    rows, heads, block, dim, n_blocks, q_len = 1, 2, 4, 8, 6, 5
    memory, inv_freq = _random_memory(rows, heads, n_blocks, block, dim, top_k=1)
    q, k, v = _rotated_window(memory, rows, heads, q_len, dim, inv_freq)
    # a planted block per head: its landmark key aligns with the head's first query
    target = [4, 1]
    for h, g in enumerate(target):
        direction = rotate(q[0, h, :1], torch.tensor([-(block - 1)]), inv_freq)[0]
        memory.keys[0][0, h, g, -1] = 50 * direction / direction.norm()
    chosen = select_blocks(q, memory.keys[0], 1, inv_freq)
    assert chosen.shape == (rows, heads, q_len, 1)
    for h, g in enumerate(target):
        assert chosen[0, h, 0, 0] == g
    # per token and head: the block whose landmark (at the common synthetic position B - 1) scores highest
    for h in range(heads):
        for t in range(q_len):
            scores = [float(q[0, h, t] @ rotate(memory.keys[0][0, h, g, -1:], torch.tensor([block - 1]),
                                                 inv_freq)[0]) for g in range(n_blocks)]
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
    memory.top_k = 3
    chosen3 = select_blocks(q, memory.keys[0], 3, inv_freq)
    assert chosen3.shape == (rows, heads, q_len, 3) and (chosen3.diff(dim=-1) > 0).all()
    assert (chosen3 == chosen).any(-1).all()


@pytest.mark.parametrize("train_context,block,top_k", [(512, 64, 5), (256, 32, 5), (64, 8, 3), (100, 7, 4),
                                                       (40, 4, 6)])
def test_reassigned_positions_stay_within_the_training_context(train_context, block, top_k):
    window = window_length(train_context, block, top_k)
    assert window > 0 and window % block == 0
    memory = LandmarkMemory(block, top_k, torch.ones(2))
    queries = memory.window_offset + torch.arange(window)
    for n_selected in range(1, top_k + 1):
        slots = memory.slot_positions(n_selected)
        assert slots.min() >= 0 and slots.max() + 1 == memory.window_offset   # contiguous, just before the window
        assert len(set(slots.flatten().tolist())) == n_selected * block
        assert queries.max() - slots.min() <= train_context - 1
    assert queries.max() - queries.min() <= train_context - 1
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


# --- on a model --------------------------------------------------------------------------------------------------
def _model(heads=4, kv_heads=2, vocab=40, tie=True, seed=0):
    return tiny_llama(seed, vocab=vocab, hidden=32, intermediate=48, heads=heads, kv_heads=kv_heads, window=40,
                      tie_word_embeddings=tie, attn_implementation="sdpa")


# B = 4, k = 6, T = 40: windows of 12 tokens, and after two windows the memory (6 blocks) is still <= k
PARAMS = {"mem_freq": 3, "top_k": 6, "train_context": 40}


def _landmark_model(**kw):
    model = _model(**kw)
    return get_method("landmark").apply(model, 40, 40, "finetuned", **PARAMS)


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
    assert record["landmark_id"] == 40 and record["params"] == PARAMS and model.config.vocab_size == 41
    torch.testing.assert_close(model.get_input_embeddings().weight[40].detach(), mean_in)
    torch.testing.assert_close(model.get_output_embeddings().weight[40].detach(), mean_out)
    assert attention_of(model).name == "landmark"


@pytest.mark.parametrize("tie", [True, False])
def test_memory_inference_equals_single_pass_on_short_inputs(tie):
    model = _landmark_model(tie=tie)
    method = attention_of(model)
    torch.manual_seed(3)
    ids = torch.randint(0, 40, (2, 26))         # 26 regular + 8 landmarks = 34 tokens: windows of 12, 12, 10
    with torch.no_grad():
        single = method.single_pass_logits(model, ids)
    memory = method.logits(model, ids)
    assert memory.shape == (2, 26, 40)            # regular positions only, landmark column dropped
    torch.testing.assert_close(memory, single, rtol=1e-4, atol=1e-4)
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


def test_training_inputs_exclude_landmarks_from_the_loss():
    model = _landmark_model()
    batch = torch.randint(0, 40, (2, 10))
    inputs = attention_of(model).training_inputs(model, batch)
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


def test_checkpoint_reload_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _landmark_model(tie=False)
    ids = torch.randint(0, 40, (1, 50))
    before = attention_of(model).logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = restore(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval())
    assert loaded.config.ctxext_attention == model.config.ctxext_attention
    torch.testing.assert_close(attention_of(loaded).logits(loaded, ids), before)


def test_bad_parameters_fail_clearly():
    method = get_method("landmark")
    with pytest.raises(ValueError, match="mem_freq"):
        method.resolve(256, 256, "finetuned", mem_freq=0)
    with pytest.raises(ValueError, match="top_k"):
        method.resolve(256, 256, "finetuned", top_k=2.5)
    with pytest.raises(ValueError, match="mem_freq=63"):
        method.resolve(256, 256, "finetuned")        # (5 + 2) blocks of 64 do not fit a 256 context
    with pytest.raises(ValueError, match="regime"):
        method.resolve(256, 256, "frozen", mem_freq=31)
    with pytest.raises(ValueError, match="unknown parameter"):
        method.resolve(256, 256, "finetuned", mem_freq=31, block=3)
    assert method.resolve(256, 256, "finetuned", mem_freq=31) == {"mem_freq": 31, "top_k": 5,
                                                                  "train_context": 256}
