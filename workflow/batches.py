"""Deterministic training batches: each batch is a pure function of the step, so every method sees the same rows in
the same order, and a resumed run sees what the uninterrupted run would have seen. A share of rows can be
synthetic retrieval rows (`workflow.synthetic`; the same rows for every method).

A batch is a dict of [rows, T] tensors: `input_ids`; `labels` (the token to predict, -100 where nothing is scored:
in synthetic rows with `answer_only`, everything but the answers and copies); and, when `weight` is set,
`loss_weights`, which put `weight` of the step's loss on the synthetic targets and the rest on the corpus tokens,
each spread evenly (they sum to 1 over the batch; `train` takes the weighted sum of the token losses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


class RowMaker:
    """Turns corpus rows and synthetic rows (ids, supervised mask) into a batch."""

    def __init__(self, synthetic=None, answer_only: bool = True, weight: float | None = None):
        if weight is not None and not 0.0 <= weight <= 1.0:
            raise ValueError(f"synthetic loss weight must be in [0, 1] or null, got {weight!r}")
        self.synthetic, self.answer_only, self.weight = synthetic, bool(answer_only), weight

    def synthetic_row(self, i: int, seq_len: int):
        return self.synthetic.row(i, seq_len) if self.synthetic is not None else None

    def assemble(self, rows: list[tuple[np.ndarray, np.ndarray | None]]) -> Batch:
        ids = torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r, _ in rows]))
        labels = ids.clone()
        synthetic = torch.zeros_like(ids, dtype=torch.bool)
        for k, (_, mask) in enumerate(rows):
            if mask is None:
                continue
            supervised = torch.from_numpy(np.asarray(mask, dtype=bool))
            synthetic[k] = supervised
            if self.answer_only:
                labels[k, ~supervised] = -100
        batch = {"input_ids": ids, "labels": labels}
        if self.weight is not None:
            scored = labels != -100
            scored[:, 0] = False   # the first token of a row is never predicted
            corpus = scored & ~synthetic
            n_syn, n_corpus = int((synthetic & scored).sum()), int(corpus.sum())
            w_syn = (self.weight if n_corpus else 1.0) if n_syn else 0.0
            weights = torch.zeros(ids.shape, dtype=torch.float32)
            if n_syn:
                weights[synthetic & scored] = w_syn / n_syn
            if n_corpus:
                weights[corpus] = (1.0 - w_syn) / n_corpus
            batch["loss_weights"] = weights
        return batch


@dataclass(frozen=True)
class Phase:
    """A stretch of pretraining: `steps` steps of `batch_size` rows of `seq_len` tokens made by `rows`."""

    steps: int
    seq_len: int
    batch_size: int
    rows: RowMaker


def pretrain_batches(tokens: np.ndarray, phases: list[Phase], seed: int) -> Callable[[int], Batch]:
    """Rows at seeded random offsets of the training stream (row i of the run is drawn from an RNG seeded by
    (seed, i); rows are numbered across phases), phase by phase; the last phase runs to the end of training."""
    if not phases:
        raise ValueError("pretraining needs at least one phase")
    for phase in phases:
        if len(tokens) - phase.seq_len <= 0:
            raise ValueError(f"the training stream ({len(tokens)} tokens) is shorter than one row of {phase.seq_len}")
    first_steps = np.cumsum([0] + [p.steps for p in phases[:-1]])
    first_rows = np.cumsum([0] + [p.steps * p.batch_size for p in phases[:-1]])

    def batch(step: int) -> Batch:
        k = int(np.searchsorted(first_steps, step, side="right")) - 1
        phase = phases[k]
        first = int(first_rows[k]) + (step - int(first_steps[k])) * phase.batch_size
        limit = len(tokens) - phase.seq_len
        out = []
        for i in range(first, first + phase.batch_size):
            made = phase.rows.synthetic_row(i, phase.seq_len)
            if made is None:
                start = int(np.random.default_rng([seed, i]).integers(0, limit))
                made = (tokens[start:start + phase.seq_len], None)
            out.append(made)
        return phase.rows.assemble(out)

    return batch


SYNTHETIC_LENGTHS = ("train_len", "base_window")   # the values of finetune.synthetic.length


def synthetic_row_length(length: str, base_window: int) -> int | None:
    """Tokens of a fine-tuning synthetic row for finetune.synthetic.length (`finetune_batches`' synthetic_len):
    None (the training length) for train_len, the base window for base_window."""
    if length not in SYNTHETIC_LENGTHS:
        raise ValueError(f"finetune.synthetic.length must be one of {', '.join(SYNTHETIC_LENGTHS)}, got {length!r}")
    return int(base_window) if length == "base_window" else None


_PLACEMENT_STREAM = 104729   # separates the placement of embedded synthetic rows from the other seeded streams


def embed_row(made: tuple[np.ndarray, np.ndarray], corpus: np.ndarray, rng: np.random.Generator):
    """A synthetic row (ids, supervised mask) shorter than the corpus row, written over the corpus tokens at an
    offset drawn by `rng`: (ids, mask) of the corpus row's length, the mask zero outside the synthetic tokens."""
    ids, mask = made
    offset = int(rng.integers(0, len(corpus) - len(ids) + 1))
    out_ids, out_mask = np.array(corpus, dtype=np.int64), np.zeros(len(corpus), dtype=np.int8)
    out_ids[offset:offset + len(ids)], out_mask[offset:offset + len(ids)] = ids, mask
    return out_ids, out_mask


def finetune_batches(tokens: np.ndarray, seq_len: int, tokens_per_step: int,
                     rows: RowMaker | None = None, start_step: int = 0, synthetic_len: int | None = None,
                     seed: int = 0) -> Callable[[int], Batch]:
    """Consecutive rows of `seq_len` tokens read in order from the training stream, `tokens_per_step // seq_len` rows
    a step: cells of every training length read the same tokens in the same order (two 512-token rows hold the
    tokens of one 1024-token row). `start_step` starts the reading that many steps' tokens into the stream (wrapping
    at its end; the offset is in whole steps, so every training length starts at the same token). Synthetic rows
    (`rows`) are built at `synthetic_len` tokens (None: `seq_len`); a shorter one is written over the row's corpus
    tokens at an offset seeded by (`seed`, row), so that its retrieval gaps never exceed `synthetic_len`."""
    rows = rows or RowMaker()
    if tokens_per_step % seq_len:
        raise ValueError(f"finetune.tokens_per_step={tokens_per_step} must be a multiple of the training "
                         f"length {seq_len}")
    synthetic_len = seq_len if synthetic_len is None else int(synthetic_len)
    if not 0 < synthetic_len <= seq_len:
        raise ValueError(f"synthetic rows of {synthetic_len} tokens do not fit rows of {seq_len}")
    per_step = tokens_per_step // seq_len
    n_rows = len(tokens) // seq_len
    if n_rows == 0:
        raise ValueError(f"the training stream ({len(tokens)} tokens) is shorter than one row of {seq_len}")
    first = start_step * per_step

    def batch(step: int) -> Batch:
        out = []
        for i in range(step * per_step, (step + 1) * per_step):
            start = ((first + i) % n_rows) * seq_len
            corpus = tokens[start:start + seq_len]
            made = rows.synthetic_row(i, synthetic_len)
            if made is None:
                made = (corpus, None)
            elif synthetic_len < seq_len:
                made = embed_row(made, corpus, np.random.default_rng([seed, _PLACEMENT_STREAM, i]))
            out.append(made)
        return rows.assemble(out)

    return batch


_SEED_STREAM = 7919   # separates the start offset's random stream from the other users of the fine-tuning seed


def seed_start_step(seed_number: int, seed: int, n_tokens: int, tokens_per_step: int) -> int:
    """Where fine-tuning with seed number `seed_number` (study.seeds) starts reading the stream, in steps: 0 for seed
    number 0 (the study's cells as they always were), else a step drawn uniformly from the stream's whole steps with
    an RNG seeded by the fine-tuning seed `seed` (finetune.seed + seed_number). The same for every method and
    training length, so the cells of one seed number still see the same tokens in the same order."""
    if not seed_number:
        return 0
    steps_in_stream = max(1, n_tokens // tokens_per_step)
    return int(np.random.default_rng([seed, _SEED_STREAM]).integers(0, steps_in_stream))
