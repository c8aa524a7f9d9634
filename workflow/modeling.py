"""Building, loading and saving models: the scratch base model, imported checkpoints, and cell models.

Models load from safetensors only and never with `trust_remote_code`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from methods import get_attention, get_method, restore
from workflow.common import log


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


def load_model(path: str | Path, attn_implementation: str = "sdpa", dtype: str = "float32"):
    """Load a saved checkpoint (safetensors only) and re-install the runtime hooks of its method."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {path} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 attn_implementation=attn_implementation,
                                                 trust_remote_code=False)
    restore(model)
    return model.eval()


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


def save_model_dir(model, tokenizer, model_dir: str | Path) -> Path:
    """Save a model (safetensors) with its tokenizer as a self-contained Hugging Face directory."""
    import shutil

    model_dir = Path(model_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
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
