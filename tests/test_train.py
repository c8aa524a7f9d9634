"""The shared training loop: schedule, logging, checkpoints and resumption, deterministic batches."""
import json

import numpy as np
import pytest
import torch

from workflow.batches import Phase, RowMaker, finetune_batches, pretrain_batches
from workflow.train import lr_at, train
from tests.helpers import tiny_llama

CFG = {"steps": 6, "lr": 1e-2, "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "weight_decay": 0.1,
       "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "checkpoint_every": 3}


def tiny_model():
    return tiny_llama(vocab=64, hidden=32, intermediate=64, heads=2, window=32).train()


def batches():
    tokens = np.random.default_rng(0).integers(0, 64, size=5000).astype(np.uint16)
    return pretrain_batches(tokens, [Phase(6, 16, 4, RowMaker())], seed=1)


def test_schedules():
    assert lr_at(0, CFG) == pytest.approx(5e-3) and lr_at(1, CFG) == pytest.approx(1e-2)
    assert lr_at(5, CFG) < lr_at(3, CFG) and lr_at(6, CFG) == pytest.approx(1e-3)
    constant = {**CFG, "schedule": "constant_with_warmup"}
    assert lr_at(5, constant) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(4, {**CFG, "schedule": "zigzag"})


def test_resume_gives_the_same_weights_and_log(tmp_path):
    full = tiny_model()
    train(full, batches(), CFG, tmp_path / "full", "full")

    interrupted = tiny_model()
    with pytest.raises(RuntimeError, match="killed"):
        def dying(step, inner=batches()):
            if step == 4:
                raise RuntimeError("killed")
            return inner(step)
        train(interrupted, dying, CFG, tmp_path / "resumed", "resumed")
    assert (tmp_path / "resumed" / "ckpt" / "trainer.pt").exists()
    resumed = tiny_model()  # a fresh process would start from fresh weights and load the checkpoint
    summary = train(resumed, batches(), CFG, tmp_path / "resumed", "resumed")
    assert summary["resumed_from_step"] == 3
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    full_log = [json.loads(l) for l in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(l) for l in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == list(range(1, 7))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]


def test_nan_loss_stops_training(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(model, batches(), CFG, tmp_path, "nan")


def test_finetune_batches_read_the_same_tokens_at_every_length():
    tokens = np.arange(10_000, dtype=np.uint16)
    short, long = finetune_batches(tokens, 512, 2048), finetune_batches(tokens, 1024, 2048)
    for step in range(3):
        assert torch.equal(short(step)["input_ids"].flatten(), long(step)["input_ids"].flatten())
    with pytest.raises(ValueError, match="multiple"):
        finetune_batches(tokens, 1000, 2048)


class EveryOther:
    def row(self, i, length):
        return (np.full(length, 7), np.ones(length, dtype=np.int8)) if i % 2 == 0 else None


def test_batches_are_pure_functions_of_the_step_and_mix_rows():
    tokens = np.random.default_rng(0).integers(0, 64, size=5000).astype(np.uint16)
    fn = pretrain_batches(tokens, [Phase(10, 16, 4, RowMaker(EveryOther()))], seed=3)
    ids = lambda step: fn(step)["input_ids"]  # noqa: E731
    assert torch.equal(ids(5), ids(5)) and not torch.equal(ids(5), ids(6))
    assert (ids(0)[0] == 7).all() and not (ids(0)[1] == 7).all()


def test_weighted_loss_is_the_weighted_mean_of_token_losses():
    """train's loss with loss_weights equals sum(w * CE) written out here; without, the model's own mean."""
    from workflow.train import step_loss

    model = tiny_model().eval()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :10] = -100
    weights = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    weights[labels == -100] = 0
    weights /= weights[:, 1:].sum()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = sum(weights[r, p] * torch.nn.functional.cross_entropy(logits[r, p - 1], ids[r, p])
                       for r in range(3) for p in range(1, 16) if labels[r, p] != -100)
        got = step_loss(model, {"input_ids": ids, "labels": labels, "loss_weights": weights})
        plain = step_loss(model, {"input_ids": ids, "labels": labels})
        mean = torch.stack([torch.nn.functional.cross_entropy(logits[r, p - 1], ids[r, p])
                            for r in range(3) for p in range(1, 16) if labels[r, p] != -100]).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and plain.item() == pytest.approx(mean.item(), rel=1e-5)


def test_warmup_stable_decay_schedule():
    cfg = {**CFG, "steps": 10, "schedule": "warmup_stable_decay", "decay_fraction": 0.3, "min_lr_ratio": 0.1}
    lrs = [lr_at(step, cfg) for step in range(10)]
    assert lrs[:2] == pytest.approx([5e-3, 1e-2]) and lrs[2:7] == pytest.approx([1e-2] * 5)
    assert lrs[7:] == pytest.approx([1e-2 - 9e-3 / 3, 1e-2 - 2 * 9e-3 / 3, 1e-3])


def test_training_that_does_not_fit_stops_before_the_first_step(tmp_path, monkeypatch):
    from workflow import resources

    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(resources.ResourceError, match=r"training at length 16 \(4 rows a step\) does not fit"):
        train(tiny_model(), batches(), CFG, tmp_path, "oom")
    assert not (tmp_path / "train_log.jsonl").exists()
