"""Evaluate stage: score one cell on every task of the study and write one JSON file of tidy rows per
task (`<cell>/eval/<task>.json`).

- ppl: perplexity at every evaluation length on the same held-out tokens (fixed document spans of
  the longest length, cut into windows of each length), the loss averaged over all tokens of each
  window (LCEG's protocol); the same spans for every cell.
- passkey, needle: retrieval accuracy on the data stage's length x depth grids. A sample counts as
  correct when the model's argmax at every answer position is the answer token, which is exactly
  greedy decoding's exact match, computed in one forward pass.
- ruler, lm_eval: suites run through lm-evaluation-harness in process with the cell as an lm-eval model
  (workflow/lm_eval_suites.py, workflow/lm_eval_model.py); rows carry their task within the suite.

    python -m workflow.evaluate --config evaluate.json --data-dir results/tiny/data \
        --model results/tiny/cells/yarn-exact-1024-ft/model --out results/tiny/cells/yarn-exact-1024-ft/eval
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from methods import AttentionMethod, attention_of
from workflow.common import run_cell_stage, stage_parser, log, peak_memory_mb, read_json, set_threads, write_json
from workflow.modeling import apply_cell_method, load_model
from workflow.resources import ensure_eval_fits

SCHEMA_VERSION = 1
LM_EVAL_SUITES = ("ruler", "lm_eval")  # suites served by lm-eval (workflow/lm_eval_suites.py)


def document_bounds(tokens: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """(start, end) of every document of an EOS-separated token stream."""
    cuts = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [len(tokens)]])
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e > s]


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
        mean = float(per_span.mean())
        half = 1.96 * float(per_span.std(ddof=1)) / math.sqrt(len(spans)) if len(spans) > 1 else float("nan")
        scored = len(starts) * (length - 1)
        rows.append({"eval_len": length, "depth": None, "metric": "ppl", "value": math.exp(mean), "n": scored,
                     "ci_low": math.exp(mean - half), "ci_high": math.exp(mean + half)})
        rows.append({"eval_len": length, "depth": None, "metric": "loss", "value": mean, "n": scored,
                     "ci_low": mean - half, "ci_high": mean + half})
    return rows, {"spans": len(spans), "span_tokens": span, "cross_document_spans": crossing}


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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


def cell_model(cfg: dict, model_dir: Path):
    """The cell's model: the fine-tuned checkpoint, or the base model with the method applied."""
    model_cfg = cfg.get("base", {}).get("model", {})
    model = load_model(model_dir, model_cfg.get("attn_implementation", "sdpa"), model_cfg.get("dtype", "float32"),
                       to_device=True)
    if cfg["regime"] == "frozen":
        model = apply_cell_method(model, cfg)
    return model


def evaluate_cell(cfg: dict, data_dir: Path, model_dir: Path, out_dir: Path, tasks: list[str] | None = None) -> None:
    ev = cfg["eval"]
    tasks = tasks or ev["tasks"]
    model = cell_model(cfg, model_dir)
    ensure_eval_fits(model, ev["lengths"] + ev["retrieval"]["lengths"], ev["batch_tokens"])
    manifest = read_json(data_dir / "manifest.json")
    eos_id = manifest["tokenizer"]["eos_id"]
    lm = None
    for task in tasks:
        t0 = time.perf_counter()
        if task == "ppl":
            test = np.load(data_dir / "test.npy", mmap_mode="r")
            rows, meta = evaluate_ppl(model, test, eos_id, ev)
        elif task in LM_EVAL_SUITES:
            from workflow import lm_eval_suites
            from workflow.lm_eval_model import CellLM, longest_eval_len

            if lm is None:
                lm = CellLM(model=model, tokenizer=str(model_dir), max_gen_toks=ev["max_gen_toks"],
                            max_length=longest_eval_len(cfg) + ev["max_gen_toks"], batch_size=ev["gen_batch_size"])
            rows, meta = getattr(lm_eval_suites, f"run_{task}")(lm, data_dir, ev)
        else:
            rows, meta = evaluate_retrieval(model, data_dir / f"{task}.jsonl", ev)
        wall = time.perf_counter() - t0
        meta.update({"wall_s": round(wall, 2), "peak_mem_mb": round(peak_memory_mb(), 1),
                     "threads": torch.get_num_threads()})
        write_json(out_dir / f"{task}.json", {"schema_version": SCHEMA_VERSION, "cell_id": cfg["cell_id"],
                                              "task": task, "rows": rows, "meta": meta})
        headline = ", ".join(f"{r.get('task', task)}@{r['eval_len']}:{r['value']:.3g}" for r in rows
                             if r["metric"] in ("ppl", "score") or (r["metric"] == "accuracy"
                                                                    and r["depth"] == rows[0]["depth"]))
        log(f"{cfg['cell_id']} {task} ({wall:.0f} s): {headline}")


def main(argv=None) -> None:
    parser = stage_parser(__doc__, "the cell's eval directory")
    parser.add_argument("--model", required=True, type=Path, help="fine-tuned cell model, or the base model")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cfg = read_json(args.config)
    run_cell_stage("evaluate", cfg, args.out.parent, lambda: evaluate_cell(cfg, args.data_dir, args.model, args.out))


if __name__ == "__main__":
    main()
