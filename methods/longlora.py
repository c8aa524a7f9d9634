"""`longlora`: LongLoRA (Chen et al. 2023, arXiv 2309.12307; docs/methods.md §8.2), an attention kind of the fine-tuned
regime: shifted sparse attention (S²-Attn) and LoRA during fine-tuning, full attention with merged weights after it.

- **S²-Attn (training only).** A row of n tokens is cut into groups of G = int(n · group_size_ratio) tokens (n/4 by
  default; G must divide n and be even). The first half of the heads attends causally inside the groups
  [kG, (k+1)G); the second half inside groups shifted by G/2: [0, G/2), [G/2, 3G/2), …, [n − G/2, n). This is the
  official FlashAttention-varlen form (sequence boundaries, half-size first and last groups), not the older `roll`
  form, which wraps the last half-group round to the start and lets early tokens see the future (LongLoRA issues
  #15 and #90). Keys and values are repeated to every query head first (grouped-query attention), as upstream.
- **LoRA.** Rank-r adapters (r 8, α 16, dropout 0, no bias) on q_proj, k_proj, v_proj and o_proj, made with peft
  (`inject_adapter_in_model`: A Kaiming-uniform, B zero, scaling α/r), the base weights frozen; the parameters whose
  names contain "embed" or "norm" are trained too (upstream's `trainable_params="embed,norm"`; with tied embeddings
  the output layer is the embedding).
- **After fine-tuning** (`finish_training`, called by the fine-tuning stage before the model is saved): every adapter
  is merged into its base weight, W + (α/r)·B·A, the adapters are removed and the model is switched back to its own
  full attention. The checkpoint is then a plain LLaMA model (no adapter keys); its config still records
  `ctxext_attention` (with `merged: true`), so the cell's attention kind is known, and `install_hooks` does nothing for
  a merged model. Evaluation uses full attention with the cell's RoPE (PI in the paper's row), as LongLoRA and LCEG
  evaluate it.

Outside training (`model.eval()`) the attention function is transformers' own SDPA attention, so an un-merged model
evaluates with full attention too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import AttentionMethod

ATTN_IMPLEMENTATION = "ctxext_longlora"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def group_size(n: int, ratio: float) -> int:
    """S²-Attn's group length for rows of n tokens: int(n · ratio), as upstream."""
    return int(n * ratio)


def check_group(n: int, ratio: float) -> int:
    """The group length for rows of n tokens; ValueError unless it is even, at least 2 and divides n."""
    group = group_size(n, ratio)
    if group < 2 or group % 2 or n % group:
        raise ValueError(f"longlora: rows of {n} tokens with group_size_ratio={ratio} give groups of {group} tokens; "
                         "the group must be an even number >= 2 that divides the row length")
    return group


def s2_segments(n: int, group: int, shifted: bool) -> list[tuple[int, int]]:
    """(start, stop) of the causal groups of a row of n tokens: [kG, (k+1)G), or, shifted, [0, G/2) and then
    [G/2 + kG, G/2 + (k+1)G), the last ones cut at n (half-size first and last groups when G divides n)."""
    if not shifted:
        return [(s, min(s + group, n)) for s in range(0, n, group)]
    half = group // 2
    return [(0, min(half, n))] + [(s, min(s + group, n)) for s in range(half, n, group)]


def s2_attention(query, key, value, group: int, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Shifted sparse attention of a full row (no cache): query/key/value [b, h, n, d] (kv heads already repeated).
    Heads [0, h/2) attend causally within the plain groups, heads [h/2, h) within the shifted ones. Returns
    [b, n, h, d]."""
    b, h, n, d = query.shape
    if h % 2:
        raise ValueError(f"longlora: S²-Attn splits the heads in two halves; the model has {h} heads")
    half = h // 2
    out = torch.empty_like(query)
    for heads, shifted in ((slice(0, half), False), (slice(half, h), True)):
        for start, stop in s2_segments(n, group, shifted):
            out[:, heads, start:stop] = F.scaled_dot_product_attention(
                query[:, heads, start:stop], key[:, heads, start:stop], value[:, heads, start:stop], is_causal=True,
                scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous()


def longlora_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """The attention function registered as `ATTN_IMPLEMENTATION`: S²-Attn in training, SDPA (full) otherwise."""
    if not module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    record = getattr(module.config, "ctxext_attention", None) or {}
    if record.get("attention") != "longlora":
        raise RuntimeError("longlora attention is not installed on this model; use "
                           "methods.get_attention('longlora').apply(model, ...)")
    n = query.shape[2]
    if attention_mask is not None or key.shape[2] != n:
        raise ValueError("longlora: S²-Attn trains on full unpadded rows (no padding mask, no cache)")
    group = check_group(n, record["params"]["group_size_ratio"])
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return s2_attention(query, key, value, group, scaling, dropout), None


AttentionInterface.register(ATTN_IMPLEMENTATION, longlora_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every peft LoRA layer of the model."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def merged_state_dict(state: dict, scaling: float, adapter: str = "default") -> dict:
    """A state dict of the LoRA-injected model -> that of the plain model: each `<m>.base_layer.weight` becomes
    `<m>.weight` = W + scaling·B·A (computed in float32, stored in W's dtype), the adapter entries are dropped."""
    out = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name or ".lora_dropout." in name:
            continue
        if ".base_layer." in name:
            prefix, _, rest = name.partition(".base_layer.")
            if rest == "weight":
                a, b = state[f"{prefix}.lora_A.{adapter}.weight"], state[f"{prefix}.lora_B.{adapter}.weight"]
                tensor = (tensor.float() + scaling * (b.float() @ a.float())).to(tensor.dtype)
            name = f"{prefix}.{rest}"
        out[name] = tensor
    return out


class LongLoRA(AttentionMethod):
    name = "longlora"
    description = ("LongLoRA: S²-Attn (groups of n/4, half the heads shifted by half a group) and LoRA on q,k,v,o plus "
                   "trainable embeddings and norms in fine-tuning; merged weights and full attention at inference.")
    regimes = ("finetuned",)

    def _defaults(self, base_window, train_len, regime):
        return {"group_size_ratio": 0.25, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                "lora_targets": list(LORA_TARGETS), "trainable": ["embed", "norm"]}

    def _validate(self, params, base_window, train_len):
        ratio = params["group_size_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"longlora: group_size_ratio must be a number in (0, 1], got {ratio!r}")
        check_group(int(train_len), ratio)  # the rows of this cell (trap 1)
        r = params["lora_r"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"longlora: lora_r must be an integer >= 1, got {r!r}")
        alpha = params["lora_alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"longlora: lora_alpha must be a number > 0, got {alpha!r}")
        drop = params["lora_dropout"]
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
            raise ValueError(f"longlora: lora_dropout must be a number in [0, 1), got {drop!r}")
        targets = params["lora_targets"]
        if not isinstance(targets, (list, tuple)) or not targets or not set(targets) <= set(LORA_TARGETS):
            raise ValueError(f"longlora: lora_targets must be a non-empty list of {', '.join(LORA_TARGETS)}, "
                             f"got {targets!r}")
        trainable = params["trainable"]
        if not isinstance(trainable, (list, tuple)) or not all(isinstance(t, str) and t for t in trainable):
            raise ValueError(f"longlora: trainable must be a list of parameter-name parts, got {trainable!r}")
        return {**params, "lora_targets": list(targets), "trainable": list(trainable)}

    # --- model --------------------------------------------------------------------------------------------------
    def apply(self, model, base_window: int, train_len: int, regime: str = "finetuned", **overrides):
        """Add LoRA adapters (seeded by the caller's torch RNG), choose the trainable parameters, record the kind and
        switch the attention to S²-Attn for training."""
        from peft import LoraConfig, inject_adapter_in_model

        params = self.resolve(base_window, train_len, regime, **overrides)
        if getattr(model.config, "ctxext_attention", None):
            raise ValueError(f"model already has an attention kind applied: {model.config.ctxext_attention}")
        if model.config.num_attention_heads % 2:
            raise ValueError(f"longlora: S²-Attn needs an even number of heads, the model has "
                             f"{model.config.num_attention_heads}")
        inference = model.config._attn_implementation
        inject_adapter_in_model(LoraConfig(r=params["lora_r"], lora_alpha=params["lora_alpha"],
                                           lora_dropout=params["lora_dropout"], target_modules=params["lora_targets"],
                                           bias="none"), model)
        for name, parameter in model.named_parameters():
            if any(part in name for part in params["trainable"]):
                parameter.requires_grad_(True)
        super().apply(model, base_window, train_len, regime, **overrides)
        model.config.ctxext_attention.update({"merged": False, "inference_attn_implementation": inference})
        return model

    def install_hooks(self, model) -> None:
        """S²-Attn while the adapters are in the model; nothing once they are merged (full attention)."""
        record = model.config.ctxext_attention
        if not record.get("merged"):
            model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def finish_training(self, model, state_dict: dict | None = None):
        """Merge the adapters and go back to full attention. Without `state_dict`: in place (the adapters are merged
        into their base layers and removed); returns the model. With the full state dict of a sharded model (the
        multi-process fine-tuning stage): returns the merged state dict of the plain model; only the config is
        changed in place."""
        record = model.config.ctxext_attention
        if record.get("attention") != "longlora" or record.get("merged"):
            raise ValueError(f"finish_training needs a longlora model with adapters, got {record}")
        params = record["params"]
        scaling = params["lora_alpha"] / params["lora_r"]
        result = model
        if state_dict is not None:
            result = merged_state_dict(state_dict, scaling)
        else:
            with torch.no_grad():
                for name, layer in lora_layers(model):
                    base = layer.get_base_layer()
                    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                    base.weight += (scaling * (b.float() @ a.float())).to(base.weight.dtype)
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child, base)
            for parameter in model.parameters():
                parameter.requires_grad_(True)
        record.update({"merged": True})
        model.set_attn_implementation(record.get("inference_attn_implementation") or "sdpa")
        return result


METHOD = LongLoRA()
