"""Synthetic retrieval rows (workflow.synthetic) and the batches built from them (workflow.batches): seeded, exact
length, answers where the mask says, shares as configured, no fixed key-to-answer offset, nothing from the
evaluation sets, and loss weights that put the configured share of a step's loss on the synthetic targets."""
import collections
import json

import numpy as np
import pytest
import torch

from tests.helpers import stdlib_tokenizer
from workflow import corpus, synthetic
from workflow.batches import Phase, RowMaker, finetune_batches, pretrain_batches, synthetic_row_length
from workflow.retrieval import EVALUATION_KEY_SHARE, is_evaluation_key, needle_example, passkey_example


@pytest.fixture(scope="module")
def tok_and_code():
    tokenizer, texts = stdlib_tokenizer()
    code = corpus.encode_documents(tokenizer, texts, tokenizer.eos_token_id)
    return tokenizer, code


def rows_of(tok_and_code, mix=None, seed=3):
    tokenizer, code = tok_and_code
    return synthetic.for_tokenizer(tokenizer, code, mix or synthetic.Mix(kv=0.5, copy=0.3), seed)


def test_rows_are_a_function_of_seed_and_index_with_exact_length(tok_and_code):
    a, b = rows_of(tok_and_code), rows_of(tok_and_code)
    for T in (64, 128, 256):
        built = [a.row(i, T) for i in range(200)]
        again = [b.row(i, T) for i in reversed(range(200))][::-1]   # the order of requests does not matter
        for x, y in zip(built, again):
            assert (x is None) == (y is None)
            if x is not None:
                assert len(x[0]) == T and len(x[1]) == T
                assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
    other = rows_of(tok_and_code, seed=4)
    assert any(not np.array_equal(a.row(i, 128)[0], other.row(i, 128)[0])
               for i in range(50) if a.row(i, 128) is not None and other.row(i, 128) is not None)


def test_shares_of_row_kinds(tok_and_code):
    rows = rows_of(tok_and_code, synthetic.Mix(kv=0.3, copy=0.2))
    kinds = collections.Counter("corpus" if rows.row(i, 256) is None else "synthetic" for i in range(2000))
    assert kinds["synthetic"] / 2000 == pytest.approx(0.5, abs=0.04)
    assert rows_of(tok_and_code, synthetic.Mix()).row(0, 256) is None


def test_key_value_answers_are_the_stated_key(tok_and_code):
    tokenizer, _ = tok_and_code
    rows = rows_of(tok_and_code, synthetic.Mix(kv=1.0, multikey=0.0))
    for i in range(40):
        ids, mask = rows.row(i, 256)
        text = tokenizer.decode(ids.tolist())
        answers = tokenizer.decode(ids[mask == 1].tolist()).split()
        assert answers, text
        for answer in answers:          # every answer is a key stated earlier in the row
            assert answer.isdigit() and text.count(answer) >= 2, (answer, text)


def test_multikey_rows_ask_for_one_of_several_named_keys(tok_and_code):
    tokenizer, _ = tok_and_code
    rows = rows_of(tok_and_code, synthetic.Mix(kv=1.0, multikey=1.0))
    named = 0
    for i in range(40):
        ids, mask = rows.row(i, 256)
        text = tokenizer.decode(ids.tolist())
        names = [n for n in synthetic.NAMES if n in text]
        named += len(names) >= 2
    assert named >= 30


def test_the_key_to_answer_offset_varies(tok_and_code):
    """No fixed offset between the stated key and its answer (the old passkey rows repeated the key 11 tokens on)."""
    rows = rows_of(tok_and_code, synthetic.Mix(kv=1.0, multikey=0.0))
    offsets = set()
    for i in range(60):
        ids, mask = rows.row(i, 256)
        answer_start = int(np.flatnonzero(mask)[0])
        first_digit = ids[answer_start + 1]
        earlier = [p for p in range(answer_start) if ids[p] == first_digit and mask[p] == 0]
        if earlier:
            offsets.add(answer_start - earlier[-1])
    assert len(offsets) > 20


def test_copy_rows_repeat_a_span_and_a_digit_string(tok_and_code):
    rows = rows_of(tok_and_code, synthetic.Mix(copy=1.0))
    for i in range(20):
        ids, mask = rows.row(i, 256)
        copied = ids[mask == 1]
        assert len(copied) >= synthetic.SPAN_TOKENS[0] - 1 + synthetic.DIGIT_STRING[0]
        runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) != 1) + 1)
        for run in runs:   # each supervised run repeats tokens that appear earlier in the row, unsupervised
            piece = ids[run[0] - 1:run[-1] + 1].tolist()
            hay = ids[:run[0] - 1].tolist()
            assert any(hay[k:k + len(piece)] == piece for k in range(len(hay) - len(piece) + 1))


def test_evaluation_keys_and_prompts_never_appear_in_training(tok_and_code):
    tokenizer, code = tok_and_code
    # stands for the test split (random tokens, so that no window is shared with code by chance): never given to the
    # builder; the stage wiring is tested on real splits in test_training_rows_hold_no_test_split_text
    held_out = np.random.default_rng(0).integers(4, len(tokenizer), size=4000).astype(np.uint16)
    train = code
    evaluation = [passkey_example(tokenizer, 256, d, np.random.default_rng(k)) for k in range(20)
                  for d in (0.0, 0.5, 1.0)]
    evaluation += [needle_example(held_out, tokenizer, 256, 0.5, np.random.default_rng(k)) for k in range(20)]
    keys = {row["answer"] for row in evaluation}
    assert all(is_evaluation_key(key) for key in keys)            # the evaluation draws from its share of keys
    rows = synthetic.for_tokenizer(tokenizer, train, synthetic.Mix(kv=0.6, copy=0.4), 5)
    drawn = [rows.key(np.random.default_rng(s)) for s in range(4000)]
    assert not any(is_evaluation_key(key) for key in drawn) and not keys & set(drawn)
    # every 12-token window of an evaluation prompt that holds its key's digits (the templates and filler sentences
    # are the task's format and are shared; a prompt's key, in its place, is not)
    prompts = set()
    for row in evaluation:
        ids, digits = row["input_ids"], row["answer_ids"][1:]
        at = next(k for k in range(row["needle_pos"], len(ids)) if ids[k:k + len(digits)] == digits)
        prompts |= {tuple(ids[k:k + 12]) for k in range(max(0, at + len(digits) - 12), min(at, len(ids) - 12) + 1)}
    hay_grams = {tuple(held_out[k:k + 24].tolist()) for k in range(0, len(held_out) - 24)}
    for i in range(300):
        built = rows.row(i, 256)
        if built is None:
            continue
        ids = built[0].tolist()
        grams = {tuple(ids[k:k + 24]) for k in range(len(ids) - 24)}
        assert not grams & hay_grams, f"row {i} holds held-out haystack"
        assert not {tuple(ids[k:k + 12]) for k in range(len(ids) - 12)} & prompts, f"row {i} holds an eval prompt's key"
        for key in keys:
            assert f" {key}." not in tokenizer.decode(ids)


def test_loss_weights_put_the_configured_share_on_synthetic_targets(tok_and_code):
    tokenizer, code = tok_and_code
    rows = RowMaker(rows_of(tok_and_code, synthetic.Mix(kv=0.3, copy=0.2)), answer_only=True, weight=0.5)
    batch = pretrain_batches(code, [Phase(10, 128, 16, rows)], seed=0)(3)
    assert set(batch) == {"input_ids", "labels", "loss_weights"} and batch["input_ids"].shape == (16, 128)
    w, labels = batch["loss_weights"], batch["labels"]
    assert w.sum().item() == pytest.approx(1.0) and (w[labels == -100] == 0).all() and (w[:, 0] == 0).all()
    synthetic_rows = [k for k in range(16) if (labels[k] == -100).any()]
    corpus_rows = [k for k in range(16) if k not in synthetic_rows]
    assert synthetic_rows and corpus_rows
    assert w[synthetic_rows].sum().item() == pytest.approx(0.5)
    plain = RowMaker(rows_of(tok_and_code, synthetic.Mix(kv=0.3, copy=0.2)), answer_only=False, weight=None)
    batch = pretrain_batches(code, [Phase(10, 128, 16, plain)], seed=0)(3)
    assert "loss_weights" not in batch and torch.equal(batch["labels"], batch["input_ids"])


def test_phases_change_row_length_and_keep_rows_numbered_across_the_run(tok_and_code):
    _, code = tok_and_code
    phases = [Phase(2, 64, 8, RowMaker()), Phase(5, 128, 4, RowMaker())]
    batches = pretrain_batches(code, phases, seed=1)
    assert batches(0)["input_ids"].shape == (8, 64) and batches(1)["input_ids"].shape == (8, 64)
    assert batches(2)["input_ids"].shape == (4, 128) and batches(9)["input_ids"].shape == (4, 128)
    single = pretrain_batches(code, [Phase(5, 128, 4, RowMaker())], seed=1)
    assert not torch.equal(batches(2)["input_ids"], single(0)["input_ids"])   # rows 16.. of the run, not rows 0..


def test_finetune_batches_with_synthetic_rows(tok_and_code):
    _, code = tok_and_code
    rows = RowMaker(rows_of(tok_and_code, synthetic.Mix(kv=0.5)), answer_only=True, weight=0.25)
    batch = finetune_batches(code, 128, 1024, rows)(0)
    assert batch["input_ids"].shape == (8, 128) and batch["loss_weights"].sum().item() == pytest.approx(1.0)


def test_base_window_synthetic_rows_are_written_into_training_length_rows(tok_and_code):
    """finetune.synthetic.length=base_window: each synthetic row is built at the short length and written over the
    corpus tokens of a longer row, so every supervised token (and the key it answers) lies within one short span;
    the rest of the row is the corpus, unscored; the placement is a function of (seed, row) and varies."""
    _, code = tok_and_code
    rows = RowMaker(rows_of(tok_and_code, synthetic.Mix(kv=0.6, copy=0.4)), answer_only=True, weight=0.5)
    plain = finetune_batches(code, 512, 4096)(0)["input_ids"]
    make = lambda seed: finetune_batches(code, 512, 4096, rows, synthetic_len=128, seed=seed)(0)   # noqa: E731
    batch, again, other = make(1), make(1), make(2)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    assert batch["input_ids"].shape == (8, 512)
    offsets = []
    for r in range(8):
        changed = torch.nonzero(batch["input_ids"][r] != plain[r]).flatten()
        scored = torch.nonzero(batch["labels"][r] != -100).flatten()
        if rows.synthetic_row(r, 128) is None:                # a row that no synthetic row fits stays the corpus
            assert not len(changed) and len(scored) == 512
            continue
        assert len(changed) and len(scored)
        assert int(changed.max() - changed.min()) < 128       # one span of the short length
        assert int(scored.min()) >= int(changed.min()) - 1 and int(scored.max()) <= int(changed.max()) + 1
        offsets.append(int(changed.min()))
        # the synthetic tokens are the short row itself
        short = rows.synthetic_row(r, 128)[0]
        start = next(o for o in range(512 - 127) if np.array_equal(batch["input_ids"][r, o:o + 128].numpy(), short))
        assert torch.equal(batch["input_ids"][r, :start], plain[r, :start])
    assert len(offsets) >= 4 and len(set(offsets)) > 1        # most rows synthetic, not at one fixed place
    assert not torch.equal(other["input_ids"], batch["input_ids"])   # another seed places them elsewhere
    with pytest.raises(ValueError, match="do not fit"):
        finetune_batches(code, 128, 1024, rows, synthetic_len=256)
    # finetune.synthetic.length names the row length
    assert synthetic_row_length("base_window", 256) == 256 and synthetic_row_length("train_len", 256) is None
    with pytest.raises(ValueError, match="finetune.synthetic.length"):
        synthetic_row_length("base", 256)


def test_training_rows_hold_no_test_split_text(stage):
    """The base stage's rows (as pretrain_phases builds them from the data directory) hold no 16-token window of
    the test split that the train split does not also hold (code repeats idioms across files), and no evaluation
    key."""
    from transformers import AutoTokenizer

    from workflow.stages.base import pretrain_phases

    data = stage["root"] / "data"
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    train, test = np.load(data / "train.npy"), np.load(data / "test.npy")
    cfg = {**stage["cfg"], "data": {**stage["cfg"]["data"], "synthetic": {**stage["cfg"]["data"]["synthetic"],
                                                                         "kv": 0.5, "copy": 0.5}}}
    keys = {json.loads(line)["answer"] for task in ("passkey", "needle")
            for line in (data / f"{task}.jsonl").read_text().splitlines()}
    phases = pretrain_phases(cfg, tokenizer, train)
    grams = lambda a: {tuple(a[k:k + 16].tolist()) for k in range(len(a) - 16)}  # noqa: E731
    only_test = grams(test) - grams(train)
    batches = pretrain_batches(train, phases, seed=0)
    for step in range(3):
        for row in batches(step)["input_ids"]:
            assert not grams(row.numpy()) & only_test
            assert not any(f" {key}." in tokenizer.decode(row.tolist()) for key in keys)


def test_the_evaluations_share_of_keys():
    """One number in EVALUATION_KEY_SHARE is an evaluation key, for every length; RULER's numbers are too."""
    from workflow import ruler

    for low in (10 ** 4, 10 ** 6):
        share = np.mean([is_evaluation_key(str(k)) for k in range(low, low + 20000)])
        assert share == pytest.approx(1 / EVALUATION_KEY_SHARE, abs=0.01)
    rng = np.random.default_rng(0)
    assert all(is_evaluation_key(ruler._random("numbers", rng, [])) for _ in range(50))
