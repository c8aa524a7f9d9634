"""Configuration: Hydra composition, validation before compute, and the grid of cells."""
import subprocess
import sys

import pytest
import yaml

from methods import ATTENTIONS, METHODS
from tests.helpers import REPO
from workflow import config as config_module
from workflow.config import (REGISTRIES, SCHEMA_FILE, ConfigError, cell_id, cell_record, compose, expand_grid, schema,
                             schema_problems)
from workflow.checkpoints import CELL_REGIMES
from workflow.modeling import MODEL_SOURCES
from workflow.ruler import FAMILIES
from workflow.runtime import ATTN_IMPLEMENTATIONS, DTYPES
from workflow.tasks import TASKS
from workflow.train import SCHEDULES

ROPES, KINDS = ", ".join(METHODS), ", ".join(ATTENTIONS)  # the registries, as the schema lists them

STUDIES = ("tiny", "micro", "smollm2", "llama2_7b")

TINY_CELLS = {
    "none-exact-256-frozen",
    *(f"{m}-exact-{n}-ft" for m in ("none", "pi", "ntk", "dynamic_ntk", "yarn", "clex") for n in (512, 1024)),
    *(f"{m}-exact-1024-frozen" for m in ("ntk", "dynamic_ntk", "yarn")),
    "none-lm_infinite-256-frozen",
    "none-landmark-256-ft",
}


def test_tiny_grid_is_exactly_the_configured_cells():
    cells = expand_grid(compose("tiny"))
    assert {c["cell_id"] for c in cells} == TINY_CELLS
    assert len(cells) == 18


# The rows of config/grids/extended.yaml beyond the paper grid, in the micro study (base window 64, 128/256).
EXTENDED_MICRO_CELLS = {
    "none-self_extend-64-frozen",
    *(f"{m}-{n}-ft" for m in ("pi-longlora", "longrope-exact", "llama3-exact") for n in (128, 256)),
    "longrope-exact-256-frozen", "llama3-exact-256-frozen",
}


def test_micro_has_the_tiny_grid_shape_plus_the_extended_rows():
    cfg = compose("micro")
    cells = expand_grid(cfg)
    base = cfg["model"]["base_window"]
    assert len(cells) == 18 + 9
    assert {c["cell_id"] for c in cells} == {
        c.replace("-256-", f"-{base}-").replace("-512-", "-128-").replace("-1024-", "-256-")
        for c in TINY_CELLS} | EXTENDED_MICRO_CELLS


def test_the_extended_grid_starts_with_the_paper_grid():
    import yaml

    grids = REPO / "config" / "grids"
    paper = yaml.safe_load((grids / "paper_rope.yaml").read_text())["grid"]
    extended = yaml.safe_load((grids / "extended.yaml").read_text())["grid"]
    assert extended[:len(paper)] == paper and len(extended) > len(paper)


def test_overrides_reach_the_resolved_config():
    cfg = compose("micro", ["finetune.steps=3", "eval.lengths=[32,64]"])
    assert cfg["finetune"]["steps"] == 3 and cfg["eval"]["lengths"] == [32, 64]


def test_method_params_are_resolved_per_regime():
    cells = {c["cell_id"]: c for c in expand_grid(compose("tiny"))}
    assert cells["dynamic_ntk-exact-1024-frozen"]["method_params"]["factor"] == 2
    assert cells["dynamic_ntk-exact-1024-ft"]["method_params"]["factor"] == 2   # ceil(4 / 2)
    assert cells["yarn-exact-512-ft"]["method_params"]["beta_fast"] == 32
    # CLEX: max_factor 4 x the training scale (as upstream; LCEG's 32 at 4k -> 32k)
    assert cells["clex-exact-512-ft"]["method_params"] == {"max_factor": 8, "param_factor": 1, "act": "silu",
                                                           "time_dt": 0.01}
    assert cells["clex-exact-1024-ft"]["method_params"]["max_factor"] == 16


def test_landmark_cell_is_fine_tuned_at_the_base_window_with_study_block_size():
    for study, mem_freq in (("tiny", 31), ("micro", 7)):
        cfg = compose(study)
        base = cfg["model"]["base_window"]
        cell = {c["cell_id"]: c for c in expand_grid(cfg)}[f"none-landmark-{base}-ft"]
        assert (cell["rope"], cell["attention"], cell["regime"], cell["train_len"]) == (
            "none", "landmark", "finetuned", base)
        assert cell["attention_params"] == {"mem_freq": mem_freq, "top_k": 5, "train_context": base,
                                            "landmark_in_loss": True}


def test_bad_landmark_parameters_stop_before_compute():
    cfg = compose("tiny", ["method.landmark.mem_freq=63"])   # (5 + 2) blocks of 64 do not fit 256
    with pytest.raises(ConfigError, match="mem_freq"):
        expand_grid(cfg)
    cfg = compose("tiny", ["grid=[{rope: none, attention: landmark, regime: frozen, train_len: base}]"])
    with pytest.raises(ConfigError, match="regime"):
        expand_grid(cfg)
    with pytest.raises(ConfigError, match="landmark_in_loss must be true or false"):
        expand_grid(compose("tiny", ["+method.landmark.landmark_in_loss=1"]))
    cells = {c["cell_id"]: c for c in expand_grid(compose("tiny", ["+method.landmark.landmark_in_loss=false"]))}
    assert cells["none-landmark-256-ft"]["attention_params"]["landmark_in_loss"] is False


def test_cell_record_has_config_and_hash():
    cfg = compose("micro")
    cell = expand_grid(cfg)[1]
    record = cell_record(cfg, cell, "abc")
    assert record["cell_id"] == cell["cell_id"] and len(record["config_hash"]) == 64
    changed = cell_record(compose("micro", ["finetune.lr=0.5"]), cell, "abc")
    assert changed["config_hash"] != record["config_hash"]


@pytest.mark.parametrize("override, message", [
    ("grid=[{rope: nope, attention: exact, regime: frozen, train_len: 512}]",
     f"grid[0].rope must be one of {ROPES}, got 'nope'; did you mean 'none'?"),
    ("grid=[{rope: [pi, yran], attention: exact, regime: frozen, train_len: 512}]",
     f"grid[0].rope[1] must be one of {ROPES}, got 'yran'; did you mean 'yarn'?"),
    ("grid=[{rope: pi, attention: sideways, regime: frozen, train_len: 512}]",
     f"grid[0].attention must be one of {KINDS}, got 'sideways'"),
    ("grid=[{rope: pi, attention: exact, regime: frozen, train_len: 128}]", "train_len=128 must be above"),
    ("grid=[{rope: pi, attention: exact, regime: melted, train_len: 512}]",
     "grid[0].regime must be one of finetuned, frozen, checkpoint, got 'melted'"),
    ("grid=[{rope: pi, attention: exact, regime: frozen, train_len: 512.0}]",
     "grid[0].train_len must be an integer, 'base' or a list, got 512.0"),
    ("grid=[{rope: pi, attention: exact, regime: frozen, train_len: [1024, bas]}]",
     "grid[0].train_len[1] must be an integer or 'base', got 'bas'"),
    ("grid=[{rope: pi, attention: exact, regime: frozen, train_len: 512, param: {scale: 2}}]",
     "grid[0].param is not a known key; did you mean grid[0].params?"),
    ("grid=[{rope: pi, attention: exact, regime: frozen}]", "grid[0].train_len is required but missing"),
    ("grid=[]", "grid must not be empty"),
    ("eval.lengths=[128,-4]", "eval.lengths[1]"),
    ("model.source=hf_dir", "model.path=None"),
    (("model.source=hf_dir", "model.path=/nonexistent/llama"), "model.path='/nonexistent/llama' is not a Hugging Face"),
    ("eval.lengths=[128,0]", "eval.lengths[1] must be >= 1, got 0"),
    ("eval.lengths=[128,abc]", "eval.lengths[1] must be an integer, got 'abc'"),
    ("eval.lengths=[128,256.5]", "eval.lengths[1] must be an integer, got 256.5"),
    ("eval.lengths=[]", "eval.lengths must not be empty"),
    ("model.base_window=true", "model.base_window must be an integer, got True"),
    ("model.hidden_size=130", "model.hidden_size=130 must be a multiple of model.num_attention_heads=4"),
    ("model.num_key_value_heads=3", "model.num_attention_heads=4 must be a multiple of model.num_key_value_heads=3"),
    (("pretrain=tiny", "model.source=scratch", "pretrain.lr=0"),   # tiny starts from a shipped model: scratch
     "pretrain.lr must be > 0 when model.source is 'scratch', got 0"),
    ("finetune.betas=[0.9]", "finetune.betas must have at least 2 items, got [0.9]"),
    ("eval.retrieval.depths=[0.5,1.5]", "eval.retrieval.depths[1] must be <= 1, got 1.5"),
    ("eval.tasks=[ppl,ppl]", "eval.tasks repeats an item: ['ppl', 'ppl']"),
    ("study.name='a b'", "study.name='a b' must match"),
    ("method.yarm.beta_fast=3", "method.yarm is not a known key; did you mean method.yarn?"),    # Hydra refuses it
    ("+method.yarm={beta_fast: 3}", "method.yarm is not a known key; did you mean method.yarn?"),  # Hydra adds it
    ("finetune.warmup_step=5", "finetune.warmup_step is not a known key; did you mean finetune.warmup_steps?"),
    ("finetun.steps=5", "finetun is not a known key; did you mean finetune?"),
    ("+finetune.optimizer=sgd", "finetune.optimizer is not a known key; valid keys of finetune: steps, lr, schedule,"),
    ("grid=[{rope: ntk, attention: exact, regime: frozen, train_len: 512, params: {alpha: 0.5}}]",
     "alpha must be a number >= 1, got 0.5"),                                       # scale factor below 1
    ("grid=[{rope: dynamic_ntk, attention: exact, regime: frozen, train_len: 512, params: {factor: 0.5}}]",
     "factor must be a number >= 1, got 0.5"),
    ("grid=[{rope: none, attention: landmark, regime: frozen, train_len: base}]", "regime"),  # frozen but needs training
    ("grid=[{rope: none, attention: exact, regime: finetuned, train_len: base}]", "would only continue pretraining"),
    ("finetune.lr=inf", "finetune.lr must be a finite number, got inf"),
    ("finetune.lr=nan", "finetune.lr must be a finite number, got nan"),
    ("finetune.lr=0", "finetune.lr must be > 0, got 0"),
    ("pretrain.schedule=zigzag", "pretrain.schedule must be one of cosine, constant_with_warmup, warmup_stable_decay, got 'zigzag'"),
    ("finetune.checkpoint_every=0", "finetune.checkpoint_every must be >= 1, got 0"),
    ("finetune.tokens_per_step=1000", "finetune.tokens_per_step=1000 must be a multiple of grid[1].train_len=512"),
    ("grid=[{rope: yarn, attention: exact, regime: frozen, train_len: 512, params: {beta_quick: 3}}]", "beta_quick"),
])
def test_bad_config_stops_with_a_clear_message(override, message):
    with pytest.raises(ConfigError) as err:
        expand_grid(compose("tiny", list(override) if isinstance(override, tuple) else [override]))
    assert message in str(err.value)


def test_unknown_method_message_lists_the_registry():
    with pytest.raises(ConfigError) as err:
        expand_grid(compose("tiny", ["grid=[{rope: nope, attention: exact, regime: frozen, train_len: 512}]"]))
    assert f"must be one of {', '.join(METHODS)}, got 'nope'" in str(err.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        compose("tiny", ["+finetune.warmup_step=5", "eval.lengths=[0]", "~model.dtype"])
    assert str(err.value).splitlines() == [
        "3 problems:",
        "  eval.lengths[0] must be >= 1, got 0",
        "  finetune.warmup_step is not a known key; did you mean finetune.warmup_steps?",
        "  model.dtype is required but missing (compute precision (auto: bf16 on CUDA, float32 on the CPU))"]


def test_cell_id_slug():
    assert cell_id("yarn", "exact", 1024, "finetuned") == "yarn-exact-1024-ft"
    assert cell_id("none", "exact", 256, "frozen") == "none-exact-256-frozen"


def _dry_run(tmp_path, *extra):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
           "--cores", "2", "report", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_dry_run_lists_every_cell(tmp_path):
    run = _dry_run(tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    for cid in TINY_CELLS:
        assert f"cell={cid}" in out or f"finetuned_cell={cid}" in out, cid
    assert out.count("rule finetune:") == 13 and out.count("rule evaluate:") == 18


def test_dry_run_fails_early_on_bad_config(tmp_path):
    run = _dry_run(tmp_path, "--config", "overrides=[\"grid=[{rope: nope, attention: exact, regime: frozen, "
                   "train_len: 512}]\"]")
    assert run.returncode != 0
    assert "ctxext configuration error: grid[0].rope must be one of none, pi," in run.stderr
    assert "Traceback" not in run.stdout + run.stderr and 'File "' not in run.stderr


@pytest.mark.parametrize("override, message", [
    ("eval.lengths=[128,-4]", "eval.lengths[1] must be >= 1, got -4"),
    ("model.path=/nonexistent/llama", "model.path='/nonexistent/llama' is not a Hugging Face checkpoint"),
])
def test_dry_run_fails_before_any_job_on_bad_values(tmp_path, override, message):
    extra = '"model.source=hf_dir", ' if override.startswith("model.path") else ""
    run = _dry_run(tmp_path, "--config", f'overrides=[{extra}"{override}"]')
    assert run.returncode != 0
    assert message in run.stdout + run.stderr and "rule data:" not in run.stdout
    assert not (tmp_path / "results").exists()


def test_attention_params_are_validated_against_the_attention_kind():
    cfg = compose("micro")
    cfg["grid"] = [{"rope": "none", "attention": "exact", "regime": "frozen", "train_len": "base",
                    "attention_params": {"n_local": 8}}]
    with pytest.raises(ConfigError, match=r"grid\[0\].*attention 'exact'.*unknown parameter"):
        expand_grid(cfg)
    cfg["grid"][0]["attention"] = "window"
    with pytest.raises(ConfigError, match=rf"grid\[0\]\.attention must be one of {KINDS}, got 'window'"):
        expand_grid(cfg)


def test_lm_infinite_cells_combine_with_any_rope_and_are_frozen_only():
    cells = {c["cell_id"]: c for c in expand_grid(compose("tiny"))}
    assert cells["none-lm_infinite-256-frozen"]["attention_params"] == {"n_local": 256, "n_global": 10,
                                                                         "distance_cap": 256}
    cfg = compose("tiny")
    cfg["grid"] = [{"rope": "yarn", "attention": "lm_infinite", "regime": "frozen", "train_len": 1024,
                    "attention_params": {"n_global": 4}}]
    (cell,) = expand_grid(cfg)
    assert cell["cell_id"] == "yarn-lm_infinite-1024-frozen" and cell["method_params"]["beta_fast"] == 32
    assert cell["attention_params"] == {"n_local": 256, "n_global": 4, "distance_cap": 256}
    cfg["grid"][0]["regime"] = "finetuned"
    with pytest.raises(ConfigError, match=r"grid\[0\].*lm_infinite.*supports regime\(s\) frozen"):
        expand_grid(cfg)
    cfg["grid"][0].update(regime="frozen", attention_params={"n_local": 0})
    with pytest.raises(ConfigError, match="n_local must be an integer >= 1"):
        expand_grid(cfg)
    cfg["grid"] = [{"rope": "none", "attention": "lm_infinite", "regime": "frozen", "train_len": 512}]
    with pytest.raises(ConfigError, match="train_len must be 256"):
        expand_grid(cfg)


@pytest.mark.parametrize("override,message", [
    ("eval.ruler.tasks=[niah_single_9]", r"eval.ruler.tasks\[0\] must be one of niah_single_1, .*, got 'niah_single_9'; "
                                         "did you mean 'niah_single_3'"),
    ("eval.ruler.lengths=[0]", r"eval.ruler.lengths\[0\] must be >= 1, got 0"),
    ("eval.ruler.qa_files.qa_3=/x.jsonl", "eval.ruler.qa_files.qa_3 is not a known key; did you mean eval.ruler.qa_files.qa_2"),
    ("eval.ruler.qa_files.qa_1=/nowhere.jsonl", "eval.ruler.qa_files.qa_1='/nowhere.jsonl' is not a file"),
    ("eval.tasks=[ppl,lm_eval]", "eval.lm_eval.tasks is empty"),
    ("eval.chat_template=maybe", "eval.chat_template must be true or false"),
])
def test_bad_evaluation_suite_settings_stop_early(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("micro", [override])


# --- the schema (workflow/schemas/config.schema.yaml) ------------------------------------------------------------
def _typo_config_dir(tmp_path):
    """A config directory on Hydra's search path with finetune/typo.yaml: config/finetune/tiny.yaml with one key
    misspelt (the repository's config/ is left as it is)."""
    (tmp_path / "finetune").mkdir(parents=True)
    text = (REPO / "config" / "finetune" / "tiny.yaml").read_text()
    assert "\nwarmup_steps:" in text
    (tmp_path / "finetune" / "typo.yaml").write_text(text.replace("\nwarmup_steps:", "\nwarmup_step:"))
    return [f"hydra.searchpath=[file://{tmp_path}]", "finetune=typo"]


UNKNOWN = "finetune.warmup_step is not a known key; did you mean finetune.warmup_steps?"
FAULTS = {  # fault -> what the message must say
    "append": (["+finetune.warmup_step=5"], [UNKNOWN]),
    "yaml_typo": (_typo_config_dir, [UNKNOWN, "finetune.warmup_steps is required but missing"]),
    "delete": (["~eval.lengths"], ["eval.lengths is required but missing (perplexity evaluation lengths in tokens)"]),
}


def _fault(name, tmp_path):
    overrides, messages = FAULTS[name]
    return (overrides(tmp_path) if callable(overrides) else overrides), messages


@pytest.mark.parametrize("fault", FAULTS)
def test_unknown_and_missing_keys_stop_composition(fault, tmp_path):
    overrides, messages = _fault(fault, tmp_path)
    with pytest.raises(ConfigError) as err:
        compose("tiny", overrides)
    assert all(m in str(err.value) for m in messages), str(err.value)


@pytest.mark.parametrize("fault", FAULTS)
def test_unknown_and_missing_keys_stop_snakemake_before_any_job(fault, tmp_path):
    overrides, messages = _fault(fault, tmp_path / "config")
    work = tmp_path / "work"
    quoted = ", ".join(f'"{o}"' for o in overrides)
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "report", "-d", str(work),
                          "--config", f"overrides=[{quoted}]"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "ctxext configuration error: " in run.stderr and all(m in run.stderr for m in messages), run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr and 'File "' not in run.stderr  # the message, no stack
    assert "rule " not in run.stdout + run.stderr and not (work / "results").exists()


def _keys(obj, path=()):
    """Every key path of a composed config (lists are walked into; their items' keys get an index)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*path, key)
            yield from _keys(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _keys(value, (*path, i))


def _subschema(node, path):
    """The schema of a key path, or None when the path is not in the schema."""
    for part in path:
        if isinstance(part, int):
            node = node.get("items")
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):  # a map: parameter names are free
            return node["additionalProperties"]
        else:
            return None
        if node is not None and "anyOf" in node and "properties" not in node:  # e.g. one value or a list of values
            node = next((b for b in node["anyOf"] if b.get("type") in ("object", "array")), node)
    return node


@pytest.mark.parametrize("study", STUDIES)
def test_every_key_of_every_study_is_in_the_schema_and_valid(study):
    cfg = compose(study)
    assert schema_problems(cfg) == []
    missing = [path for path in _keys(cfg) if _subschema(schema(), path) is None]
    assert not missing, missing
    assert expand_grid(cfg)


def _schemas(node, path="$"):
    """Every subschema with where it is (properties, items, anyOf branches, map values)."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _schemas(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _schemas(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schemas(node["additionalProperties"], f"{path}.*")
    for i, branch in enumerate(node.get("anyOf", [])):
        yield from _schemas(branch, f"{path}|{i}")


def test_the_schema_documents_and_closes_every_object():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())
    nodes = list(_schemas(schema()))
    assert len(nodes) > 150
    undocumented = [path for path, node in nodes if not node.get("description")]
    assert not undocumented, undocumented
    for path, node in nodes:
        if node.get("type") == "object":
            rest = node.get("additionalProperties")
            assert rest is False or (isinstance(rest, dict) and "map" in node["description"]), path  # closed, or a map
            assert set(node.get("required", [])) <= set(node.get("properties", {})), path
    # every key is required but those only some studies set, the grid's overrides and the registry-named ones; a grid
    # entry requires its axes or its checkpoint by its regime (if/then/else)
    def required(node):
        return set(node.get("required", [])) | {key for branch in ("then", "else")
                                                for key in node.get(branch, {}).get("required", [])}
    optional = {f"{path}.{key}" for path, node in nodes if node.get("type") == "object" and "x-properties-from" not in node
                for key in set(node.get("properties", {})) - required(node)}
    assert optional == {"$.model.package", "$.model.gguf_file", "$.model.hub_id", "$.model.shipped",
                        "$.finetune.gradient_checkpointing",
                        "$.finetune.fused_adamw", "$.finetune.launcher", "$.grid[].params", "$.grid[].attention_params"}


def test_registry_values_are_injected_not_written_in_the_schema():
    raw = SCHEMA_FILE.read_text()
    keywords = set()
    walk = [yaml.safe_load(raw)]
    while walk:
        node = walk.pop()
        if isinstance(node, dict):
            keywords |= set(node)
        walk += list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
    assert "enum" not in keywords and "x-registry" in keywords
    for values in (METHODS, ATTENTIONS, DTYPES, ATTN_IMPLEMENTATIONS, SCHEDULES, MODEL_SOURCES):
        assert not any(f" {v}," in raw or f"[{v}" in raw for v in values if len(v) > 4), values
    props = schema()["properties"]
    entry = props["grid"]["items"]["properties"]
    assert entry["rope"]["anyOf"][0]["enum"] == list(METHODS)
    assert entry["attention"]["anyOf"][1]["items"]["enum"] == list(ATTENTIONS)
    assert entry["regime"]["anyOf"][0]["enum"] == list(CELL_REGIMES) == ["finetuned", "frozen", "checkpoint"]
    assert props["eval"]["properties"]["tasks"]["items"]["enum"] == list(TASKS)
    assert props["eval"]["properties"]["ruler"]["properties"]["tasks"]["items"]["enum"] == list(FAMILIES)
    assert list(props["eval"]["properties"]["ruler"]["properties"]["qa_files"]["properties"]) == ["qa_1", "qa_2"]
    model = props["model"]["properties"]
    assert (model["source"]["enum"], model["dtype"]["enum"], model["attn_implementation"]["enum"]) == (
        list(MODEL_SOURCES), list(DTYPES), list(ATTN_IMPLEMENTATIONS))
    assert props["finetune"]["properties"]["schedule"]["enum"] == props["pretrain"]["properties"]["schedule"]["enum"] \
        == list(SCHEDULES)
    assert list(props["method"]["properties"]) == [*METHODS, *ATTENTIONS]
    used = set(REGISTRIES)
    assert all(f"x-registry: {name}" in raw or f"[{name}" in raw for name in used), used


def test_a_new_registry_value_is_valid_without_editing_the_schema(monkeypatch):
    monkeypatch.setitem(REGISTRIES, "dtypes", [*DTYPES, "float8"])
    config_module.schema.cache_clear()
    config_module._validator.cache_clear()
    try:
        assert compose("micro", ["model.dtype=float8"])["model"]["dtype"] == "float8"
    finally:
        monkeypatch.undo()
        config_module.schema.cache_clear()
        config_module._validator.cache_clear()
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        compose("micro", ["model.dtype=float8"])
