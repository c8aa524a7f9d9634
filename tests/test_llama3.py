"""Tests of Llama 3.1's rope scaling (`methods/llama3.py`, docs/methods.md §14): the three wavelength bands computed
here frequency by frequency in Python floats (Meta's `apply_scaling` loop), against transformers'
`_compute_llama3_parameters` and the rotary module it builds, on a model, and validation."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from methods import get_method
from tests.helpers import logits, random_ids, tiny_llama


def reference(d, b, L, factor, low=1.0, high=4.0):
    """Meta's loop: one frequency at a time, by wavelength against L/high and L/low."""
    out = []
    for i in range(d // 2):
        theta = b ** (-2 * i / d)
        wavelength = 2 * math.pi / theta
        if wavelength < L / high:
            out.append(theta)
        elif wavelength > L / low:
            out.append(theta / factor)
        else:
            smooth = (L / wavelength - low) / (high - low)
            out.append((1 - smooth) * theta / factor + smooth * theta)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("d, b, L, s", [(128, 500000.0, 8192, 8.0), (128, 1e4, 4096, 8.0), (32, 1e4, 256, 4.0),
                                        (16, 1e4, 64, 2.0), (64, 1e5, 8192, 4.0)])
def test_frequencies_match_the_reference_loop(d, b, L, s):
    inv, scale = get_method("llama3").frequencies(head_dim=d, base=b, original_window=L, target_window=int(L * s))
    assert scale == 1.0 and inv.dtype == torch.float32 and inv.shape == (d // 2,)
    torch.testing.assert_close(inv.double(), reference(d, b, L, s), rtol=1e-6, atol=0)


def test_the_bands_in_the_tiny_study():
    """d = 32, b = 1e4, L = 256: wavelengths 2π·10^(i/4); dimensions 0-4 (λ < 64) are kept, 5-6 blended,
    7-15 (λ > 256) divided by s = 4."""
    inv, _ = get_method("llama3").frequencies(head_dim=32, base=1e4, original_window=256, target_window=1024)
    theta = 1e4 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    assert torch.allclose(inv[:5].double(), theta[:5], rtol=1e-6, atol=0)
    assert torch.allclose(inv[7:].double(), theta[7:] / 4, rtol=1e-6, atol=0)
    mid = inv[5:7].double()
    assert ((mid < theta[5:7]) & (mid > theta[5:7] / 4)).all()
    # dimension 5: 256 / (2π·10^1.25) = 2.291 turns, smooth = (2.291 - 1) / 3
    smooth = (256 / (2 * math.pi * 10 ** 1.25) - 1) / 3
    assert inv[5].item() == pytest.approx((1 - smooth) * theta[5].item() / 4 + smooth * theta[5].item(), rel=1e-6)


def test_meta_values_change_only_the_band_they_should():
    """Llama 3.1 (d 128, b 5e5, L 8192, factor 8): the fastest dimension is untouched, the slowest divided by 8."""
    inv, _ = get_method("llama3").frequencies(head_dim=128, base=5e5, original_window=8192, target_window=65536)
    assert inv[0].item() == 1.0
    assert inv[-1].item() == pytest.approx(5e5 ** (-126 / 128) / 8, rel=1e-6)


@pytest.mark.parametrize("L, T, overrides", [(64, 256, {}), (64, 128, {"low_freq_factor": 0.5}),
                                             (256, 1024, {"factor": 8.0, "high_freq_factor": 2.0})])
def test_matches_transformers(L, T, overrides):
    model = get_method("llama3").apply(tiny_llama(window=L), original_window=L, target_window=T, **overrides)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == L
    assert model.config.max_position_embeddings == T
    theirs, their_scale = ROPE_INIT_FUNCTIONS["llama3"](model.config, None)
    params = model.config.ctxext["params"]
    ours = reference(16, 1e4, L, params["factor"], params["low_freq_factor"], params["high_freq_factor"])
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), ours, rtol=1e-6, atol=0)
    assert their_scale == 1.0 and model.model.rotary_emb.attention_scaling == 1.0


def test_save_reload_and_change(tmp_path):
    model = get_method("llama3").apply(tiny_llama(window=64), original_window=64, target_window=256)
    x = random_ids(200, 128)
    before = logits(model, x)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.ctxext == {"rope": "llama3", "original_window": 64, "target_window": 256,
                                   "params": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    assert torch.equal(logits(again, x), before)
    assert not torch.allclose(before, logits(tiny_llama(window=64), x))


@pytest.mark.parametrize("overrides, needle", [({"factor": 0.5}, "factor"), ({"low_freq_factor": 0}, "low_freq"),
                                               ({"high_freq_factor": 1.0}, "high_freq_factor"),
                                               ({"low_freq_factor": "1"}, "low_freq"), ({"beta": 1}, "beta")])
def test_validation(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        get_method("llama3").frequencies(head_dim=32, base=1e4, original_window=256, target_window=1024, **overrides)
