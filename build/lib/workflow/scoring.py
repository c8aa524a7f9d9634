"""Scorers of the evaluation tasks: perplexity and the retrieval grids (see `workflow.tasks` for the registry that
the evaluate stage dispatches through).

- ppl: perplexity at every evaluation length on the same held-out tokens (fixed document spans of
  the longest length, cut into windows of each length), the loss averaged over all tokens of each
  window (LCEG's protocol); the same spans for every cell.
- passkey, needle: retrieval accuracy on the data stage's length x depth grids. A sample counts as
  correct when the model's argmax at every answer position is the answer token, which is exactly
  greedy decoding's exact match, computed in one forward pass.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from methods import AttentionMethod, attention_of
from workflow.corpus import document_bounds
from workflow.stats import t_interval, wilson


def ppl_spans(tokens: np.ndarray, eos_id: int, span: int, n_spans: int, seed: int) -> tuple[list[int], int]:
    """Start offsets of `n_spans` spans of `span` tokens (the longest evaluation length), one per test
    document long enough to hold it (seeded choice, each span at its document's start). When fewer
    documents are that long, the remaining spans are cut from the concatenated stream (several
    documents joined by EOS) and counted as crossing document boundaries."""
    docs = [start for start, end in document_bounds(tokens, eos_id) if end - start >= span]
    rng = np.random.default_rng([seed, span])
    if len(docs) >= n_spans:
        return sorted(int(s) for s in rng.choice(docs, size=n_spans, replace=False)), 0
    limit = len(tokens) - span
    if limit < 0:
        raise ValueError(f"the test split has {len(tokens)} tokens, fewer than one span of {span}")
    extra = sorted(int(s) for s in rng.integers(0, limit + 1, size=n_spans - len(docs)))
    return sorted(docs) + extra, len(extra)


@torch.no_grad()
def token_losses(model, batch: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Next-token negative log-likelihood at every position but the last: [B, T-1]. With `chunk` (eval.loss_chunk),
    the output layer and the loss run over `chunk` positions at a time, so the full-vocabulary logits of a whole
    long sequence never exist at once; an attention kind with its own inference loop (Landmark) gives whole logits."""
    attention = attention_of(model)
    batch = batch.to(model.device)
    targets = batch[:, 1:]
    if not chunk or type(attention).logits is not AttentionMethod.logits:
        logits = attention.logits(model, batch).float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    return torch.cat([F.cross_entropy(head(hidden[:, i:i + chunk]).float().transpose(1, 2), targets[:, i:i + chunk],
                                      reduction="none") for i in range(0, targets.shape[1], chunk)], dim=1)


def _batches(items: list, length: int, batch_tokens: int):
    size = max(1, batch_tokens // length)
    for i in range(0, len(items), size):
        yield items[i:i + size]


def evaluate_ppl(model, tokens: np.ndarray, eos_id: int, cfg: dict) -> tuple[list[dict], dict]:
    """Perplexity at every evaluation length on the same tokens: fixed spans of the longest length,
    each cut into consecutive windows of the evaluated length; the loss is averaged over all tokens
    of every window (LCEG). Lengths then differ only in how much context each token gets. The
    interval is a 95% t-interval over spans (documents), on the loss scale."""
    lengths, ppl_cfg = cfg["lengths"], cfg["ppl"]
    span = max(lengths)
    spans, crossing = ppl_spans(tokens, eos_id, span, ppl_cfg["documents"], ppl_cfg["seed"])
    rows = []
    for length in tqdm(lengths, desc="ppl", mininterval=5.0):
        starts = [s + k * length for s in spans for k in range(span // length)]
        per_window = []
        for chunk in _batches(starts, length, cfg["batch_tokens"]):
            batch = torch.from_numpy(np.stack([tokens[s:s + length] for s in chunk]).astype(np.int64))
            per_window.extend(token_losses(model, batch, cfg.get("loss_chunk")).mean(dim=1).tolist())
        per_span = np.array(per_window).reshape(len(spans), -1).mean(axis=1)
        mean, low, high = t_interval(per_span.tolist())
        scored = len(starts) * (length - 1)
        rows.append({"eval_len": length, "depth": None, "metric": "ppl", "value": math.exp(mean), "n": scored,
                     "ci_low": math.exp(low), "ci_high": math.exp(high)})
        rows.append({"eval_len": length, "depth": None, "metric": "loss", "value": mean, "n": scored,
                     "ci_low": low, "ci_high": high})
    return rows, {"spans": len(spans), "span_tokens": span, "cross_document_spans": crossing}


@torch.no_grad()
def answers_correct(model, samples: list[dict]) -> list[bool]:
    """For same-length samples: is the argmax at every answer position the answer token?"""
    batch = torch.tensor([s["input_ids"] + s["answer_ids"] for s in samples], dtype=torch.long, device=model.device)
    logits = attention_of(model).logits(model, batch)
    out = []
    for row, s in zip(range(len(samples)), samples):
        start = len(s["input_ids"])
        predicted = logits[row, start - 1:start - 1 + len(s["answer_ids"])].argmax(-1).tolist()
        out.append(predicted == s["answer_ids"])
    return out


def evaluate_retrieval(model, path: Path, cfg: dict) -> tuple[list[dict], dict]:
    samples = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_len = defaultdict(list)
    for s in samples:
        by_len[s["eval_len"]].append(s)
    tally = defaultdict(lambda: [0, 0])
    for length in tqdm(sorted(by_len), desc=Path(path).stem, mininterval=5.0):
        group = by_len[length]
        for chunk in _batches(group, length, cfg["batch_tokens"]):
            for s, ok in zip(chunk, answers_correct(model, chunk)):
                tally[(length, s["depth"])][0] += int(ok)
                tally[(length, s["depth"])][1] += 1
    rows = []
    for (length, depth), (correct, n) in sorted(tally.items()):
        low, high = wilson(correct, n)
        rows.append({"eval_len": length, "depth": depth, "metric": "accuracy", "value": correct / n, "n": n,
                     "ci_low": low, "ci_high": high})
    return rows, {"samples": len(samples)}
