"""Tests of LongRoPE (`methods/longrope.py`, `workflow/rope_search.py`; docs/methods.md §13): the frequencies θ_i/λ_i
and the magnitude sqrt(1 + ln s/ln L) computed here, against transformers' `longrope` rope function and rotary module
(short set up to L, long set beyond), the search's start (YaRN's ramp as factors), the search itself (it lowers the
loss of a planted signal below its start, is seeded, keeps every candidate monotonic and on its grid), the found
factors realised exactly by transformers and reloaded by plain transformers, the workflow's validation-split search
with its record file, and validation."""
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from methods import get_method
from methods.longrope import initial_factors, search
from tests.helpers import logits, random_ids, tiny_llama

L, T = 16, 64   # s = 4; head_dim 16: eight factors


def model_with(factors=None, seed=0, sharp=False, **overrides):
    model = tiny_llama(seed, vocab=97, intermediate=96, window=L)
    if sharp:  # larger q, k and output weights: attention and predictions depend strongly on the positions
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight *= 6
                layer.self_attn.k_proj.weight *= 6
                layer.mlp.down_proj.weight *= 4
            model.lm_head.weight *= 4
    return get_method("longrope").apply(model, L, T, long_factor=factors, **overrides)


def theta(d, b=1e4):
    return b ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


# ---------------------------------------------------------------- maths


def test_initial_factors_are_yarns_ramp_as_factors():
    """d 128, b 1e4, L 4096, s 8: YaRN's ramp runs from index 20 to 46, so λ = 1 up to 20, 8 from 46."""
    got = initial_factors(128, 1e4, 4096, 32768)
    ramp = [min(max((i - 20) / 26, 0.0), 1.0) for i in range(64)]
    assert got == pytest.approx([1 + 7 * r for r in ramp], abs=1e-12)
    assert got[:21] == [1.0] * 21 and got[46:] == [8.0] * 18
    tiny = initial_factors(32, 1e4, 256, 1024)  # low/high 0/7 (docs/methods.md §4b)
    assert tiny == pytest.approx([1 + 3 * min(i / 7, 1.0) for i in range(16)], abs=1e-12)


@pytest.mark.parametrize("short", ["long", "ones", [1.5] * 8])
def test_frequencies_and_magnitude(short):
    method = get_method("longrope")
    factors = [1.0, 1.0, 1.2, 1.9, 2.5, 3.3, 4.2, 5.0]
    kw = dict(head_dim=16, base=1e4, original_window=L, target_window=T, long_factor=factors, short_factor=short)
    long, scale = method.frequencies(seq_len=L + 1, **kw)
    short_set, short_scale = method.frequencies(seq_len=L, **kw)
    assert scale == short_scale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)), rel=1e-12)
    torch.testing.assert_close(long.double(), theta(16) / torch.tensor(factors, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    expected_short = factors if short == "long" else [1.0] * 8 if short == "ones" else short
    torch.testing.assert_close(short_set.double(), theta(16) / torch.tensor(expected_short, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    none, _ = method.frequencies(**kw)   # no length: the short set (transformers' initial inv_freq)
    assert torch.equal(none, short_set)


@pytest.mark.parametrize("short", ["long", "ones"])
def test_matches_transformers_longrope_short_and_long(short):
    factors = [1.0, 1.0, 1.2, 1.9, 2.5, 3.3, 4.2, 5.0]
    model = model_with(factors, short_factor=short)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == factors
    assert rope["original_max_position_embeddings"] == L and rope["factor"] == 4.0
    assert model.config.max_position_embeddings == T
    su = math.sqrt(1 + math.log(4) / math.log(16))
    for n, expect in ((L, [1.0] * 8 if short == "ones" else factors), (L + 1, factors), (3 * T, factors)):
        theirs, their_scale = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=n)
        reference = theta(16) / torch.tensor(expect, dtype=torch.float64)
        torch.testing.assert_close(theirs.double(), reference, rtol=1e-6, atol=0, msg=f"n={n}")
        assert their_scale == pytest.approx(su, rel=1e-12)
        # the rotary module picks the set from the positions it is given (transformers' longrope update)
        rotary = model.model.rotary_emb
        cos, _ = rotary(torch.zeros(1, 1, 16), position_ids=torch.arange(n)[None])
        angles = torch.arange(n, dtype=torch.float64)[:, None] * reference[None]
        torch.testing.assert_close(cos[0].double(), torch.cat([angles.cos()] * 2, -1) * su, rtol=1e-4, atol=1e-5)


def test_save_reload_with_the_factors(tmp_path):
    factors = [1.0, 1.1, 1.5, 2.0, 3.0, 4.0, 4.5, 5.0]
    model = model_with(factors)
    x = random_ids(3 * L, 97)
    before = logits(model, x)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.rope_parameters["long_factor"] == factors
    assert plain.config.ctxext["params"]["long_factor"] == factors
    assert torch.equal(logits(plain, x), before)
    assert not torch.allclose(before, logits(model_with([1.0] * 8), x))


@pytest.mark.parametrize("short", ["ones", "long"])
def test_chunked_prefill_and_cached_generation_equal_full_recomputation(short):
    """transformers picks the short or long set per forward; a prompt longer than L prefilled in chunks of L/2 must
    still get the long set in every chunk (fixed_length), and the decoding steps keep the prompt's set."""
    from methods import EXACT

    model = model_with([1.0, 1.1, 1.5, 2.0, 3.0, 4.0, 4.5, 5.0], short_factor=short)
    prompt = torch.cat([random_ids(3 * L, 97, seed) for seed in (1, 2)])
    generated = EXACT.greedy_generate(model, prompt, max_new_tokens=6, prefill_chunk=L // 2)
    x = prompt
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, logits(model, x)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, x[:, 3 * L:])
    positions = torch.tensor([[0, L, 3 * L - 1]] * 2)
    full = logits(model, prompt)
    torch.testing.assert_close(EXACT.answer_logits(model, prompt, positions),
                               torch.stack([full[r, positions[r]] for r in range(2)]), rtol=1e-4, atol=1e-4)
    rotary = model.model.rotary_emb
    before = rotary.inv_freq.clone()
    with get_method("longrope").fixed_length(model, 3 * L):
        cos, _ = rotary(torch.zeros(1, 1, 16), position_ids=torch.arange(4)[None])   # a short forward, long set
    assert torch.equal(rotary.inv_freq, before) and rotary.rope_type == "longrope"
    reference = theta(16) / torch.tensor([1.0, 1.1, 1.5, 2.0, 3.0, 4.0, 4.5, 5.0], dtype=torch.float64)
    angles = torch.arange(4, dtype=torch.float64)[:, None] * reference[None]
    su = math.sqrt(1 + math.log(4) / math.log(16))
    torch.testing.assert_close(cos[0].double(), torch.cat([angles.cos()] * 2, -1) * su, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the search

PLANTED = [1.0, 1.0, 1.3, 2.0, 2.9, 3.8, 4.4, 4.9]
BUDGET = dict(population=6, generations=3, parents=3, mutations=3, crossovers=3, crossover_tries=20, step=0.01)


def planted_scorer(model, n=3 * L):
    """KL divergence from a teacher, the same weights with the planted factors, on random rows longer than L (so the
    long factors act): zero exactly at the planted factors."""
    teacher = model_with(PLANTED, sharp=True)
    x = torch.cat([random_ids(n, 97, seed) for seed in (11, 12)])
    with torch.no_grad():
        target = torch.log_softmax(logits(teacher, x), -1)
    seen = []

    @torch.no_grad()
    def score(factors):
        seen.append(list(factors))
        assert model.config.rope_parameters["long_factor"] == list(factors)  # installed before it is scored
        out = torch.log_softmax(logits(model, x), -1)
        return float((target.exp() * (target - out)).sum(-1).mean())
    return score, seen


def test_search_lowers_the_loss_of_a_planted_signal_and_keeps_the_constraints():
    model = model_with(sharp=True)
    score, seen = planted_scorer(model)
    result = search(model, score, seed=3, **BUDGET)
    start = initial_factors(16, 1e4, L, T)
    assert seen[0] == start and result["initial_factor"] == start
    assert result["loss"] < 0.7 * result["initial_loss"]   # measured: 0.0208 -> 0.0094
    assert result["best_per_generation"] == sorted(result["best_per_generation"], reverse=True)
    assert result["evaluations"] == len(seen) == len({tuple(round(v, 6) for v in f) for f in seen})  # none twice
    assert result["evaluations"] == 6 + 3 * 6
    for factors in seen:
        assert all(b >= a for a, b in zip(factors, factors[1:]))          # monotonic
        assert 1.0 <= factors[0] and factors[-1] <= 1.0 + 4 + 1e-9       # inside [1, 1 + s]
    for factors in seen[1:]:  # on the grid 1 + 0.01·k, except a value inherited from the (off-grid) start
        for i, value in enumerate(factors):
            k = (value - 1.0) / 0.01
            assert abs(k - round(k)) < 1e-6 or value == start[i]
    # the best is installed and recorded: config, rotary module, params, summary
    assert model.config.rope_parameters["long_factor"] == result["long_factor"]
    assert model.config.ctxext["params"]["long_factor"] == result["long_factor"]
    assert model.config.ctxext["search"]["loss"] == result["loss"]
    theirs, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=L + 1)
    torch.testing.assert_close(theirs.double(), theta(16) / torch.tensor(result["long_factor"], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert score(result["long_factor"]) == pytest.approx(result["loss"], rel=1e-6)
    get_method("longrope").set_factors(model, PLANTED)
    assert score(PLANTED) == pytest.approx(0.0, abs=1e-6)   # the planted factors are the optimum


def test_search_is_seeded():
    runs = []
    for seed in (5, 5, 6):
        model = model_with(sharp=True)
        score, seen = planted_scorer(model)
        runs.append((search(model, score, seed=seed, **BUDGET), seen))
    (a, seen_a), (b, seen_b), (c, seen_c) = runs
    assert seen_a == seen_b and a["long_factor"] == b["long_factor"] and a["loss"] == b["loss"]
    assert seen_a != seen_c


def test_search_validates_its_budget():
    model = model_with()
    with pytest.raises(ValueError, match="parents"):
        search(model, lambda f: 0.0, **{**BUDGET, "parents": 9})
    with pytest.raises(ValueError, match="population"):
        search(model, lambda f: 0.0, **{**BUDGET, "population": 0})
    with pytest.raises(ValueError, match="no longrope"):
        search(tiny_llama(window=L), lambda f: 0.0, **BUDGET)


# ---------------------------------------------------------------- the workflow's search on the validation split


def test_cell_search_on_the_validation_split_and_its_record(tmp_path):
    from workflow import rope_search

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "validation.npy", np.random.default_rng(0).integers(0, 97, 400).astype(np.uint16))
    cell = {"cell_id": "longrope-exact-64-frozen", "rope": "longrope", "attention": "exact", "train_len": T,
            "regime": "frozen", "base_window": L, "method_params": {}, "base": {"model": {"x": 1}}}
    budget = dict(search_population=4, search_generations=2, search_parents=2, search_mutations=2,
                  search_crossovers=1, search_tokens=3 * T)
    model = model_with(**budget)
    assert rope_search.needs_search(model)
    windows = rope_search.validation_windows(data, T, 3 * T)
    assert windows.shape == (3, T) and windows[1, 0] == int(np.load(data / "validation.npy")[T])
    found = rope_search.search_cell(model, cell, data, tmp_path / "cell")
    assert not rope_search.needs_search(model)
    assert found["summary"]["evaluations"] == 4 + 2 * 3 and found["summary"]["windows"] == 3
    assert model.config.rope_parameters["long_factor"] == found["long_factor"]
    # the loss of the found factors is the mean next-token loss over the three windows, computed here
    with torch.no_grad():
        out = torch.log_softmax(logits(model, windows), -1)
        nll = -out[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    assert found["summary"]["loss"] == pytest.approx(float(nll), rel=1e-5)
    # reused when the key matches (no scoring), searched again when the cell changes
    again = model_with(**budget)
    rope_search.search_cell(again, cell, None, tmp_path / "cell")   # no data: it must not search
    assert again.config.rope_parameters["long_factor"] == found["long_factor"]
    short = tmp_path / "short"
    short.mkdir()
    np.save(short / "validation.npy", np.zeros(10, dtype=np.uint16))
    changed = {**cell, "base": {"model": {"x": 2}}}
    with pytest.raises(ValueError, match="fewer than one window"):  # another key: it searches (and needs data)
        rope_search.search_cell(model_with(**budget), changed, short, tmp_path / "cell")


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("overrides, needle", [
    ({"long_factor": [1.0, -2.0]}, "long_factor"), ({"long_factor": "yarn"}, "long_factor"),
    ({"short_factor": "short"}, "short_factor"), ({"search_parents": 99}, "search_parents"),
    ({"search_population": 0}, "search_population"), ({"search_step": 0}, "search_step"),
    ({"search_seed": 1.5}, "search_seed"), ({"search_tokens": True}, "search_tokens"),
    ({"long_factor": [1.0] * 5}, "8"), ({"n_hat": 4}, "n_hat")])
def test_validation(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        get_method("longrope").frequencies(head_dim=16, base=1e4, original_window=L, target_window=T, **overrides)


def test_defaults_are_the_official_search():
    assert get_method("longrope").defaults(4096, 32768, "finetuned") == {
        "long_factor": None, "short_factor": "long", "search_population": 64, "search_generations": 40,
        "search_parents": 32, "search_mutations": 16, "search_crossovers": 16, "search_crossover_tries": 20,
        "search_step": 0.01, "search_tokens": 5 * 32768, "search_seed": 42}


# ---------------------------------------------------------------- the stages


def test_the_stages_search_on_the_validation_split_and_record_it(stage):
    """A fine-tuned micro LongRoPE cell searches in the fine-tuning stage and saves its factors in the checkpoint; a
    frozen one searches in cell_model and reuses its record the second time."""
    import json

    from tests.helpers import run_finetune
    from workflow import rope_search
    from workflow.config import stage_config
    from workflow.modeling import cell_model

    run, out = run_finetune(stage, "longrope-exact-128-ft")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / rope_search.SEARCH_FILE).read_text())
    assert record["summary"]["evaluations"] == 4 + 2 * 3 and record["summary"]["windows"] == 512 // 128
    assert record["summary"]["loss"] <= record["summary"]["initial_loss"]
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["rope_parameters"]["long_factor"] == record["long_factor"] == saved["ctxext"]["params"]["long_factor"]
    plain = AutoModelForCausalLM.from_pretrained(out / "model")
    assert plain.config.rope_parameters["rope_type"] == "longrope"

    frozen = stage["cells"]["longrope-exact-256-frozen"]
    cfg = stage_config(stage["cfg"], frozen, "evaluate")
    cell_dir = stage["root"] / "cells" / frozen["cell_id"]
    model = cell_model(cfg, stage["root"] / "base" / "model", stage["root"] / "data", cell_dir)
    found = json.loads((cell_dir / rope_search.SEARCH_FILE).read_text())
    assert model.config.rope_parameters["long_factor"] == found["long_factor"]
    assert found["summary"]["windows"] == 512 // 256 and found["key"] == rope_search.search_key(cfg)
    again = cell_model(cfg, stage["root"] / "base" / "model", None, cell_dir)   # reused: no data needed
    assert again.config.rope_parameters["long_factor"] == found["long_factor"]
    with pytest.raises(ValueError, match="needs cell_dir"):
        cell_model(cfg, stage["root"] / "base" / "model")
    with pytest.raises(ValueError, match="searching needs data_dir"):
        cell_model(cfg, stage["root"] / "base" / "model", None, stage["root"] / "elsewhere")
