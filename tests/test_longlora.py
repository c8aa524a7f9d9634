"""Tests of LongLoRA (`methods/longlora.py`, docs/methods.md §8.2): S²-Attn against a naive masked reference written
here (group membership spelled out pair by pair), no attention across the shifted groups' boundaries (no future
leakage, unlike the roll form), equality with full attention when a group covers the sequence and outside training,
the LoRA recipe (targets, rank, trainable embeddings and norms), and the merge: the saved cell is a plain model whose
weights are W + (α/r)·B·A."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AttentionInterface, AutoModelForCausalLM

from methods import ATTENTIONS, attention_of, get_attention, get_method
from methods.longlora import ATTN_IMPLEMENTATION, lora_layers, merged_state_dict, s2_attention, s2_segments
from tests.helpers import random_ids, tiny_llama

L = 16


def tiny_model(seed=0, heads=4, kv_heads=2):
    return tiny_llama(seed, vocab=97, intermediate=96, heads=heads, kv_heads=kv_heads, window=L,
                      attn_implementation="sdpa")


def ids(n, rows=1, seed=1):
    return torch.cat([random_ids(n, 97, seed + r) for r in range(rows)])


def qkv(n, h=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, d, generator=g) for _ in range(3)]


# ---------------------------------------------------------------- S²-Attn against a reference


def allowed(i, j, head, heads, group):
    """May query i see key j in this head? Causal, and in the same group; the second half of the heads uses groups
    shifted by group/2 (so i and j share a group iff floor((i + G/2)/G) == floor((j + G/2)/G))."""
    if j > i:
        return False
    shift = group // 2 if head >= heads // 2 else 0
    return (i + shift) // group == (j + shift) // group


def naive_s2(q, k, v, group, scaling, rule=allowed):
    b, h, n, d = q.shape
    scores = (q.double() @ k.double().transpose(-1, -2)) * scaling
    mask = torch.tensor([[[rule(i, j, head, h, group) for j in range(n)] for i in range(n)] for head in range(h)])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ v.double()).transpose(1, 2)


def rolled(i, j, head, heads, group):
    """The older roll-based form: the shifted heads see the sequence rolled left by G/2, so the last half-group is
    wrapped round to the start and the first queries see it (the leak)."""
    if head < heads // 2:
        return j <= i and i // group == j // group
    n = ROLL_N
    ri, rj = (i - group // 2) % n, (j - group // 2) % n   # positions in the rolled sequence
    return rj <= ri and ri // group == rj // group


ROLL_N = 16


def test_segments():
    assert s2_segments(16, 4, False) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert s2_segments(16, 4, True) == [(0, 2), (2, 6), (6, 10), (10, 14), (14, 16)]
    assert s2_segments(8, 32, True) == [(0, 8)]


@pytest.mark.parametrize("n, group", [(16, 4), (16, 8), (32, 8), (12, 6), (16, 16)])
def test_matches_the_masked_reference(n, group):
    q, k, v = qkv(n)
    torch.testing.assert_close(s2_attention(q, k, v, group, 0.3).double(), naive_s2(q, k, v, group, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_no_attention_across_shifted_group_boundaries_and_no_future_leak():
    n, group = ROLL_N, 4
    q, k, v = qkv(n, seed=3)
    out = s2_attention(q, k, v, group, 0.3)
    for j in range(n):  # perturb one key/value position: only queries in its group, at or after it, may change
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 5.0
        v2[:, :, j] += 5.0
        changed = (s2_attention(q, k2, v2, group, 0.3) - out).abs().amax(dim=(0, 3)) > 1e-6   # [n, heads]
        for i in range(n):
            for head in range(4):
                assert bool(changed[i, head]) == allowed(i, j, head, 4, group), (i, j, head)
    # the roll form would let the first half-group of the shifted heads see the last one (the future)
    wrong = naive_s2(q, k, v, group, 0.3, rule=rolled)
    assert not torch.allclose(out.double(), wrong, atol=1e-4)
    leaked = [(i, j) for i in range(group // 2) for j in range(n - group // 2, n) if rolled(i, j, 3, 4, group)]
    assert leaked and not any(allowed(i, j, 3, 4, group) for i, j in leaked)


def test_equals_full_attention_when_a_group_covers_the_sequence():
    n = 10
    q, k, v = qkv(n, seed=5)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(s2_attention(q, k, v, 2 * n, 0.3), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s2_attention(q, k, v, n, 0.3), full, atol=1e-4)  # G = n: the shifted half is split


# ---------------------------------------------------------------- on a model


def longlora_model(seed=0, train_len=16, **overrides):
    model = tiny_model(seed)
    get_method("pi").apply(model, L, 4 * L)
    torch.manual_seed(seed)
    return get_attention("longlora").apply(model, L, train_len, "finetuned", **overrides)


def test_registered_with_the_lora_recipe():
    assert "longlora" in ATTENTIONS and ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    model = longlora_model()
    record = model.config.ctxext_attention
    assert record["params"] == {"group_size_ratio": 0.25, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                "trainable": ["embed", "norm"]}
    assert record["merged"] is False and model.config._attn_implementation == ATTN_IMPLEMENTATION
    layers = lora_layers(model)
    assert sorted({name.rsplit(".", 1)[-1] for name, _ in layers}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(layers) == 4 * 2 and all(layer.r["default"] == 8 and layer.scaling["default"] == 2.0
                                        for _, layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if "lora_" in n or "embed_tokens" in n or "norm" in n}
    assert any("input_layernorm" in n for n in trainable) and "model.norm.weight" in trainable
    assert not any("mlp" in n or "base_layer" in n for n in trainable)


def test_training_uses_s2_attn_and_evaluation_full_attention():
    base = tiny_model()
    get_method("pi").apply(base, L, 4 * L)
    model = longlora_model()
    x = ids(16, rows=2)
    with torch.no_grad():
        # eval mode (and B = 0 at initialisation): exactly the model it was made from, full attention
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        model.train()
        trained = model(input_ids=x).logits
        assert not torch.allclose(trained, base(input_ids=x).logits, atol=1e-4)

        def naive(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            groups = query.shape[1] // key.shape[1]
            out = naive_s2(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), 4, scaling)
            return out.to(query.dtype), None
        AttentionInterface.register("test_naive_s2", naive)
        model.set_attn_implementation("test_naive_s2")
        torch.testing.assert_close(trained, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def train_a_little(model, steps=3):
    """A few AdamW steps on random rows (training mode, S²-Attn), so that the adapters and norms move."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = ids(16, rows=2, seed=10 + step)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_finish_merges_into_a_plain_model(tmp_path):
    from workflow.modeling import load_model

    model = train_a_little(longlora_model())
    x = ids(40, seed=4)
    with torch.no_grad():
        expected = model(input_ids=x).logits  # eval mode: full attention with the adapters
    weights = {}
    for name, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        assert b.abs().sum() > 0
        weights[name + ".weight"] = layer.get_base_layer().weight.double() + (16 / 8) * (b @ a)
    attention_of(model).finish_training(model)
    assert not lora_layers(model) and model.config._attn_implementation == "sdpa"
    assert model.config.ctxext_attention["merged"] is True
    for name, value in weights.items():
        torch.testing.assert_close(model.get_parameter(name).double(), value, rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert set(weights) <= keys
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()   # plain transformers, no ctxext
    assert json.loads((tmp_path / "config.json").read_text())["ctxext"]["rope"] == "pi"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
    again = load_model(tmp_path)   # ctxext's loader: restore() leaves the merged model's full attention alone
    assert again.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)


def test_the_state_dict_path_of_sharded_training_gives_the_same_checkpoint(tmp_path):
    one, two = train_a_little(longlora_model()), train_a_little(longlora_model())
    state = merged_state_dict(dict(two.state_dict()), 2.0)
    via_dict = attention_of(two).finish_training(two, state_dict=dict(two.state_dict()))
    assert via_dict.keys() == state.keys()
    attention_of(one).finish_training(one)
    reference = one.state_dict()
    assert set(via_dict) == set(reference)
    for name, value in via_dict.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6)
    two.save_pretrained(tmp_path, safe_serialization=True, state_dict=via_dict)  # as the multi-process stage saves
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(20)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, one(input_ids=x).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- parameters


def test_validation():
    method = get_attention("longlora")
    assert method.defaults(256, 1024, "finetuned")["group_size_ratio"] == 0.25
    with pytest.raises(ValueError, match="supports regime"):
        method.defaults(256, 1024, "frozen")
    for train_len, ratio in ((1002, 0.25), (12, 0.25), (16, 0.1)):  # 250 does not divide 1002; 3 is odd; 1 < 2
        with pytest.raises(ValueError, match="divides the row length"):
            method.resolve(8, train_len, "finetuned", group_size_ratio=ratio)
    assert method.resolve(8, 16, "finetuned", group_size_ratio=1.0)["group_size_ratio"] == 1.0
    for key, bad in (("group_size_ratio", 0), ("group_size_ratio", 1.5), ("lora_r", 0), ("lora_r", 2.0),
                     ("lora_alpha", -1), ("lora_dropout", 1.0), ("lora_targets", ["gate_proj"]),
                     ("lora_targets", []), ("trainable", "norm")):
        with pytest.raises(ValueError, match=key):
            method.resolve(256, 1024, "finetuned", **{key: bad})
    with pytest.raises(ValueError, match="even number of heads"):
        method.apply(tiny_model(heads=1, kv_heads=1), L, 16, "finetuned")
    model = longlora_model()
    with pytest.raises(ValueError, match="already has an attention"):
        method.apply(model, L, 16, "finetuned")
    method.finish_training(model)
    with pytest.raises(ValueError, match="with adapters"):
        method.finish_training(model)
    x = ids(24)  # a training row whose group (6) does not divide it... 24 / 4 = 6: fine; 20 / 4 = 5 (odd): refused
    model = longlora_model().train()
    model(input_ids=x)
    with pytest.raises(ValueError, match="divides the row length"):
        model(input_ids=ids(20))


# ---------------------------------------------------------------- the fine-tuning stage


def test_the_finetune_stage_saves_a_merged_plain_model(stage):
    """The micro study's PI + LongLoRA cell through the real stage: trained with S²-Attn and adapters, saved merged."""
    from tests.helpers import run_finetune

    run, out = run_finetune(stage, "pi-longlora-128-ft")
    assert run.returncode == 0, run.stderr[-3000:]
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["ctxext"]["rope"] == "pi" and saved["rope_parameters"]["rope_type"] == "linear"
    assert saved["ctxext_attention"]["attention"] == "longlora" and saved["ctxext_attention"]["merged"] is True
    plain = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(stage["root"] / "base" / "model").eval()
    changed = [n for n, p in plain.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert any("q_proj" in n for n in changed) and any("norm" in n for n in changed)
    assert not any("mlp" in n for n in changed)   # frozen: neither LoRA targets nor embed/norm
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stage["cfg"]["finetune"]["steps"] + 1))
