"""Tests of Self-Extend (`methods/self_extend.py`, docs/methods.md §8.1): against a naive O(n^2) reference written here
(every pair's neighbour or grouped positions spelled out, rotations in complex form), the official boundary, equality
with the base model where nothing is grouped, on a model with any RoPE, cached greedy generation against full
recomputation token for token, answer logits, save/reload, validation and the studies' defaults."""
import itertools
import math

import pytest
import torch
from transformers import AttentionInterface

from methods import ATTENTIONS, get_attention, get_method
from methods.self_extend import ATTN_IMPLEMENTATION, effective_length, max_length, self_extend_scores_attention
from tests.helpers import check_reload_and_refusals, rotated_back, rotated_inputs, logits, random_ids, tiny_llama

W0 = 16  # base window of the tiny model


def tiny_model(seed=0, kv_heads=2):
    return tiny_llama(seed, vocab=97, intermediate=96, kv_heads=kv_heads, window=W0, attn_implementation="sdpa")


def ids(n, seed=1, rows=1):
    return torch.cat([random_ids(n, 97, seed + r) for r in range(rows)])


# ---------------------------------------------------------------- the naive reference


def naive_self_extend(q_rot, k_rot, v, inv_freq, G, W, scaling, scale_base=-1, neighbour=None):
    """O(n^2) reference from rotated q [b,h,q_len,d] (positions n-q_len ..) and k [b,h_kv,n,d] (0 ..): q and k are
    rotated back to position 0, then every pair (m, j) is scored at (m, j) if it is a neighbour (m - j < W by
    default) and at (m//G + W - W/G, j//G) otherwise; one softmax over the row."""
    neighbour = neighbour or (lambda dist: dist < W)
    b, h, q_len, d = q_rot.shape
    n = k_rot.shape[2]
    q0, k0, theta = rotated_back(q_rot, k_rot, inv_freq)
    scores = torch.full((b, h, q_len, n), float("-inf"), dtype=torch.float64)
    for row, m in enumerate(range(n - q_len, n)):
        log_scale = max(1.0, math.log(m + 1) / math.log(scale_base)) if scale_base > 0 else 1.0
        for j in range(m + 1):
            pq, pk = (m, j) if neighbour(m - j) else (m // G + W - W / G, j // G)
            qm = q0[:, :, row] * torch.exp(1j * pq * theta) * log_scale
            kj = k0[:, :, j] * torch.exp(1j * pk * theta)
            scores[:, :, row, j] = (qm * kj.conj()).real.sum(-1) * scaling
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.repeat_interleave(h // v.shape[1], 1).double()).transpose(1, 2)


@pytest.mark.parametrize("G, W", [(1, 1), (1, 4), (2, 2), (2, 4), (3, 6), (4, 8), (5, 5), (2, 30)])
def test_matches_the_naive_reference(G, W):
    n = 23
    q, k, v, inv_freq = rotated_inputs(n, n, magnitude=1.2, batch=2)
    ref = naive_self_extend(q, k, v, inv_freq, G, W, scaling=0.35)
    for block in (1, 5, None):
        out = self_extend_scores_attention(q, k, v, inv_freq, G, W, scaling=0.35, block=block)
        assert out.shape == (2, n, 4, 8)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len", [1, 3])
def test_matches_the_naive_reference_for_the_last_queries(q_len):
    """The decoding shape: a few queries at the end of a longer key sequence (as with a KV cache)."""
    q, k, v, inv_freq = rotated_inputs(27, q_len, seed=3, batch=2)
    for G, W in [(2, 4), (4, 8), (3, 3)]:
        out = self_extend_scores_attention(q, k, v, inv_freq, G, W, scaling=0.35, block=2)
        torch.testing.assert_close(out.double(), naive_self_extend(q, k, v, inv_freq, G, W, scaling=0.35),
                                   rtol=1e-5, atol=1e-5)


def test_the_boundary_distance_w_is_grouped_and_w_minus_1_a_neighbour():
    """Grouping starts at distance W. Since G divides W, the grouped distance of a pair exactly W apart is
    W/G + W - W/G = W, the neighbour distance: the two computations meet there, so a boundary at W or W + 1 gives the
    same result, while one a step earlier (W - 1 grouped) or later (W + 1 a neighbour) does not."""
    q, k, v, inv_freq = rotated_inputs(20, 20, seed=4, batch=2)
    out = self_extend_scores_attention(q, k, v, inv_freq, 2, 4, scaling=0.5).double()
    torch.testing.assert_close(out, naive_self_extend(q, k, v, inv_freq, 2, 4, scaling=0.5), rtol=1e-5, atol=1e-5)
    same = naive_self_extend(q, k, v, inv_freq, 2, 4, scaling=0.5, neighbour=lambda dist: dist <= 4)
    torch.testing.assert_close(out, same, rtol=1e-5, atol=1e-5)
    for off_by_one in (lambda dist: dist <= 5, lambda dist: dist < 3):
        wrong = naive_self_extend(q, k, v, inv_freq, 2, 4, scaling=0.5, neighbour=off_by_one)
        assert not torch.allclose(out, wrong, atol=1e-4)


def test_query_log_scaling_matches_the_reference():
    q, k, v, inv_freq = rotated_inputs(21, 21, seed=5, batch=2)
    out = self_extend_scores_attention(q, k, v, inv_freq, 2, 4, scaling=0.4, scale_base=6.0, block=4)
    torch.testing.assert_close(out.double(), naive_self_extend(q, k, v, inv_freq, 2, 4, 0.4, scale_base=6.0),
                               rtol=1e-5, atol=1e-5)
    plain = self_extend_scores_attention(q, k, v, inv_freq, 2, 4, scaling=0.4)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_the_reference_itself_is_causal_attention_when_nothing_is_grouped():
    q, k, v, inv_freq = rotated_inputs(9, 9, heads=2, kv_heads=2, batch=2)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(naive_self_extend(q, k, v, inv_freq, 3, 9, 0.5).float(), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive_self_extend(q, k, v, inv_freq, 1, 2, 0.5).float(), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- on a model


def test_registered_and_equal_to_the_base_model_without_grouping():
    assert "self_extend" in ATTENTIONS
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    base = tiny_model()
    model = get_attention("self_extend").apply(tiny_model(), W0, W0, "frozen", group_size=2, window=8)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    x = ids(40)
    out, ref = logits(model, x), logits(base, x)
    torch.testing.assert_close(out[:, :8], ref[:, :8], rtol=1e-5, atol=1e-5)  # n <= W: ordinary attention
    assert not torch.allclose(out[:, 8:], ref[:, 8:], atol=1e-3)  # grouped positions beyond the window
    unity = get_attention("self_extend").apply(tiny_model(), W0, W0, "frozen", group_size=1, window=4)
    torch.testing.assert_close(logits(unity, x), ref, rtol=1e-5, atol=1e-5)  # G = 1: every position is its own


def _register_naive(model):
    def naive(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        p = module.config.ctxext_attention["params"]
        out = naive_self_extend(query, key, value, model.model.rotary_emb.inv_freq, p["group_size"], p["window"],
                                scaling)
        return out.to(query.dtype), None
    AttentionInterface.register("test_naive_self_extend", naive)


@pytest.mark.parametrize("rope", ["none", "yarn"])
def test_model_matches_the_naive_reference_with_any_rope(rope):
    model = tiny_model()
    target = W0 if rope == "none" else 4 * W0
    get_method(rope).apply(model, W0, target, "frozen")
    get_attention("self_extend").apply(model, W0, target, "frozen", group_size=3, window=6)
    x = ids(3 * W0, seed=5)
    out = logits(model, x)
    _register_naive(model)
    model.set_attn_implementation("test_naive_self_extend")
    torch.testing.assert_close(out, logits(model, x), rtol=1e-4, atol=1e-4)


def recompute_greedily(model, prompt, steps):
    """Greedy decoding by full forward passes over the whole sequence (no cache), one token at a time."""
    x = prompt
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, logits(model, x)[:, -1:].argmax(-1)], dim=1)
    return x[:, prompt.shape[1]:]


@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_cached_greedy_generation_equals_full_recomputation(prefill_chunk):
    """The kind's cached generation (the base class's, through transformers' cache of rotated keys; a chunked prefill
    too) equals greedy decoding by full forward passes, token for token, once grouped positions are in use."""
    from transformers import DynamicCache

    method = get_attention("self_extend")
    model = method.apply(tiny_model(seed=2), W0, W0, "frozen", group_size=2, window=4)
    prompt = ids(11, seed=7, rows=3)  # longer than W: the cached decoding steps use grouped positions
    generated = method.greedy_generate(model, prompt, max_new_tokens=20, prefill_chunk=prefill_chunk)
    assert generated.shape == (3, 20) and generated.dtype == torch.long
    assert torch.equal(generated, recompute_greedily(model, prompt, 20))
    # and the logits themselves: prefill + one-token cached steps equal one full forward pass
    x = torch.cat([prompt, generated], dim=1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        rows = [model(input_ids=x[:, :11], cache=cache, use_cache=True).logits]
        for t in range(11, x.shape[1]):
            rows.append(model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == x.shape[1]
    torch.testing.assert_close(torch.cat(rows, dim=1), logits(model, x), rtol=1e-4, atol=1e-4)


def test_generation_stops_per_row_and_overall():
    method = get_attention("self_extend")
    model = method.apply(tiny_model(seed=2), W0, W0, "frozen", group_size=2, window=4)
    prompt = ids(9, seed=3, rows=2)
    full = method.greedy_generate(model, prompt, max_new_tokens=12)
    calls = []

    def stop(generated):  # row 0 stops after 3 tokens, row 1 after 5
        calls.append(generated.shape[1])
        return torch.tensor([generated.shape[1] >= 3, generated.shape[1] >= 5])

    cut = method.greedy_generate(model, prompt, max_new_tokens=12, stop=stop, pad_id=0)
    assert calls == [1, 2, 3, 4, 5]  # called after every step, and decoding ends once every row has stopped
    assert torch.equal(cut[0, :3], full[0, :3]) and (cut[0, 3:] == 0).all()
    assert torch.equal(cut[1, :5], full[1, :5]) and (cut[1, 5:] == 0).all()


@pytest.mark.parametrize("prefill_chunk", [None, 7])
def test_answer_logits_are_the_full_logits_at_those_positions(prefill_chunk):
    method = get_attention("self_extend")
    model = method.apply(tiny_model(), W0, W0, "frozen", group_size=2, window=4)
    x = ids(30, rows=2)
    positions = torch.tensor([[3, 17, 29], [0, 28, 5]])
    got = method.answer_logits(model, x, positions, prefill_chunk=prefill_chunk)
    full = logits(model, x)
    assert got.shape == (2, 3, 97)
    expected = torch.stack([full[r, positions[r]] for r in range(2)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_save_reload_padding_and_unhooked_models(tmp_path):
    model = get_attention("self_extend").apply(tiny_model(), W0, W0, "frozen", group_size=2, window=4)
    check_reload_and_refusals(model, tiny_model(), ATTN_IMPLEMENTATION,
                              {"group_size": 2, "window": 4, "scale_base": -1}, ids(2 * W0), tmp_path)


# ---------------------------------------------------------------- parameters and the studies' defaults


def test_defaults_follow_lceg_and_validation():
    method = get_attention("self_extend")
    assert method.defaults(4096, 4096, "frozen") == {"group_size": 64, "window": 1024, "scale_base": -1}  # LCEG
    assert method.defaults(256, 256, "frozen") == {"group_size": 64, "window": 64, "scale_base": -1}     # tiny
    assert method.defaults(64, 64, "frozen") == {"group_size": 16, "window": 16, "scale_base": -1}       # micro
    with pytest.raises(ValueError, match="supports regime"):
        method.defaults(256, 512, "finetuned")
    for key, bad in itertools.product(("group_size", "window"), (0, -3, 2.5, True, "4")):
        with pytest.raises(ValueError, match=key):
            method.resolve(256, 256, "frozen", **{key: bad})
    with pytest.raises(ValueError, match="must divide"):
        method.resolve(256, 256, "frozen", group_size=3, window=64)
    with pytest.raises(ValueError, match="below the base window"):
        method.resolve(256, 256, "frozen", group_size=4, window=256)
    with pytest.raises(ValueError, match="scale_base"):
        method.resolve(256, 256, "frozen", scale_base=0.5)
    with pytest.raises(ValueError, match="unknown parameter"):
        method.resolve(256, 256, "frozen", neighbours=4)


def test_lengths_of_lceg_and_the_rule_of_thumb():
    assert max_length(64, 1024, 4096) == 197_632  # docs/methods.md §8.1a
    assert effective_length(65536, 64, 1024) == pytest.approx(2032)  # about 1/2 of 4096


@pytest.mark.parametrize("study", ["micro", "tiny", "smollm2", "llama2_7b"])
def test_each_studys_self_extend_cell_fits_its_longest_length(study):
    """README rule W + (N - W)/G <~ (1/2 ... 2/3)·L at the study's longest evaluation length N, and no grouped
    distance beyond L (micro, whose G must divide W = 16, sits at 0.73·L)."""
    from workflow.config import compose, expand_grid

    cfg = compose(study, ["grids=extended"])
    L = cfg["model"]["base_window"]
    longest = max(cfg["eval"]["lengths"] + cfg["eval"]["retrieval"]["lengths"])
    cells = [c for c in expand_grid(cfg) if c["attention"] == "self_extend"]
    assert len(cells) == 1
    for cell in cells:
        p = cell["attention_params"]
        assert longest <= max_length(p["group_size"], p["window"], L)
        assert effective_length(longest, p["group_size"], p["window"]) <= 0.75 * L
