"""`clex`: CLEX (Chen et al. 2023, ICLR 2024; docs/methods.md §5), continuous length extrapolation with a learned
neural-ODE frequency basis.

- The ODE. z(t) = log theta(t) in R^(d/2), z(1) = log theta (the original RoPE, the model's base b); for t >= 1
  dz/dt = act((z + xi(t)) W_up) W_down + xi'(t), with the NTK time embedding xi_i(t) = -(2i/d) ln 10000
  - (2i/(d-2)) ln(2t - 1). W_down starts at zero, so an untrained CLEX is NTK-aware with alpha = 2t - 1 on the
  model's base (xi' does not depend on the base). One `CLEXODE` module (p*d^2 parameters, p = param_factor) is
  shared by all layers and heads. It is solved with torchdiffeq's fixed-step `rk4` (the 3/8 rule) with step
  `time_dt`, in float32.
- The time embedding's base is the official code's fixed 10000 (`TIME_EMBEDDING_BASE`; `clex_layer.py`'s
  `get_time_embedding(t, base=10000)` is never given the model's base, also not in the released CLEX-Mixtral,
  rope_theta 1e6), not the model's base b, which the paper's notation suggests. Both are the same at b = 1e4
  (LLaMA-2: every CLEX run of the paper and of LCEG, and the micro and tiny studies). At b = 1e5 (SmolLM2, d = 64)
  the two forms move theta(t) apart once W_down is non-zero: with W_down ~ N(0, 0.001) up to 0.5-1 % at t = 2,
  4-7 % over t <= 8 and 8-15 % over t <= 16 (ten seeds); with the ODE weights the micro study's CLEX cells learned
  (d = 16) transplanted to b = 1e5, up to 13 % (max_factor 8) and 18 % (max_factor 16). Untrained, both are NTK.
- Training (the rotary module in training mode): every forward draws an integer t uniformly from 1..max_factor
  and gives the T tokens sorted, random, fractional positions over [0, L*t): 0, (u_1 + 1)/k, ..., (u_{T-2} + 1)/k,
  (T*t - 1)/k with k = T/L and u distinct integers drawn from 0..T*t - 3. The incoming position ids are ignored
  (the attention mask is built from them as usual, so no float position id ever reaches transformers' masking);
  the fractional positions only enter the cos/sin computation, in float32.
- Inference: t = ceil(n / L) clipped to max_factor, n = the total length (last position id + 1, cached tokens
  included). theta(t) for every integer t comes from one ODE solve over the grid 1, 2, ..., max_factor, cached and
  recomputed when the ODE parameters change (their version counters or storage).
- KV cache. t depends on the total length, and not only the cached keys (rotated with the old t) but also the
  keys and values of every layer above the first (computed from hidden states that attended with the old t) are
  stale once t changes. Re-rotating un-rotated keys, as the reference implementation does, fixes the first layer
  only. So when a cached forward crosses into a new t, a decoder pre-hook drops the cache and re-encodes the whole
  sequence (the cache remembers its token ids) with the new t; cached generation then equals full recomputation
  (tested). It happens at most max_factor - 1 times per sequence. Supported: transformers' dynamic cache (and
  LM-Infinite's bounded one), contiguous positions (no left padding), input ids (not embeddings). A chunked prefill
  runs under `fixed_length(model, n)`, which pins t = t(n) of the whole prompt, so the chunks are not re-encoded as
  they cross multiples of L; the decoding steps then take t from their own length (`methods.attention`).
- Checkpoints. The ODE is `model.model.rotary_emb.ode`, so the optimizer trains it and `save_pretrained` saves
  it (keys `model.rotary_emb.ode.*`). transformers' `from_pretrained` builds the stock rotary module and drops those
  keys; `methods.restore` -> `install_hooks` rebuilds the CLEX module from `config.ctxext` and loads its weights
  from the checkpoint's safetensors files (`model.name_or_path`).
"""
from __future__ import annotations

import contextlib
import math
from numbers import Integral
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .rope import (RopeMethod, check_windows, default_inv_freq, is_number, rotary_dim, rotary_module,
                   set_rope)

ACTIVATIONS = {"tanh": torch.tanh, "silu": torch.nn.functional.silu}
PREFIX = "model.rotary_emb.ode."  # state-dict prefix of the ODE weights in a LlamaForCausalLM checkpoint
_HOOK_ATTRS = ("_ctxext_clex_pre_hook", "_ctxext_clex_post_hook")
_CACHE_ATTR = "_ctxext_clex_t"  # on a transformers Cache: the t its keys and values were computed with
_IDS_ATTR = "_ctxext_clex_ids"  # on a transformers Cache: the token ids it holds
TIME_EMBEDDING_BASE = 10000.0   # the NTK time embedding's base, fixed as in the official code (see above)


# --- scales and positions -------------------------------------------------------------------------------------
def inference_scale(n: int, original_window: int, max_factor: int) -> int:
    """t = ceil(n / L) clipped to [1, max_factor] (n: total length including cached tokens)."""
    if not isinstance(n, Integral) or n <= 0:
        raise ValueError(f"clex: the sequence length n must be a positive integer, got {n!r}")
    return max(1, min(-(-int(n) // int(original_window)), int(max_factor)))


def training_positions(seq_len: int, original_window: int, t: int, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """Sorted, distinct, fractional float32 positions [seq_len] spanning [0, L*t): 0, (u + 1)/k for seq_len - 2
    distinct integers u drawn uniformly from 0 .. seq_len*t - 3 (sorted), and (seq_len*t - 1)/k; k = seq_len / L."""
    if seq_len < 2:
        raise ValueError(f"clex: training needs sequences of at least 2 tokens, got {seq_len}")
    k = seq_len / original_window
    span = seq_len * t  # integers 0 .. span - 1 before the division by k
    inner = torch.randperm(span - 2, generator=generator)[: seq_len - 2].sort().values + 1
    ticks = torch.cat((torch.zeros(1, dtype=torch.long), inner, torch.tensor([span - 1])))
    return ticks.to(torch.float64).div(k).to(torch.float32)


# --- the ODE ---------------------------------------------------------------------------------------------------
class CLEXODE(nn.Module):
    """dz/dt = act((z + xi(t)) W_up) W_down + xi'(t); parameters W_up [d/2, p*d] (Kaiming-uniform, a = sqrt(5)) and
    W_down [p*d, d/2] (zeros)."""

    def __init__(self, head_dim: int, base: float, param_factor: int = 1, act: str = "silu", time_dt: float = 0.01):
        super().__init__()
        self.head_dim, self.base, self.act, self.time_dt = int(head_dim), float(base), act, float(time_dt)
        self.w_up = nn.Parameter(torch.empty(head_dim // 2, param_factor * head_dim))
        self.w_down = nn.Parameter(torch.zeros(param_factor * head_dim, head_dim // 2))
        nn.init.kaiming_uniform_(self.w_up, a=math.sqrt(5))
        i = torch.arange(head_dim // 2, dtype=torch.float64)  # float64 here, cast to the solver's dtype when used
        self.register_buffer("_log_theta", -(2 * i / head_dim) * math.log(base), persistent=False)   # z(1)
        self.register_buffer("_time_log_theta", -(2 * i / head_dim) * math.log(TIME_EMBEDDING_BASE), persistent=False)
        self.register_buffer("_ntk_slope", -(2 * i / (head_dim - 2)), persistent=False)

    def time_embedding(self, t: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(xi(t), xi'(t)): the log NTK-aware frequencies of base TIME_EMBEDDING_BASE with alpha = 2t - 1 (alpha = 1
        below t = 1) and their derivative in t (the same for every base)."""
        t = t.to(dtype)
        alpha = torch.clamp(2 * t - 1, min=1.0)
        d_log_alpha = torch.where(t >= 1, 2 / alpha, torch.zeros_like(alpha))
        log_theta, slope = self._time_log_theta.to(dtype), self._ntk_slope.to(dtype)
        return log_theta + slope * torch.log(alpha), slope * d_log_alpha

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xi, d_xi = self.time_embedding(t, z.dtype)
        hidden = ACTIVATIONS[self.act]((z + xi) @ self.w_up.to(z.dtype))
        return hidden @ self.w_down.to(z.dtype) + d_xi

    def log_frequencies(self, scales: list[int], dtype=torch.float32) -> torch.Tensor:
        """z(t) [len(scales), d/2] for increasing integer scales >= 1, from one solve starting at z(1) = log theta
        (float32 as the reference implementation; float64 only for tests of the maths)."""
        from torchdiffeq import odeint

        z0 = self._log_theta.to(dtype)
        if list(scales) == [1]:
            return z0[None].clone()
        grid = torch.tensor([1.0] + [float(s) for s in scales if s != 1], dtype=dtype, device=z0.device)
        z = odeint(self, z0.clone(), grid, method="rk4", options={"step_size": self.time_dt})
        return z if scales[0] == 1 else z[1:]

    def inv_freq(self, t: int) -> torch.Tensor:
        """theta(t) = exp(z(t)) [d/2] (float32), differentiable in the parameters."""
        return self.log_frequencies([int(t)])[-1].exp()


class CLEXRotaryEmbedding(nn.Module):
    """Drop-in for LlamaRotaryEmbedding: forward(x, position_ids) -> (cos, sin), with theta chosen by t."""

    def __init__(self, head_dim: int, base: float, original_window: int, max_factor: int, param_factor: int,
                 act: str, time_dt: float):
        super().__init__()
        self.original_window, self.max_factor = int(original_window), int(max_factor)
        self.ode = CLEXODE(head_dim, base, param_factor, act, time_dt)
        self.attention_scaling = 1.0
        theta = default_inv_freq(head_dim, base)
        self.register_buffer("inv_freq", theta, persistent=False)  # t = 1 (what transformers code may read)
        self.register_buffer("original_inv_freq", theta.clone(), persistent=False)
        self._table, self._table_key = None, None
        self.last_t = None  # the t of the last forward (for tests and diagnostics)
        self.pinned_t = None  # set by CLEX.fixed_length: the t every inference forward uses meanwhile

    def _parameters_key(self):
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.ode.parameters())

    def frequency_table(self) -> torch.Tensor:
        """theta(t) for t = 1 .. max_factor [max_factor, d/2], from one solve; cached until the parameters change."""
        key = self._parameters_key()
        if self._table is None or self._table_key != key:
            with torch.no_grad():
                self._table = self.ode.log_frequencies(list(range(1, self.max_factor + 1))).exp()
            self._table_key = key
        return self._table

    def scale_for(self, n: int) -> int:
        return inference_scale(n, self.original_window, self.max_factor)

    def current_scale(self, n: int) -> int:
        """The t an inference forward over a total length n uses: the pinned t if any, else t(n)."""
        return self.pinned_t if self.pinned_t is not None else self.scale_for(n)

    def inference_inv_freq(self, n: int) -> torch.Tensor:
        return self.frequency_table()[self.scale_for(n) - 1]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.training:
            t = int(torch.randint(1, self.max_factor + 1, ()))
            positions = training_positions(position_ids.shape[-1], self.original_window, t)[None].to(x.device)
            inv_freq = self.ode.inv_freq(t)
        else:
            t = self.current_scale(int(position_ids.max()) + 1)
            positions = position_ids.to(torch.float32)
            inv_freq = self.frequency_table()[t - 1]
        self.last_t = t
        angles = positions[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


# --- KV cache -------------------------------------------------------------------------------------------------
def _cache_in(kwargs_or_output):
    """The KV cache of a decoder call or output: transformers >= 5.24 names it `cache`, earlier versions
    `past_key_values` (the old name is still accepted as an alias)."""
    get = kwargs_or_output.get if isinstance(kwargs_or_output, dict) else lambda k: getattr(kwargs_or_output, k, None)
    cache = get("cache")
    return cache if cache is not None else get("past_key_values")


def _sync_cache(decoder, args, kwargs):
    """Forward pre-hook on the decoder: when this forward's t differs from the t the cache was built with, drop the
    cache and re-encode the whole sequence (the cached token ids plus the new ones) with the new t; the post-hook
    then keeps only the new positions of the output, so callers see the usual shapes."""
    if decoder.training:
        return None
    cache = _cache_in(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:
        return None
    new_ids = kwargs.get("input_ids")
    cached_ids = getattr(cache, _IDS_ATTR, None)
    if new_ids is None or cached_ids is None or cached_ids.shape[-1] != past:
        raise NotImplementedError("clex: generation with a KV cache needs input_ids in every forward (the cache is "
                                  "re-encoded when the scale t changes)")
    rotary = decoder.rotary_emb
    n = past + new_ids.shape[1]
    position_ids = kwargs.get("position_ids")
    expected = torch.arange(past, n, device=new_ids.device)
    if position_ids is not None and not torch.equal(position_ids.expand(new_ids.shape[0], -1)[0], expected):
        raise NotImplementedError("clex: KV-cache generation supports contiguous positions 0..n-1 only "
                                  "(no left padding)")
    new_t, old_t = rotary.current_scale(n), getattr(cache, _CACHE_ATTR)
    if new_t == old_t:
        return None
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
            raise NotImplementedError(f"clex: re-encoding a {type(layer).__name__} cache is not supported")
    cache.crop(-past)  # empty: the keys and values of every layer were computed with the old t
    if cache.get_seq_length() != 0:
        raise RuntimeError(f"clex: could not empty the {type(cache).__name__} for re-encoding")
    setattr(cache, _IDS_ATTR, None)
    kwargs = {**kwargs, "input_ids": torch.cat((cached_ids, new_ids), dim=1)}
    if position_ids is not None:
        kwargs["position_ids"] = torch.arange(n, device=new_ids.device)[None].expand(new_ids.shape[0], -1)
    decoder._ctxext_clex_keep = new_ids.shape[1]
    return args, kwargs


def _record_cache(decoder, args, kwargs, output):
    """Forward hook on the decoder: note on the returned cache its token ids and the t its keys and values were
    computed with; after a re-encoding, keep only the positions the caller asked for."""
    keep = getattr(decoder, "_ctxext_clex_keep", None)
    if keep is not None:
        decoder._ctxext_clex_keep = None
        output.last_hidden_state = output.last_hidden_state[:, -keep:]
    cache = _cache_in(output)
    if cache is None or decoder.training:
        return output
    ids = kwargs.get("input_ids")
    if ids is None:
        setattr(cache, _IDS_ATTR, None)
    else:
        old = getattr(cache, _IDS_ATTR, None)
        setattr(cache, _IDS_ATTR, ids if old is None or keep is not None else torch.cat((old, ids), dim=1))
    setattr(cache, _CACHE_ATTR, decoder.rotary_emb.last_t)
    return output


# --- loading the ODE weights back -----------------------------------------------------------------------------
def _checkpoint_ode_state(model) -> dict[str, torch.Tensor]:
    """The ODE weights stored in the checkpoint the model was loaded from (`model.name_or_path`)."""
    from safetensors import safe_open

    where = Path(str(getattr(model, "name_or_path", "") or ""))
    files = sorted(where.glob("*.safetensors")) if where.is_dir() else []
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(PREFIX):
                    state[key[len(PREFIX):]] = handle.get_tensor(key)
    if not state:
        raise FileNotFoundError(f"clex: the model's config records CLEX but no ODE weights ({PREFIX}*) were found "
                                f"in the safetensors files of {str(where)!r} (model.name_or_path)")
    return state


# --- the method ------------------------------------------------------------------------------------------------
class CLEX(RopeMethod):
    name = "clex"
    rope_type = None   # its own rotary module: recognised from config.ctxext only
    description = ("CLEX: frequencies learned as a function of the scale t by a neural ODE shared by all layers; "
                   "random fractional positions over [0, L*t) in training, t = ceil(n/L) at inference.")

    def _defaults(self, original_window, target_window, regime):
        scale = math.ceil(target_window / original_window)
        return {"max_factor": 4 * scale, "param_factor": 1, "act": "silu", "time_dt": 0.01}

    def _validate(self, params, original_window, target_window):
        for key in ("max_factor", "param_factor"):
            value = params[key]
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"clex: {key} must be a positive integer, got {value!r}")
        if params["act"] not in ACTIVATIONS:
            raise ValueError(f"clex: act must be one of {', '.join(ACTIVATIONS)}, got {params['act']!r}")
        dt = params["time_dt"]
        if not is_number(dt) or not 0 < dt <= 1:
            raise ValueError(f"clex: time_dt must be a number in (0, 1], got {dt!r}")
        return {"max_factor": int(params["max_factor"]), "param_factor": int(params["param_factor"]),
                "act": params["act"], "time_dt": float(dt)}

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params, ode=None):
        """theta(t) of an untrained ODE (the NTK identity), or of `ode`; t = ceil(seq_len / L) clipped, and the
        training scale ceil(target / L) when seq_len is None."""
        n = seq_len if seq_len is not None else target_window
        t = inference_scale(n, original_window, params["max_factor"])
        if ode is None:
            ode = CLEXODE(head_dim, base, params["param_factor"], params["act"], params["time_dt"])
        with torch.no_grad():
            return ode.inv_freq(t).cpu(), 1.0

    @contextlib.contextmanager
    def fixed_length(self, model, n: int):
        """Inside, every inference forward uses t = t(n) (and the cache hook does not re-encode for a t that this pin
        keeps constant): a chunked prefill of an n-token prompt then equals one forward over it."""
        rotary = rotary_module(model)
        previous = rotary.pinned_t
        rotary.pinned_t = rotary.scale_for(int(n))
        try:
            yield
        finally:
            rotary.pinned_t = previous

    def model_frequencies(self, model, seq_len: int) -> torch.Tensor:
        """theta(t) [d/2] the CLEX model `model` uses for a sequence of total length `seq_len` (its trained ODE)."""
        return rotary_module(model).inference_inv_freq(seq_len).detach().clone()

    def apply(self, model, original_window: int, target_window: int, regime: str = "finetuned", **overrides):
        config = model.config
        if getattr(config, "ctxext", None):
            raise ValueError(f"model already has a context-extension method applied: {config.ctxext}")
        check_windows(original_window, target_window)
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"apply() expects a model with the original RoPE, got rope_type={rope_type!r}")
        params = self.resolve(original_window, target_window, regime, **overrides)
        set_rope(config, rope_type="default", rope_theta=float(config.rope_parameters["rope_theta"]))
        config.max_position_embeddings = int(target_window)
        config.ctxext = {"rope": self.name, "original_window": int(original_window),
                         "target_window": int(target_window), "params": params}
        self._install_module(model)
        self.install_hooks(model)
        return model

    @staticmethod
    def _install_module(model) -> CLEXRotaryEmbedding:
        config = model.config
        record, inner = config.ctxext, getattr(model, "model", model)
        params = record["params"]
        old = inner.rotary_emb
        rotary = CLEXRotaryEmbedding(rotary_dim(config), float(config.rope_parameters["rope_theta"]),
                                     record["original_window"], params["max_factor"], params["param_factor"],
                                     params["act"], params["time_dt"])
        inner.rotary_emb = rotary.to(device=old.inv_freq.device, dtype=model.dtype)
        rotary.inv_freq = rotary.inv_freq.float()  # buffers stay float32 (a bf16 model keeps fp32 frequencies)
        rotary.original_inv_freq = rotary.original_inv_freq.float()
        rotary.train(model.training)
        return rotary

    def install_hooks(self, model) -> None:
        """Rebuild the CLEX rotary module if the model has the stock one (a reloaded checkpoint: its ODE weights come
        from the checkpoint files), and (re-)install the KV-cache hooks on the decoder."""
        inner = getattr(model, "model", model)
        if not isinstance(inner.rotary_emb, CLEXRotaryEmbedding):
            state = _checkpoint_ode_state(model)
            rotary = self._install_module(model)
            rotary.ode.load_state_dict({k: v.to(rotary.ode.w_up.dtype) for k, v in state.items()})
        for attr in _HOOK_ATTRS:
            old = getattr(inner, attr, None)
            if old is not None:
                old.remove()
        setattr(inner, _HOOK_ATTRS[0], inner.register_forward_pre_hook(_sync_cache, with_kwargs=True))
        setattr(inner, _HOOK_ATTRS[1], inner.register_forward_hook(_record_cache, with_kwargs=True))


METHOD = CLEX()
