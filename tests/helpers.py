"""Helpers shared by the tests (import them as `from tests.helpers import ...`; fixtures are in conftest.py):

- small random LLaMA models, inputs and a real tokenizer (`tiny_llama`, `random_ids`, `logits`, `stdlib_tokenizer`),
  and the reference of cached generation (`greedy_by_recomputation`);
- the micro study's data and base stages built in a tmp dir, and the stage commands run as subprocesses
  (`build_stage`, `run_module`, `finetune_args`, `read_log`);
- a small fake results tree with the layout of results/<study>/ for the store and report tests (`build_study`), and
  the check that every link of a rendered report resolves (`link_problems`).
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workflow.config import compose, expand_grid, stage_config

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- models and inputs
def tiny_llama(seed=0, vocab=128, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=None, window=64,
               rope_parameters=None, **config):
    """A seeded, randomly initialised LlamaForCausalLM in eval mode with the original RoPE (base 10000), or the
    given `rope_parameters` (e.g. a YaRN or linear scaling)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=window,
                      rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def random_ids(n, vocab, seed=1):
    """A [1, n] batch of token ids drawn with a fixed seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


def as_complex(x):
    """Rotate-half layout [.., d] -> complex [.., d/2]: dimension k pairs with k + d/2, rotation by a = * e^{ia}."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].double(), x[..., half:].double())


def rotated_back(q_rot, k_rot, inv_freq):
    """Queries [b, h, q_len, d] at positions n - q_len .. n - 1 and keys [b, h_kv, n, d] at 0 .. n - 1, rotated back to
    position 0 as complex [.., d/2] (keys repeated to the query heads), with theta = inv_freq in float64: the start
    of the naive references that score each (query, key) pair at a position of their own."""
    q_len, n = q_rot.shape[2], k_rot.shape[2]
    theta = inv_freq.double()
    q0 = as_complex(q_rot) * torch.exp(-1j * torch.arange(n - q_len, n).double()[:, None] * theta)
    k0 = as_complex(k_rot.repeat_interleave(q_rot.shape[1] // k_rot.shape[1], 1)) * torch.exp(
        -1j * torch.arange(n).double()[:, None] * theta)
    return q0, k0, theta


def check_reload_and_refusals(model, plain, impl: str, params: dict, x, tmp_path) -> None:
    """The contract of an attention kind that installs its own attention function (LM-Infinite, Self-Extend): a
    saved model reloads with the kind and its parameters and the same logits; a left-padded batch is refused (the
    kinds take contiguous positions); a model without the kind installed fails clearly when asked for `impl`."""
    from workflow.modeling import load_model

    expected = logits(model, x)
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = load_model(tmp_path)
    assert again.config._attn_implementation == impl
    assert again.config.ctxext_attention["params"] == params
    torch.testing.assert_close(logits(again, x), expected, rtol=1e-5, atol=1e-5)
    rows = x[:1, :8].repeat(2, 1)
    mask = torch.ones_like(rows)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="unpadded"):
        model(input_ids=rows, attention_mask=mask)
    model(input_ids=rows, attention_mask=torch.ones_like(rows))  # an all-ones mask is fine
    plain.set_attn_implementation(impl)
    with pytest.raises(RuntimeError, match="not installed"):
        plain(input_ids=rows)


@torch.no_grad()
def greedy_by_recomputation(logits_fn, input_ids, max_new_tokens):
    """Greedy decoding by full recomputation, the reference of every cached generation: the argmax of the last
    logits of a full forward pass (`logits_fn(ids) -> [rows, T, vocab]`) over everything so far, appended, repeated.
    Returns the new tokens [rows, max_new_tokens]."""
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, logits_fn(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def stdlib_tokenizer(vocab=512, modules=("argparse.py", "typing.py", "inspect.py")):
    """(a byte-level BPE trained on a few standard-library modules, their texts): a small real tokenizer
    and haystack corpus, available offline on every machine."""
    import sysconfig

    from workflow import corpus

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in modules]
    tokenizer, _ = corpus.train_tokenizer(texts, vocab, 2, None)
    return tokenizer, texts


def rotated_inputs(n, q_len, heads=4, kv_heads=2, d=8, magnitude=1.0, seed=0, batch=1):
    """Random q, k, v with q, k rotated by transformers' own apply_rotary_pos_emb (cos/sin times magnitude), for the
    attention kinds that re-rotate the keys they are handed (LM-Infinite, Self-Extend)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, d, generator=g)
    k = torch.randn(batch, kv_heads, n, d, generator=g)
    v = torch.randn(batch, kv_heads, n, d, generator=g)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(n).float()[:, None] * inv_freq
    emb = torch.cat([angles, angles], -1)[None]
    cos, sin = emb.cos() * magnitude, emb.sin() * magnitude
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos[:, n - q_len:], sin[:, n - q_len:])
    return q_rot, k_rot, v, inv_freq


# ---------------------------------------------------------------------------------------------- stages as subprocesses
OVERRIDES = ["pretrain.steps=4", "pretrain.phases=[{steps: 2, seq_len: 64, kv: 0.4, copy: 0.4}]", "finetune.steps=16",
             "finetune.checkpoint_every=3"]
CLEX = "clex-exact-256-ft"     # samples a random scale each step: resumption must restore the RNG
FROZEN = "ntk-exact-256-frozen"


def run_module(*args, **kwargs):
    """`python -m <args>` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


def build_stage(root) -> dict:
    """The micro study's data and a 4-step base model under `root`, plus the resolved configs of its jobs."""
    cfg = compose("micro", OVERRIDES)
    cells = {c["cell_id"]: c for c in expand_grid(cfg)}
    files = {}
    for name, obj in {"data": stage_config(cfg, stage="data"), "base": stage_config(cfg, stage="base"),
                      "finetune": stage_config(cfg, cells[CLEX], "finetune"),
                      "evaluate": stage_config(cfg, cells[FROZEN], "evaluate")}.items():
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(obj, sort_keys=True))
    for args in (("workflow.stages.data", "--config", files["data"], "--out", root / "data"),
                 ("workflow.stages.base", "--config", files["base"], "--data-dir", root / "data", "--out", root / "base")):
        run = run_module(*args)
        assert run.returncode == 0, run.stderr[-3000:]
    return {"root": root, "cfg": cfg, "cells": cells, "files": files}


def finetune_args(stage, out, base=None):
    """The arguments after `-m` of the CLEX cell's fine-tune job writing to `out`."""
    return ["workflow.stages.finetune", "--config", stage["files"]["finetune"], "--data-dir", stage["root"] / "data",
            "--base", base or stage["root"] / "base" / "model", "--out", out]


def run_finetune(stage, cell_id):
    """Fine-tune one cell of the stage's study as its rule does (a subprocess): (the completed run, the cell's dir)."""
    config = stage["root"] / f"finetune-{cell_id}.json"
    config.write_text(json.dumps(stage_config(stage["cfg"], stage["cells"][cell_id], "finetune"), sort_keys=True))
    out = stage["root"] / "cells" / cell_id
    run = run_module("workflow.stages.finetune", "--config", config, "--data-dir", stage["root"] / "data",
                     "--base", stage["root"] / "base" / "model", "--out", out)
    return run, out


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- a fake results tree
BASE_WINDOW = 256
EVAL_LENGTHS = [128, 256, 512, 1024, 2048, 4096]
RETRIEVAL_LENGTHS = [256, 512, 1024, 2048]
DEPTHS = [0.0, 0.5, 1.0]
HOSTILE = "<script>alert(1)</script>"
HOSTILE_CELL = "evil-<img src=x onerror=alert(1)>-512-ft"

# Perplexity per eval length of each cell that has results (None: no row at that length).
PPL = {
    "none-exact-256-frozen": [31.0, 27.5, 95.0, 940.0, 2.1e4, 3.4e5],
    "pi-exact-512-ft": [30.2, 25.8, 22.9, 61.0, 410.0, 3050.0],
    "yarn-exact-1024-ft": [29.6, 25.1, 22.4, 20.7, 36.0, 152.0],
}
MISSING_CELL = "ntk-exact-512-ft"  # has cell.json and a train log, no eval files
ABSENT_CELL = "clex-exact-1024-ft"  # listed in study.json's cells, never written at all
RULER_TASKS = ["niah_single_1", "vt", "cwe"]
RULER_LENGTHS = [256, 512, 1024]
RULER_CELLS = ["none-exact-256-frozen", "pi-exact-512-ft", "yarn-exact-1024-ft"]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _cell_record(study: str, cell_id: str, rope: str, attention: str, train_len: int, regime: str,
                 extra_config: dict | None = None) -> dict:
    return {"schema_version": 1, "study": study, "cell_id": cell_id, "rope": rope,
            "attention": attention, "train_len": train_len, "regime": regime,
            "base_window": BASE_WINDOW,
            "method_params": {"factor": train_len / BASE_WINDOW} if rope != "none" else {},
            "config": {"finetune": {"steps": 30, "lr": 1e-3}, **(extra_config or {})},
            "config_hash": hashlib.sha256(cell_id.encode()).hexdigest(), "code_version": "abc1234"}


def _train_log(path: Path, steps: int, start: float, end: float) -> None:
    lines = []
    for step in range(1, steps + 1):
        loss = end + (start - end) * math.exp(-step / (steps / 4)) + 0.05 * math.sin(step)
        lines.append(json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens": 4096,
                                 "tokens_per_s": 1500.0 + step, "peak_mem_mb": 800.0 + step,
                                 "elapsed_s": 2.7 * step}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _summary(steps: int, wall_s: float) -> dict:
    return {"steps": steps, "tokens": steps * 4096, "wall_s": wall_s, "tokens_per_s": 4096 * steps / wall_s,
            "final_loss": 3.2, "peak_mem_mb": 900.0, "threads": 2, "resumed_from_step": None}


def ppl_eval(cell_id: str, values: list[float]) -> dict:
    rows = []
    for length, value in zip(EVAL_LENGTHS, values):
        if value is None:
            continue
        n = 4 * length
        rows.append({"eval_len": length, "depth": None, "metric": "ppl", "value": value, "n": n,
                     "ci_low": value * 0.97, "ci_high": value * 1.03})
        rows.append({"eval_len": length, "depth": None, "metric": "loss", "value": math.log(value),
                     "n": n, "ci_low": None, "ci_high": None})
    return {"schema_version": 1, "cell_id": cell_id, "task": "ppl", "rows": rows,
            "meta": {"wall_s": 12.0, "peak_mem_mb": 700.0, "threads": 1, "windows": {}}}


def retrieval_eval(cell_id: str, task: str, reach: int) -> dict:
    """Accuracy 1 up to `reach` tokens, then falling with length and depth."""
    rows = []
    for length in RETRIEVAL_LENGTHS:
        for depth in DEPTHS:
            acc = 1.0 if length <= reach else max(0.0, 1.0 - 0.25 * math.log2(length / reach) - 0.25 * depth)
            rows.append({"eval_len": length, "depth": depth, "metric": "accuracy", "value": acc, "n": 4,
                         "ci_low": max(0.0, acc - 0.3), "ci_high": min(1.0, acc + 0.3)})
            token = 0.1 + 0.9 * acc ** 0.5          # graded metrics: partial retrieval before exact match moves
            rows.append({"eval_len": length, "depth": depth, "metric": "token_accuracy", "value": token, "n": 4,
                         "ci_low": max(0.0, token - 0.2), "ci_high": min(1.0, token + 0.2)})
            rows.append({"eval_len": length, "depth": depth, "metric": "answer_logprob", "value": -2.3 * (1 - token),
                         "n": 4, "ci_low": -2.3 * (1 - token) - 0.5, "ci_high": -2.3 * (1 - token) + 0.5})
    return {"schema_version": 1, "cell_id": cell_id, "task": task, "rows": rows,
            "meta": {"wall_s": 5.0, "peak_mem_mb": 650.0, "threads": 1}}


def ruler_score(task_index: int, length: int, reach: int) -> float:
    """A RULER-style task score: high up to `reach` tokens, low beyond it."""
    return round((1.0 - 0.1 * task_index) if length <= reach else 0.1 / (task_index + 1), 4)


def ruler_eval(cell_id: str, reach: int, tasks: list[str]) -> dict:
    """Suite `ruler`: one row per (task, length), each naming its task."""
    rows = [{"task": task, "eval_len": length, "metric": "accuracy", "value": ruler_score(i, length, reach),
             "n": 8} for i, task in enumerate(tasks) for length in RULER_LENGTHS]
    return {"schema_version": 1, "cell_id": cell_id, "task": "ruler", "rows": rows,
            "meta": {"wall_s": 7.0, "peak_mem_mb": 600.0, "threads": 1}}


def build_study(root: Path, name: str = "fixture", hostile: bool = False) -> Path:
    """Write a fake results/<study>/ tree under root and return its path.

    Cells: the frozen base (none-exact-256-frozen), pi-exact-512-ft, yarn-exact-1024-ft (all with
    ppl/passkey/needle results; the three also have a `ruler` suite) and ntk-exact-512-ft (cell.json
    and train log, no results); study.json also expects clex-exact-1024-ft, which has nothing. With
    hostile=True the study name, a config value, one extra cell id and a ruler task name carry HTML."""
    study_dir = Path(root) / name
    study_name = HOSTILE if hostile else name
    manifest = {
        "source": "stdlib", "description": "Python standard library source files",
        "synthetic": {"kv": 0.3, "copy": 0.2, "multikey": 0.3, "code_haystack": 0.5,
                                     "answer_only": True, "weight": 0.5}, "seeds": {"split": 1234},
        "tokenizer": {"vocab_size": 4096},
        "splits": {split: {"files": n, "tokens": n * 900, "file_list_sha256": f"{n:064x}",
                           "text_sha256": f"{n * 7:064x}"}
                   for split, n in (("train", 1800), ("validation", 95), ("test", 95))},
        "files": {"train": [f"lib/mod{i}.py" for i in range(200)]},
    }
    config = {"study": {"name": study_name, "train_lens": [512, 1024]},
              "model": {"source": "scratch", "base_window": BASE_WINDOW, "hidden_size": 128},
              "data": {"synthetic": {"kv": 0.3, "copy": 0.2, "answer_only": True, "weight": 0.5}},
              "pretrain": {"steps": 4000, "phases": [{"steps": 1500, "seq_len": 128, "kv": 0.4, "copy": 0.4}]},
              "finetune": {"synthetic": {"kv": 0.0, "copy": 0.0}},
              "eval": {"lengths": EVAL_LENGTHS}, "note": HOSTILE if hostile else "plain"}
    _write(study_dir / "study.json", {
        "name": study_name, "description": "A fixture study.", "base_window": BASE_WINDOW,
        "train_lens": [512, 1024], "eval_lengths": EVAL_LENGTHS,
        "model": {"architecture": "LlamaForCausalLM", "n_params": 1_412_352, "hidden_size": 128,
                  "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 4096},
        "data": manifest, "config": config, "code_version": "abc1234",
        "cells": ["none-exact-256-frozen", "pi-exact-512-ft", "yarn-exact-1024-ft", MISSING_CELL, ABSENT_CELL]
        + ([HOSTILE_CELL] if hostile else [])})
    _write(study_dir / "data" / "manifest.json", manifest)
    _train_log(study_dir / "base" / "train_log.jsonl", 60, 8.0, 3.4)
    _write(study_dir / "base" / "train_summary.json", _summary(60, 300.0))

    cells = [("none-exact-256-frozen", "none", 256, "frozen", 256),
             ("pi-exact-512-ft", "pi", 512, "finetuned", 512),
             ("yarn-exact-1024-ft", "yarn", 1024, "finetuned", 1024),
             (MISSING_CELL, "ntk", 512, "finetuned", None)]
    if hostile:
        cells.append((HOSTILE_CELL, "yarn", 512, "finetuned", 512))
    for cell_id, rope, train_len, regime, reach in cells:
        cell_dir = study_dir / "cells" / cell_id
        extra = {"note": HOSTILE} if hostile else None
        _write(cell_dir / "cell.json", _cell_record(study_name, cell_id, rope, "exact", train_len, regime, extra))
        if regime == "finetuned":
            _train_log(cell_dir / "train_log.jsonl", 30, 3.9, 3.1 + train_len / 4096)
            _write(cell_dir / "train_summary.json", _summary(30, 80.0 + train_len / 10))
        if reach is None:
            continue
        values = PPL.get(cell_id, PPL["yarn-exact-1024-ft"])
        _write(cell_dir / "eval" / "ppl.json", ppl_eval(cell_id, values))
        _write(cell_dir / "eval" / "passkey.json", retrieval_eval(cell_id, "passkey", reach))
        _write(cell_dir / "eval" / "needle.json", retrieval_eval(cell_id, "needle", reach // 2))
        if cell_id in RULER_CELLS:
            tasks = RULER_TASKS + ([HOSTILE] if hostile else [])
            _write(cell_dir / "eval" / "ruler.json", ruler_eval(cell_id, reach, tasks))
    return study_dir


def add_seed_runs(study_dir: Path, cell_id: str, rope: str, train_len: int, ppl_by_seed: dict[int, list[float]]) -> None:
    """Write the runs of a fine-tuned cell with several seeds into a build_study tree: for each seed number its cell
    record (`<cell_id>` for seed 0, `<cell_id>-s<r>` otherwise, group `cell_id`), train log and perplexity rows
    `ppl_by_seed[r]` (one per EVAL_LENGTHS); study.json expects every run."""
    study_dir = Path(study_dir)
    study = json.loads((study_dir / "study.json").read_text())
    for seed, values in ppl_by_seed.items():
        run_id = cell_id if seed == 0 else f"{cell_id}-s{seed}"
        cell_dir = study_dir / "cells" / run_id
        _write(cell_dir / "cell.json", {**_cell_record(study["name"], run_id, rope, "exact", train_len, "finetuned"),
                                        "seed": seed, "group": cell_id})
        _train_log(cell_dir / "train_log.jsonl", 30, 3.9, 3.1 + train_len / 4096)
        _write(cell_dir / "train_summary.json", _summary(30, 80.0 + train_len / 10))
        _write(cell_dir / "eval" / "ppl.json", ppl_eval(run_id, values))
        if run_id not in study["cells"]:
            study["cells"].append(run_id)
    _write(study_dir / "study.json", study)


# Rows the store must hold for build_study(hostile=False).
EXPECTED_COUNTS = {
    "cells": 4,
    # per result cell: ppl and loss per length; accuracy, token_accuracy and answer_logprob per passkey/needle
    # length x depth; a ruler score per task and length
    "metrics": 3 * (2 * len(EVAL_LENGTHS) + 3 * 2 * len(RETRIEVAL_LENGTHS) * len(DEPTHS)
                    + len(RULER_TASKS) * len(RULER_LENGTHS)),
    "train_log": 60 + 3 * 30,
}


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.targets = set(), []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id":
                self.ids.add(value)
            elif name in ("href", "src", "xlink:href", "action", "poster", "data"):
                self.targets.append((tag, name, value or ""))


def link_problems(html: str, folder: Path) -> list[str]:
    """The links of a rendered page that do not resolve: '#id' with no such id in the page, a relative path with no
    file under `folder` (the page's folder; a path may not leave it), and anything else that is not an https URL."""
    parser = _Links()
    parser.feed(html)
    root, problems = Path(folder).resolve(), []
    for tag, attr, target in parser.targets:
        parts = urlsplit(target)
        if parts.scheme == "https" and parts.netloc:
            continue
        if parts.scheme or parts.netloc or target.startswith("/"):
            problems.append(f"<{tag} {attr}={target!r}>: neither relative nor https")
        elif not parts.path:
            if parts.fragment not in parser.ids:
                problems.append(f"<{tag} {attr}={target!r}>: no element with that id")
        else:
            path = (root / unquote(parts.path)).resolve()
            if not path.is_relative_to(root):
                problems.append(f"<{tag} {attr}={target!r}>: leaves the report's folder")
            elif not path.is_file():
                problems.append(f"<{tag} {attr}={target!r}>: no file {path}")
    return problems
