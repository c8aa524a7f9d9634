"""Evaluation helpers: perplexity windows, retrieval scoring (exact match, per-token accuracy, the answer's
log-probability, logits only at the answer positions), confidence intervals."""
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from methods import attention_of
from tests.helpers import greedy_by_recomputation, tiny_llama
from workflow.corpus import document_bounds
from workflow.scoring import answer_scores, answers_correct, evaluate_ppl, evaluate_retrieval, ppl_spans
from workflow.stats import wilson


def test_spans_stay_inside_documents_when_possible():
    eos = 0
    docs = [np.arange(1, 301), np.arange(1, 51), np.arange(1, 901), np.arange(1, 401)]
    tokens = np.concatenate([np.concatenate([d, [eos]]) for d in docs]).astype(np.uint16)
    bounds = document_bounds(tokens, eos)
    assert [e - s for s, e in bounds] == [300, 50, 900, 400]
    starts, crossing = ppl_spans(tokens, eos, 300, 3, seed=0)
    assert crossing == 0 and len(starts) == 3
    assert set(starts) == {s for s, e in bounds if e - s >= 300}
    assert ppl_spans(tokens, eos, 300, 3, seed=0) == (starts, 0)
    starts, crossing = ppl_spans(tokens, eos, 800, 3, seed=0)   # only one document is long enough
    assert len(starts) == 3 and crossing == 2


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert low < 0.5 < high and 0 <= low and high <= 1
    assert wilson(0, 4)[0] == 0.0 and wilson(4, 4)[1] == 1.0


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def test_retrieval_scoring_matches_greedy_decoding():
    model = _model()
    prompt = [3, 9, 4, 12, 7, 1, 8]
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, len(prompt):].tolist()
    wrong = [(t + 1) % 50 for t in greedy]
    samples = [{"input_ids": prompt, "answer_ids": greedy}, {"input_ids": prompt, "answer_ids": wrong}]
    assert answers_correct(model, samples) == [True, False]


def test_ppl_scores_the_same_tokens_at_every_length_and_matches_the_model_loss():
    model = _model()
    tokens = np.random.default_rng(0).integers(1, 50, size=400).astype(np.uint16)
    tokens[[130, 260]] = 0   # three documents: 130, 129 and 139 tokens
    cfg = {"lengths": [32, 128], "ppl": {"documents": 2, "seed": 0}, "batch_tokens": 64}
    rows, meta = evaluate_ppl(model, tokens, 0, cfg)
    assert meta == {"spans": 2, "span_tokens": 128, "cross_document_spans": 0}
    spans, _ = ppl_spans(tokens, 0, 128, 2, 0)
    for length in (32, 128):
        ppl = next(r for r in rows if r["metric"] == "ppl" and r["eval_len"] == length)
        batch = torch.tensor(np.stack([tokens[s + k:s + k + length] for s in spans
                                       for k in range(0, 128, length)]).astype(np.int64))
        with torch.no_grad():
            expected = model(input_ids=batch, labels=batch).loss.item()
        assert math.isclose(ppl["value"], math.exp(expected), rel_tol=1e-5)
        assert ppl["n"] == 2 * (128 // length) * (length - 1)


def _retrieval_samples(vocab, lengths, depths, per_cell, seed=0):
    """Samples of the data stage's shape: prompt + answer of exactly eval_len tokens, answers of 1 to 3 tokens."""
    g = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for i in range(per_cell):
                k = 1 + (i % 3)
                ids = g.integers(1, vocab, size=length).tolist()
                out.append({"eval_len": length, "depth": depth, "input_ids": ids[:-k], "answer_ids": ids[-k:]})
    return out


def test_retrieval_rows_give_exact_match_token_accuracy_and_log_probability(tmp_path):
    model = _model()
    samples = _retrieval_samples(50, [12, 20], [0.0, 1.0], 5)
    for s in samples[::2]:  # make some answers the model's own greedy continuation
        prompt = torch.tensor([s["input_ids"]])
        s["answer_ids"] = greedy_by_recomputation(lambda x: model(input_ids=x).logits, prompt,
                                                  len(s["answer_ids"]))[0].tolist()
    path = tmp_path / "passkey.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    rows, meta = evaluate_retrieval(model, path, {"batch_tokens": 40, "prefill_chunk": 5})
    assert meta == {"samples": 20, "prefill_chunk": 5}
    assert {r["metric"] for r in rows} == {"accuracy", "token_accuracy", "answer_logprob"}
    assert len(rows) == 2 * 2 * 3
    for length in (12, 20):
        for depth in (0.0, 1.0):
            group = [s for s in samples if s["eval_len"] == length and s["depth"] == depth]
            exact, token, logprob = [], [], []
            for s in group:  # the reference: one full forward pass, all logits, log-softmax at the answer positions
                with torch.no_grad():
                    full = model(input_ids=torch.tensor([s["input_ids"] + s["answer_ids"]])).logits[0].double()
                start, k = len(s["input_ids"]), len(s["answer_ids"])
                at = full[start - 1:start - 1 + k]
                hits = [int(at[i].argmax()) == s["answer_ids"][i] for i in range(k)]
                exact.append(all(hits))
                token.append(sum(hits) / k)
                logprob.append(float(torch.log_softmax(at, -1)[range(k), s["answer_ids"]].mean()))
            got = {r["metric"]: r for r in rows if r["eval_len"] == length and r["depth"] == depth}
            assert all(r["n"] == 5 for r in got.values())
            assert got["accuracy"]["value"] == sum(exact) / 5
            assert (got["accuracy"]["ci_low"], got["accuracy"]["ci_high"]) == wilson(sum(exact), 5)
            assert got["token_accuracy"]["value"] == pytest.approx(np.mean(token))
            assert got["answer_logprob"]["value"] == pytest.approx(np.mean(logprob), rel=1e-5)
            for name, values, clip in (("token_accuracy", token, True), ("answer_logprob", logprob, False)):
                if np.std(values) == 0:
                    continue
                low, high = scipy.stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy.stats.sem(values))
                if clip:
                    low, high = max(0.0, low), min(1.0, high)
                assert got[name]["ci_low"] == pytest.approx(low, rel=1e-4, abs=1e-6)
                assert got[name]["ci_high"] == pytest.approx(high, rel=1e-4, abs=1e-6)
    assert all(r["value"] >= 0.4 for r in rows if r["metric"] == "accuracy")  # the planted greedy answers count
    assert all(r["value"] < 1 for r in rows if r["metric"] == "accuracy")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any aten operation returns while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.largest:
                self.largest, self.shape = leaf.numel(), tuple(leaf.shape)
        return out


@pytest.mark.parametrize("attention,prefill_chunk", [("exact", None), ("lm_infinite", None), ("lm_infinite", 1024)])
def test_retrieval_scoring_at_4096_tokens_never_builds_full_vocabulary_logits(attention, prefill_chunk):
    from methods import get_attention

    vocab, T, rows = 4096, 4096, 2  # the tiny study's vocabulary at its longest retrieval length
    model = tiny_llama(0, vocab=vocab, hidden=32, intermediate=64, layers=2, heads=2, window=256)
    if attention == "lm_infinite":
        get_attention(attention).apply(model, 256, 256, "frozen")
    samples = _retrieval_samples(vocab, [T], [0.5], rows)
    head_inputs = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: head_inputs.append(args[0].shape))
    with LargestTensor() as largest:
        scores = answer_scores(model, samples, prefill_chunk=prefill_chunk)
    assert len(scores) == rows
    assert head_inputs == [torch.Size([rows, 2, 32])]  # the output layer saw the answer positions only
    assert largest.largest < T * vocab, f"a {largest.shape} tensor was built"  # not even one row's [T, vocab]
    batch = torch.tensor([s["input_ids"] + s["answer_ids"] for s in samples])
    with LargestTensor() as old_way, torch.no_grad():  # the test has teeth: full logits are that large
        attention_of(model).logits(model, batch)
    assert old_way.largest == rows * T * vocab


def test_a_bad_prefill_chunk_stops_before_any_compute():
    from workflow.config import ConfigError, compose, validate

    validate(compose("micro", ["eval.prefill_chunk=null"]))  # null: the default chunk
    for bad, message in (("0", "must be >= 1"), ("-4", "must be >= 1"), ("2.5", "must be an integer or null"),
                         ("true", "must be an integer or null")):
        with pytest.raises(ConfigError, match=f"eval.prefill_chunk {message}"):
            validate(compose("micro", [f"eval.prefill_chunk={bad}"]))
