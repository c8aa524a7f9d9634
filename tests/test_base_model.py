"""The shipped tiny base model (models/tiny-base): it retrieves inside its window, and it retrieves fresh random keys
substituted into the evaluation prompts as well as the prompts' own keys, so its retrieval is a capability, not a
memory of the evaluation's keys; it was pretrained on none of the documents the default study holds out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import REPO
from workflow import corpus, retrieval
from workflow.config import compose
from workflow.modeling import PROVENANCE_FILE, load_model, shipped_dir

SHIPPED = "tiny-base"


@pytest.fixture(scope="module")
def base():
    from transformers import AutoTokenizer

    where = shipped_dir(SHIPPED)
    torch.manual_seed(0)
    return load_model(where), AutoTokenizer.from_pretrained(where)


def exact_match(model, rows: list[dict]) -> float:
    """Share of rows whose greedy answer (argmax at every answer position) is the answer, as the evaluation scores."""
    from methods import attention_of

    hits = 0
    for row in rows:
        ids = torch.tensor([row["input_ids"] + row["answer_ids"]])
        start, k = len(row["input_ids"]), len(row["answer_ids"])
        positions = torch.arange(start - 1, start - 1 + k)[None]
        with torch.no_grad():
            predicted = attention_of(model).answer_logits(model, ids, positions).argmax(-1)[0].tolist()
        hits += predicted == row["answer_ids"]
    return hits / len(rows)


def substitute(row: dict, tokenizer, key: str) -> dict:
    """The same prompt with every occurrence of its key's digits replaced by `key` (same number of digits)."""
    old = tokenizer.encode(row["answer"], add_special_tokens=False)
    new = tokenizer.encode(key, add_special_tokens=False)
    assert len(old) == len(new)
    ids, n, out, k = row["input_ids"], len(old), [], 0
    while k < len(ids):
        if ids[k:k + n] == old:
            out += new
            k += n
        else:
            out.append(ids[k])
            k += 1
    answer = tokenizer.encode(" " + key, add_special_tokens=False)
    return {**row, "input_ids": out, "answer_ids": answer, "answer": key}


def evaluation_rows(task: str, tokenizer, haystack, lengths) -> list[dict]:
    """The default study's evaluation rows for `task`, as the data stage builds them (same code, same seeds)."""
    cfg = compose("tiny")["eval"]["retrieval"]
    rows = []
    for length in lengths:
        for d_index, depth in enumerate(cfg["depths"]):
            for sample in range(cfg["samples"]):
                rng = retrieval._row_rng(cfg["seed"], task, length, d_index, sample)
                rows.append(retrieval.passkey_example(tokenizer, length, depth, rng) if task == "passkey" else
                            retrieval.needle_example(haystack, tokenizer, length, depth, rng))
    return rows


def fresh_keys(rows: list[dict], seed: int) -> list[str]:
    """A new random key per row, of the same length, drawn uniformly (not from the evaluation's share)."""
    rng = np.random.default_rng(seed)
    return [str(int(rng.integers(10 ** (len(r["answer"]) - 1), 10 ** len(r["answer"])))) for r in rows]


def test_the_base_model_retrieves_the_evaluations_keys_and_fresh_ones_alike(base):
    model, tokenizer = base
    rows = evaluation_rows("passkey", tokenizer, None, [128, 256])
    stored = exact_match(model, rows)
    fresh = exact_match(model, [substitute(r, tokenizer, k) for r, k in zip(rows, fresh_keys(rows, 7))])
    assert stored >= 0.9 and fresh >= 0.9, (stored, fresh)
    assert abs(stored - fresh) <= 0.1, (stored, fresh)


def test_the_base_model_finds_a_needle_in_held_out_code(base):
    model, tokenizer = base
    cfg = compose("tiny")["data"]
    source = corpus.open_source(cfg)
    test_files = corpus.split_names(source.names, cfg["split"], cfg["seed"], cfg["max_files"])["test"]
    haystack = corpus.encode_documents(tokenizer, [source.read(n) for n in test_files], tokenizer.eos_token_id)
    rows = evaluation_rows("needle", tokenizer, haystack, [256])
    fresh = [substitute(r, tokenizer, k) for r, k in zip(rows, fresh_keys(rows, 11))]
    assert exact_match(model, rows) >= 0.7 and exact_match(model, fresh) >= 0.7


def test_the_shipped_model_never_saw_the_default_studys_held_out_documents():
    from workflow.common import read_json

    made = read_json(shipped_dir(SHIPPED) / PROVENANCE_FILE)
    cfg = compose("tiny")["data"]
    source = corpus.open_source(cfg)
    split = corpus.split_names(source.names, cfg["split"], cfg["seed"], cfg["max_files"])
    seen = set(made["data"]["train_files"])
    assert seen and not seen & (set(split["test"]) | set(split["validation"]))
    assert made["data"]["seed"] == cfg["seed"] and made["data"]["split"] == cfg["split"]
    assert (REPO / "models" / SHIPPED / "model.safetensors").stat().st_size < 8 * 2 ** 20
