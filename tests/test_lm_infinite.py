"""Tests of LM-Infinite (`methods/lm_infinite.py`): against a naive O(n^2) masked reference written here (the
Λ-mask and distance ceiling spelled out pair by pair, rotations in complex form), equality with the base model
for n <= n_local, cached decoding against recomputation, save/reload, any RoPE method, and validation."""
import itertools

import pytest
import torch
from transformers import AttentionInterface

from methods import ATTENTIONS, get_attention, get_method
from methods.lm_infinite import ATTN_IMPLEMENTATION, lm_infinite_scores_attention
from tests.helpers import check_reload_and_refusals, rotated_back, rotated_inputs, logits, random_ids, tiny_llama

W = 16  # base window of the tiny model


def tiny_model(seed=0, kv_heads=2):
    return tiny_llama(seed, vocab=97, intermediate=96, kv_heads=kv_heads, window=W, attn_implementation="sdpa")


def ids(n, seed=1):
    return random_ids(n, 97, seed)


# ---------------------------------------------------------------- the naive reference


def naive_lm_infinite(q_rot, k_rot, v, inv_freq, n_local, n_global, cap, scaling):
    """O(n^2) reference from rotated q [b,h,q_len,d] / k [b,h_kv,n,d] (positions n-q_len.. and 0..): each pair
    (m, j) gets distance m - j if m - j < n_local, min(m - j, cap) if j < n_global, else is masked; the score is
    <R(dist) q, k> with q, k rotated back to position 0; one softmax over the full row."""
    b, h, q_len, d = q_rot.shape
    n = k_rot.shape[2]
    q0, k0, theta = rotated_back(q_rot, k_rot, inv_freq)
    scores = torch.full((b, h, q_len, n), float("-inf"), dtype=torch.float64)
    for row, m in enumerate(range(n - q_len, n)):
        for j in range(m + 1):
            if m - j < n_local:
                dist = m - j
            elif j < n_global:
                dist = min(m - j, cap)
            else:
                continue
            moved = q0[:, :, row] * torch.exp(1j * dist * theta)
            scores[:, :, row, j] = (moved * k0[:, :, j].conj()).real.sum(-1) * scaling
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.repeat_interleave(h // v.shape[1], 1).double()).transpose(1, 2)


@pytest.mark.parametrize("n_local,n_global,cap", [
    (1, 0, 1), (3, 0, 3), (3, 2, 3), (4, 5, 4), (8, 3, 8), (5, 2, 2), (3, 2, 7), (20, 4, 20), (30, 3, 30)])
def test_matches_the_naive_reference(n_local, n_global, cap):
    n = 20  # beyond the window for most settings, inside it for n_local >= 20
    q, k, v, inv_freq = rotated_inputs(n, n, magnitude=1.3)
    for block in (3, 7, None):
        out = lm_infinite_scores_attention(q, k, v, inv_freq, n_local, n_global, cap, scaling=0.35, block=block)
        ref = naive_lm_infinite(q, k, v, inv_freq, n_local, n_global, cap, scaling=0.35)
        assert out.shape == (1, n, 4, 8)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len", [1, 4])
def test_matches_the_naive_reference_for_the_last_queries(q_len):
    """The decoding shape: a few queries at the end of a longer key sequence (as with a KV cache)."""
    q, k, v, inv_freq = rotated_inputs(23, q_len, seed=3)
    for n_local, n_global, cap in [(4, 3, 4), (4, 3, 9), (6, 0, 6)]:
        out = lm_infinite_scores_attention(q, k, v, inv_freq, n_local, n_global, cap, scaling=0.35, block=2)
        ref = naive_lm_infinite(q, k, v, inv_freq, n_local, n_global, cap, scaling=0.35)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_the_reference_itself_is_full_attention_inside_the_window():
    """Sanity check of the reference: with n_local >= n it is ordinary causal softmax attention."""
    q, k, v, inv_freq = rotated_inputs(9, 9, heads=2, kv_heads=2)
    ref = naive_lm_infinite(q, k, v, inv_freq, 9, 0, 9, scaling=0.5)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(ref.float(), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- on a model


def test_registered_and_equal_to_the_base_model_up_to_n_local():
    assert "lm_infinite" in ATTENTIONS
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    base = tiny_model()
    x = ids(W)
    expected = logits(base, x)
    model = get_attention("lm_infinite").apply(tiny_model(), W, W, "frozen")
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.ctxext_attention["params"] == {"n_local": W, "n_global": 10, "distance_cap": W}
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)  # n == n_local
    torch.testing.assert_close(logits(model, x[:, :5]), expected[:, :5], rtol=1e-5, atol=1e-5)
    longer = ids(3 * W)  # beyond the window the attention differs, but the first n_local positions do not
    out, ref = logits(model, longer), logits(base, longer)
    torch.testing.assert_close(out[:, :W], ref[:, :W], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, W:], ref[:, W:], atol=1e-3)


def _register_naive(model):
    """Register the naive reference as an attention function that reads the model's frequencies and params."""
    def naive(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        p = module.config.ctxext_attention["params"]
        out = naive_lm_infinite(query, key, value, model.model.rotary_emb.inv_freq, p["n_local"], p["n_global"],
                                p["distance_cap"], scaling)
        return out.to(query.dtype), None
    AttentionInterface.register("test_naive_lm_infinite", naive)


@pytest.mark.parametrize("rope", ["none", "yarn"])
def test_model_matches_the_naive_reference_with_any_rope(rope):
    """`none` and `yarn` x lm_infinite: the model's logits equal the same model running the naive reference
    (YaRN changes the frequencies and the cos/sin magnitude, which the capped scores must respect)."""
    model = tiny_model()
    target = W if rope == "none" else 4 * W
    get_method(rope).apply(model, W, target, "frozen")
    get_attention("lm_infinite").apply(model, W, target, "frozen", n_local=6, n_global=3, distance_cap=6)
    x = ids(3 * W, seed=5)
    out = logits(model, x)
    _register_naive(model)
    model.set_attn_implementation("test_naive_lm_infinite")
    torch.testing.assert_close(out, logits(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cap", [5, 12])
def test_cached_generation_equals_recomputation(cap):
    model = get_attention("lm_infinite").apply(tiny_model(seed=2), W, W, "frozen", n_local=5, n_global=2,
                                               distance_cap=cap)
    prompt = ids(9, seed=7)
    generated = model.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=True,
                               pad_token_id=0, eos_token_id=None)
    x = prompt
    with torch.no_grad():
        for _ in range(14):  # full recomputation, one token at a time
            x = torch.cat([x, logits(model, x)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, x)
    # and the logits themselves: prefill + one-token steps with the cache equal one full forward pass
    with torch.no_grad():
        step = model(input_ids=x[:, :9], use_cache=True)
        cache, rows = step.past_key_values, [step.logits]
        for t in range(9, x.shape[1]):
            step = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            rows.append(step.logits)
    torch.testing.assert_close(torch.cat(rows, dim=1), logits(model, x), rtol=1e-4, atol=1e-4)


def test_save_reload_padding_and_unhooked_models(tmp_path):
    model = get_attention("lm_infinite").apply(tiny_model(), W, W, "frozen", n_local=4, n_global=2)
    check_reload_and_refusals(model, tiny_model(), ATTN_IMPLEMENTATION,
                              {"n_local": 4, "n_global": 2, "distance_cap": W}, ids(2 * W), tmp_path)


# ---------------------------------------------------------------- parameters


def test_defaults_and_validation():
    method = get_attention("lm_infinite")
    assert method.defaults(256, 256, "frozen") == {"n_local": 256, "n_global": 10, "distance_cap": 256}
    assert method.resolve(256, 1024, "frozen", n_global=0)["n_global"] == 0
    with pytest.raises(ValueError, match="supports regime"):
        method.defaults(256, 512, "finetuned")
    for key, bad in itertools.product(("n_local", "distance_cap"), (0, -3, 2.5, True, "4")):
        with pytest.raises(ValueError, match=key):
            method.resolve(256, 256, "frozen", **{key: bad})
    with pytest.raises(ValueError, match="n_global"):
        method.resolve(256, 256, "frozen", n_global=-1)
    with pytest.raises(ValueError, match="unknown parameter.*valid: distance_cap, n_global, n_local"):
        method.resolve(256, 256, "frozen", window=4)
    model = method.apply(tiny_model(), W, W, "frozen")
    with pytest.raises(ValueError, match="already has an attention"):
        method.apply(model, W, W, "frozen")


def test_benchmark_script_runs_on_small_lengths():
    """Smoke test of workflow/bench_attention.py (no timing assertions: it is a benchmark, not a timed test)."""
    from workflow.tools.bench_attention import run_benchmark, summary

    rows = run_benchmark([32, 64], ["sdpa", "lm_infinite"], n_local=16, repeats=1, measure=("time",), verbose=False)
    assert [(r["kind"], r["n"]) for r in rows] == [("sdpa", 32), ("lm_infinite", 32), ("sdpa", 64),
                                                   ("lm_infinite", 64)]
    text = summary(rows, ["sdpa", "lm_infinite"])
    assert "sdpa/lminf time" in text and "growth per doubling" in text
