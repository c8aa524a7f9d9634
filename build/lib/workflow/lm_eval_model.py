"""lm-eval model `ctxext`: one cell of a study (its checkpoint with its method, rope x attention, applied
exactly as the evaluate stage does) served to lm-evaluation-harness.

- Every logit comes from `methods.attention_of(model).logits(model, ids)`, so Landmark (which inserts
  tokens) and LM-Infinite cells are scored as the evaluate stage scores them.
- `max_length` is the cell's longest evaluation length plus the generation budget, never the model's
  `max_position_embeddings` (lm-eval's HF model defaults to it and silently left-truncates); a request
  longer than `max_length` is an error here, not a truncation.
- Generation is greedy and re-runs the full forward pass for every new token (no KV cache): correct for
  every attention kind and for Dynamic NTK, whose frequencies depend on the sequence length. It costs
  one forward pass over the whole sequence per generated token, which is fine for answers of a few
  tokens; rows of the same prompt length are decoded as one batch.

From the command line: `python -m workflow.tools.lm_eval` (registers the model, then hands over to lm-eval's CLI).
"""
from __future__ import annotations

from pathlib import Path

import torch

import workflow.common  # noqa: F401  (offline defaults before lm-eval/datasets are imported)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from methods import attention_of
from workflow.common import read_json
from workflow.modeling import cell_model

DEFAULT_MAX_GEN_TOKS = 128


def cell_paths(cell_dir: str | Path) -> tuple[dict, Path]:
    """(the cell's resolved evaluate config, its model directory) from results/<study>/cells/<cell>."""
    cell_dir = Path(cell_dir)
    record_path = cell_dir / "cell.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{cell_dir} is not a cell directory (no cell.json)")
    cfg = read_json(record_path)["config"]
    model_dir = cell_dir / "model" if cfg["regime"] == "finetuned" else cell_dir.parent.parent / "base" / "model"
    return cfg, model_dir


def longest_eval_len(cfg: dict) -> int:
    ev = cfg["eval"]
    return max([*ev["lengths"], *ev.get("ruler", {}).get("lengths", [])])


@register_model("ctxext")
class CellLM(HFLM):
    """A cell as an lm-eval model. Give `cell` (a cell directory), or `model` (a loaded model) and
    `tokenizer` with `max_length`."""

    def __init__(self, cell: str | None = None, model=None, tokenizer=None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, batch_size: int | str = 1, **kwargs):
        if cell is not None:
            cfg, model_dir = cell_paths(cell)
            model = cell_model(cfg, model_dir)
            tokenizer = tokenizer or str(model_dir)
            max_length = int(max_length or longest_eval_len(cfg) + int(max_gen_toks))
        if model is None or tokenizer is None or not max_length:
            raise ValueError("the ctxext model needs cell=<cell directory>, or model, tokenizer and max_length")
        super().__init__(pretrained=model, tokenizer=tokenizer, max_length=int(max_length),
                         max_gen_toks=int(max_gen_toks),
                         batch_size=int(batch_size) if str(batch_size).isdigit() else batch_size, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if inps.shape[1] > self.max_length + 1:
            raise ValueError(f"a {inps.shape[1]}-token input exceeds max_length {self.max_length}")
        with torch.no_grad():
            return attention_of(self.model).logits(self.model, inps)

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        ids, mask = super().tok_batch_encode(strings, padding_side=padding_side, truncation=truncation)
        if left_truncate_len and ids.shape[1] > left_truncate_len:
            raise ValueError(f"a {ids.shape[1]}-token prompt does not fit max_length {self.max_length} minus the "
                             f"generation budget ({left_truncate_len} tokens); raise max_length instead of "
                             f"truncating the context")
        return ids, mask

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        for req in requests:
            context, continuation = req.args
            n = len(self.tok_encode(context + continuation))
            if n > self.max_length + 1:
                raise ValueError(f"a {n}-token loglikelihood request exceeds max_length {self.max_length}")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @torch.no_grad()
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """Greedy decoding by full forward passes. `context` is left-padded; rows are decoded in groups of
        equal unpadded length, so that no padding ever enters the model."""
        if generation_kwargs.get("do_sample"):
            raise ValueError("the ctxext model serves greedy generation only (do_sample must be false)")
        mask = generation_kwargs.get("attention_mask")
        batch, width = context.shape
        lengths = mask.sum(dim=1).tolist() if mask is not None else [width] * batch
        n_new = max_length - width
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = torch.full((batch, width + n_new), pad, dtype=context.dtype)
        out[:, :width] = context
        for length in sorted(set(lengths)):
            rows = [i for i in range(batch) if lengths[i] == length]
            ids = context[rows, width - length:]
            done = [False] * len(rows)
            for step in range(n_new):
                logits = attention_of(self.model).logits(self.model, ids)[:, -1]
                nxt = logits.argmax(dim=-1)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                for j, row in enumerate(rows):
                    if done[j]:
                        continue
                    out[row, width + step] = nxt[j]
                    text = self.tok_decode(ids[j, length:].tolist())
                    done[j] = int(nxt[j]) == self.eot_token_id or any(s and s in text for s in stop)
                if all(done):
                    break
        return out
