"""The study's cells and how the report describes them: method labels, families, the method overview's text (from
reports/reference/methods.yaml), the base model and the data."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from workflow.report.formatting import as_json, compact_params, fmt_count, fmt_num
from workflow.report.queries import Db

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO / "reports" / "reference"   # methods.yaml (overview text), paper.yaml (published numbers)

ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}")


def method_label(rope: str, attention: str, methods: dict) -> str:
    """The method's name as the overview (methods.yaml `label`) gives it: the RoPE method, the attention kind, or
    both (e.g. "YaRN + LM-Infinite"); a name missing from methods.yaml is shown as it is."""
    rope_label = methods["rope"].get(rope, {}).get("label", rope)
    if attention == "exact":
        return rope_label
    attn = methods["attention"].get(attention, {}).get("label", attention)
    return attn if rope == "none" else f"{rope_label} + {attn}"


def paper_link(paper: dict) -> dict:
    """A methods.yaml `paper` entry with its arXiv URL; an id that is not of arXiv's form stops the report."""
    arxiv = str(paper["arxiv"])
    if not ARXIV_ID.fullmatch(arxiv):
        raise ValueError(f"methods.yaml: {arxiv!r} is not an arXiv identifier (e.g. 2309.00071)")
    return {"arxiv": arxiv, "url": f"https://arxiv.org/abs/{arxiv}", "cite": paper.get("cite"),
            "section": paper.get("section")}


def describe_model(model: dict, base_window) -> str:
    model = model or {}
    parts = []
    name = model.get("name") or model.get("architecture")
    if model.get("n_params") is not None:
        parts.append(f"{fmt_count(model['n_params'])} parameters")
    layers = model.get("num_hidden_layers", model.get("layers"))
    if layers is not None:
        parts.append(f"{layers} layers")
    hidden = model.get("hidden_size", model.get("hidden"))
    if hidden is not None:
        parts.append(f"hidden size {hidden}")
    heads = model.get("num_attention_heads", model.get("heads"))
    if heads is not None:
        parts.append(f"{heads} heads")
    if model.get("vocab_size") is not None:
        parts.append(f"vocabulary {model['vocab_size']:,}")
    if base_window is not None:
        parts.append(f"base window {base_window:,} tokens")
    return (f"{name}: " if name else "") + ", ".join(parts) if parts or name else "not recorded"


def token_counts(data: dict) -> dict[str, int]:
    """Tokens per split from the manifest summary: data.splits.<split>.tokens, data.token_counts
    or data.tokens (a split -> count mapping)."""
    if isinstance(data.get("splits"), dict):
        counts = {k: v.get("tokens", v.get("n_tokens")) for k, v in data["splits"].items()
                  if isinstance(v, dict)}
        return {k: v for k, v in counts.items() if v is not None}
    for key in ("token_counts", "tokens"):
        if isinstance(data.get(key), dict):
            return dict(data[key])
    return {}


def describe_data(data: dict) -> dict:
    data = data or {}
    order = ("train", "validation", "test")
    counts = sorted(token_counts(data).items(),
                    key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    return {"source": data.get("source") or "not recorded", "description": data.get("description"),
            "tokens": [(k, fmt_count(v)) for k, v in counts]}


def _shares(kv: float, copy: float) -> str:
    return f"{100 * kv:g}% key/value rows and {100 * copy:g}% copy rows"


def describe_training_data(config: dict | None, model: dict | None) -> dict:
    """What the synthetic retrieval rows (workflow.synthetic) were in pretraining and in fine-tuning, in words: the
    base model's own record when it was shipped or pretrained here, the study's fine-tuning shares."""
    config, model = config or {}, model or {}
    made = model.get("made_with") or ({"pretrain": config.get("pretrain"), "synthetic": config.get("data", {}).get(
        "synthetic")} if config.get("model", {}).get("source") == "scratch" else None)
    if made and made.get("synthetic") and made.get("pretrain"):
        syn, pre = made["synthetic"], made["pretrain"]
        phases = "; ".join(f"first {p['steps']:,} steps rows of {p['seq_len']} tokens with {_shares(p['kv'], p['copy'])}"
                           for p in pre.get("phases") or [])
        weight = ("every scored token counting the same" if syn.get("weight") is None
                  else f"{100 * syn['weight']:g}% of each step's loss on them")
        scored = "only their answers and copies scored" if syn.get("answer_only") else "every token scored"
        pretrain = (f"{pre['steps']:,} steps: {(phases + '; then ') if phases else ''}rows of the base window with "
                    f"{_shares(syn['kv'], syn['copy'])} ({scored}, {weight}); the rest is the corpus")
        if model.get("source") == "shipped":
            pretrain += f" (the shipped base model {model.get('shipped')}, made by study {model.get('study')})"
    else:
        pretrain = "not pretrained here (an imported checkpoint)"
    ft = (config.get("finetune") or {}).get("synthetic") or {}
    where = (" of the base window written into the training-length rows (the pretraining mix replayed: no retrieval "
             "gap beyond the base window)" if ft.get("length") == "base_window" else " at the training length")
    finetune = ("text only, as the reference study fine-tunes" if not ft.get("kv") and not ft.get("copy")
                else _shares(ft.get("kv", 0.0), ft.get("copy", 0.0)) + where)
    return {"pretrain": pretrain, "finetune": finetune}


def load_reference(directory: Path = REFERENCE_DIR) -> tuple[dict, dict]:
    """(methods.yaml, paper.yaml): the method overview text and the reference study's numbers."""
    return tuple(yaml.safe_load((directory / name).read_text()) for name in ("methods.yaml", "paper.yaml"))


def load_cells(db: Db, expected: list[str], methods: dict) -> list[dict]:
    """Every stored cell (one per seed of a fine-tuned cell), then every cell study.json expects but the store never
    saw (status says so). Their figure styles come with their groups (workflow.report.seeds.group_cells)."""
    cells = db.rows("cells")
    seen = {c["cell_id"] for c in cells}
    for cid in expected or []:
        if cid not in seen:
            cells.append({"cell_id": cid, "study": None, "rope": None, "attention": None, "train_len": None,
                          "regime": "—", "base_window": None, "method_params": None, "attention_params": None,
                          "config_hash": None, "code_version": None, "train_wall_s": None,
                          "train_tokens_per_s": None, "train_peak_mem_mb": None, "status": "no cell record",
                          "status_reason": None, "seed": None, "group_id": None, "checkpoint": None})
    for c in cells:
        # the seeds of one cell share its group (its id without the seed suffix; workflow.report.seeds); a cell the
        # store never saw is a group of its own
        c["group"] = c["group_id"] or c["cell_id"]
        rope = methods["rope"].get(c["rope"], {})
        attn = methods["attention"].get(c["attention"], {})
        known = c["rope"] is not None
        c["method"] = method_label(c["rope"], c["attention"], methods) if known else "—"
        c["family"] = ("approximate" if "approximate" in (rope.get("family"), attn.get("family")) else "exact") \
            if known else "—"
        c["changes"] = "; ".join(d["changes"] for d, name in ((rope, c["rope"]), (attn, c["attention"]))
                                 if d and name not in ("none", "exact")) or (rope.get("changes", "—"))
        c["params_added"] = ", ".join(sorted({d.get("params_added", "none") for d in (rope, attn)} - {"none"})) \
            or ("none" if known else "—")
        parts = [d for d, name in ((rope, c["rope"]), (attn, c["attention"])) if d and name not in ("none", "exact")]
        parts = parts or ([rope] if rope else [])   # the unmodified model: RoPE's own entry
        c["specs"] = [d["spec"] for d in parts if d.get("spec")]
        c["spec"] = ", ".join(c["specs"]) or "—"
        c["papers"] = [paper_link(d["paper"]) for d in parts if d.get("paper")]
        c["params"] = compact_params({**(as_json(c["method_params"]) or {}), **(as_json(c["attention_params"]) or {})})
        if c.get("checkpoint"):   # a checkpoint cell: where it came from, then its own rope parameters
            c["params"] = f"{c['checkpoint']}: {c['params']}"
        c["scale"] = fmt_num(c["train_len"] / c["base_window"]) if c["base_window"] and c["train_len"] else "—"
        c["hash"] = (c["config_hash"] or "—")[:12]
        c["ok"] = c["status"] == "ok"
        c["status_text"] = c["status"] + (f": {c['status_reason']}" if c.get("status_reason") else "")
    return cells


