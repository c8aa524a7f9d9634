"""Tests of the RoPE extension methods: the maths against docs/methods.md (formulas written out here), against
transformers' own rope functions, the patched models (cos/sin, save/reload, dynamic-NTK state), and validation."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import methods
from methods import METHODS, get_method, restore
from methods.rope import verify_rotary
from methods.yarn import correction_range, mscale
from tests.helpers import logits, random_ids, tiny_llama

L, TARGET = 64, 256  # tiny model windows (s = 4)
NAMES = ["none", "pi", "ntk", "dynamic_ntk", "yarn", "llama3"]  # fixed frequency methods (CLEX: tests/test_clex.py)
ALL_NAMES = ["none", "pi", "ntk", "dynamic_ntk", "yarn", "clex", "llama3", "longrope"]


def theta(d, b):
    return 1.0 / (b ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def tiny_model(seed=0, **kw):
    return tiny_llama(seed, window=L, **kw)


def wide_head_model():
    """One layer with head_dim 128 (LLaMA2-7B's rotary dimension), windows 4096 -> 32768 are only config."""
    config = LlamaConfig(vocab_size=16, hidden_size=128, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(config).eval()


def ids(n, seed=1):
    return random_ids(n, 128, seed)


def alpha_from(inv_freq, d, b=10000.0):
    """Recover alpha from the last NTK frequency: b'^(-(d-2)/d) = b^(-(d-2)/d) / alpha."""
    return (b ** (-(d - 2) / d)) / inv_freq[-1].double().item()


# ---------------------------------------------------------------- registry and validation


def test_registry_names_and_unknown_method():
    assert list(METHODS) == ALL_NAMES
    for name in ALL_NAMES:
        method = get_method(name)
        assert method.name == name and method.description and "\n" not in method.description
    with pytest.raises(ValueError) as err:
        get_method("nope")
    assert all(name in str(err.value) for name in ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("windows, needle", [((0, 128), "original_window"), ((-4, 128), "original_window"),
                                             ((64, 0), "target_window"), ((64.0, 128), "original_window"),
                                             ((128, 64), "target_window=64")])
def test_bad_windows_raise(name, windows, needle):
    with pytest.raises(ValueError, match=needle):
        get_method(name).frequencies(head_dim=64, base=1e4, original_window=windows[0], target_window=windows[1])
    with pytest.raises(ValueError, match=needle):
        get_method(name).apply(tiny_model(), original_window=windows[0], target_window=windows[1])


@pytest.mark.parametrize("name, overrides, needle", [
    ("none", {"alpha": 2.0}, "alpha"), ("pi", {"factor": 8.0}, "factor"), ("yarn", {"beta_quick": 3}, "beta_quick"),
    ("ntk", {"alpha": 0.5}, "alpha"), ("yarn", {"beta_fast": 1.0, "beta_slow": 2.0}, "beta_fast"),
    ("yarn", {"beta_slow": 0}, "beta_slow"), ("dynamic_ntk", {"factor": 0.5}, "factor"),
    ("dynamic_ntk", {"floor": 10}, "floor"), ("dynamic_ntk", {"floor": "middle"}, "middle"),
    ("dynamic_ntk", {"regime": "melted"}, "melted")])
def test_bad_overrides_raise(name, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        get_method(name).frequencies(head_dim=64, base=1e4, original_window=4096, target_window=32768, **overrides)


def test_bad_rope_inputs_raise():
    with pytest.raises(ValueError, match="head_dim"):
        get_method("pi").frequencies(head_dim=63, base=1e4, original_window=4096, target_window=8192)
    with pytest.raises(ValueError, match="base"):
        get_method("pi").frequencies(head_dim=64, base=1.0, original_window=4096, target_window=8192)


def test_defaults():
    assert get_method("none").defaults(4096, 32768, "finetuned") == {}
    assert get_method("pi").defaults(4096, 32768, "frozen") == {}
    assert get_method("ntk").defaults(4096, 32768, "finetuned") == {"alpha": 8.0}
    assert get_method("yarn").defaults(4096, 32768, "finetuned") == {"beta_fast": 32.0, "beta_slow": 1.0}
    dyn = get_method("dynamic_ntk")
    assert dyn.defaults(4096, 32768, "finetuned") == {"factor": 4.0, "floor": 32768}
    assert dyn.defaults(4096, 65536, "finetuned") == {"factor": 8.0, "floor": 65536}
    assert dyn.defaults(4096, 32768, "frozen") == {"factor": 2.0, "floor": 4096}
    assert dyn.resolve(4096, 32768, floor="original") == {"factor": 4.0, "floor": 4096}
    assert dyn.resolve(4096, 32768, regime="frozen", floor="target") == {"factor": 2.0, "floor": 32768}


# ---------------------------------------------------------------- maths vs docs/methods.md


@pytest.mark.parametrize("d, b, s", [(128, 1e4, 8), (64, 1e4, 4), (16, 5e5, 16)])
def test_none_pi_ntk_formulas(d, b, s):
    L0 = 4096
    kw = dict(head_dim=d, base=b, original_window=L0, target_window=L0 * s, seq_len=L0 * s)
    none, none_scale = get_method("none").frequencies(**kw)
    pi, pi_scale = get_method("pi").frequencies(**kw)
    ntk, ntk_scale = get_method("ntk").frequencies(**kw)
    for t in (none, pi, ntk):
        assert t.dtype == torch.float32 and t.shape == (d // 2,)
    assert none_scale == pi_scale == ntk_scale == 1.0
    i = torch.arange(d // 2, dtype=torch.float64)
    torch.testing.assert_close(none.double(), b ** (-2 * i / d), rtol=1e-6, atol=0)
    torch.testing.assert_close(pi.double(), b ** (-2 * i / d) / s, rtol=1e-6, atol=0)
    b_ntk = b * s ** (d / (d - 2))
    torch.testing.assert_close(ntk.double(), b_ntk ** (-2 * i / d), rtol=1e-6, atol=0)
    torch.testing.assert_close(ntk.double(), b ** (-2 * i / d) * s ** (-2 * i / (d - 2)), rtol=1e-6, atol=0)
    assert pi[0].item() == pytest.approx(1 / s, rel=1e-7) and ntk[0].item() == 1.0
    assert ntk[-1].item() == pytest.approx(pi[-1].item(), rel=1e-6)  # NTK with alpha = s ends where PI does
    ntk29, _ = get_method("ntk").frequencies(**kw, alpha=29.0)
    assert alpha_from(ntk29, d, b) == pytest.approx(29.0, rel=1e-5)


def spec_yarn_bounds(d, b, L0, beta_fast=32, beta_slow=1):
    D = lambda r: d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(b))  # noqa: E731
    return max(math.floor(D(beta_fast)), 0), min(math.ceil(D(beta_slow)), d - 1)


def test_yarn_correction_range_and_mscale():
    assert spec_yarn_bounds(128, 1e4, 4096) == correction_range(128, 1e4, 4096, 32, 1) == (20, 46)
    assert spec_yarn_bounds(64, 1e4, 4096) == correction_range(64, 1e4, 4096, 32, 1) == (10, 23)
    for s, value in [(8, 1.2079441542), (2, 1.0693147181), (4, 1.1386294361), (16, 1.2772588722),
                     (32, 1.3465735903), (1, 1.0), (0.5, 1.0)]:
        assert mscale(s) == pytest.approx(value, abs=1e-10)
    assert mscale(8) ** 2 == pytest.approx(1.4591290796, abs=1e-9)


@pytest.mark.parametrize("d, s", [(128, 8), (64, 8), (128, 2), (64, 16)])
def test_yarn_frequencies(d, s):
    b, L0 = 1e4, 4096
    inv, scale = get_method("yarn").frequencies(head_dim=d, base=b, original_window=L0, target_window=L0 * s,
                                                seq_len=L0 * s)
    assert scale == pytest.approx(0.1 * math.log(s) + 1, abs=1e-12)
    low, high = spec_yarn_bounds(d, b, L0)
    orig = theta(d, b)
    pi = orig / s
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    torch.testing.assert_close(inv.double(), (orig.double() * (1 - ramp) + pi.double() * ramp), rtol=1e-6, atol=0)
    assert torch.equal(inv[: low + 1], orig[: low + 1])  # fast dimensions keep the original frequency
    torch.testing.assert_close(inv[high:], pi[high:], rtol=1e-6, atol=0)  # slow dimensions are PI
    mid = slice(low + 1, min(high, d // 2))
    assert (inv[mid] < orig[mid]).all() and (inv[mid] > pi[mid]).all() and inv[mid].numel() > 0
    assert inv[0].item() == 1.0


def test_yarn_beta_overrides_move_the_ramp():
    kw = dict(head_dim=128, base=1e4, original_window=4096, target_window=32768)
    default, _ = get_method("yarn").frequencies(**kw)
    wider, _ = get_method("yarn").frequencies(**kw, beta_fast=64.0, beta_slow=0.5)
    low, high = spec_yarn_bounds(128, 1e4, 4096, 64, 0.5)
    assert (low, high) == correction_range(128, 1e4, 4096, 64.0, 0.5) == (16, 50)
    ramp = ((torch.arange(64, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    orig = theta(128, 1e4).double()
    torch.testing.assert_close(wider.double(), orig * (1 - ramp) + orig / 8 * ramp, rtol=1e-6, atol=0)
    assert not torch.equal(default, wider)


def test_dynamic_ntk_frozen_alpha_matches_lceg():
    d, L0 = 128, 4096
    params = get_method("dynamic_ntk").defaults(L0, 32768, "frozen")
    for mult, alpha in [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31)]:
        inv, scale = get_method("dynamic_ntk").frequencies(head_dim=d, base=1e4, original_window=L0,
                                                           target_window=32768, seq_len=mult * L0, **params)
        assert scale == 1.0
        assert alpha_from(inv, d) == pytest.approx(alpha, rel=1e-5)
        b_n = 1e4 * alpha ** (d / (d - 2))
        torch.testing.assert_close(inv, theta(d, b_n), rtol=1e-6, atol=0)
    short, _ = get_method("dynamic_ntk").frequencies(head_dim=d, base=1e4, original_window=L0, target_window=32768,
                                                     seq_len=100, **params)
    assert torch.equal(short, theta(d, 1e4))  # alpha = 1 below the window: the original RoPE


def test_dynamic_ntk_finetuned_alpha_matches_lceg():
    d, L0 = 128, 4096
    dyn = get_method("dynamic_ntk")
    for n in (1, 2048, 4096, 16384, 32768):
        inv, _ = dyn.frequencies(head_dim=d, base=1e4, original_window=L0, target_window=32768, seq_len=n)
        assert alpha_from(inv, d) == pytest.approx(29, rel=1e-5)
    inv, _ = dyn.frequencies(head_dim=d, base=1e4, original_window=L0, target_window=32768, seq_len=65536)
    assert alpha_from(inv, d) == pytest.approx(61, rel=1e-5)
    inv, _ = dyn.frequencies(head_dim=d, base=1e4, original_window=L0, target_window=65536, seq_len=65536)
    assert alpha_from(inv, d) == pytest.approx(121, rel=1e-5)  # NTK-64K per code (docs/methods.md §3.2b)
    static29, _ = get_method("ntk").frequencies(head_dim=d, base=1e4, original_window=L0, target_window=32768,
                                                alpha=29.0)
    inv, _ = dyn.frequencies(head_dim=d, base=1e4, original_window=L0, target_window=32768, seq_len=8000)
    torch.testing.assert_close(inv, static29, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- vs transformers' rope functions


def hf_inv_freq(model, seq_len=None):
    config = model.config
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return type(model.model.rotary_emb).compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


@pytest.mark.parametrize("make, L0, T", [(tiny_model, L, TARGET), (wide_head_model, 4096, 32768)])
@pytest.mark.parametrize("name, hf_type", [("none", "default"), ("pi", "linear"), ("ntk", "default"),
                                           ("yarn", "yarn"), ("llama3", "llama3")])
def test_static_methods_match_transformers(make, L0, T, name, hf_type):
    model = get_method(name).apply(make(), original_window=L0, target_window=T)
    assert model.config.rope_parameters["rope_type"] == hf_type
    d = model.config.head_dim
    ours, scale = get_method(name).frequencies(head_dim=d, base=1e4, original_window=L0, target_window=T)
    theirs, their_scale = hf_inv_freq(model)
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=0)
    assert their_scale == pytest.approx(scale, rel=1e-12)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(scale, rel=1e-12)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, ours, rtol=1e-6, atol=0)
    if name == "yarn":  # the HF ramp uses L (20/46 for d = 128), not max_position_embeddings
        assert model.config.max_position_embeddings == T
        assert model.config.rope_parameters["original_max_position_embeddings"] == L0
        assert model.model.rotary_emb.attention_scaling == pytest.approx(mscale(T / L0), abs=1e-12)


@pytest.mark.parametrize("make, L0, T", [(tiny_model, L, TARGET), (wide_head_model, 4096, 32768)])
@pytest.mark.parametrize("regime", ["frozen", "finetuned"])
def test_dynamic_ntk_matches_transformers_dynamic(make, L0, T, regime):
    dyn = get_method("dynamic_ntk")
    model = dyn.apply(make(), original_window=L0, target_window=T, regime=regime)
    params = model.config.ctxext["params"]
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    assert model.config.max_position_embeddings == params["floor"]
    d, floor = model.config.head_dim, params["floor"]
    lengths = sorted({1, L0 - 1, L0, L0 + 1, 2 * L0, floor - 1, floor, floor + 1, 2 * floor, 3 * floor + 17,
                      16 * L0, 37 * L0 + 5})
    for n in lengths:
        ours, _ = dyn.frequencies(head_dim=d, base=1e4, original_window=L0, target_window=T, seq_len=n, **params)
        theirs, their_scale = ROPE_INIT_FUNCTIONS["dynamic"](model.config, None, seq_len=n)
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=0, msg=f"n={n}")
        theirs_t, _ = ROPE_INIT_FUNCTIONS["dynamic"](model.config, None, seq_len=torch.tensor(n))
        torch.testing.assert_close(theirs_t, ours, rtol=1e-5, atol=0, msg=f"n={n} (tensor seq_len)")
        assert their_scale == 1.0


def rope_cos_sin(inv_freq, scale, positions):
    angles = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


@pytest.mark.parametrize("name", NAMES)
def test_rotary_cos_sin_match_method_frequencies(name):
    method = get_method(name)
    model = method.apply(tiny_model(), original_window=L, target_window=TARGET)
    params = model.config.ctxext["params"]
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 64)
    for n in (40, L, 150, TARGET, 300, 700, 120):  # grows then shrinks: each call uses its own n
        positions = torch.arange(n)
        cos, sin = rotary(x, position_ids=positions[None])
        inv, scale = method.frequencies(head_dim=16, base=1e4, original_window=L, target_window=TARGET,
                                        seq_len=n, **params)
        ref_cos, ref_sin = rope_cos_sin(inv, scale, positions)
        torch.testing.assert_close(cos[0], ref_cos, rtol=1e-5, atol=2e-5, msg=f"{name} n={n}")
        torch.testing.assert_close(sin[0], ref_sin, rtol=1e-5, atol=2e-5, msg=f"{name} n={n}")
    # a single decoding step at position 499: n = max(position_ids) + 1 counts the cached tokens
    cos, _ = rotary(x, position_ids=torch.tensor([[499]]))
    inv, scale = method.frequencies(head_dim=16, base=1e4, original_window=L, target_window=TARGET, seq_len=500,
                                    **params)
    torch.testing.assert_close(cos[0], rope_cos_sin(inv, scale, torch.tensor([499]))[0], rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------- models: record, reload, state


@pytest.mark.parametrize("name", NAMES)
def test_save_reload_identical_logits(name, tmp_path):
    model = get_method(name).apply(tiny_model(), original_window=L, target_window=TARGET)
    record = model.config.ctxext
    assert record == {"rope": name, "original_window": L, "target_window": TARGET,
                      "params": get_method(name).defaults(L, TARGET, "finetuned")}
    x = ids(180)
    before = logits(model, x)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, fresh forward
    assert reloaded.config.ctxext == record
    assert torch.equal(logits(reloaded, x), before)
    assert restore(reloaded) is reloaded
    assert torch.equal(logits(reloaded, x), before)
    if name == "none":
        assert torch.equal(before, logits(tiny_model(), x))  # `none` changes nothing
    else:
        assert not torch.allclose(before, logits(tiny_model(), x))  # the method does change the model


def test_none_leaves_rotary_untouched():
    model = tiny_model()
    rotary = model.model.rotary_emb
    get_method("none").apply(model, original_window=L, target_window=L)
    assert model.model.rotary_emb is rotary and model.config.rope_parameters["rope_type"] == "default"
    assert model.config.max_position_embeddings == L


@pytest.mark.parametrize("regime, short, long", [("frozen", 150, 300), ("finetuned", 300, 450)])
def test_dynamic_ntk_no_state_leak(regime, short, long, tmp_path):
    model = get_method("dynamic_ntk").apply(tiny_model(), original_window=L, target_window=TARGET, regime=regime)
    x_short, x_long = ids(short, seed=2), ids(long, seed=3)
    fresh = logits(model, x_short)
    logits(model, x_long)
    assert torch.equal(logits(model, x_short), fresh)

    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(plain, x_short), fresh)  # fresh single forward of plain transformers
    logits(plain, x_long)
    assert not torch.allclose(logits(plain, x_short), fresh)  # plain HF reuses alpha(long): the leak
    restore(restore(plain))  # idempotent; also resets the leaked state
    assert len(plain.model.rotary_emb._forward_pre_hooks) == 1
    assert torch.equal(logits(plain, x_short), fresh)
    logits(plain, x_long)
    assert torch.equal(logits(plain, x_short), fresh)


def test_restore_without_record_is_noop():
    model = tiny_model()
    x = ids(50)
    before = logits(model, x)
    assert restore(model) is model
    assert not model.model.rotary_emb._forward_pre_hooks and torch.equal(logits(model, x), before)


def test_apply_refuses_an_already_extended_model():
    model = get_method("pi").apply(tiny_model(), original_window=L, target_window=TARGET)
    with pytest.raises(ValueError, match="already"):
        get_method("yarn").apply(model, original_window=L, target_window=TARGET)
    model = tiny_model()
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="linear"):
        get_method("ntk").apply(model, original_window=L, target_window=TARGET)


def test_apply_records_resolved_overrides_and_config_keys():
    model = get_method("dynamic_ntk").apply(tiny_model(), original_window=L, target_window=TARGET,
                                            factor=3, floor="original")
    assert model.config.ctxext["params"] == {"factor": 3, "floor": L}
    rope = model.config.rope_parameters
    assert rope["factor"] == pytest.approx(3.0) and rope["rope_theta"] == pytest.approx(1e4)  # floor L: plain HF
    model = get_method("ntk").apply(tiny_model(), original_window=L, target_window=TARGET, alpha=10.0)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": pytest.approx(1e4 * 10 ** (16 / 14))}
    model = get_method("pi").apply(tiny_model(), original_window=L, target_window=TARGET)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
    assert model.config.max_position_embeddings == TARGET


def test_verify_rotary_can_fail():
    rotary = tiny_model().model.rotary_emb
    inv, _ = get_method("pi").frequencies(head_dim=16, base=1e4, original_window=L, target_window=TARGET)
    with pytest.raises(RuntimeError, match="inv_freq"):
        verify_rotary(rotary, inv, 1.0, "pi")
    with pytest.raises(RuntimeError, match="attention_scaling"):
        verify_rotary(rotary, theta(16, 1e4), 1.2, "yarn")


def test_package_exports():
    assert set(methods.__all__) >= {"METHODS", "get_method", "restore"}
    assert methods.ATTENTIONS == ("exact", "lm_infinite", "landmark", "self_extend", "longlora")


def test_attention_axis_registry_and_exact_is_a_no_op(tmp_path):
    from methods import get_attention

    assert get_method("exact") is get_attention("exact")
    with pytest.raises(ValueError, match="valid: exact, lm_infinite"):
        get_attention("sparse")
    model = tiny_model()
    before = model(input_ids=torch.arange(8)[None]).logits
    get_attention("exact").apply(model, 16, 64, "frozen")
    assert not getattr(model.config, "ctxext_attention", None)
    assert torch.equal(model(input_ids=torch.arange(8)[None]).logits, before)
    with pytest.raises(ValueError, match="unknown parameter"):
        get_attention("exact").resolve(16, 64, "frozen", n_local=4)
