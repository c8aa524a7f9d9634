"""lm-eval model `ctxext`: one cell of a study (its checkpoint with its method, rope x attention, applied
exactly as the evaluate stage does) served to lm-evaluation-harness.

- Every logit comes from the cell's attention kind (`methods.attention_of(model)`), so Landmark (which inserts
  tokens) and LM-Infinite cells are scored as the evaluate stage scores them, and only where lm-eval needs it:
  loglikelihood requests get `answer_logits` at the continuation's positions (full-vocabulary logits of the
  continuation only, never of the context; HFLM's own path builds [batch, T, vocab] log-softmaxes), grouped
  into batches of equal length so that no padding enters the model.
- `max_length` is the cell's longest evaluation length plus the generation budget, never the model's
  `max_position_embeddings` (lm-eval's HF model defaults to it and silently left-truncates); a request
  longer than `max_length` is an error here, not a truncation.
- Generation is greedy through the kind's KV cache (`greedy_generate`): the prompt is prefilled in chunks of
  `prefill_chunk` tokens (eval.prefill_chunk), then each new token costs one decoding step, with the output
  layer at the new position only. Rows of the same prompt length are decoded as one batch; Dynamic NTK keeps
  the prompt's α for the whole answer and CLEX re-encodes when its scale changes (docs/methods.md §3.2g, §5g).

From the command line: `python -m workflow.tools.lm_eval` (registers the model, then hands over to lm-eval's CLI).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import workflow.common  # noqa: F401  (offline defaults before lm-eval/datasets are imported)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from methods import attention_of
from methods.attention import check_prefill_chunk
from workflow import checkpoints
from workflow.checkpoints import CHECKPOINT
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
    if cfg["regime"] == CHECKPOINT:   # a given checkpoint, checked against the study's tokenizer
        return cfg, checkpoints.prepare(cfg, cell_dir.parent.parent / "data")
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
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, batch_size: int | str = 1,
                 prefill_chunk: int | str | None = None, **kwargs):
        if cell is not None:
            cfg, model_dir = cell_paths(cell)
            model = cell_model(cfg, model_dir, Path(cell).parent.parent / "data", Path(cell))
            tokenizer = tokenizer or str(model_dir)
            max_length = int(max_length or longest_eval_len(cfg) + int(max_gen_toks))
            prefill_chunk = prefill_chunk if prefill_chunk is not None else cfg["eval"].get("prefill_chunk")
        if model is None or tokenizer is None or not max_length:
            raise ValueError("the ctxext model needs cell=<cell directory>, or model, tokenizer and max_length")
        self.prefill_chunk = check_prefill_chunk(int(prefill_chunk) if isinstance(prefill_chunk, str)
                                                 else prefill_chunk)
        super().__init__(pretrained=model, tokenizer=tokenizer, max_length=int(max_length),
                         max_gen_toks=int(max_gen_toks),
                         batch_size=int(batch_size) if str(batch_size).isdigit() else batch_size, **kwargs)

    def _check_length(self, n: int, what: str) -> None:
        if n > self.max_length + 1:
            raise ValueError(f"a {n}-token {what} exceeds max_length {self.max_length}")

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """HFLM's contract: logits [batch, T, vocab] at every position (only HFLM's batch-size probe still calls it;
        loglikelihood requests go through `_loglikelihood_tokens`, which asks for the continuation's logits only)."""
        self._check_length(inps.shape[1], "input")
        positions = torch.arange(inps.shape[1], device=inps.device).expand(inps.shape[0], -1)
        return attention_of(self.model).answer_logits(self.model, inps, positions, prefill_chunk=self.prefill_chunk)

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
            self._check_length(len(self.tok_encode(context + continuation)), "loglikelihood request")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation) per request
        ((context, continuation) strings or None, context ids, continuation ids), in request order. The input is
        context + continuation minus its last token, never truncated; requests of equal input and continuation
        lengths are batched (no padding), and the logits are computed at the continuation's positions only."""
        kind, size = attention_of(self.model), override_bs or (self.batch_size if isinstance(self.batch_size, int)
                                                               else 1)
        groups = defaultdict(list)
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if not context_enc or not continuation_enc:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation (in tokens)")
            n = len(context_enc) + len(continuation_enc)
            self._check_length(n, "loglikelihood request")
            groups[(n - 1, len(continuation_enc))].append(i)
        results = [None] * len(requests)
        softmax_dtype = getattr(self, "softmax_dtype", None) or torch.float32
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            for (n, k), members in sorted(groups.items(), reverse=True):
                for start in range(0, len(members), size):
                    part = members[start:start + size]
                    ids = torch.tensor([(requests[i][1] + requests[i][2])[:-1] for i in part], dtype=torch.long,
                                       device=self.device)
                    positions = torch.arange(n - k, n, device=self.device).expand(len(part), k)
                    logits = kind.answer_logits(self.model, ids, positions, prefill_chunk=self.prefill_chunk)
                    logprobs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
                    for row, i in enumerate(part):
                        cont = torch.tensor(requests[i][2], dtype=torch.long, device=logits.device)
                        answer = (float(logprobs[row].gather(-1, cont[:, None]).sum()),
                                  bool((logits[row].argmax(-1) == cont).all()))
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                        bar.update(1)
        return results

    @torch.no_grad()
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """Greedy decoding through the attention kind's KV cache (`greedy_generate`). `context` is left-padded;
        rows are decoded in groups of equal unpadded length, so that no padding ever enters the model. A row stops
        at the end-of-text token or once its text contains a stop sequence; its later positions hold the pad id."""
        if generation_kwargs.get("do_sample"):
            raise ValueError("the ctxext model serves greedy generation only (do_sample must be false)")
        mask = generation_kwargs.get("attention_mask")
        batch, width = context.shape
        lengths = mask.sum(dim=1).tolist() if mask is not None else [width] * batch
        n_new = max_length - width
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = torch.full((batch, width + n_new), pad, dtype=context.dtype, device=context.device)
        out[:, :width] = context
        kind = attention_of(self.model)

        def stopped(generated: torch.Tensor) -> list[bool]:
            return [int(row[-1]) == self.eot_token_id or any(s and s in self.tok_decode(row.tolist()) for s in stop)
                    for row in generated]

        for length in sorted(set(lengths)):
            rows = [i for i in range(batch) if lengths[i] == length]
            ids = context[rows, width - length:]
            out[rows, width:] = kind.greedy_generate(self.model, ids, n_new, stop=stopped, pad_id=pad,
                                                     prefill_chunk=self.prefill_chunk).to(out.dtype)
        return out
