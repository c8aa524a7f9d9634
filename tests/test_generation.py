"""Cached generation and logits where needed (methods/attention.py: `greedy_generate`, `answer_logits`): for every
attention kind and RoPE method, cached greedy decoding equals greedy decoding by full recomputation token for token
(the reference, `tests.helpers.greedy_by_recomputation`, runs the model's full forward pass per new token), over
several prompt lengths, with and without a chunked prefill; LM-Infinite's cache stays bounded; Dynamic NTK is
compared with a model whose base is fixed at the prompt's α, built here from the formula; the stop rule; the
uncached fallback of a kind with its own logits (Landmark)."""
from __future__ import annotations

import math

import pytest
import torch

from methods import attention_of, get_attention, get_method
from methods.attention import DEFAULT_PREFILL_CHUNK, EXACT, check_prefill_chunk, decode_greedily
from methods.lm_infinite import LambdaCacheLayer
from tests.helpers import greedy_by_recomputation, random_ids, tiny_llama

W = 16      # base window of the tiny models
VOCAB = 97


def model_of(seed=0, **config):
    return tiny_llama(seed, vocab=VOCAB, intermediate=96, kv_heads=2, window=W, attn_implementation="sdpa",
                      **config)


def prompts(n, rows=2, seed=1):
    return torch.cat([random_ids(n, VOCAB, seed + r) for r in range(rows)])


def full_logits(model):
    return lambda ids: model(input_ids=ids).logits


def assert_generation_matches(model, ids, new, chunks=(None, 5), reference=None, atol=1e-4):
    """Cached greedy tokens equal the reference's (full recomputation), and so do the logits of every step: the
    output layer's outputs during generation against the reference's last logits over each prefix."""
    reference = reference or full_logits(model)
    want = greedy_by_recomputation(reference, ids, new)
    with torch.no_grad():
        sequence = torch.cat([ids, want], dim=1)
        want_logits = [reference(sequence[:, :ids.shape[1] + k])[:, -1] for k in range(new)]
    kind = attention_of(model)
    for chunk in chunks:
        seen = []
        hook = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1]))
        try:
            got = kind.greedy_generate(model, ids, new, prefill_chunk=chunk)
        finally:
            hook.remove()
        assert got.dtype == torch.long and got.shape == (ids.shape[0], new)
        assert torch.equal(got, want), f"n={ids.shape[1]} prefill_chunk={chunk}"
        assert len(seen) == new
        for k, (mine, theirs) in enumerate(zip(seen, want_logits)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=atol, msg=f"step {k}, prefill_chunk={chunk}")


def assert_answer_logits_match(model, ids, chunks=(None, 5), atol=1e-5):
    n = ids.shape[1]
    g = torch.Generator().manual_seed(n)
    positions = torch.randint(0, n, (ids.shape[0], 4), generator=g)
    positions[:, -1] = n - 1
    with torch.no_grad():
        full = attention_of(model).logits(model, ids)
    want = full[torch.arange(ids.shape[0])[:, None], positions]
    for chunk in chunks:
        got = attention_of(model).answer_logits(model, ids, positions, prefill_chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == (ids.shape[0], 4, full.shape[-1])
        torch.testing.assert_close(got, want.float(), rtol=0, atol=atol)


# ---------------------------------------------------------------- exact attention, static RoPE methods


@pytest.mark.parametrize("n", [1, 7, 16, 37])
def test_exact_attention_equals_full_recomputation(n):
    model = model_of()
    assert_generation_matches(model, prompts(n), 12, chunks=(None, 5, 16))
    assert_answer_logits_match(model, prompts(n))


@pytest.mark.parametrize("rope", ["pi", "ntk", "yarn"])
@pytest.mark.parametrize("n", [11, 29, 50])
def test_static_rope_methods_equal_full_recomputation(rope, n):
    model = get_method(rope).apply(model_of(seed=3), W, 4 * W, "finetuned")
    assert_generation_matches(model, prompts(n), 10, chunks=(None, 7))


def test_the_cache_is_used_one_token_per_step():
    model = model_of()
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    EXACT.greedy_generate(model, prompts(37), 6, prefill_chunk=16)
    assert seen == [16, 16, 5, 1, 1, 1, 1, 1]  # chunked prefill, then one token per step (none after the last)
    calls = []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    EXACT.greedy_generate(model, prompts(37), 3)
    assert calls == [(2, 1, 64)] * 3  # the output layer only at the last position


# ---------------------------------------------------------------- LM-Infinite: the bounded cache


@pytest.mark.parametrize("n_local,n_global,cap", [(5, 2, 5), (5, 2, 12), (6, 0, 6), (4, 3, 4), (1, 2, 1)])
@pytest.mark.parametrize("n", [9, 23, 41])
def test_lm_infinite_bounded_cache_equals_full_recomputation(n_local, n_global, cap, n):
    assert n > n_local + n_global  # the bounded cache drops keys already in the prompt
    model = get_attention("lm_infinite").apply(model_of(seed=2), W, W, "frozen", n_local=n_local,
                                               n_global=n_global, distance_cap=cap)
    assert_generation_matches(model, prompts(n), 14, chunks=(None, 4, 6))
    assert_answer_logits_match(model, prompts(n), chunks=(None, 4, 6))


def test_lm_infinite_memory_per_step_is_constant_in_the_prompt_length(monkeypatch):
    kept = []
    real = LambdaCacheLayer.update

    def update(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        kept.append((self.cumulative_length, self.keys.shape[-2], out[0].shape[-2]))
        return out

    monkeypatch.setattr(LambdaCacheLayer, "update", update)
    model = get_attention("lm_infinite").apply(model_of(seed=2), W, W, "frozen", n_local=5, n_global=2)
    for n in (23, 80):
        kept.clear()
        attention_of(model).greedy_generate(model, prompts(n, rows=1), 6, prefill_chunk=8)
        assert max(k for _, k, _ in kept) == 2 + 5 - 1          # n_global + n_local - 1 keys stored
        steps = [read for total, _, read in kept if total > n]   # decoding: a step reads the 6 kept keys + itself
        assert steps and set(steps) == {2 + 5}
        assert max(read for _, _, read in kept) <= 2 + 5 - 1 + 8  # a prefill chunk reads the same plus its tokens


def test_lm_infinite_with_yarn_and_dynamic_ntk():
    for rope, regime in (("yarn", "finetuned"), ("dynamic_ntk", "frozen")):
        model = get_method(rope).apply(model_of(seed=4), W, 4 * W, regime)
        get_attention("lm_infinite").apply(model, W, 4 * W, "frozen", n_local=6, n_global=3, distance_cap=6)
        ids = prompts(12)  # below the Dynamic NTK floor (16) for the whole generation: alpha = 1 throughout
        assert_generation_matches(model, ids, 4, chunks=(None, 5))


# ---------------------------------------------------------------- Dynamic NTK: alpha fixed at the prompt's length


def static_base_twin(model, seed, alpha):
    """The same weights with the RoPE base fixed at b * alpha^(d/(d-2)) (docs/methods.md §3.1, written out here)."""
    twin = model_of(seed=seed)
    d = 64 // 4  # hidden / heads
    base = 10000.0 * alpha ** (d / (d - 2))
    twin.model.rotary_emb.inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return twin


def alpha_of(n, factor, floor):
    return factor * max(n, floor) / W - (factor - 1)


@pytest.mark.parametrize("regime,target,n", [("frozen", 4 * W, 11), ("frozen", 4 * W, 13), ("frozen", 4 * W, 21),
                                             ("frozen", 4 * W, 30), ("finetuned", 2 * W, 27),
                                             ("finetuned", 2 * W, 31), ("finetuned", 2 * W, 45)])
def test_dynamic_ntk_equals_recomputation_with_alpha_fixed_at_the_prompt(regime, target, n):
    model = get_method("dynamic_ntk").apply(model_of(seed=5), W, target, regime)
    params = model.config.ctxext["params"]
    new = 8  # n = 11, 13 (frozen, floor 16) and 27, 31 (fine-tuned, floor 32) cross the floor while generating
    alpha = alpha_of(n, params["factor"], params["floor"])
    twin = static_base_twin(model, 5, alpha)
    assert_generation_matches(model, prompts(n), new, chunks=(None, 4), reference=full_logits(twin))
    # the prefill alone is exact: the model's own full forward pass over the prompt uses alpha(n) everywhere
    assert_answer_logits_match(model, prompts(n), chunks=(None, 4))


def test_dynamic_ntk_with_lm_infinite_keeps_the_prompts_alpha_in_the_capped_scores():
    model = get_method("dynamic_ntk").apply(model_of(seed=5), W, 4 * W, "frozen")
    twin = static_base_twin(model, 5, alpha_of(21, 2.0, W))
    for m in (model, twin):  # the capped scores rotate with the pinned frequencies too
        get_attention("lm_infinite").apply(m, W, 4 * W, "frozen", n_local=6, n_global=3, distance_cap=6)
    assert_generation_matches(model, prompts(21), 6, chunks=(None, 4), reference=full_logits(twin))


def test_dynamic_ntk_below_the_floor_is_plain_full_recomputation():
    model = get_method("dynamic_ntk").apply(model_of(seed=5), W, 4 * W, "frozen")
    assert_generation_matches(model, prompts(5), 10, chunks=(None, 3))  # 5 + 10 <= floor 16


def test_dynamic_ntk_pin_is_released():
    method = get_method("dynamic_ntk")
    model = method.apply(model_of(seed=5), W, 4 * W, "frozen")
    ids = prompts(40)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        attention_of(model).greedy_generate(model, prompts(20), 3)
        after = model(input_ids=ids).logits
        with method.fixed_length(model, 20):
            pinned = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert (pinned - before).abs().max() > 1e-4


# ---------------------------------------------------------------- CLEX: re-encoding when t changes


def clex_model(seed=0):
    model = get_method("clex").apply(tiny_llama(seed, vocab=VOCAB, layers=2, window=8, kv_heads=2), 8, 16,
                                     max_factor=4)
    with torch.no_grad():  # a trained-looking ODE, not the NTK identity
        model.model.rotary_emb.ode.w_down.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("n", [6, 8, 13, 21])
def test_clex_equals_full_recomputation_across_multiples_of_L(n):
    model = clex_model()
    # generation crosses t = 1 -> 2 -> 3 -> 4 at n = 9, 17, 25 and the clip at 33; a chunked prefill crosses them too
    assert_generation_matches(model, prompts(n), 14, chunks=(None, 3, 5))
    assert_answer_logits_match(model, prompts(n), chunks=(None, 3))
    assert model.model.rotary_emb.pinned_t is None


def test_clex_with_lm_infinite_re_encodes_through_the_bounded_cache():
    model = clex_model()
    get_attention("lm_infinite").apply(model, 8, 16, "frozen", n_local=6, n_global=2)
    for n in (6, 21):  # the bounded cache is emptied and refilled whenever decoding moves t
        assert_generation_matches(model, prompts(n), 14, chunks=(None, 5))


def test_clex_re_encodes_only_when_decoding_changes_t():
    model = clex_model()
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    attention_of(model).greedy_generate(model, prompts(21), 14, prefill_chunk=3)
    # the prefill is pinned at t(21) = 3 (no re-encoding at 9 or 17); decoding re-encodes once, at n = 25 (t = 4)
    assert seen == [3] * 7 + [1, 1, 1, 25] + [1] * 9


# ---------------------------------------------------------------- stopping, arguments


def test_stop_rule_and_what_follows_a_stopped_row():
    model = model_of()
    ids = prompts(9)
    want = greedy_by_recomputation(full_logits(model), ids, 8)
    calls = []

    def stop(generated):
        calls.append(generated.shape[1])
        return torch.tensor([generated.shape[1] >= 3, generated.shape[1] >= 5])

    got = EXACT.greedy_generate(model, ids, 8, stop=stop, pad_id=-1)
    assert calls == [1, 2, 3, 4, 5]  # called after every step, and decoding ends once every row has stopped
    assert got[0, :3].tolist() == want[0, :3].tolist() and got[0, 3:].tolist() == [-1] * 5
    assert got[1, :5].tolist() == want[1, :5].tolist() and got[1, 5:].tolist() == [-1] * 3
    repeated = EXACT.greedy_generate(model, ids, 8, stop=lambda g: torch.tensor([g.shape[1] >= 3, False]))
    assert repeated[0, 3:].tolist() == [want[0, 2].item()] * 5  # without a pad id: the last token repeated
    assert torch.equal(repeated[1], want[1])
    assert EXACT.greedy_generate(model, ids, 0).shape == (2, 0)


def test_decode_greedily_on_scripted_logits():
    eye = torch.eye(5)
    script = iter([eye[[1, 3]], eye[[2, 0]], eye[[4, 4]]])
    out = decode_greedily(eye[[0, 2]], lambda token: next(script), 4, stop=lambda g: g[:, -1] == 3, pad_id=9)
    assert out.tolist() == [[0, 1, 2, 4], [2, 3, 9, 9]]


def test_arguments_are_checked():
    model = model_of()
    assert check_prefill_chunk(None) == DEFAULT_PREFILL_CHUNK and check_prefill_chunk(7) == 7
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="prefill_chunk"):
            check_prefill_chunk(bad)
    with pytest.raises(ValueError, match="positions must lie"):
        EXACT.answer_logits(model, prompts(5), torch.tensor([[5], [0]]))
    with pytest.raises(ValueError, match="input_ids"):
        EXACT.greedy_generate(model, torch.zeros(3, dtype=torch.long), 2)


# ---------------------------------------------------------------- a kind with its own logits: the uncached fallback


def test_a_kind_with_its_own_logits_gets_the_uncached_fallback():
    model = tiny_llama(0, vocab=40, hidden=32, intermediate=48, heads=4, kv_heads=2, window=40,
                       attn_implementation="sdpa")
    get_method("landmark").apply(model, 40, 40, "finetuned", mem_freq=3, top_k=6, train_context=40)
    kind = attention_of(model)
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = greedy_by_recomputation(lambda x: kind.logits(model, x), ids, 5)
        full = kind.logits(model, ids)
    assert torch.equal(kind.greedy_generate(model, ids, 5), want)
    positions = torch.tensor([[3, 29], [0, 17]])
    torch.testing.assert_close(kind.answer_logits(model, ids, positions), full[[[0], [1]], positions].float())
    assert math.isfinite(float(full.sum()))


# ---------------------------------------------------------------- the benchmark tool (a smoke test, no timings checked)


def test_generation_benchmark_runs_and_writes_its_rows(tmp_path):
    import duckdb

    from workflow.config import compose
    from workflow.modeling import build_scratch_model
    from workflow.store import write_benchmarks
    from workflow.tools import bench_generation as bench

    cfg = compose("micro")
    tokenizer = bench.bench_tokenizer(None, 300)
    base = build_scratch_model(cfg["model"], bench._Sized(300, tokenizer), seed=0).eval()
    rows = bench.run_benchmark(cfg, base, tokenizer, [40, 80], ["exact", "lm_infinite"], 4, 32, 1, "cpu",
                               recompute_max=40, measure=("time",), verbose=False)
    paths = sorted({(r["attention"], r["path"]) for r in rows})
    assert paths == [("exact", "ctxext"), ("exact", "lm-eval HFLM"), ("exact", "lm-eval ctxext"),
                     ("exact", "recompute"), ("lm_infinite", "ctxext")]
    assert len(rows) == 5 + 4  # no full recomputation at 80 tokens
    assert all(r["ratio"] > 0 and r["generate_s"] > 0 for r in rows)
    text = bench.summary(rows, 4)
    assert "gen/forward" in text and "vs HFLM" in text and "target: exact attention" in text
    db = tmp_path / "bench.duckdb"
    assert write_benchmarks(db, bench.benchmark_rows(rows, "micro", {"device": "cpu"}, 4)) == len(rows)
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("SELECT phase, attention, count(*) FROM benchmarks GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    assert got == [("generate", "exact", 2), ("generate", "lm_infinite", 2), ("generate_hflm", "exact", 2),
                   ("generate_lm_eval", "exact", 2), ("generate_recompute", "exact", 1)]
