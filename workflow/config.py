"""Compose the Hydra configuration of a study, validate it, and expand its grid into cells.

Everything here runs at Snakemake parse time, so a bad configuration stops `snakemake -n` before any
compute, with a message that names the offending key and value. Validation is in two parts: the schema
(workflow/schemas/config.schema.yaml: every key, its type and range, unknown and missing keys, the values of the
registries) and the rules across keys below (`validate`, `expand_grid`).
"""
from __future__ import annotations

import difflib
import functools
import itertools
import math
import subprocess
from pathlib import Path

from methods import ATTENTIONS, METHODS, get_attention, get_method
from workflow.batches import SYNTHETIC_LENGTHS
from workflow.checkpoints import CELL_REGIMES, CHECKPOINT, CHECKPOINT_REGIMES, CheckpointError
from workflow.checkpoints import describe as describe_checkpoint
from workflow.common import RESULT_SCHEMA_VERSION, config_hash
from workflow.corpus import SOURCES
from workflow.modeling import MODEL_SOURCES, shipped_dir
from workflow.ruler import FAMILIES
from workflow.runtime import ATTN_IMPLEMENTATIONS, DTYPES
from workflow.tasks import TASKS, TaskConfigError
from workflow.train import SCHEDULES

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.yaml"
AXES = ("rope", "attention", "train_len", "regime")

# The registries whose names the schema takes (`x-registry: <name>` becomes an enum of the registry's values,
# `x-properties-from: [<name>]` one property per value): each allowed value stays defined once, in its registry.
REGISTRIES = {
    "methods": METHODS, "attentions": ATTENTIONS, "regimes": CELL_REGIMES, "checkpoint_regimes": CHECKPOINT_REGIMES,
    "tasks": TASKS, "model_sources": MODEL_SOURCES,
    "schedules": SCHEDULES, "dtypes": DTYPES, "attn_implementations": ATTN_IMPLEMENTATIONS,
    "ruler_families": FAMILIES, "ruler_qa_families": [name for name, f in FAMILIES.items() if f.kind == "qa"],
    "data_sources": SOURCES, "synthetic_lengths": SYNTHETIC_LENGTHS,
}


class ConfigError(ValueError):
    """A configuration problem found before any compute."""


def compose(study: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved configuration (a plain dict) of `study` with Hydra `overrides` applied, validated."""
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
    except Exception as exc:  # an unknown key is named with the closest valid one; else Hydra's own message
        unknown = [m for m in map(_unknown_override, all_overrides) if m]
        raise ConfigError("; ".join(unknown) if unknown else
                          f"cannot compose the configuration (overrides {all_overrides}): {exc}") from exc
    validate(resolved)
    return resolved


def validate(cfg: dict) -> None:
    """The schema, then the rules across keys: the model's source and shape, the tasks' own checks."""
    check_schema(cfg)
    model = cfg["model"]
    for source, key in (("gguf_package", "package"), ("hub", "hub_id")):
        if model["source"] == source and not model.get(key):
            raise ConfigError(f"model.source={source!r} needs model.{key}, got {model.get(key)!r}")
    if model["source"] == "hf_dir":
        path = model["path"]
        if not path or not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.path={path!r} is not a Hugging Face checkpoint directory (no config.json)")
    if model["source"] == "shipped":
        try:
            shipped_dir(model.get("shipped"))
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    for whole, part in (("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads")):
        if model[whole] % model[part]:
            raise ConfigError(f"model.{whole}={model[whole]} must be a multiple of model.{part}={model[part]}")
    if model["source"] == "scratch":  # imported models are not pretrained
        _check_pretraining(cfg["pretrain"], model["base_window"])
    _check_synthetic(cfg)
    for name in cfg["eval"]["tasks"]:  # each task checks its own part of `eval` (workflow.tasks)
        try:
            TASKS[name].validate(cfg["eval"])
        except TaskConfigError as exc:
            raise ConfigError(str(exc)) from None


def _check_pretraining(pre: dict, base_window: int) -> None:
    """A scratch model's pretraining: a learning rate, and phases that fit its steps and tokens a step."""
    if pre["lr"] <= 0:
        raise ConfigError(f"pretrain.lr must be > 0 when model.source is 'scratch', got {pre['lr']!r}")
    tokens_per_step = pre["batch_size"] * base_window
    for index, phase in enumerate(pre["phases"]):
        if tokens_per_step % phase["seq_len"]:
            raise ConfigError(f"pretrain.phases[{index}].seq_len={phase['seq_len']} must divide the tokens of a step "
                              f"({tokens_per_step} = pretrain.batch_size x model.base_window)")
        if phase["kv"] + phase["copy"] > 1:
            raise ConfigError(f"pretrain.phases[{index}]: kv + copy = {phase['kv'] + phase['copy']} exceeds 1")
    if sum(phase["steps"] for phase in pre["phases"]) >= pre["steps"]:
        raise ConfigError(f"pretrain.phases take {sum(p['steps'] for p in pre['phases'])} steps, not fewer than "
                          f"pretrain.steps={pre['steps']}")


def _check_synthetic(cfg: dict) -> None:
    for where, shares in (("data.synthetic", cfg["data"]["synthetic"]), ("finetune.synthetic", cfg["finetune"]["synthetic"])):
        if shares["kv"] + shares["copy"] > 1:
            raise ConfigError(f"{where}: kv + copy = {shares['kv'] + shares['copy']} exceeds 1")


# --- the schema -------------------------------------------------------------------------------------------------
@functools.cache
def schema() -> dict:
    """The configuration schema with the registries' values filled in (read once; do not modify it)."""
    import yaml

    raw = yaml.safe_load(SCHEMA_FILE.read_text())
    raw.pop("x-anchors", None)  # YAML anchors the schema reuses, not a schema keyword
    return _fill_registries(raw)


def _fill_registries(node):
    if isinstance(node, list):
        return [_fill_registries(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _fill_registries(value) for key, value in node.items()}
    if "x-registry" in node:
        node["enum"] = list(REGISTRIES[node["x-registry"]])
    if "x-properties-from" in node:
        node["properties"] = {name: node["x-property"] for registry in node["x-properties-from"]
                              for name in REGISTRIES[registry]}
    return node


@functools.cache
def _validator():
    """A draft 2020-12 validator of the schema whose integers are ints (not 256.0) and numbers finite (not inf)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine_many({
        "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
        "number": lambda _, x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)})
    cls = jsonschema.validators.extend(base, type_checker=checker)
    cls.check_schema(schema())
    # without `$schema`, which would make jsonschema pick its own draft 2020-12 class (and type checker) again
    return cls({key: value for key, value in schema().items() if key != "$schema"})


def schema_problems(instance, prefix: tuple[str, ...] = ()) -> list[str]:
    """One message per problem of `instance` against the schema (or against the part of it at key path `prefix`)."""
    validator = _validator()
    for key in prefix:
        validator = validator.evolve(schema=validator.schema["properties"][key])
    errors = validator.iter_errors(instance)
    problems = []
    for error in sorted(errors, key=lambda e: [(isinstance(p, int), p) for p in e.absolute_path]):
        problems += [m for m in _describe(error, prefix, validator.schema) if m not in problems]
    return problems


def check_schema(instance, prefix: tuple[str, ...] = ()) -> None:
    """ConfigError naming every problem of `instance` against the schema (see `schema_problems`)."""
    problems = schema_problems(instance, prefix)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


_TYPE_WORDS = {"integer": "an integer", "number": "a finite number", "string": "a string",
               "boolean": "true or false", "array": "a list", "object": "a mapping", "null": "null"}
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _describe(error, prefix, root: dict) -> list[str]:
    """What is wrong, in words, naming the full key path (e.g. `eval.lengths[1]`); `root` is the schema validated."""
    path = [*prefix, *error.absolute_path]
    where, value, kind, rule = _dotted(path), error.instance, error.validator, error.validator_value
    if kind == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        return [_unknown_key(path, key, known) for key in value if key not in known]
    if kind == "required":
        properties = error.schema.get("properties") or _owner(root, error.absolute_schema_path)["properties"]
        return [f"{_dotted([*path, key])} is required but missing ({properties[key]['description']})"
                for key in rule if key not in value]
    if kind == "anyOf":  # explain the branch(es) of the value's own type, else what the types are
        fits = [i for i, branch in enumerate(rule) if _has_type(branch, value) and "const" not in branch]
        if not fits:
            return [f"{where} must be {_either([_accepts(branch) for branch in rule])}, got {value!r}"]
        return [m for e in error.context if e.relative_schema_path[0] in fits for m in _describe(e, prefix, root)]
    if kind == "type":
        return [f"{where} must be {_accepts({'type': rule})}, got {value!r}"]
    if kind == "enum":
        hint = _closest(value, rule)
        return [f"{where} must be one of {', '.join(map(str, rule))}, got {value!r}"
                + (f"; did you mean {hint!r}?" if hint else "")]
    if kind == "const":
        return [f"{where} must be {rule!r}, got {value!r}"]
    if kind in _BOUNDS:
        return [f"{where} must be {_BOUNDS[kind]} {rule}, got {value!r}"]
    if kind in ("minItems", "maxItems"):
        if kind == "minItems" and rule == 1:
            return [f"{where} must not be empty"]
        return [f"{where} must have {'at least' if kind == 'minItems' else 'at most'} {rule} items, got {value!r}"]
    if kind == "uniqueItems":
        return [f"{where} repeats an item: {value!r}"]
    if kind == "pattern":
        return [f"{where}={value!r} must match {rule}"]
    return [f"{where or 'the configuration'}: {error.message}"]


def _owner(root: dict, schema_path) -> dict:
    """The object schema whose `then`/`else` branch a `required` error came from (the branch lists keys only)."""
    node = root
    for part in list(schema_path)[:-2]:  # without the branch and its `required`
        node = node[part]
    return node


def _dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _closest(value, options) -> str | None:
    if not isinstance(value, str):
        return None
    match = difflib.get_close_matches(value, [str(o) for o in options], n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_key(parent: list, key: str, known: list[str]) -> str:
    hint = _closest(key, known)
    if hint:
        return f"{_dotted([*parent, key])} is not a known key; did you mean {_dotted([*parent, hint])}?"
    return f"{_dotted([*parent, key])} is not a known key; valid keys{' of ' + _dotted(parent) if parent else ''}: " \
           f"{', '.join(known)}"


def _has_type(branch: dict, value) -> bool:
    types = branch.get("type")
    if types is None:
        return True
    checker = _validator().TYPE_CHECKER
    return any(checker.is_type(value, t) for t in ([types] if isinstance(types, str) else types))


def _accepts(branch: dict) -> str:
    if "const" in branch:
        return repr(branch["const"])
    types = branch.get("type", [])
    return _either([_TYPE_WORDS[t] for t in ([types] if isinstance(types, str) else types)])


def _either(words: list[str]) -> str:
    return " or ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"


def _unknown_override(override: str) -> str | None:
    """The unknown-key message for an override Hydra could not apply because its key does not exist (Hydra's
    own message suggests appending the key with `+`, which the schema would then reject), or None."""
    key = override.lstrip("~+").split("=", 1)[0]
    parts = key.split(".")
    if "@" in key or parts[0] == "hydra" or (len(parts) == 1 and (CONFIG_DIR / key).is_dir()):  # a config group
        return None
    node, path = schema(), []
    for part in parts:
        known = node.get("properties")
        if known is None:  # a list or a map below this key: nothing to name
            return None
        if part not in known:
            return _unknown_key(path, part, list(known))
        node, path = known[part], [*path, part]
    return None


# --- the grid ---------------------------------------------------------------------------------------------------
def cell_id(rope: str, attention: str, train_len: int, regime: str) -> str:
    """The readable slug of a cell, e.g. `yarn-exact-1024-ft`."""
    return f"{rope}-{attention}-{train_len}-{'ft' if regime == 'finetuned' else 'frozen'}"


def seeded_id(cid: str, seed: int) -> str:
    """The id of seed number `seed` of a fine-tuned cell: the cell's own id for seed 0 (the cells of a one-seed study
    keep their ids), `<id>-s<seed>` for the others."""
    return cid if seed == 0 else f"{cid}-s{seed}"


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_grid(cfg: dict) -> list[dict]:
    """All cells of the study's grid, validated, in config order (duplicates are an error). A fine-tuned cell is
    repeated for every seed number of `study.seeds` (`seed`; its `group` is the id of the cell without a seed
    suffix); frozen and checkpoint cells are deterministic and appear once (`seed` None)."""
    check_schema(cfg["grid"], ("grid",))  # also for a grid built in code: known keys, every axis, known names
    base_window = cfg["model"]["base_window"]
    cells, seen = [], {}

    def add(cell: dict, where: str) -> None:
        if cell["cell_id"] in seen:
            raise ConfigError(f"{where} repeats cell {cell['cell_id']} (first defined in {seen[cell['cell_id']]})")
        seen[cell["cell_id"]] = where
        cells.append(cell)

    for index, entry in enumerate(cfg["grid"]):
        where = f"grid[{index}]"
        if entry["regime"] == CHECKPOINT:
            add(_checkpoint_cell(cfg, entry, where), where)
            continue
        stray = [key for key in ("checkpoint", "name") if key in entry]
        if stray:
            raise ConfigError(f"{where}: {' and '.join(stray)} {'belongs' if len(stray) == 1 else 'belong'} to a "
                              f"checkpoint entry (regime: checkpoint), not to an entry of regime {entry['regime']!r}")
        lists = [_as_list(entry[a]) for a in AXES]
        for rope, attention, train_len, regime in itertools.product(*lists):
            if regime == CHECKPOINT:
                raise ConfigError(f"{where}: regime 'checkpoint' evaluates a given checkpoint; give it its own entry "
                                  "{regime: checkpoint, checkpoint: <directory or hub id>, name: <short name>}")
            if train_len == "base":
                train_len = base_window
            if rope == "none" and attention == "exact" and regime == "finetuned" and train_len <= base_window:
                raise ConfigError(f"{where}: the control cell (rope 'none', exact attention, fine-tuned) trains on longer "
                                  f"rows with RoPE unchanged: train_len must be above model.base_window={base_window} "
                                  f"(at the base window it would only continue pretraining), got {train_len}")
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
            params = _method_params(cfg, rope, base_window, train_len, regime, entry.get("params") or {}, where)
            attention_params = _attention_params(cfg, attention, base_window, train_len, regime,
                                                 entry.get("attention_params") or {}, where)
            cell = {"cell_id": cid, "rope": rope, "attention": attention, "train_len": train_len,
                    "regime": regime, "base_window": base_window, "method_params": params,
                    "attention_params": attention_params, "seed": None, "group": cid}
            if regime != "finetuned":   # deterministic: the same model and the same numbers every time
                add(cell, where)
                continue
            for seed in cfg["study"]["seeds"]:
                add({**cell, "cell_id": seeded_id(cid, seed), "seed": seed}, where)
    return cells


def _checkpoint_cell(cfg: dict, entry: dict, where: str) -> dict:
    """The cell of a checkpoint entry: its axes read from the checkpoint's config (workflow.checkpoints)."""
    given = sorted(set(entry) - {"regime", "checkpoint", "name"})
    if given:
        raise ConfigError(f"{where}: a checkpoint entry takes {', '.join(given)} from the checkpoint's config; "
                          f"remove {'it' if len(given) == 1 else 'them'}")
    try:
        return describe_checkpoint(entry["checkpoint"], entry["name"], cfg["model"], f"{where}.checkpoint")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def _method_params(cfg, rope, base_window, train_len, regime, entry_params, where) -> dict:
    """The method's resolved hyperparameters: its own defaults < config/method < grid entry params."""
    method = get_method(rope)
    params = dict(method.defaults(original_window=base_window, target_window=train_len, regime=regime))
    params.update(cfg["method"].get(rope) or {})
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
    overrides = {**(cfg["method"].get(attention) or {}), **entry_params}
    try:
        return get_attention(attention).resolve(base_window, train_len, regime, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid attention {attention!r} for this cell ({regime}, train_len "
                          f"{train_len}): {exc}") from exc


def stage_config(cfg: dict, cell: dict | None = None, stage: str = "cell") -> dict:
    """The part of the configuration a stage depends on (its hash decides when Snakemake reruns it)."""
    data = {**cfg["data"], "retrieval": cfg["eval"]["retrieval"], "model_source": cfg["model"]["source"],
            "model_path": cfg["model"]["path"]}
    if cfg["model"]["source"] in ("shipped", "gguf_package", "hub"):  # where the data stage finds the tokenizer
        data["model_import"] = {k: cfg["model"].get(k) for k in ("shipped", "package", "gguf_file", "hub_id")}
    if stage == "data":
        return data
    base = {"model": cfg["model"], "pretrain": cfg["pretrain"], "data": data}
    if stage == "base":
        return base
    if cell["regime"] == CHECKPOINT:  # evaluated as it is: of the base model only how it computes
        base = {"model": {k: cfg["model"][k] for k in ("attn_implementation", "dtype")}, "data": data}
    # `group` is the report's; a seed is part of the job only when it is not 0 (so a one-seed study's jobs, and the
    # first seed's, have the configs and hashes they had before seeds existed)
    fields = {k: v for k, v in cell.items() if k != "group" and not (k == "seed" and not v)}
    out = {"study": cfg["study"]["name"], **fields, "base": base}
    if stage == "finetune":
        return {**out, "finetune": finetune_config(cfg, cell)}
    if stage == "evaluate":
        return {**out, "finetune": finetune_config(cfg, cell) if cell["regime"] == "finetuned" else None,
                "eval": cfg["eval"]}
    raise ValueError(f"unknown stage {stage!r}")


def finetune_config(cfg: dict, cell: dict) -> dict:
    """The fine-tuning recipe of a cell: `finetune`, with the seed finetune.seed + the cell's seed number."""
    seed = cell.get("seed") or 0
    return cfg["finetune"] if not seed else {**cfg["finetune"], "seed": cfg["finetune"]["seed"] + seed}


def code_version(checkout: Path = REPO) -> str:
    """The git commit of the code in `checkout` (this one by default; with '-dirty' if tracked files differ), or
    'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
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
