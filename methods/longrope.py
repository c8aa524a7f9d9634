"""`longrope`: LongRoPE (Ding et al. 2024, arXiv 2402.13753; docs/methods.md §13): non-uniform per-dimension rescale
factors found by an evolutionary search, realised with transformers' `longrope` rope type.

- **Frequencies.** θ'_i = θ_i / λ_i with one rescale factor λ_i per frequency (d/2 of them). transformers' `longrope`
  keeps two sets: `long_factor` for sequences longer than the original window L, `short_factor` otherwise, and one cos/
  sin magnitude, the paper's and the official code's "su" scale sqrt(1 + ln s / ln L) (s = target / L), which
  transformers derives from `factor` = s. ctxext uses the searched factors for both sets by default
  (`short_factor: long`, one set at every length, as the official search evaluates and fine-tunes them);
  `short_factor: ones` keeps the original RoPE up to L (the magnitude still applies), or give a list.
- **Search** (`search`), the official `dim_mono` algorithm: the factors live on a grid of `search_step` (0.01) between
  1 and 1 + s and must be non-decreasing in i (the monotonic constraint: slower dimensions are interpolated at least as
  much). The start is YaRN's ramp turned into factors, λ_i = 1 + (s − 1)·ramp_i (β_fast 32, β_slow 1); the first
  population is the start plus population − 1 mutations of it. Each generation keeps the `search_parents` best (lowest
  loss) and adds `search_mutations` mutants of random parents and `search_crossovers` children of two distinct parents;
  after `search_generations` generations the best individual wins. A mutation redraws every factor in turn uniformly
  from the grid between its (already updated) neighbours; a crossover starts from the better parent and takes each
  factor of the other with probability 0.3·0.5, until the child is new and monotonic (at most `search_crossover_tries`
  passes, else a mutation of the better parent). No individual is evaluated twice. Scores come from a callable (the
  workflow passes the loss on the study's validation split at the cell's target length); the random draws come from
  a torch generator seeded with `search_seed`, so a search is reproducible.
- **Not implemented:** the initial-token window n̂ (the first n̂ positions kept unscaled, the official `dim_mono_n`):
  transformers' `longrope` type has no such window, so n̂ = 0 (as in Phi-3's released LongRoPE configs); and the
  paper's second search at the original length for short-context recovery (`short_factor: long` by default instead).

Once found, the factors are written into the model config (`rope_parameters` short/long factors, read back by plain
transformers) and into `config.ctxext["params"]["long_factor"]`, with the search summary in `config.ctxext["search"]`:
applying the method with the recorded params rebuilds the same model.
"""
from __future__ import annotations

import contextlib
import math
import time
from numbers import Integral
from typing import Callable

import torch

from .rope import RopeMethod, default_inv_freq, is_number, rebuild_rotary, rotary_dim, rotary_module, set_rope, \
    verify_rotary
from .yarn import correction_range

SEARCH_KEYS = ("search_population", "search_generations", "search_parents", "search_mutations", "search_crossovers",
               "search_crossover_tries")
SHORT_MODES = ("long", "ones")
_PINNED_TYPE = "ctxext_pinned"  # the rotary module's rope type while a length is pinned: transformers' update is skipped


def su_scale(scale: float, original_window: int) -> float:
    """LongRoPE's cos/sin magnitude sqrt(1 + ln s / ln L) for s > 1, else 1 (the official `su` policy)."""
    return math.sqrt(1 + math.log(scale) / math.log(original_window)) if scale > 1 else 1.0


def initial_factors(head_dim: int, base: float, original_window: int, target_window: int, beta_fast: float = 32.0,
                    beta_slow: float = 1.0) -> list[float]:
    """The search's start: YaRN's extrapolation mask γ turned into factors, λ_i = s·(1 − γ_i) + γ_i (official
    `search.py`), i.e. 1 + (s − 1)·ramp_i, [head_dim // 2] floats."""
    scale = target_window / original_window
    low, high = correction_range(head_dim, base, original_window, beta_fast, beta_slow)
    if low == high:
        high += 0.001
    return [1.0 + (scale - 1.0) * min(max((i - low) / (high - low), 0.0), 1.0) for i in range(head_dim // 2)]


def is_monotonic(factors) -> bool:
    """Non-decreasing in the frequency index (LongRoPE's constraint)."""
    return all(b >= a - 1e-12 for a, b in zip(factors, factors[1:]))


class _Search:
    """The evolutionary search of the module docstring (state: seeded generator, evaluated individuals)."""

    def __init__(self, score: Callable[[list[float]], float], upper: float, step: float, seed: int,
                 crossover_tries: int):
        self.score_fn, self.upper, self.step = score, upper, step
        self.generator = torch.Generator().manual_seed(int(seed))
        self.crossover_tries = crossover_tries
        self.scores: dict[tuple, float] = {}

    def integer(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def two_of(self, n: int) -> tuple[int, int]:
        i, j = torch.randperm(n, generator=self.generator)[:2].tolist()
        return min(i, j), max(i, j)

    @staticmethod
    def key(factors: list[float]) -> tuple:
        return tuple(round(x, 6) for x in factors)

    def evaluate(self, factors: list[float]) -> tuple[list[float], float]:
        key = self.key(factors)
        if key not in self.scores:
            self.scores[key] = float(self.score_fn(factors))
        return factors, self.scores[key]

    def _novel(self, factors: list[float]) -> bool:
        return self.key(factors) not in self.scores and is_monotonic(factors)

    def mutate(self, parent: list[float], tries: int = 1000) -> list[float] | None:
        """Every factor in turn redrawn uniformly from the grid between its (already updated) neighbours, 1 and
        1 + s at the ends; repeated until the result is new."""
        n = len(parent)
        for _ in range(tries):
            new = list(parent)
            for i in range(n):
                low = new[i - 1] if i > 0 else 1.0
                high = new[i + 1] if i < n - 1 else self.upper
                count = int(math.floor((high - low) / self.step + 1e-9)) + 1 if high >= low else 1
                new[i] = low + self.step * self.integer(count)
            if self._novel(new):
                return new
        return None

    def crossover(self, first: list[float], second: list[float]) -> list[float] | None:
        """From the better parent, each factor of the other taken with probability 0.3 · 0.5, until the child is new
        and monotonic (the official loop, which keeps every change it made)."""
        if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(first, second)):
            return None
        new = list(first)
        for _ in range(self.crossover_tries):
            for i in range(len(new)):
                if self.uniform() < 0.3:
                    if self.uniform() < 0.5:
                        new[i] = second[i]
                    if self._novel(new):
                        return list(new)
        return None


def search(model, score_fn: Callable[[list[float]], float], *, population: int, generations: int, parents: int,
           mutations: int, crossovers: int, crossover_tries: int = 20, step: float = 0.01, seed: int = 42,
           log: Callable[[str], None] | None = None) -> dict:
    """LongRoPE's evolutionary search of the long factors of `model` (which must have `longrope` applied: its config
    gives d, b, L and s). For every new candidate the factors are installed on the model first (`set_factors`), then
    `score_fn(factors)` gives its loss (lower is better; a model-loss function may ignore its argument). Installs the
    best factors at the end and returns {long_factor, loss, initial_factor, initial_loss, evaluations,
    best_per_generation, wall_s}."""
    record = _record(model)
    head_dim, base = rotary_dim(model.config), float(model.config.rope_parameters["rope_theta"])
    original, target = record["original_window"], record["target_window"]
    for name, value in (("population", population), ("generations", generations), ("parents", parents),
                        ("mutations", mutations), ("crossovers", crossovers), ("crossover_tries", crossover_tries)):
        least = 0 if name == "generations" else 1
        if not isinstance(value, Integral) or isinstance(value, bool) or value < least:
            raise ValueError(f"longrope search: {name} must be an integer >= {least}, got {value!r}")
    if parents > population:
        raise ValueError(f"longrope search: parents={parents} exceeds population={population}")
    t0 = time.perf_counter()

    def score(factors: list[float]) -> float:
        METHOD.set_factors(model, factors)
        return float(score_fn(list(factors)))

    state = _Search(score, 1.0 + target / original, step, seed, crossover_tries)
    start = initial_factors(head_dim, base, original, target)
    pool = [state.evaluate(start)]
    initial_loss = pool[0][1]
    while len(pool) < population:
        child = state.mutate(start)
        if child is None:
            break
        pool.append(state.evaluate(child))
    best_per_generation = [min(loss for _, loss in pool)]
    for generation in range(generations):
        elite = sorted(pool, key=lambda item: item[1])[:parents]
        pool = list(elite)
        for _ in range(mutations):
            child = state.mutate(elite[state.integer(len(elite))][0])
            if child is not None:
                pool.append(state.evaluate(child))
        for _ in range(crossovers):
            if len(elite) < 2:
                break
            i, j = state.two_of(len(elite))
            child = state.crossover(elite[i][0], elite[j][0])
            if child is None:
                child = state.mutate(elite[i][0])
            if child is not None:
                pool.append(state.evaluate(child))
        best_per_generation.append(min(loss for _, loss in pool))
        if log:
            log(f"longrope search: generation {generation + 1}/{generations}, best loss {best_per_generation[-1]:.5f} "
                f"({len(state.scores)} evaluated)")
    best, loss = min(pool, key=lambda item: item[1])
    result = {"long_factor": [float(x) for x in best], "loss": loss, "initial_factor": [float(x) for x in start],
              "initial_loss": initial_loss, "evaluations": len(state.scores),
              "best_per_generation": best_per_generation, "wall_s": round(time.perf_counter() - t0, 3)}
    METHOD.set_factors(model, result["long_factor"], search={k: v for k, v in result.items() if k != "long_factor"})
    return result


def _record(model) -> dict:
    record = getattr(model.config, "ctxext", None)
    if not record or record.get("rope") != "longrope":
        raise ValueError("the model has no longrope applied (config.ctxext)")
    return record


class LongRoPE(RopeMethod):
    name = "longrope"
    rope_type = "longrope"
    description = ("LongRoPE: per-dimension rescale factors (monotonic, found by evolutionary search on validation "
                   "loss), cos/sin x sqrt(1 + ln s / ln L) (HF rope_type 'longrope').")

    def _defaults(self, original_window, target_window, regime):
        # the official dim_mono hyperparameters (evolution/default_hyper_params/dim_mono_llama.json) and seed 42; the
        # tokens scored per candidate: five windows of the target length [assumption: the official script scores
        # `--samples` documents]
        return {"long_factor": None, "short_factor": "long", "search_population": 64, "search_generations": 40,
                "search_parents": 32, "search_mutations": 16, "search_crossovers": 16, "search_crossover_tries": 20,
                "search_step": 0.01, "search_tokens": 5 * int(target_window), "search_seed": 42}

    def _validate(self, params, original_window, target_window):
        for key in SEARCH_KEYS + ("search_tokens",):
            value = params[key]
            least = 0 if key == "search_generations" else 1
            if not isinstance(value, Integral) or isinstance(value, bool) or value < least:
                raise ValueError(f"longrope: {key} must be an integer >= {least}, got {value!r}")
        if params["search_parents"] > params["search_population"]:
            raise ValueError(f"longrope: search_parents={params['search_parents']} exceeds "
                             f"search_population={params['search_population']}")
        if not is_number(params["search_step"]) or params["search_step"] <= 0:
            raise ValueError(f"longrope: search_step must be a number > 0, got {params['search_step']!r}")
        if not isinstance(params["search_seed"], Integral) or isinstance(params["search_seed"], bool):
            raise ValueError(f"longrope: search_seed must be an integer, got {params['search_seed']!r}")
        for key in ("long_factor", "short_factor"):
            value = params[key]
            if value is None and key == "long_factor" or value in SHORT_MODES and key == "short_factor":
                continue
            if not isinstance(value, (list, tuple)) or not value or not all(is_number(x) and x > 0 for x in value):
                allowed = "null (search)" if key == "long_factor" else " or ".join(repr(m) for m in SHORT_MODES)
                raise ValueError(f"longrope: {key} must be {allowed} or a list of positive numbers, got {value!r}")
        return {**params, **{k: [float(x) for x in params[k]] for k in ("long_factor", "short_factor")
                             if isinstance(params[k], (list, tuple))}}

    def factor_sets(self, head_dim, base, original_window, target_window, params) -> tuple[list, list]:
        """(long, short) factors [head_dim // 2] each: the given or searched long factors (the search's start while
        none are given), and the short set per `short_factor`."""
        long = params["long_factor"]
        if long is None:
            long = initial_factors(head_dim, base, original_window, target_window)
        if len(long) != head_dim // 2:
            raise ValueError(f"longrope: long_factor has {len(long)} entries, the rotary dimension {head_dim} needs "
                             f"{head_dim // 2}")
        short = params["short_factor"]
        short = list(long) if short == "long" else [1.0] * (head_dim // 2) if short == "ones" else short
        if len(short) != head_dim // 2:
            raise ValueError(f"longrope: short_factor has {len(short)} entries, the rotary dimension {head_dim} "
                             f"needs {head_dim // 2}")
        return [float(x) for x in long], [float(x) for x in short]

    def _frequencies(self, head_dim, base, original_window, target_window, seq_len, params):
        long, short = self.factor_sets(head_dim, base, original_window, target_window, params)
        factors = long if seq_len is not None and seq_len > original_window else short
        return default_inv_freq(head_dim, base) / torch.tensor(factors, dtype=torch.float32), \
            su_scale(target_window / original_window, original_window)

    def _configure(self, config, head_dim, base, original_window, target_window, params):
        long, short = self.factor_sets(head_dim, base, original_window, target_window, params)
        config.max_position_embeddings = int(target_window)
        set_rope(config, rope_type=self.rope_type, rope_theta=base, long_factor=long, short_factor=short,
                 factor=float(target_window / original_window), original_max_position_embeddings=int(original_window))

    def apply(self, model, original_window, target_window, regime="finetuned", **overrides):
        model = super().apply(model, original_window, target_window, regime, **overrides)
        self._verify_long(model)
        return model

    def _verify_long(self, model) -> None:
        """transformers' long set (used when n > L) against the method's (verify_rotary checked the short set)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        record = model.config.ctxext
        original, target, params = record["original_window"], record["target_window"], record["params"]
        head_dim = rotary_dim(model.config)
        theirs, their_scale = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=original + 1)
        base = float(model.config.rope_parameters["rope_theta"])
        ours, scale = self._frequencies(head_dim, base, original, target, original + 1, params)
        if not torch.allclose(theirs.float().cpu(), ours, rtol=1e-5, atol=0.0) or \
                not math.isclose(their_scale, scale, rel_tol=1e-9):
            raise RuntimeError(f"longrope: transformers' long inv_freq {theirs.tolist()} (scale {their_scale}) differs "
                               f"from the method's {ours.tolist()} (scale {scale})")

    @contextlib.contextmanager
    def fixed_length(self, model, n: int):
        """Inside, every forward uses the factor set of a sequence of n tokens (long for n > L, else short), whatever
        its own length, so that a prompt prefilled in chunks gets the frequencies of one forward over it (transformers
        picks the set per forward from max(position_ids) + 1; trap 2). Nests; restores the per-forward choice."""
        record = _record(model)
        rotary = rotary_module(model)
        inv_freq, _ = self._frequencies(rotary_dim(model.config), float(model.config.rope_parameters["rope_theta"]),
                                        record["original_window"], record["target_window"], int(n), record["params"])
        own_type, saved = rotary.rope_type, rotary.inv_freq.clone()
        rotary.rope_type = _PINNED_TYPE
        rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq))
        try:
            yield
        finally:
            rotary.rope_type = own_type
            rotary.inv_freq.copy_(saved)

    def generation_length(self, model, n_prompt: int):
        """The prompt's factor set for every decoding step: the cached keys keep the set they were rotated with, so a
        generation that crosses L does not switch sets half-way (with the default `short_factor: long` the two sets
        are equal and nothing changes)."""
        return self.fixed_length(model, n_prompt)

    def set_factors(self, model, long_factor: list[float], search: dict | None = None):
        """Install `long_factor` (and the short set that follows from `short_factor`) on a longrope model: config,
        rotary module (rebuilt and verified), `config.ctxext["params"]["long_factor"]`; `search` (a summary) goes to
        `config.ctxext["search"]`. Returns the model."""
        record = _record(model)
        params = {**record["params"], "long_factor": [float(x) for x in long_factor]}
        head_dim, base = rotary_dim(model.config), float(model.config.rope_parameters["rope_theta"])
        original, target = record["original_window"], record["target_window"]
        self._configure(model.config, head_dim, base, original, target, params)
        rebuild_rotary(model)
        inv_freq, scale = self._frequencies(head_dim, base, original, target, None, params)
        verify_rotary(rotary_module(model), inv_freq, scale, self.name)
        record["params"] = params
        if search is not None:
            record["search"] = search
        self._verify_long(model)
        return model


METHOD = LongRoPE()
