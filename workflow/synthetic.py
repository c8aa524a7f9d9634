"""Synthetic retrieval rows mixed into training: seeded builders, the same rows for every method
(docs/retrieval-data.md explains the design and the measurements behind it).

A small model does not learn content-based retrieval from code alone within a CPU budget: it learns a copy head
only from data where copying is the one thing that pays (see the docs). Two kinds of rows replace a share of the
training rows; each comes with a mask of its supervised tokens (the answers and the copies):

- **key/value rows**: one key (a 3-9 digit number) stated once in a haystack (a slice of the training split's
  code, or plain filler sentences), then asked for 1-4 times at gaps drawn half uniformly and half log-uniformly
  over the row, in one of several statement/question templates (so no fixed offset between key and answer
  pays); in `multikey` of them several named keys are stated and one or more of them asked for (RULER's
  multikey form);
- **copy rows**: a random token span (8-24 tokens of the whole vocabulary) and a random digit string (6-16
  digits after a space) inside code, each repeated at random gaps; copying them needs matching on more than
  the previous token (a digit string repeats digits).

Nothing here reads the test split: haystacks are training code or the filler pool, keys are random numbers outside
the evaluation's share of the key space (`workflow.retrieval.is_evaluation_key`), names come from a fixed word
list. Row `i` of a run is a function of (seed, i) only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from workflow.batches import RowMaker
from workflow.retrieval import is_evaluation_key

# Statement and question of a key; {key} the number, {name} the key's name (named templates only).
TEMPLATES: tuple[tuple[str, str], ...] = (
    (" The pass key is {key}. Remember it. {key} is the pass key.", " What is the pass key? The pass key is"),
    (" The pass key is {key}.", " What is the pass key? The pass key is"),
    (" The secret code is {key}.", " What is the secret code? The secret code is"),
    ("\n# The magic number is {key}.\n", "\n# What is the magic number? The magic number is"),
    (" Remember this number: {key}.", " What was the number to remember? It was"),
)
NAMED_TEMPLATES: tuple[tuple[str, str], ...] = (
    (" One of the special magic numbers for {name} is: {key}.", " The special magic number for {name} is:"),
    ("\n{name}_id = {key}\n", "\nassert {name}_id =="),
    (" The number of {name} is {key}.", " How many {name}? The number of {name} is"),
)
FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "Birds sing in the morning.", "The road is long and dry.", "A cat sleeps on the mat.",
    "The wind blows over the hills.", "Snow falls in winter.", "The lamp is on the table.", "Rain taps on the window.",
    "The train leaves at noon.", "Leaves turn red in autumn.", "The bread is warm.", "A dog barks at night.",
    "The clock ticks on the wall.", "Fish swim in the lake.", "The door is open.", "Stars shine at night.",
    "The garden is full of roses.", "The coffee is hot.", "Children play in the park.", "The moon is bright.",
)
NAMES = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "eagle", "forest", "silver",
         "garden", "winter", "rocket", "candle", "harbor", "meadow", "falcon", "copper", "violet", "marble", "pepper",
         "orbit", "saddle", "cactus", "walnut", "canyon", "dragon", "island")
KEY_DIGITS = (3, 9)          # key lengths, inclusive
SPAN_TOKENS = (8, 24)        # copy rows: random token span length, inclusive
DIGIT_STRING = (6, 16)       # copy rows: digits of the random digit string, inclusive
QUERIES = (1, 4)             # questions per key/value row, inclusive
NAMED_KEYS = (2, 4)          # keys stated in a multikey row, inclusive
_STREAM = 104729             # separates the rows' random streams from other users of the same seed


@dataclass(frozen=True)
class Mix:
    """Shares of the training rows that are synthetic (the rest are corpus rows)."""

    kv: float = 0.0          # key/value rows
    copy: float = 0.0        # copy rows
    multikey: float = 0.3    # share of key/value rows with several named keys
    code_haystack: float = 0.5   # share of key/value rows whose haystack is code (else filler sentences)

    def __post_init__(self):
        for name in ("kv", "copy", "multikey", "code_haystack"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"synthetic share {name} must be in [0, 1], got {value!r}")
        if self.kv + self.copy > 1.0:
            raise ValueError(f"synthetic shares kv + copy = {self.kv + self.copy} exceed 1")

    @property
    def total(self) -> float:
        return self.kv + self.copy


def _gap(rng: np.random.Generator, most: int) -> int:
    """A gap in 0..most: half the time uniform, half log-uniform (many short gaps, a long tail)."""
    most = max(0, int(most))
    if rng.random() < 0.5:
        return int(rng.integers(0, most + 1))
    return int(math.exp(rng.uniform(0.0, math.log(most + 1)))) - 1


def _assemble(haystack: list[int], inserts: list[tuple[int, list[int], list[int]]]) -> tuple[list[int], list[int]]:
    """The haystack with pieces inserted at offsets (stable for equal offsets), and the pieces' masks."""
    ids, mask, prev = [], [], 0
    for offset, piece, piece_mask in sorted(inserts, key=lambda x: x[0]):
        ids += haystack[prev:offset]
        mask += [0] * (offset - prev)
        ids += piece
        mask += piece_mask
        prev = offset
    ids += haystack[prev:]
    mask += [0] * (len(haystack) - prev)
    return ids, mask


class SyntheticRows:
    """Builds synthetic rows for a training stream. `encode` turns text into token ids (no special tokens),
    `code` is the training split's token stream (haystacks), `vocabulary` the token ids a random span draws from,
    `space_id`/`digit_ids` the tokens of ' ' before a number and of the ten digits (digits are single tokens)."""

    def __init__(self, encode: Callable[[str], list[int]], code: np.ndarray, vocabulary: np.ndarray, space_id: int,
                 digit_ids: list[int], mix: Mix, seed: int):
        self.encode, self.code, self.vocabulary = encode, code, np.asarray(vocabulary)
        self.space_id, self.digit_ids, self.mix, self.seed = int(space_id), list(digit_ids), mix, int(seed)
        self.filler = [encode(" " + sentence) for sentence in FILLER]
        self._encoded: dict[str, list[int]] = {}
        if len(code) < 2:
            raise ValueError("the training stream is too short for synthetic haystacks")

    def _enc(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = self.encode(text)
        return ids

    # --- pieces ---------------------------------------------------------------------------------------------------
    def key(self, rng: np.random.Generator) -> str:
        while True:
            digits = int(rng.integers(KEY_DIGITS[0], KEY_DIGITS[1] + 1))
            key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
            if not is_evaluation_key(key):
                return key

    def code_slice(self, rng: np.random.Generator, n: int) -> list[int]:
        start = int(rng.integers(0, max(1, len(self.code) - n)))
        return [int(t) for t in self.code[start:start + n]]

    def filler_text(self, rng: np.random.Generator, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            out += self.filler[int(rng.integers(len(self.filler)))]
        return out[:n]

    # --- rows -----------------------------------------------------------------------------------------------------
    def kv_row(self, rng: np.random.Generator, T: int) -> tuple[list[int], list[int]] | None:
        if rng.random() < self.mix.multikey:
            n_keys = int(rng.integers(NAMED_KEYS[0], NAMED_KEYS[1] + 1))
            names = [str(n) for n in rng.choice(NAMES, size=n_keys, replace=False)]
            statement, question = NAMED_TEMPLATES[int(rng.integers(len(NAMED_TEMPLATES)))]
        else:
            names = [str(rng.choice(NAMES))]
            pool = TEMPLATES + NAMED_TEMPLATES
            statement, question = pool[int(rng.integers(len(pool)))]
        keys = [self.key(rng) for _ in names]
        stated = [self._enc(statement.format(key=k, name=n)) for k, n in zip(keys, names)]
        asked = [int(rng.integers(len(names))) for _ in range(int(rng.integers(QUERIES[0], QUERIES[1] + 1)))]
        queries = []
        for a in asked:
            q, answer = self._enc(question.format(name=names[a])), self._enc(" " + keys[a])
            queries.append((q + answer, [0] * len(q) + [1] * len(answer)))
        n_hay = T - sum(map(len, stated)) - sum(len(q) for q, _ in queries)
        if n_hay < 1:
            return None
        hay = self.code_slice(rng, n_hay) if rng.random() < self.mix.code_haystack else self.filler_text(rng, n_hay)
        gaps = [_gap(rng, n_hay) for _ in queries]
        last_statement = int(rng.integers(0, n_hay - max(gaps) + 1))
        offsets = sorted(int(x) for x in rng.integers(0, last_statement + 1, size=len(stated) - 1)) + [last_statement]
        inserts = [(o, s, [0] * len(s)) for o, s in zip(offsets, stated)]
        inserts += [(last_statement + g, q, m) for g, (q, m) in zip(gaps, queries)]
        return _assemble(hay, inserts)

    def copy_row(self, rng: np.random.Generator, T: int) -> tuple[list[int], list[int]] | None:
        span = [int(t) for t in rng.choice(self.vocabulary, size=int(rng.integers(SPAN_TOKENS[0], SPAN_TOKENS[1] + 1)))]
        digits = [self.space_id] + [self.digit_ids[int(d)] for d in
                                    rng.integers(0, 10, size=int(rng.integers(DIGIT_STRING[0], DIGIT_STRING[1] + 1)))]
        units = [(span, 1), (digits, int(rng.integers(1, 3)))]
        n_hay = T - sum(len(u) * (1 + r) for u, r in units)
        if n_hay < 1:
            return None
        hay, inserts = self.code_slice(rng, n_hay), []
        for unit, repeats in units:
            gaps = [_gap(rng, n_hay) for _ in range(repeats)]
            first = int(rng.integers(0, n_hay - max(gaps) + 1))
            inserts.append((first, unit, [0] * len(unit)))
            inserts += [(first + g, unit, [0] + [1] * (len(unit) - 1)) for g in gaps]
        return _assemble(hay, inserts)

    def row(self, i: int, T: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(token ids [T], supervised mask [T]) of synthetic row i, or None when row i stays a corpus row (or no
        synthetic row fits T tokens)."""
        if self.mix.total <= 0:
            return None
        rng = np.random.default_rng([self.seed, _STREAM, int(i)])
        u = rng.random()
        if u < self.mix.kv:
            built = self.kv_row(rng, T)
        elif u < self.mix.total:
            built = self.copy_row(rng, T)
        else:
            return None
        if built is None:
            return None
        ids, mask = built
        if len(ids) != T:
            raise AssertionError(f"synthetic row of {len(ids)} tokens, expected {T}")
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)


def for_tokenizer(tokenizer, code: np.ndarray, mix: Mix, seed: int) -> SyntheticRows:
    """SyntheticRows for a Hugging Face tokenizer whose digits are single tokens (the study tokenizers)."""
    encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    space = encode(" 5")
    digit_ids = [encode(str(d)) for d in range(10)]
    if len(space) != 2 or any(len(d) != 1 for d in digit_ids):
        raise ValueError("synthetic rows need a tokenizer that splits digits into single tokens and a space token "
                         f"before a number (' 5' -> {space})")
    special = set(tokenizer.all_special_ids)
    vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    return SyntheticRows(encode, code, vocabulary, space[0], [d[0] for d in digit_ids], mix, seed)


def row_maker(tokenizer, code: np.ndarray, synthetic_cfg: dict, shares: dict, seed: int):
    """The batches' RowMaker for a training stage: `synthetic_cfg` is `data.synthetic` (mix shape, answer_only,
    weight), `shares` the stage's {kv, copy} shares (they override the data config's)."""
    mix = Mix(kv=float(shares.get("kv", synthetic_cfg["kv"])), copy=float(shares.get("copy", synthetic_cfg["copy"])),
              multikey=float(synthetic_cfg["multikey"]), code_haystack=float(synthetic_cfg["code_haystack"]))
    rows = for_tokenizer(tokenizer, code, mix, seed) if mix.total > 0 else None
    return RowMaker(rows, answer_only=synthetic_cfg["answer_only"], weight=synthetic_cfg["weight"] if rows else None)
