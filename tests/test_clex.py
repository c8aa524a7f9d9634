"""CLEX (docs/methods.md §5): the NTK identity at initialisation, the time embedding's fixed base against an
independent solve of both forms, scale selection, the training-position sampler, gradient flow into the ODE,
checkpoint reload, and cached generation vs full recomputation."""
import math

import pytest
import torch

from methods import get_method
from methods.clex import TIME_EMBEDDING_BASE, CLEXODE, CLEXRotaryEmbedding, inference_scale, training_positions
from methods.ntk import ntk_base
from methods.rope import default_inv_freq
from workflow.modeling import load_model
from tests.helpers import random_ids, tiny_llama

CLEX = get_method("clex")
L = 8


def tiny_model(seed=0, layers=2):
    return tiny_llama(seed, vocab=64, layers=layers, window=L, eos_token_id=None, bos_token_id=None)


def clex_model(seed=0, target=16, trained=True, **params):
    model = CLEX.apply(tiny_model(seed), L, target, **params)
    if trained:  # a non-zero W_down, so that the ODE is no longer the NTK identity
        with torch.no_grad():
            model.model.rotary_emb.ode.w_down.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def ids(n, seed=1):
    return random_ids(n, 64, seed)


# ---------------------------------------------------------------- maths


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("t", [1, 2, 3, 8, 32])
def test_untrained_clex_is_ntk_with_alpha_2t_minus_1(d, t):
    inv_freq, scale = CLEX.frequencies(head_dim=d, base=1e4, original_window=4096, target_window=32768,
                                       seq_len=4096 * t, max_factor=32)
    ntk = default_inv_freq(d, ntk_base(1e4, d, 2 * t - 1))
    assert scale == 1.0 and inv_freq.dtype == torch.float32
    assert torch.allclose(inv_freq, ntk, rtol=0.0, atol=1e-6)
    # the maths is exact: the float64 solve of the same ODE agrees to ~1e-10 (the float32 gap is rounding)
    ode = CLEXODE(d, 1e4).double()
    z = ode.log_frequencies([t], dtype=torch.float64)[-1]
    assert torch.allclose(z, torch.log(default_inv_freq(d, ntk_base(1e4, d, 2 * t - 1)).double()), atol=1e-5)
    expected = -(2 * torch.arange(d // 2, dtype=torch.float64) / d) * torch.log(torch.tensor(1e4, dtype=torch.float64)) \
        - (2 * torch.arange(d // 2, dtype=torch.float64) / (d - 2)) * torch.log(torch.tensor(2.0 * t - 1, dtype=torch.float64))
    assert torch.allclose(z, expected, atol=1e-9, rtol=0)


def _theta_by_rk4(w_up, w_down, d, base, time_base, scales, dt=0.01):
    """theta(t) [len(scales), d/2] from the formulas, in float64 by a hand-written fixed-step 3/8-rule RK4 from t = 1:
    z(1) = log of base's RoPE frequencies, dz/dt = silu((z + xi(t)) W_up) W_down + xi'(t) with
    xi_i(t) = -(2i/d) ln time_base - (2i/(d-2)) ln(2t - 1) and xi'_i(t) = -(2i/(d-2)) * 2/(2t - 1)."""
    i = torch.arange(d // 2, dtype=torch.float64)
    w_up, w_down = w_up.double(), w_down.double()

    def f(t, z):
        xi = -(2 * i / d) * math.log(time_base) - (2 * i / (d - 2)) * math.log(2 * t - 1)
        return torch.nn.functional.silu((z + xi) @ w_up) @ w_down - (2 * i / (d - 2)) * 2 / (2 * t - 1)

    z, t, out = -(2 * i / d) * math.log(base), 1.0, []
    for target in scales:
        for _ in range(round((target - t) / dt)):
            h = (target - t) / round((target - t) / dt)
            k1 = f(t, z)
            k2 = f(t + h / 3, z + h * k1 / 3)
            k3 = f(t + 2 * h / 3, z + h * (k2 - k1 / 3))
            k4 = f(t + h, z + h * (k1 - k2 + k3))
            z, t = z + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8, t + h
        t = float(target)
        out.append(z.exp())
    return torch.stack(out)


def test_time_embedding_has_the_official_fixed_base_10000():
    """At the model's base 1e5 (SmolLM2, d = 64): theta(t) is the official form's (time embedding on 10000, z(1) on
    1e5), not the form with the time embedding on the model's base; at base 1e4 the two are the same; untrained, both
    are NTK on the model's base."""
    assert TIME_EMBEDDING_BASE == 10000.0
    d, base, scales = 64, 1e5, [1, 2, 4, 8]
    torch.manual_seed(0)                  # W_up's initialisation
    ode = CLEXODE(d, base, act="silu")
    with torch.no_grad():
        ode.w_down.normal_(0.0, 0.001, generator=torch.Generator().manual_seed(0))
        got64 = ode.log_frequencies(scales, dtype=torch.float64).exp()
        got32 = ode.log_frequencies(scales).exp()
    official = _theta_by_rk4(ode.w_up.detach(), ode.w_down.detach(), d, base, 1e4, scales)
    paper = _theta_by_rk4(ode.w_up.detach(), ode.w_down.detach(), d, base, base, scales)
    torch.testing.assert_close(got64, official, rtol=1e-9, atol=0)
    torch.testing.assert_close(got32.double(), official, rtol=2e-5, atol=0)
    gap = ((paper - official).abs() / official).max(dim=1).values      # per t: the other form's departure
    assert gap[0] == 0 and 1e-3 < gap[1] < 2e-2 and 0.02 < gap[3] < 0.1    # docs/methods.md §5g: ~1 % at t = 2, 4-7 %
    assert ((got64 - paper).abs() / paper).max() > 0.02                 # the test tells the two forms apart
    # base 1e4: the same ODE either way
    ode4 = CLEXODE(d, 1e4, act="silu")
    ode4.load_state_dict(ode.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ode4.log_frequencies(scales, dtype=torch.float64).exp(),
                                   _theta_by_rk4(ode.w_up.detach(), ode.w_down.detach(), d, 1e4, 1e4, scales),
                                   rtol=1e-9, atol=0)
    # untrained: NTK-aware with alpha = 2t - 1 on the model's base 1e5
    for t in scales:
        inv_freq, _ = CLEX.frequencies(head_dim=d, base=base, original_window=4096, target_window=32768,
                                       seq_len=4096 * t, max_factor=8)
        assert torch.allclose(inv_freq, default_inv_freq(d, ntk_base(base, d, 2 * t - 1)), rtol=1e-4, atol=0)


def test_one_solve_gives_every_scale_and_matches_single_solves():
    ode = CLEXODE(32, 1e4, act="tanh")
    with torch.no_grad():
        ode.w_down.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        table = ode.log_frequencies([1, 2, 3, 4])
        assert table.shape == (4, 16)
        assert torch.equal(table[0], ode._log_theta.float())
        assert torch.allclose(table[2], ode.log_frequencies([3])[-1], atol=1e-5)
    ntk = torch.log(default_inv_freq(32, ntk_base(1e4, 32, 5)))
    assert (table[2] - ntk).abs().max() > 1e-3  # a trained ODE departs from the NTK identity


def test_scale_selection():
    assert inference_scale(L, L, 4) == 1
    assert inference_scale(L + 1, L, 4) == 2
    assert inference_scale(2 * L, L, 4) == 2
    assert inference_scale(40 * L, L, 4) == 4  # clipped to max_factor
    assert inference_scale(1, L, 4) == 1
    assert inference_scale(40_000, 4096, 32) == 10 and inference_scale(32_769, 4096, 32) == 9  # docs/methods.md §5e1
    with pytest.raises(ValueError, match="n must be"):
        inference_scale(0, L, 4)
    model = clex_model(target=16, max_factor=4)
    rotary = model.model.rotary_emb
    for n, t in [(L, 1), (L + 1, 2), (40 * L, 4)]:
        with torch.no_grad():
            model(input_ids=ids(n))
        assert rotary.last_t == t
        assert torch.equal(CLEX.model_frequencies(model, n), rotary.frequency_table()[t - 1])


@pytest.mark.parametrize("T, t", [(16, 1), (16, 3), (32, 4), (64, 2)])
def test_training_positions(T, t):
    torch.manual_seed(T * 10 + t)
    pos = training_positions(T, L, t)
    k = T / L
    assert pos.dtype == torch.float32 and pos.shape == (T,)
    assert pos[0] == 0 and pos[-1] == pytest.approx((T * t - 1) / k)       # first and last positions
    assert (pos[1:] > pos[:-1]).all()                                     # sorted, distinct
    assert pos.min() >= 0 and pos.max() < L * t                           # within [0, L*t)
    ticks = pos.double() * k                                              # on the grid of 1/k steps
    assert torch.allclose(ticks, ticks.round(), atol=1e-4)
    if k > 1:
        assert (ticks.round() % k != 0).any()                             # fractional positions occur
    if t > 1:
        assert pos.max() > L * (t - 1)                                    # the whole range [0, L*t) is used


def test_training_forward_uses_random_scales_and_fractional_positions():
    model = clex_model()
    model.train()
    rotary = model.model.rotary_emb
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        cos, sin = rotary(torch.zeros(1, 16, 4), torch.arange(16)[None])
        seen.add(rotary.last_t)
    assert seen == set(range(1, 9))  # default max_factor = 4 x the training scale (16 / 8 = 2)


def test_gradient_flows_into_the_ode_weights():
    model = clex_model(trained=False)
    model.train()
    x = ids(16)
    torch.manual_seed(3)  # draws t > 1 (t = 1 uses the original theta and has no ODE gradient)
    while True:
        model.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        if model.model.rotary_emb.last_t > 1:
            break
    loss.backward()
    ode = model.model.rotary_emb.ode
    assert ode.w_down.grad is not None and ode.w_down.grad.abs().sum() > 0
    names = {n for n, _ in model.named_parameters()}
    assert {"model.rotary_emb.ode.w_up", "model.rotary_emb.ode.w_down"} <= names
    # the inference table follows an optimizer step (cache invalidated by the parameter change)
    model.eval()
    before = model.model.rotary_emb.frequency_table().clone()
    torch.optim.SGD(ode.parameters(), lr=1.0).step()
    assert not torch.equal(before, model.model.rotary_emb.frequency_table())


def test_reload_gives_identical_logits(tmp_path):
    model = clex_model()
    x = ids(30)
    with torch.no_grad():
        before = model(input_ids=x).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(tmp_path)
    assert isinstance(loaded.model.rotary_emb, CLEXRotaryEmbedding)
    assert torch.equal(loaded.model.rotary_emb.ode.w_down, model.model.rotary_emb.ode.w_down)
    with torch.no_grad():
        after = loaded(input_ids=x).logits
    assert torch.equal(before, after)
    assert loaded.config.ctxext == model.config.ctxext


def test_reload_without_ode_weights_fails_clearly(tmp_path):
    model = clex_model()
    model.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.torch import load_file, save_file
    state = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "rotary_emb.ode" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FileNotFoundError, match="ODE weights"):
        load_model(tmp_path)


def test_cached_generation_equals_full_recomputation():
    model = clex_model(max_factor=4)
    prompt = ids(6)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert out.sequences.shape[1] == 36  # crosses t = 1 -> 2 -> 3 -> 4 (n = 9, 17, 25) and the clip at 33
    for i, step_logits in enumerate(out.logits):
        n = prompt.shape[1] + i
        with torch.no_grad():
            full = model(input_ids=out.sequences[:, :n]).logits[:, -1]
        assert torch.allclose(step_logits, full, atol=1e-5, rtol=0), f"step {i} (n = {n})"


def test_manual_cache_loop_equals_full_and_needs_reencoding():
    model = clex_model(max_factor=4)
    x = ids(9)
    with torch.no_grad():
        first = model(input_ids=x[:, :8], use_cache=True)
        step = model(input_ids=x[:, 8:], past_key_values=first.past_key_values, use_cache=True)
        full = model(input_ids=x, use_cache=True)
    assert step.logits.shape == (1, 1, 64)
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)
    for mine, ref in zip(step.past_key_values.layers, full.past_key_values.layers):
        assert torch.allclose(mine.keys, ref.keys, atol=1e-6) and torch.allclose(mine.values, ref.values, atol=1e-6)
    # without the re-encoding (plain post-RoPE cache) the step would differ: the test above has teeth
    inner = model.model
    inner._ctxext_clex_pre_hook.remove()
    with torch.no_grad():
        first = model(input_ids=x[:, :8], use_cache=True)
        stale = model(input_ids=x[:, 8:], past_key_values=first.past_key_values, use_cache=True)
    assert (stale.logits[:, -1] - full.logits[:, -1]).abs().max() > 1e-4
    CLEX.install_hooks(model)


# ---------------------------------------------------------------- parameters


def test_defaults_and_validation():
    assert CLEX.defaults(4096, 32768) == {"max_factor": 32, "param_factor": 1, "act": "silu", "time_dt": 0.01}
    assert CLEX.defaults(256, 1024)["max_factor"] == 16 and CLEX.defaults(256, 512)["max_factor"] == 8
    for overrides, needle in [({"max_factor": 0}, "max_factor"), ({"param_factor": 1.5}, "param_factor"),
                              ({"act": "relu"}, "act"), ({"time_dt": 0}, "time_dt"), ({"nope": 1}, "nope")]:
        with pytest.raises(ValueError, match=needle):
            CLEX.frequencies(head_dim=64, base=1e4, original_window=4096, target_window=32768, **overrides)


def test_apply_records_and_refuses_twice():
    model = clex_model(trained=False, act="tanh", param_factor=2)
    assert model.config.ctxext == {"rope": "clex", "original_window": L, "target_window": 16,
                                   "params": {"max_factor": 8, "param_factor": 2, "act": "tanh", "time_dt": 0.01}}
    assert model.model.rotary_emb.ode.w_up.shape == (8, 32)
    with pytest.raises(ValueError, match="already"):
        CLEX.apply(model, L, 16)
