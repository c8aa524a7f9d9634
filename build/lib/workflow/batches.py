"""Deterministic training batches: each batch is a pure function of the step, so every method sees
the same rows in the same order, and a resumed run sees what the uninterrupted run would have seen.
A share of rows is replaced by passkey-style documents (the same rows for every method)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def _assemble(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def pretrain_batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                     mixer=None) -> Callable[[int], torch.Tensor]:
    """Rows of `seq_len` tokens at seeded random offsets of the training stream (row i of the run is
    drawn from an RNG seeded by (seed, i))."""
    limit = len(tokens) - seq_len
    if limit <= 0:
        raise ValueError(f"the training stream ({len(tokens)} tokens) is shorter than one row of {seq_len}")

    def batch(step: int) -> torch.Tensor:
        rows = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            row = mixer.row(i, seq_len) if mixer is not None else None
            if row is None:
                start = int(np.random.default_rng([seed, i]).integers(0, limit))
                row = tokens[start:start + seq_len]
            rows.append(np.asarray(row))
        return _assemble(rows)

    return batch


def finetune_batches(tokens: np.ndarray, seq_len: int, tokens_per_step: int,
                     mixer=None) -> Callable[[int], torch.Tensor]:
    """Consecutive rows of `seq_len` tokens read in order from the start of the training stream,
    `tokens_per_step // seq_len` rows a step: cells of every training length read the same tokens in
    the same order (two 512-token rows hold the tokens of one 1024-token row)."""
    if tokens_per_step % seq_len:
        raise ValueError(f"finetune.tokens_per_step={tokens_per_step} must be a multiple of the training "
                         f"length {seq_len}")
    per_step = tokens_per_step // seq_len
    n_rows = len(tokens) // seq_len
    if n_rows == 0:
        raise ValueError(f"the training stream ({len(tokens)} tokens) is shorter than one row of {seq_len}")

    def batch(step: int) -> torch.Tensor:
        rows = []
        for i in range(step * per_step, (step + 1) * per_step):
            row = mixer.row(i, seq_len) if mixer is not None else None
            if row is None:
                start = (i % n_rows) * seq_len
                row = tokens[start:start + seq_len]
            rows.append(np.asarray(row))
        return _assemble(rows)

    return batch
