"""The ctxext lm-eval model (no truncation, logits through the attention kind, greedy generation), the
lm_eval suite's rows and hub checks, and an end-to-end RULER run into DuckDB."""
import json
import statistics
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from tests.helpers import greedy_by_recomputation, stdlib_tokenizer, tiny_llama
from workflow import lm_eval_suites
from workflow.lm_eval_model import CellLM

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def tok_and_text():
    tokenizer, texts = stdlib_tokenizer(vocab=300, modules=("argparse.py",))
    return tokenizer, texts[0]


def _model(tokenizer, window=64):
    return tiny_llama(vocab=len(tokenizer), hidden=32, intermediate=64, heads=2, window=window)


def _seen_lengths(model):
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


def _gen(prompt, n=4, until=()):
    return Instance(request_type="generate_until", doc={}, arguments=(prompt, {"until": list(until),
                    "max_gen_toks": n, "do_sample": False}), idx=0)


def test_a_long_prompt_reaches_the_model_whole(tok_and_text):
    tokenizer, text = tok_and_text
    prompt = text[:3000]
    n_prompt = len(tokenizer.encode(prompt))
    assert n_prompt > 400  # far beyond the model's 64-token max_position_embeddings
    model = _model(tokenizer)
    seen = _seen_lengths(model)
    lm = CellLM(model=model, tokenizer=tokenizer, max_length=n_prompt + 16, max_gen_toks=16)
    lm.generate_until([_gen(prompt)])
    assert max(seen) >= n_prompt
    seen.clear()
    lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(prompt, " the"), idx=0)])
    assert max(seen) >= n_prompt
    # lm-eval's own HF model, left at its default max_length, would have cut the prompt to the window
    from lm_eval.models.huggingface import HFLM

    seen.clear()
    HFLM(pretrained=model, tokenizer=tokenizer).generate_until([_gen(prompt)])
    assert max(seen) <= 64


def test_a_prompt_longer_than_max_length_is_an_error_not_a_truncation(tok_and_text):
    tokenizer, text = tok_and_text
    lm = CellLM(model=_model(tokenizer), tokenizer=tokenizer, max_length=100, max_gen_toks=8)
    with pytest.raises(ValueError, match="does not fit max_length"):
        lm.generate_until([_gen(text[:3000])])
    with pytest.raises(ValueError, match="exceeds max_length"):
        lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(text[:3000], " x"), idx=0)])


def test_greedy_generation_matches_transformers_and_batches_rows_of_any_length(tok_and_text):
    tokenizer, text = tok_and_text
    model = _model(tokenizer, window=512)
    prompts = [text[:400], text[1000:1250], text[2000:2400]]
    lm = CellLM(model=model, tokenizer=tokenizer, max_length=512, max_gen_toks=8, batch_size=3)
    got = lm.generate_until([_gen(p, n=6) for p in prompts])
    for prompt, answer in zip(prompts, got):
        ids = torch.tensor([tokenizer.encode(prompt)])
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_loglikelihood_comes_from_the_attention_kinds_answer_logits(tok_and_text, monkeypatch):
    tokenizer, text = tok_and_text
    model = _model(tokenizer, window=512)
    lm = CellLM(model=model, tokenizer=tokenizer, max_length=512, max_gen_toks=8)
    request = Instance(request_type="loglikelihood", doc={}, arguments=(text[:300], " import"), idx=0)
    before = lm.loglikelihood([request])[0][0]
    from methods import attention_of

    kind = type(attention_of(model))
    real, calls = kind.answer_logits, []

    def halved(self, m, ids, positions, **kw):
        calls.append((ids.shape, positions.shape))
        return real(self, m, ids, positions, **kw) * 0.5

    monkeypatch.setattr(kind, "answer_logits", halved)
    after = lm.loglikelihood([request])[0][0]
    n_cont = len(tokenizer.encode(text[:300] + " import")) - len(tokenizer.encode(text[:300]))
    assert calls and after != pytest.approx(before)
    assert all(shape[1] == n_cont for _, shape in calls)  # logits of the continuation only, never the context


@torch.no_grad()
def test_loglikelihood_equals_full_logits_for_mixed_lengths_in_one_batch(tok_and_text):
    tokenizer, text = tok_and_text
    model = _model(tokenizer, window=512)
    lm = CellLM(model=model, tokenizer=tokenizer, max_length=512, max_gen_toks=8, batch_size=3, prefill_chunk=32)
    pairs = [(text[:300], " import"), (text[:300], " the parser"), (text[400:520].rstrip(), " def"), (text[800:900], " x")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
        cont = whole[len(ctx):]
        logits = model(input_ids=torch.tensor([whole])).logits[0, len(ctx) - 1:-1].double()  # the reference
        expected = torch.log_softmax(logits, -1)[range(len(cont)), cont].sum()
        assert logprob == pytest.approx(float(expected), rel=1e-5)
        assert greedy == (logits.argmax(-1).tolist() == cont)
    rolling = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text[:600],),
                                                 idx=0)])[0]
    ids = [lm.prefix_token_id] + tokenizer.encode(text[:600])  # lm-eval scores every token after a prefix token
    assert len(ids) <= lm.max_length  # one rolling window
    reference = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
    assert rolling == pytest.approx(float(reference[range(len(ids) - 1), ids[1:]].sum()), rel=1e-5)


def test_generation_prefills_once_then_feeds_one_token_per_step(tok_and_text):
    tokenizer, text = tok_and_text
    model = _model(tokenizer, window=512)
    seen = _seen_lengths(model)
    lm = CellLM(model=model, tokenizer=tokenizer, max_length=1024, max_gen_toks=8, prefill_chunk=128)
    lm.generate_until([_gen(text[:1000], n=6)])
    n = len(tokenizer.encode(text[:1000]))
    assert seen == [128] * (n // 128) + [n % 128] * bool(n % 128) + [1] * 5


@pytest.mark.parametrize("attention", ["lm_infinite", "exact"])
def test_generation_equals_full_recomputation_and_stops_at_a_stop_sequence(tok_and_text, attention):
    from methods import get_attention

    tokenizer, text = tok_and_text
    model = _model(tokenizer, window=512)
    if attention == "lm_infinite":
        get_attention("lm_infinite").apply(model, 64, 64, "frozen", n_local=48, n_global=4)
    lm = CellLM(model=model, tokenizer=tokenizer, max_length=1024, max_gen_toks=12, batch_size=2, prefill_chunk=64)
    prompts = [text[:700], text[1000:1300]]
    free = lm.generate_until([_gen(p, n=10) for p in prompts])
    for prompt, answer in zip(prompts, free):
        ids = torch.tensor([tokenizer.encode(prompt)])
        ref = greedy_by_recomputation(lambda x: model(input_ids=x).logits, ids, 10)[0]
        assert answer == tokenizer.decode(ref, skip_special_tokens=True)
    stop = free[0][len(free[0]) // 2:][:2]  # a stop sequence from the middle of the first answer
    assert stop.strip()
    cut = lm.generate_until([_gen(prompts[0], n=10, until=[stop])])[0]
    assert cut == free[0][:free[0].index(stop)]


def test_rows_from_lm_eval_results():
    results = {"niah_single_1": {"alias": "niah_single_1", "4096,none": 0.75, "4096_stderr,none": "N/A",
                                 "8192,none": -1},
               "longbench2_many_shot": {"acc,none": 0.5, "acc_stderr,none": 0.1}}
    rows = lm_eval_suites.lm_eval_rows(results, eval_len=2048)
    assert rows[0] == {"task": "niah_single_1", "eval_len": 4096, "metric": "score", "value": 0.75, "n": None}
    lb = rows[1]
    assert (lb["eval_len"], lb["metric"], lb["value"]) == (2048, "acc", 0.5)
    z = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...: a 95% normal interval around lm-eval's stderr
    assert lb["ci_low"] == pytest.approx(0.5 - z * 0.1) and lb["ci_high"] == pytest.approx(0.5 + z * 0.1)
    assert len(rows) == 2  # the -1 placeholder of an absent length is no row


def test_score_rows_use_wilson_for_binary_scores_and_a_t_interval_otherwise():
    from workflow.stats import wilson

    row = lm_eval_suites.score_row("vt", 256, [1.0, 0.0, 1.0, 1.0])
    assert (row["value"], row["n"]) == (0.75, 4) and (row["ci_low"], row["ci_high"]) == wilson(3, 4)
    row = lm_eval_suites.score_row("niah_multivalue", 256, [0.5, 0.6, 0.7])
    t_975_df2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom (tables)
    assert row["value"] == pytest.approx(0.6) and row["ci_low"] == pytest.approx(0.6 - t_975_df2 * 0.1 / 3 ** 0.5)


def test_chat_template_needs_a_tokenizer_with_one(tok_and_text):
    tokenizer, _ = tok_and_text
    lm = CellLM(model=_model(tokenizer), tokenizer=tokenizer, max_length=128, max_gen_toks=8)
    with pytest.raises(ValueError, match="eval.chat_template is true"):
        lm_eval_suites._evaluate(lm, ["anything"], None, chat_template=True)


def test_a_hub_dataset_missing_offline_fails_fast_naming_it():
    with pytest.raises(RuntimeError, match=r"longbench2_many_shot needs recursal/longbench-v2 \(manyshot_learning\)"):
        lm_eval_suites.check_hub_datasets({"longbench2_many_shot": "recursal/longbench-v2 (manyshot_learning)"})


@pytest.mark.slow
def test_hub_tasks_are_found_and_a_local_file_in_their_format_runs(tok_and_text, tmp_path):
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    found = lm_eval_suites.hub_datasets(tm, ["longbench2_many_shot", "babilong_longctx"], {})
    assert found["longbench2_many_shot"] == "recursal/longbench-v2 (manyshot_learning)"
    assert any(d.startswith("RMT-team/babilong") for t, d in found.items() if t != "longbench2_many_shot")
    tokenizer, _ = tok_and_text
    lm = CellLM(model=_model(tokenizer, window=512), tokenizer=tokenizer, max_length=2048, max_gen_toks=8)
    ev = {"lengths": [256], "lm_eval": {"tasks": ["longbench2_many_shot"],
                                        "data_files": {"longbench2_many_shot": str(FIXTURES / "longbench2_many_shot.jsonl")}}}
    rows, meta = lm_eval_suites.run_lm_eval(lm, tmp_path, ev)
    acc = [r for r in rows if r["metric"] == "acc"]
    assert len(acc) == 1 and acc[0]["n"] == 3 and acc[0]["value"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert meta["chat_template"] is False


@pytest.mark.slow
def test_two_ruler_tasks_run_through_lm_eval_into_duckdb(tmp_path):
    from tests.helpers import build_study
    from workflow import store
    from workflow.config import compose, expand_grid, stage_config
    from workflow.stages.evaluate import evaluate_cell
    from workflow.modeling import save_model_dir

    tokenizer, texts = stdlib_tokenizer()
    data_dir = tmp_path / "data"
    tokenizer.save_pretrained(data_dir / "tokenizer")
    from workflow.corpus import encode_documents

    np.save(data_dir / "test.npy", encode_documents(tokenizer, texts, tokenizer.eos_token_id))
    (data_dir / "manifest.json").write_text(json.dumps({"tokenizer": {"eos_id": tokenizer.eos_token_id}}))
    study_dir = build_study(tmp_path / "results")
    model_dir = save_model_dir(_model(tokenizer), tokenizer, tmp_path / "base_model")

    cfg = compose("micro", ["eval.tasks=[ruler]", "eval.ruler.tasks=[niah_single_1,niah_multikey_2,qa_1]",
                            "eval.ruler.lengths=[256,512]", "eval.ruler.samples=2"])
    cell = next(c for c in expand_grid(cfg) if c["regime"] == "frozen" and c["rope"] == "none")
    cell_cfg = {**stage_config(cfg, cell, "evaluate"), "cell_id": "none-exact-256-frozen"}
    out = study_dir / "cells" / "none-exact-256-frozen" / "eval"
    evaluate_cell(cell_cfg, data_dir, model_dir, out)

    result = json.loads((out / "ruler.json").read_text())
    assert result["meta"]["skipped"] and result["meta"]["skipped"][0]["task"] == "qa_1"
    store.ingest(study_dir, tmp_path / "metrics.duckdb", echo=False)
    with duckdb.connect(str(tmp_path / "metrics.duckdb"), read_only=True) as con:
        got = con.execute("SELECT task, eval_len, metric, n, value BETWEEN 0 AND 1, ci_low <= value "
                          "FROM metrics WHERE suite = 'ruler' AND cell_id = 'none-exact-256-frozen' "
                              "ORDER BY task, eval_len").fetchall()
    assert got == [(t, n, "score", 2, True, True) for t in ("niah_multikey_2", "niah_single_1") for n in (256, 512)]
