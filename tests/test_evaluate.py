"""Evaluation helpers: perplexity windows, retrieval scoring, confidence intervals."""
import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workflow.corpus import document_bounds
from workflow.scoring import answers_correct, evaluate_ppl, ppl_spans
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
