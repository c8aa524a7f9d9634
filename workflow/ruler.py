"""Seeded RULER-style synthetic tasks (Hsieh et al., 2024), sized by the study's tokenizer, with the
haystacks drawn from the study's held-out test corpus.

The 13 families follow RULER's definitions (templates, needle counts, answer sets) and scoring
(`string_match_all`: the share of reference strings found, case-insensitively, in the prediction;
`string_match_part` for QA). What differs from RULER's own generators, and why:

- Every sample has its own random stream, `(seed, family, length, sample)`: the same seed gives the same
  prompts on every run, and adding a length leaves the other samples unchanged.
- "essay" haystacks are lines of the study's test split (RULER: Paul Graham essays, a hub download);
  the key words of NIAH and the words of CWE are words of that same corpus (RULER: wonderwords' lists).
- Sizing is a bounded binary search over the number of haystack units: the prompt plus the family's
  generation budget fills the requested length (never exceeds it, and falls short by less than one
  haystack unit). A length too short for a family is skipped with a reason, never looped on.
- The generation budgets are sized to the answers as a 512-token vocabulary spells them (a 7-digit
  number: 8 tokens, a uuid: 35), with room to spare: 16 tokens for one number, 48 for a uuid or four
  numbers, 32 for VT's five names and FWE's three words, 96 for CWE's ten words (RULER: 128, 128, 30,
  50, 120). Every generated token costs a forward pass over the whole prompt here. The answer prefix is
  part of the prompt, as RULER does for base models.
- QA needs question/answer data, which has no offline source: qa_1 / qa_2 run only when a local JSONL
  file is configured (rows `{"question": str, "answers": [str, ...], "documents": [str, ...]}`, the
  documents being the gold paragraphs; the other rows' documents serve as distractors).
"""
from __future__ import annotations

import functools
import json
import math
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow.retrieval import PASSKEY_FILLER, evaluation_key

NOISE = PASSKEY_FILLER.strip()  # RULER's "repeat" haystack / VT noise sentence
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_v} for {query} mentioned in the provided text?"
                 " The special magic {type_v} for {query} mentioned in the provided text are")
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above."
               " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
               "are assgined the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?"
                " Answer: The top 10 words that appear most often in the list are:")
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                "text? Answer: According to the coded text above, the three most frequently appeared words are:")
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
               "the given documents. Only give me the answer and do not output any other words.\n\n"
               "Question: {query} Answer:")
DEPTHS = np.linspace(0.0, 1.0, 40)  # RULER's 40 insertion depths


@dataclass(frozen=True)
class Family:
    kind: str                 # niah, vt, cwe, fwe, qa
    gen_toks: int             # generation budget (max_gen_toks of the lm-eval task)
    haystack: str = ""        # niah: repeat, essay, needle
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


FAMILIES: dict[str, Family] = {
    "niah_single_1": Family("niah", 16, "repeat"),
    "niah_single_2": Family("niah", 16, "essay"),
    "niah_single_3": Family("niah", 48, "essay", type_v="uuids"),
    "niah_multikey_1": Family("niah", 16, "essay", num_k=4),
    "niah_multikey_2": Family("niah", 16, "needle"),
    "niah_multikey_3": Family("niah", 48, "needle", type_k="uuids", type_v="uuids"),
    "niah_multivalue": Family("niah", 48, "essay", num_v=4),
    "niah_multiquery": Family("niah", 48, "essay", num_q=4),
    "vt": Family("vt", 32),
    "cwe": Family("cwe", 96),
    "fwe": Family("fwe", 32),
    "qa_1": Family("qa", 32),
    "qa_2": Family("qa", 32),
}


class DoesNotFit(ValueError):
    """The family's fixed parts and minimum haystack do not fit the requested length."""


# ------------------------------------------------------------------------------------------------
# Scoring (RULER's)
# ------------------------------------------------------------------------------------------------

def postprocess(prediction: str) -> str:
    """RULER's prediction clean-up: strip, and turn control characters into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def score(family: str, prediction: str, references: list[str]) -> float:
    """string_match_all (share of references found in the prediction, case-insensitive); QA families
    use string_match_part, which for one prediction is any-match over the accepted answers."""
    pred = postprocess(prediction).lower()
    found = [r.lower() in pred for r in references]
    if FAMILIES[family].kind == "qa":
        return float(any(found))
    return sum(found) / len(found)


# ------------------------------------------------------------------------------------------------
# Sources: the tokenizer's encoder, the test corpus as text, its words
# ------------------------------------------------------------------------------------------------

@dataclass
class Source:
    encode: object            # text -> token ids (no special tokens)
    corpus: str               # the test split decoded to text
    words: list[str]          # distinct lowercase words of the corpus (sorted)
    qa: dict                  # family -> list of QA rows (only the configured ones)


def corpus_words(text: str) -> list[str]:
    return sorted(set(re.findall(r"\b[a-z]{4,10}\b", text)))


def load_qa(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not (isinstance(row.get("question"), str) and isinstance(row.get("answers"), list) and row["answers"]
                and isinstance(row.get("documents"), list) and row["documents"]):
            raise ValueError(f"{path}: row {i} is not {{'question': str, 'answers': [str, ...], "
                             f"'documents': [str, ...]}}")
    if len(rows) < 2:
        raise ValueError(f"{path}: a QA file needs at least 2 rows (the others' documents are the distractors)")
    return rows


def make_source(tokenizer, test_ids, qa_files: dict | None = None) -> Source:
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    corpus = tokenizer.decode([int(t) for t in test_ids], skip_special_tokens=True)
    qa = {fam: load_qa(path) for fam, path in (qa_files or {}).items() if path}
    return Source(encode, corpus, corpus_words(corpus), qa)


# ------------------------------------------------------------------------------------------------
# Sizing
# ------------------------------------------------------------------------------------------------

def fit(build, budget: int, encode, lo: int, hi: int):
    """The largest n in [lo, hi] whose prompt build(n) (-> (text, ...)) has at most `budget` tokens, found
    by binary search (prompt length grows with n); DoesNotFit when even n = lo is too long."""
    best = build(lo)
    if len(encode(best[0])) > budget:
        raise DoesNotFit(f"the smallest prompt ({lo} haystack units) takes {len(encode(best[0]))} tokens, "
                         f"more than the {budget} available")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        out = build(mid)
        if len(encode(out[0])) <= budget:
            lo, best = mid, out
        else:
            hi = mid - 1
    return best


def _random(kind: str, rng: np.random.Generator, words: list[str]) -> str:
    if kind == "numbers":
        return evaluation_key(rng, 1_000_000, 10_000_000)  # 7 digits, as RULER (never a training key)
    if kind == "words":
        return words[int(rng.integers(len(words)))]
    if kind == "uuids":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """units with items inserted at the unit boundaries nearest the relative positions `depths` (sorted),
    measured in characters of the haystack (units differ in length: lines of the corpus)."""
    bounds = np.concatenate([[0], np.cumsum([len(u) for u in units])])  # character offset of each boundary
    out, prev = [], 0
    for item, depth in zip(items, depths):
        at = int(np.abs(bounds - depth * bounds[-1]).argmin())
        at = max(at, prev)
        out += units[prev:at] + [item]
        prev = at
    return out + units[prev:]


def _niah(fam: Family, src: Source, budget: int, rng: np.random.Generator) -> dict:
    num_k = max(fam.num_k, fam.num_q)
    keys = []
    while len(keys) < num_k:  # distinct keys
        key = _random(fam.type_k, rng, src.words)
        if key not in keys:
            keys.append(key)
    values = [[_random(fam.type_v, rng, src.words) for _ in range(fam.num_v)] for _ in keys]
    type_v = fam.type_v
    needles = [NIAH_NEEDLE.format(type_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    order = rng.permutation(len(needles))
    needles = [needles[i] for i in order]
    depths = sorted(float(d) for d in rng.choice(DEPTHS, size=len(needles), replace=False))
    queried = sorted(int(i) for i in rng.choice(num_k, size=fam.num_q, replace=False))
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template = NIAH_TEMPLATE
    if fam.num_q * fam.num_v == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_v = type_v[:-1]
    if fam.haystack == "essay":
        start = int(rng.integers(0, max(1, len(src.corpus) - 8 * budget)))
        units = [line for line in src.corpus[start:start + 16 * budget].split("\n") if line.strip()]
    elif fam.haystack == "repeat":
        units = [NOISE] * budget
    else:  # "needle": distractor needles with other keys and values
        units = [NIAH_NEEDLE.format(type_v=fam.type_v, key=_random(fam.type_k, rng, src.words),
                                    value=_random(fam.type_v, rng, src.words)) for _ in range(budget // 8 + 1)]

    def build(n):
        context = "\n".join(_insert(units[:n], needles, depths))
        return template.format(type_v=type_v, context=context, query=query), context

    prompt, context = fit(build, budget, src.encode, 0, len(units))
    first = NIAH_NEEDLE.format(type_v=fam.type_v, key=queries[0], value=values[queried[0]][0])
    return {"input": prompt, "outputs": answers, "depth": depths[needles.index(first)]}


def _vt(fam: Family, src: Source, budget: int, rng: np.random.Generator, num_hops: int = 4) -> dict:
    names = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choice(list(string.ascii_uppercase), size=5))
        if name not in names:
            names.append(name)
    value = evaluation_key(rng, 10000, 100000)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    depths = sorted(float(d) for d in rng.choice(DEPTHS, size=len(chain), replace=False))

    def build(n):
        context = " ".join(_insert([NOISE + "\n"] * n, chain, depths)).replace(". \n", ".\n")
        return VT_TEMPLATE.format(context=context, query=value, num_v=num_hops + 1), context

    prompt, _ = fit(build, budget, src.encode, 0, budget)
    return {"input": prompt, "outputs": names, "depth": depths[0]}


def _cwe(fam: Family, src: Source, budget: int, rng: np.random.Generator, length: int, num_cw: int = 10) -> dict:
    # RULER's repetitions: below 4096 tokens the common words appear 6 times and the others once (with a
    # 20-word worked example); from 4096 on, 30 and 3 times (with a 40-word example).
    freq_cw, freq_ucw, ex_words, ex_cw, ex_ucw = (6, 1, 20, 3, 1) if length < 4096 else (30, 3, 40, 10, 3)
    if len(src.words) < 2 * num_cw + ex_words:
        raise DoesNotFit(f"the test corpus has only {len(src.words)} distinct words")
    pool = [src.words[i] for i in rng.permutation(len(src.words))]
    example_words, pool = pool[:ex_words], pool[ex_words:]
    shuffle_seed = int(rng.integers(2**32))

    def numbered(words, common_reps, other_reps):
        common, other = words[:num_cw], words[num_cw:]
        listed = common * common_reps + other * other_reps
        perm = np.random.default_rng([shuffle_seed, len(words)]).permutation(len(listed))
        return " ".join(f"{i + 1}. {listed[j]}" for i, j in enumerate(perm)), common

    ex_context, ex_answer = numbered(example_words, ex_cw, ex_ucw)
    example = (CWE_TEMPLATE.format(context=ex_context) + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))

    def build(n):
        context, answer = numbered(pool[:n], freq_cw, freq_ucw)
        return example + "\n" + CWE_TEMPLATE.format(context=context), answer

    prompt, answer = fit(build, budget, src.encode, 2 * num_cw, len(pool))
    return {"input": prompt, "outputs": answer, "depth": None}


def _fwe(fam: Family, src: Source, budget: int, rng: np.random.Generator, vocab_size: int = 2000,
         alpha: float = 2.0) -> dict:
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choice(list(string.ascii_lowercase), size=6)))
    vocab = sorted(vocab)
    vocab = [vocab[i] for i in rng.permutation(len(vocab))]
    vocab[0] = "..."  # the most frequent "word" is noise
    zeta = math.pi ** 2 / 6  # zeta(2); alpha is 2 as in RULER
    weights = np.arange(1, vocab_size + 1, dtype=float) ** -alpha / zeta
    shuffle_seed = int(rng.integers(2**32))

    def counts(n):
        return (n * weights).astype(int)

    def build(n):
        words = [w for w, c in zip(vocab, counts(n)) for _ in range(c)]
        words = [words[i] for i in np.random.default_rng(shuffle_seed).permutation(len(words))]
        return FWE_TEMPLATE.format(context=" ".join(words)), None

    # the answer (ranks 2-4) is unambiguous only when their counts exceed rank 5's
    lo = next((n for n in range(10, 10 * budget) if counts(n)[3] > counts(n)[4]), None)
    prompt, _ = fit(build, budget, src.encode, lo, 10 * budget)
    return {"input": prompt, "outputs": vocab[1:4], "depth": None}


def _qa(fam: Family, src: Source, budget: int, rng: np.random.Generator, family: str) -> dict:
    rows = src.qa[family]
    gold_index = int(rng.integers(len(rows)))
    gold = rows[gold_index]
    distractors = [d for i in rng.permutation(len(rows)) if i != gold_index for d in rows[i]["documents"]]
    depth = float(rng.choice(DEPTHS))

    def build(n):
        docs = _insert(distractors[:n], gold["documents"], [depth] * len(gold["documents"]))
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        return QA_TEMPLATE.format(context=context, query=gold["question"]), None

    prompt, _ = fit(build, budget, src.encode, 0, len(distractors))
    return {"input": prompt, "outputs": list(gold["answers"]), "depth": depth}


def example(family: str, src: Source, length: int, seed: int, sample: int) -> dict:
    """One sample of `family` at `length` tokens (prompt + generation budget); DoesNotFit if impossible."""
    fam = FAMILIES[family]
    rng = np.random.default_rng([int(seed), list(FAMILIES).index(family), int(length), int(sample)])
    budget = int(length) - fam.gen_toks
    if budget <= 0:
        raise DoesNotFit(f"the generation budget ({fam.gen_toks} tokens) leaves no room for a prompt")
    if fam.kind == "niah":
        row = _niah(fam, src, budget, rng)
    elif fam.kind == "vt":
        row = _vt(fam, src, budget, rng)
    elif fam.kind == "cwe":
        row = _cwe(fam, src, budget, rng, int(length))
    elif fam.kind == "fwe":
        row = _fwe(fam, src, budget, rng)
    else:
        row = _qa(fam, src, budget, rng, family)
    return {"family": family, "eval_len": int(length), "sample": int(sample), **row}


def unavailable(family: str, src: Source) -> str | None:
    """Why a family cannot run at all here (None if it can)."""
    if FAMILIES[family].kind == "qa" and family not in src.qa:
        return (f"{family} needs question-answering data and none is available offline; set "
                f"eval.ruler.qa_files.{family} to a local JSONL file (see workflow/ruler.py)")
    return None


def build_family(family: str, src: Source, lengths, samples: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(docs, skipped): `samples` docs per length; each length the family cannot fill is skipped."""
    if family not in FAMILIES:
        raise ValueError(f"unknown RULER family {family!r}; valid: {', '.join(FAMILIES)}")
    reason = unavailable(family, src)
    if reason:
        return [], [{"task": family, "reason": reason}]
    docs, skipped = [], []
    for length in lengths:
        try:
            docs += [example(family, src, length, seed, i) for i in range(int(samples))]
        except DoesNotFit as exc:
            skipped.append({"task": family, "eval_len": int(length), "reason": str(exc)})
    return docs, skipped


# ------------------------------------------------------------------------------------------------
# The study's data directory as a source (cached per process: lm-eval's task loader and the evaluate
# stage ask for the same docs)
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def study_source(tokenizer_dir: str, test_tokens: str, qa_files: tuple = ()) -> Source:
    """The source of a study: its tokenizer directory and its test split (a .npy token file)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return make_source(tokenizer, np.load(test_tokens, mmap_mode="r"), dict(qa_files))


@functools.lru_cache(maxsize=64)
def study_family(tokenizer_dir: str, test_tokens: str, family: str, lengths: tuple, samples: int, seed: int,
                 qa_files: tuple = ()):
    return build_family(family, study_source(tokenizer_dir, test_tokens, qa_files), lengths, samples, seed)


def task_metadata(data_dir: str | Path, ruler_cfg: dict) -> dict:
    """What the lm-eval task files need (passed as TaskManager metadata): the tokenizer, the test tokens,
    the lengths, samples per length, seed and QA files."""
    data_dir = Path(data_dir).resolve()
    return {"tokenizer": str(data_dir / "tokenizer"), "test_tokens": str(data_dir / "test.npy"),
            "max_seq_lengths": [int(n) for n in ruler_cfg["lengths"]], "samples": int(ruler_cfg["samples"]),
            "seed": int(ruler_cfg["seed"]), "qa_files": {k: str(v) for k, v in (ruler_cfg.get("qa_files") or {}).items() if v}}


def metadata_family(family: str, meta: dict):
    """study_family called with task_metadata's dictionary."""
    return study_family(meta["tokenizer"], meta["test_tokens"], family, tuple(meta["max_seq_lengths"]),
                        int(meta["samples"]), int(meta["seed"]), tuple(sorted((meta.get("qa_files") or {}).items())))
