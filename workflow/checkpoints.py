"""Checkpoint cells (regime `checkpoint`): a given Hugging Face checkpoint, evaluated as it is with its own rope
configuration, so that published extended models (a YaRN or PI 32k/64k model, LCEG's released checkpoints) sit in the
same report as the study's own cells.

A grid entry `{regime: checkpoint, checkpoint: <directory or hub id>, name: <short name>}` becomes the cell
`<name>-ckpt`. When the grid is expanded (Snakemake parse time) the checkpoint's config.json is read: its RoPE method
comes from `rope_parameters` (the rope type each method of `methods` writes, `RopeMethod.rope_type`; a ctxext
checkpoint's own record `config.ctxext` first), its attention kind from `config.ctxext_attention` (exact otherwise),
its windows from the config. A hub id goes through `modeling.hub_snapshot` (config.json only at parse time; the whole
snapshot when the cell is evaluated): offline, HF_HUB_OFFLINE=1 being ctxext's default, it stops there, before any
compute, with a message naming the grid entry.

The study's evaluation data are token ids of the study's tokenizer (`<data>/tokenizer`), so the evaluate stage first
compares the checkpoint's vocabulary with it and stops with a message when they differ.
"""
from __future__ import annotations

import json
from pathlib import Path

from methods import METHODS, REGIMES as METHOD_REGIMES
from workflow.modeling import hub_snapshot

CHECKPOINT = "checkpoint"                       # the regime of a checkpoint cell
CELL_REGIMES = (*METHOD_REGIMES, CHECKPOINT)    # every cell's regime: a method's (finetuned, frozen), or checkpoint
CHECKPOINT_REGIMES = (CHECKPOINT,)              # the schema's test for a checkpoint grid entry
ID_SUFFIX = "ckpt"                              # a checkpoint cell's id: <name>-ckpt
INSTEAD = "set the grid entry's checkpoint to the directory"


class CheckpointError(ValueError):
    """A checkpoint that cannot be evaluated in this study (missing, not a checkpoint, another tokenizer)."""


def cell_id(name: str) -> str:
    return f"{name}-{ID_SUFFIX}"


def is_hub_id(spec: str) -> bool:
    """A hub id (`org/name` or a bare name) rather than a path: not an existing directory, no path-like start, at
    most one '/'."""
    return not Path(spec).expanduser().is_dir() and not spec.startswith(("/", ".", "~")) and spec.count("/") <= 1


def locate(spec: str, what: str, config_only: bool = False) -> Path:
    """The local directory of checkpoint `spec`: the directory itself, or the hub snapshot (`modeling.hub_snapshot`;
    config.json only with `config_only`). `what` names the setting in messages (e.g. `grid[3].checkpoint`)."""
    if is_hub_id(spec):
        try:
            where = Path(hub_snapshot(spec, what, INSTEAD, ("config.json",) if config_only else
                                      ("*.json", "*.safetensors", "tokenizer*")))
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
    else:
        where = Path(spec).expanduser().resolve()
        if not where.is_dir():
            raise CheckpointError(f"{what}={spec!r} is neither a directory nor a Hugging Face hub id")
    if not (where / "config.json").is_file():
        raise CheckpointError(f"{what}={spec!r}: {where} is not a Hugging Face checkpoint (no config.json)")
    return where


def read_config(where: Path, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=False)
    except Exception as exc:  # unknown architecture, bad JSON: the message says which checkpoint
        raise CheckpointError(f"{what}: cannot read the config of {where}: {type(exc).__name__}: {exc}") from None


def rope_of_config(config, base_theta: float, base_window: int, what: str) -> dict:
    """The cell axes a checkpoint's config implies: rope (a method of `methods`), its parameters, the attention kind
    and its parameters, the window it extends from (base_window) and to (train_len).

    A ctxext checkpoint records its method (`config.ctxext`) and attention kind (`config.ctxext_attention`). Otherwise
    the rope type of `rope_parameters` names the method (`RopeMethod.rope_type`); the original rope ('default') is
    `none` with the study's base `base_theta` and NTK-aware (a changed base) with any other. The windows are the
    method's reading of transformers' convention (`RopeMethod.windows_of_config`: e.g. PI's max / factor to max)."""
    rope_params = dict(config.rope_parameters or {})
    window = int(config.max_position_embeddings)
    record = getattr(config, "ctxext", None)
    if record:
        rope, params = record["rope"], dict(record.get("params") or {})
        original, target = int(record["original_window"]), int(record["target_window"])
    else:
        rope_type = rope_params.get("rope_type", "default")
        if rope_type == "default":
            rope = "none" if float(rope_params.get("rope_theta", base_theta)) == float(base_theta) else "ntk"
        else:
            named = [name for name, method in METHODS.items() if method.rope_type == rope_type]
            if len(named) != 1:
                known = sorted({m.rope_type for m in METHODS.values() if m.rope_type})
                raise CheckpointError(f"{what}: rope type {rope_type!r} of the checkpoint is none of the benchmark's "
                                      f"methods (rope types: {', '.join(known)})")
            rope = named[0]
        params = {k: v for k, v in rope_params.items() if k != "rope_type"}
        original, target = METHODS[rope].windows_of_config(rope_params, window, base_window)
    attention = getattr(config, "ctxext_attention", None) or {}
    return {"rope": rope, "method_params": params, "attention": attention.get("attention", "exact"),
            "attention_params": dict(attention.get("params") or {}), "base_window": original, "train_len": target}


def describe(spec: str, name: str, model_cfg: dict, what: str) -> dict:
    """The cell of a checkpoint grid entry (parse time; reads config.json only)."""
    where = locate(spec, what, config_only=True)
    axes = rope_of_config(read_config(where, what), model_cfg["rope_theta"], model_cfg["base_window"], what)
    cid = cell_id(name)
    return {"cell_id": cid, **axes, "regime": CHECKPOINT, "checkpoint": spec if is_hub_id(spec) else str(where),
            "checkpoint_source": "hub" if is_hub_id(spec) else "local", "seed": None, "group": cid}


def local_files(cell: dict) -> list[str]:
    """The files of a local checkpoint that its evaluation depends on (config, weights, tokenizer); none for a hub id
    (its snapshot is resolved by the evaluate stage)."""
    if cell.get("checkpoint_source") != "local":
        return []
    where = Path(cell["checkpoint"])
    return sorted(str(p) for p in where.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))


def checkpoint_dir(cell: dict) -> Path:
    """The checkpoint's local directory at evaluation time (a hub id: its whole snapshot, or the offline message)."""
    return locate(cell["checkpoint"], f"cell {cell['cell_id']}: checkpoint")


def check_tokenizer(where: Path, study_tokenizer: Path, label: str) -> None:
    """Stop unless the checkpoint's tokenizer has the study's vocabulary (the evaluation data are token ids of the
    study's tokenizer) and its embedding covers every id."""
    from transformers import AutoTokenizer

    study = AutoTokenizer.from_pretrained(study_tokenizer)
    try:
        theirs = AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # no tokenizer files, or files transformers cannot read
        raise CheckpointError(f"{label}: {where} has no tokenizer that transformers can load ({type(exc).__name__}); "
                              f"its vocabulary must be the study's ({study_tokenizer})") from None
    mine, other = study.get_vocab(), theirs.get_vocab()
    if mine != other:
        differ = sorted(set(mine.items()) ^ set(other.items()), key=lambda kv: kv[1])
        example = ", ".join(f"{token!r}={index}" for token, index in differ[:3])
        raise CheckpointError(
            f"{label}: the checkpoint's tokenizer is not the study's: the study's evaluation data are token ids of "
            f"its tokenizer ({study_tokenizer}, {len(mine)} tokens), the checkpoint's ({where}) has {len(other)} "
            f"tokens and {len(differ)} (token, id) pairs differ (e.g. {example}). Evaluate it in a study whose base "
            "model shares its tokenizer.")
    vocab_size = json.loads((where / "config.json").read_text()).get("vocab_size")
    if vocab_size is not None and int(vocab_size) < len(study):
        raise CheckpointError(f"{label}: the checkpoint's embedding has {vocab_size} rows, fewer than the study "
                              f"tokenizer's {len(study)} tokens")


def prepare(cell: dict, data_dir: Path) -> Path:
    """The checkpoint's directory, checked against the study's tokenizer (the evaluate stage, before any compute)."""
    where = checkpoint_dir(cell)
    check_tokenizer(where, Path(data_dir) / "tokenizer", f"cell {cell['cell_id']} ({cell['checkpoint']})")
    return where
