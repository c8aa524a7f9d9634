"""Compose the Hydra configuration of a study, validate it, and expand its grid into cells.

Everything here runs at Snakemake parse time, so a bad configuration stops `snakemake -n` before any
compute, with a message that names the offending key and value.
"""
from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

from methods import ATTENTIONS, METHODS, REGIMES, get_attention, get_method
from workflow.common import RESULT_SCHEMA_VERSION, config_hash
from workflow.modeling import MODEL_SOURCES
from workflow.runtime import ATTN_IMPLEMENTATIONS, DTYPES
from workflow.tasks import TASKS, TaskConfigError
from workflow.train import SCHEDULES

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"
AXES = ("rope", "attention", "train_len", "regime")


class ConfigError(ValueError):
    """A configuration problem found before any compute."""


def compose(study: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved configuration (a plain dict) of `study` with Hydra `overrides` applied."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    if isinstance(overrides, str):
        overrides = [overrides]
    all_overrides = ([f"study={study}"] if study else []) + [str(o) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=all_overrides)
            resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # Hydra's own messages name the bad override; keep them, add context
        raise ConfigError(f"cannot compose the configuration (overrides {all_overrides}): {exc}") from exc
    validate(resolved)
    return resolved


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def validate(cfg: dict) -> None:
    """Checks that do not need the grid: windows, lengths, steps."""
    model, ev = cfg["model"], cfg["eval"]
    _positive_int(model["base_window"], "model.base_window")
    if model["source"] not in MODEL_SOURCES:
        raise ConfigError(f"model.source must be one of {', '.join(MODEL_SOURCES)}, got {model['source']!r}")
    for source, key in (("gguf_package", "package"), ("hub", "hub_id")):
        if model["source"] == source and not model.get(key):
            raise ConfigError(f"model.source={source!r} needs model.{key}, got {model.get(key)!r}")
    if model.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {model.get('dtype')!r}")
    if model.get("attn_implementation", "sdpa") not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                          f"got {model.get('attn_implementation')!r}")
    if model["source"] == "hf_dir":
        path = model.get("path")
        if not path or not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.path={path!r} is not a Hugging Face checkpoint directory (no config.json)")
    if not isinstance(ev["lengths"], list) or not ev["lengths"]:
        raise ConfigError(f"eval.lengths must be a non-empty list, got {ev['lengths']!r}")
    for i, n in enumerate(ev["lengths"]):
        _positive_int(n, f"eval.lengths[{i}]")
    for i, n in enumerate(ev["retrieval"]["lengths"]):
        _positive_int(n, f"eval.retrieval.lengths[{i}]")
    for i, d in enumerate(ev["retrieval"]["depths"]):
        if not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ConfigError(f"eval.retrieval.depths[{i}] must be in [0, 1], got {d!r}")
    trained = ("pretrain", "finetune") if cfg["model"]["source"] == "scratch" else ("finetune",)
    for stage in trained:  # an imported base model is not pretrained: its pretrain keys are unused
        _positive_int(cfg[stage]["steps"], f"{stage}.steps")
        _positive_int(cfg[stage]["checkpoint_every"], f"{stage}.checkpoint_every")
        lr = cfg[stage]["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ConfigError(f"{stage}.lr must be a positive finite number, got {lr!r}")
        if cfg[stage]["schedule"] not in SCHEDULES:
            raise ConfigError(f"{stage}.schedule={cfg[stage]['schedule']!r} is not known; valid: "
                              f"{', '.join(SCHEDULES)}")
    _validate_tasks(ev)


def _validate_tasks(ev: dict) -> None:
    """eval.tasks names registered tasks (workflow.tasks); each task checks its own part of `eval`."""
    unknown = [t for t in ev["tasks"] if t not in TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks has unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    if not isinstance(ev.get("chat_template", False), bool):
        raise ConfigError(f"eval.chat_template must be true or false, got {ev['chat_template']!r}")
    if "ruler" in ev["tasks"] or "lm_eval" in ev["tasks"]:
        _positive_int(ev["max_gen_toks"], "eval.max_gen_toks")
        _positive_int(ev["gen_batch_size"], "eval.gen_batch_size")
    if "ruler" in ev["tasks"]:
        for i, n in enumerate(ev["ruler"]["lengths"]):
            _positive_int(n, f"eval.ruler.lengths[{i}]")
        _positive_int(ev["ruler"]["samples"], "eval.ruler.samples")
    for name in ev["tasks"]:
        try:
            TASKS[name].validate(ev)
        except TaskConfigError as exc:
            raise ConfigError(str(exc)) from None


def cell_id(rope: str, attention: str, train_len: int, regime: str) -> str:
    """The readable slug of a cell, e.g. `yarn-exact-1024-ft`."""
    return f"{rope}-{attention}-{train_len}-{'ft' if regime == 'finetuned' else 'frozen'}"


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_grid(cfg: dict) -> list[dict]:
    """All cells of the study's grid, validated, in config order (duplicates are an error)."""
    base_window = cfg["model"]["base_window"]
    cells, seen = [], {}
    for index, entry in enumerate(cfg["grid"]):
        where = f"grid[{index}]"
        unknown = set(entry) - set(AXES) - {"params", "attention_params"}
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}; valid: {', '.join(AXES)}, params, "
                              "attention_params")
        missing = [a for a in AXES if a not in entry]
        if missing:
            raise ConfigError(f"{where} is missing axis/axes {missing}")
        lists = [_as_list(entry[a]) for a in AXES]
        for rope, attention, train_len, regime in itertools.product(*lists):
            if rope not in METHODS:
                raise ConfigError(f"{where}.rope={rope!r} is not a known method; valid: {', '.join(METHODS)}")
            if attention not in ATTENTIONS:
                raise ConfigError(
                    f"{where}.attention={attention!r} is not a known attention; valid: {', '.join(ATTENTIONS)}")
            if regime not in REGIMES:
                raise ConfigError(f"{where}.regime={regime!r} is not valid; valid: {', '.join(REGIMES)}")
            if train_len == "base":
                train_len = base_window
            _positive_int(train_len, f"{where}.train_len")
            if rope == "none" and attention == "exact" and regime == "finetuned":
                raise ConfigError(f"{where}: a fine-tuned cell needs a method (rope 'none' with exact attention "
                                  "and regime 'finetuned' would only continue pretraining)")
            if rope != "none" and train_len <= base_window:
                raise ConfigError(f"{where}.train_len={train_len} must be above model.base_window={base_window} "
                                  f"for method {rope!r} (it is the extension target)")
            if rope == "none" and train_len != base_window and regime == "frozen":
                raise ConfigError(f"{where}: a frozen cell with rope 'none' keeps the base window: train_len must "
                                  f"be {base_window} (model.base_window, or 'base'), got {train_len}")
            tokens_per_step = cfg["finetune"]["tokens_per_step"]
            if regime == "finetuned" and tokens_per_step % train_len:
                raise ConfigError(f"finetune.tokens_per_step={tokens_per_step} must be a multiple of "
                                  f"{where}.train_len={train_len} (whole rows a step)")
            cid = cell_id(rope, attention, train_len, regime)
            if cid in seen:
                raise ConfigError(f"{where} repeats cell {cid} (first defined in grid[{seen[cid]}])")
            seen[cid] = index
            params = _method_params(cfg, rope, base_window, train_len, regime, entry.get("params") or {}, where)
            attention_params = _attention_params(cfg, attention, base_window, train_len, regime,
                                                 entry.get("attention_params") or {}, where)
            cells.append({"cell_id": cid, "rope": rope, "attention": attention, "train_len": train_len,
                          "regime": regime, "base_window": base_window, "method_params": params,
                          "attention_params": attention_params})
    if not cells:
        raise ConfigError("the grid is empty")
    return cells


def _method_params(cfg, rope, base_window, train_len, regime, entry_params, where) -> dict:
    """The method's resolved hyperparameters: its own defaults < config/method < grid entry params."""
    method = get_method(rope)
    params = dict(method.defaults(original_window=base_window, target_window=train_len, regime=regime))
    params.update(cfg.get("method", {}).get(rope) or {})
    params.update(entry_params)
    head_dim = cfg["model"]["hidden_size"] // cfg["model"]["num_attention_heads"]
    try:  # validates names and values now, before any compute
        method.frequencies(head_dim=head_dim, base=float(cfg["model"]["rope_theta"]), original_window=base_window,
                           target_window=train_len, seq_len=train_len, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid parameters {params} for method {rope!r}: {exc}") from exc
    return params


def _attention_params(cfg, attention, base_window, train_len, regime, entry_params, where) -> dict:
    """The attention kind's resolved parameters: its own defaults < config/method < grid entry attention_params."""
    overrides = {**(cfg.get("method", {}).get(attention) or {}), **entry_params}
    try:
        return get_attention(attention).resolve(base_window, train_len, regime, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid attention {attention!r} for this cell ({regime}, train_len "
                          f"{train_len}): {exc}") from exc


def stage_config(cfg: dict, cell: dict | None = None, stage: str = "cell") -> dict:
    """The part of the configuration a stage depends on (its hash decides when Snakemake reruns it)."""
    data = {**cfg["data"], "retrieval": cfg["eval"]["retrieval"], "model_source": cfg["model"]["source"],
            "model_path": cfg["model"]["path"]}
    if cfg["model"]["source"] in ("gguf_package", "hub"):  # where the data stage finds the tokenizer
        data["model_import"] = {k: cfg["model"].get(k) for k in ("package", "gguf_file", "hub_id")}
    if stage == "data":
        return data
    base = {"model": cfg["model"], "pretrain": cfg["pretrain"], "data": data}
    if stage == "base":
        return base
    out = {"study": cfg["study"]["name"], **cell, "base": base}
    if stage == "finetune":
        return {**out, "finetune": cfg["finetune"]}
    if stage == "evaluate":
        return {**out, "finetune": cfg["finetune"] if cell["regime"] == "finetuned" else None, "eval": cfg["eval"]}
    raise ValueError(f"unknown stage {stage!r}")


def code_version() -> str:
    """The git commit of the code (with '-dirty' if tracked files differ), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cell_record(cfg: dict, cell: dict, version: str) -> dict:
    """The content of cells/<cell_id>/cell.json: axes, method parameters, resolved config and its hash."""
    resolved = stage_config(cfg, cell, "evaluate")
    return {"schema_version": RESULT_SCHEMA_VERSION, "study": cfg["study"]["name"], **cell, "config": resolved,
            "config_hash": config_hash(resolved), "code_version": version}


def launch_prefix(launcher: str | None, python: str, base: str | Path = REPO) -> str:
    """The start of the fine-tuning shell command: `python` (then `-m workflow.stages.finetune ...`), or the configured
    `finetune.launcher` (e.g. `accelerate launch --config_file ...` or `torchrun --nproc_per_node 8`, both of which
    take `-m <module>`). A word naming a file under `base` (the repository) becomes an absolute path, so the
    command works from any working directory. Quoted for the shell, braces escaped for Snakemake's formatting."""
    import shlex

    if launcher is None or not str(launcher).strip():
        return shlex.quote(python)
    try:
        words = shlex.split(str(launcher))
    except ValueError as exc:
        raise ConfigError(f"finetune.launcher={launcher!r} is not a valid command prefix: {exc}") from exc
    words = [str(Path(base) / w) if not Path(w).is_absolute() and (Path(base) / w).is_file() else w for w in words]
    return " ".join(shlex.quote(w) for w in words).replace("{", "{{").replace("}", "}}")
