"""Seeded builders of the retrieval evaluation sets (the data stage writes them; training rows are built by
`workflow.synthetic` and never use these sets' keys).

- passkey (Mohtashami & Jaggi, 2023): a 5-digit key hidden at a relative depth inside repeated
  filler sentences, asked for at the end.
- needle: a "magic number" line hidden at a relative depth inside a slice of held-out text.

Prompts are built by concatenating separately tokenized pieces (the fixed pieces are tokenized once
per tokenizer), so every row has exactly the requested length: len(input_ids) + len(answer_ids).
Every function takes a numpy Generator; the same seed gives the same rows on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_KEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
NEEDLE = "\n# The magic number is {key}.\n"
NEEDLE_QUESTION = "\n# What is the magic number? The magic number is"
ANSWER = " {key}"
KEY_LOW, KEY_HIGH = 10000, 100000  # 5-digit keys: integers in [KEY_LOW, KEY_HIGH)
EVALUATION_KEY_SHARE = 8            # one number in 8 is an evaluation key (is_evaluation_key)

TASKS = ("passkey", "needle")


@dataclass(frozen=True)
class Pieces:
    """An encoder (text -> token ids, no special tokens) and the token ids of the fixed prompt pieces."""

    encode: Callable[[str], list[int]]
    intro: tuple[int, ...]
    filler: tuple[int, ...]
    passkey_question: tuple[int, ...]
    needle_question: tuple[int, ...]


_PIECES_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _encoder(tokenizer_or_fn) -> Callable[[str], list[int]]:
    if hasattr(tokenizer_or_fn, "encode"):
        return lambda text: list(tokenizer_or_fn.encode(text, add_special_tokens=False))
    if callable(tokenizer_or_fn):
        return lambda text: list(tokenizer_or_fn(text))
    raise TypeError(f"expected a tokenizer or a text -> ids function, got {type(tokenizer_or_fn).__name__}")


def pieces(tokenizer_or_fn) -> Pieces:
    """The fixed pieces tokenized once per tokenizer (or encoder function); cached while it lives."""
    if isinstance(tokenizer_or_fn, Pieces):
        return tokenizer_or_fn
    try:
        return _PIECES_CACHE[tokenizer_or_fn]
    except (KeyError, TypeError):
        pass
    encode = _encoder(tokenizer_or_fn)
    out = Pieces(encode, tuple(encode(PASSKEY_INTRO)), tuple(encode(PASSKEY_FILLER)),
                 tuple(encode(PASSKEY_QUESTION)), tuple(encode(NEEDLE_QUESTION)))
    if not out.filler:
        raise ValueError("the tokenizer encodes the passkey filler to no tokens")
    try:
        _PIECES_CACHE[tokenizer_or_fn] = out
    except TypeError:  # not weak-referenceable: no caching
        pass
    return out


def is_evaluation_key(key: str) -> bool:
    """Whether a number (as text) belongs to the evaluation's share of the key space: a fixed hash puts one number
    in EVALUATION_KEY_SHARE there. The evaluation sets (passkey, needle, RULER's numbers) draw only such keys and
    training rows (workflow.synthetic) never, so no evaluation key appears in training whatever the sets' size."""
    return hashlib.sha256(f"ctxext-evaluation-key:{key}".encode()).digest()[0] % EVALUATION_KEY_SHARE == 0


def evaluation_key(rng: np.random.Generator, low: int = KEY_LOW, high: int = KEY_HIGH) -> str:
    """A random evaluation key: an integer in [low, high) drawn until it is one (is_evaluation_key)."""
    while True:
        key = str(int(rng.integers(low, high)))
        if is_evaluation_key(key):
            return key


def _key(rng: np.random.Generator) -> str:
    return evaluation_key(rng)


def _repeat(ids: tuple[int, ...], n: int) -> list[int]:
    """`ids` repeated and cut to exactly n tokens."""
    reps = -(-n // len(ids)) if n > 0 else 0
    return list(ids * reps)[:n]


def _insert_at(n: int, depth: float) -> int:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    return int(round(depth * n))


def passkey_example(tokenizer_or_ids_fn, length: int, depth: float, rng: np.random.Generator) -> dict:
    """One passkey row of exactly `length` tokens (prompt + answer); the key sentence starts at token
    `needle_pos`, at relative position `depth` of the filler."""
    p = pieces(tokenizer_or_ids_fn)
    key = _key(rng)
    key_ids = p.encode(PASSKEY_KEY.format(key=key))
    answer_ids = p.encode(ANSWER.format(key=key))
    fixed = len(p.intro) + len(key_ids) + len(p.passkey_question) + len(answer_ids)
    n_fill = length - fixed
    if n_fill < 0:
        raise ValueError(f"passkey length {length} is too short: the intro, key sentence, question and answer "
                         f"alone take {fixed} tokens with this tokenizer")
    filler = _repeat(p.filler, n_fill)
    at = _insert_at(n_fill, depth)
    input_ids = list(p.intro) + filler[:at] + key_ids + filler[at:] + list(p.passkey_question)
    return {"task": "passkey", "eval_len": int(length), "depth": float(depth), "input_ids": input_ids,
            "answer_ids": answer_ids, "answer": key, "needle_pos": len(p.intro) + at}


def needle_example(haystack_ids, tokenizer, length: int, depth: float, rng: np.random.Generator) -> dict:
    """One needle row of exactly `length` tokens: a random contiguous slice of `haystack_ids` with the
    magic-number line inserted at token `needle_pos` (relative position `depth` of the slice)."""
    p = pieces(tokenizer)
    key = _key(rng)
    needle_ids = p.encode(NEEDLE.format(key=key))
    answer_ids = p.encode(ANSWER.format(key=key))
    fixed = len(needle_ids) + len(p.needle_question) + len(answer_ids)
    n_hay = length - fixed
    if n_hay < 0:
        raise ValueError(f"needle length {length} is too short: the needle, question and answer alone take "
                         f"{fixed} tokens with this tokenizer")
    if len(haystack_ids) < n_hay:
        raise ValueError(f"needle length {length} needs a haystack of {n_hay} tokens, but the haystack stream "
                         f"has only {len(haystack_ids)}")
    start = int(rng.integers(0, len(haystack_ids) - n_hay + 1))
    hay = [int(t) for t in haystack_ids[start:start + n_hay]]
    at = _insert_at(n_hay, depth)
    input_ids = hay[:at] + needle_ids + hay[at:] + list(p.needle_question)
    return {"task": "needle", "eval_len": int(length), "depth": float(depth), "input_ids": input_ids,
            "answer_ids": answer_ids, "answer": key, "needle_pos": at}


def _row_rng(seed: int, task: str, length: int, depth_index: int, sample: int) -> np.random.Generator:
    """Each row has its own stream: adding a length or depth to the grid leaves the other rows unchanged."""
    return np.random.default_rng([int(seed), TASKS.index(task), int(length), depth_index, sample])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build_retrieval_sets(tokenizer, test_ids, cfg: dict, out_dir: Path) -> dict:
    """Write passkey.jsonl and needle.jsonl (haystacks from `test_ids`) for every length x depth x sample
    of `cfg` (keys: lengths, depths, samples, seed). Lengths too short for a task are skipped with a
    warning. Returns, per task, the number of rows and the lengths written and skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test_ids = np.asarray(test_ids)
    summary = {}
    for task in TASKS:
        rows, written, skipped = [], [], []
        for length in cfg["lengths"]:
            try:
                block = []
                for d_index, depth in enumerate(cfg["depths"]):
                    for sample in range(int(cfg["samples"])):
                        rng = _row_rng(cfg["seed"], task, length, d_index, sample)
                        if task == "passkey":
                            row = passkey_example(tokenizer, length, depth, rng)
                        else:
                            row = needle_example(test_ids, tokenizer, length, depth, rng)
                        block.append({"task": task, "eval_len": row["eval_len"], "depth": row["depth"],
                                      "sample": sample, "input_ids": row["input_ids"],
                                      "answer_ids": row["answer_ids"], "answer": row["answer"],
                                      "needle_pos": row["needle_pos"]})
            except ValueError as exc:
                print(f"[ctxext] WARNING: skipping {task} length {length}: {exc}", file=sys.stderr, flush=True)
                skipped.append(int(length))
                continue
            rows.extend(block)
            written.append(int(length))
        _write_jsonl(out_dir / f"{task}.jsonl", rows)
        summary[task] = {"rows": len(rows), "lengths": written, "skipped_lengths": skipped}
    return summary
