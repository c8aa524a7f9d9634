"""The corpus of a study: its sources (the standard library, a local folder, a `datasets` dataset), the split by
file, the byte-level BPE tokenizer, and EOS-separated token streams (used by the data stage,
`workflow.stages.data`, and by the scorers that cut documents out of a stream)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

SPLITS = ("train", "validation", "test")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
MODEL_MAX_LENGTH = 1_000_000
LOCAL_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
JSONL_TEXT_FIELD = "text"
# Path components never taken from the standard library: tests, third-party packages, caches, and the
# interpreter's build configuration (machine-specific).
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
STDLIB_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")
ENCODE_CHUNK = 256  # documents per batch-encoding call


# ----------------------------------------------------------------------------------------- sources

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted relative paths of the standard library's .py files, test directories and
    site-packages excluded."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if set(parts[:-1]) & STDLIB_EXCLUDED_DIRS or any(p.startswith(STDLIB_EXCLUDED_PREFIXES) for p in parts):
            continue
        if path.is_file():
            out.append(path.relative_to(root).as_posix())
    return sorted(out)


def _decode(raw: bytes, max_bytes: int | None) -> str:
    """UTF-8 text (undecodable bytes replaced), cut to at most max_bytes bytes at a character boundary."""
    text = raw.decode("utf-8", errors="replace")
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return text


class Source:
    """A corpus: sorted document names, a reader of one document's text, and a description."""

    def __init__(self, names: list[str], read: Callable[[str], str], info: dict):
        self.names, self.read, self.info = names, read, info


def stdlib_source(cfg: dict) -> Source:
    root = stdlib_root()
    names = stdlib_files(root)
    if not names:
        raise FileNotFoundError(f"no standard-library .py files found under {root}")
    version = platform.python_version()
    info = {"source": "stdlib", "root": str(root), "python_version": version,
            "description": (f"Python {version} standard library source ({len(names)} .py files; test "
                            f"directories, site-packages and build configuration excluded). Other Python "
                            f"versions give a different corpus.")}
    return Source(names, lambda name: _decode((root / name).read_bytes(), cfg.get("max_bytes_per_file")), info)


def local_source(cfg: dict) -> Source:
    """Every .txt/.md/.py file under `path` is a document; each line of a .jsonl file is one (its
    "text" field), named `<file>:<line number>`."""
    if not cfg.get("path"):
        raise ValueError("data.source is 'local' but data.path is not set")
    root = Path(cfg["path"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {root} (source 'local') does not exist or is not a directory")
    max_bytes = cfg.get("max_bytes_per_file")
    docs: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        if path.suffix != ".jsonl":
            docs[rel] = _decode(path.read_bytes(), max_bytes)
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[JSONL_TEXT_FIELD]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: expected a JSON object with a {JSONL_TEXT_FIELD!r} "
                                 f"field ({exc})") from exc
            docs[f"{rel}:{number}"] = _decode(str(text).encode("utf-8"), max_bytes)
    if not docs:
        raise FileNotFoundError(f"data.path {root} (source 'local') holds no {'/'.join(LOCAL_SUFFIXES)} files")
    info = {"source": "local", "root": str(root.resolve()),
            "description": f"local corpus at {root} ({len(docs)} documents)"}
    return Source(sorted(docs), docs.__getitem__, info)


def hf_source(cfg: dict) -> Source:
    """The rows of a Hugging Face `datasets` dataset; document names are row indices."""
    name, split, field = cfg.get("hf_name"), cfg.get("hf_split") or "train", cfg.get("hf_text_field") or "text"
    if not name:
        raise ValueError("data.source is 'hf' but data.hf_name is not set")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 -- any failure here means the dataset could not be reached
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        hint = (f" ({' and '.join(offline)} set: set them to 0 to allow downloads)" if offline else "")
        raise RuntimeError(f"could not load the Hugging Face dataset {name!r} (split {split!r}): the hub is "
                           f"unreachable or offline{hint}, or the dataset does not exist. Use data.source=stdlib "
                           f"or local to work offline. Cause: {type(exc).__name__}: {exc}") from exc
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no text field {field!r} (columns: {ds.column_names})")
    width = len(str(len(ds)))
    names = [f"{i:0{width}d}" for i in range(len(ds))]
    max_bytes = cfg.get("max_bytes_per_file")
    info = {"source": "hf", "hf_name": name, "hf_split": split, "hf_text_field": field,
            "description": f"Hugging Face dataset {name} (split {split}, field {field}, {len(ds)} rows)"}
    return Source(names, lambda n: _decode(str(ds[int(n)][field]).encode("utf-8"), max_bytes), info)


SOURCES = {"stdlib": stdlib_source, "local": local_source, "hf": hf_source}


def open_source(cfg: dict) -> Source:
    kind = cfg.get("source", "stdlib")
    if kind not in SOURCES:
        raise ValueError(f"unknown data.source {kind!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[kind](cfg)


# ----------------------------------------------------------------------------------------- splits

def split_fraction(name: str, seed: int, purpose: str = "split") -> float:
    """A document's place in [0, 1) for the split: a hash of (seed, name), so a document's split does not depend on
    which other documents the corpus holds (another Python version's standard library keeps every shared file in
    the same split: a base model pretrained on one never saw the other's test files). `purpose` gives independent
    hashes for other uses (the choice of `max_files`)."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_names(names: list[str], split_cfg: dict, seed: int, max_files: int | None = None) -> dict[str, list[str]]:
    """Cut the documents into test (fraction < data.split.test), validation (< test + validation) and train by
    `split_fraction`; with `max_files`, only max_files documents chosen by an independent hash (so the shares hold).
    Validation and test get at least one document each when a share is set and there are at least three. Each list
    is sorted."""
    shares = {}
    for split in ("test", "validation"):
        share = float(split_cfg.get(split, 0.0))
        if not 0.0 <= share < 1.0:
            raise ValueError(f"data.split.{split} must be in [0, 1), got {share!r}")
        shares[split] = share
    if shares["test"] + shares["validation"] >= 1.0:
        raise ValueError(f"data.split shares {split_cfg} leave no training documents")
    ordered = sorted(set(names))
    if max_files is not None:
        ordered = sorted(sorted(ordered, key=lambda name: split_fraction(name, seed, "select"))[:int(max_files)])
    fraction = {name: split_fraction(name, seed) for name in ordered}
    ordered.sort(key=lambda name: fraction[name])
    bounds = {"test": shares["test"], "validation": shares["test"] + shares["validation"]}
    out = {"test": [n for n in ordered if fraction[n] < bounds["test"]],
           "validation": [n for n in ordered if bounds["test"] <= fraction[n] < bounds["validation"]]}
    out["train"] = [n for n in ordered if fraction[n] >= bounds["validation"]]
    for split in ("test", "validation"):  # a tiny corpus: take the train document closest to the split's range
        if shares[split] > 0 and not out[split] and len(ordered) >= 3 and len(out["train"]) > 1:
            out[split].append(out["train"].pop(0))
    if not out["train"]:
        raise ValueError(f"{len(ordered)} documents are too few for the requested split {split_cfg}")
    return {split: sorted(out[split]) for split in ("train", "validation", "test")}


def sha256_lines(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------- tokenizer

@contextlib.contextmanager
def tokenizers_parallel():
    """Let `tokenizers` use every core for training and batch encoding, then restore the setting."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, train_bytes: int | None):
    """A byte-level BPE tokenizer (no automatic BOS) trained on the texts, read in order up to
    `train_bytes` UTF-8 bytes; returned as a PreTrainedTokenizerFast, with the bytes and documents used.
    Digits are split into single tokens, as LLaMA's tokenizer does, so a number is copied digit by
    digit (passkeys and needles then have one regular tokenization wherever they appear)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample, used = [], 0
    for text in texts:
        if train_bytes is not None and used >= train_bytes:
            break
        data = text.encode("utf-8")
        if train_bytes is not None and used + len(data) > train_bytes:
            data = data[:int(train_bytes) - used]
            text = data.decode("utf-8", errors="ignore")
        sample.append(text)
        used += len(data)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MODEL_MAX_LENGTH, **SPECIAL_TOKENS)
    return wrapped, {"train_bytes_used": used, "train_documents_used": len(sample)}


def encode_documents(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """Token ids of the documents joined with eos_id, as uint16 (batch encoding, all cores)."""
    backend = tokenizer.backend_tokenizer
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.uint16)
    for start in range(0, len(texts), ENCODE_CHUNK):
        for enc in backend.encode_batch(texts[start:start + ENCODE_CHUNK], add_special_tokens=False):
            if parts:
                parts.append(eos)
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def document_bounds(tokens: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """(start, end) of every document of an EOS-separated token stream."""
    cuts = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [len(tokens)]])
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e > s]


def documents_reaching(ids: np.ndarray, eos_id: int, lengths=tuple(2 ** k for k in range(7, 18))) -> dict:
    """Share of the split's documents with at least n tokens, for n = 128 ... 131072: how many of the
    evaluation spans can lie inside one document (evaluate.ppl_spans joins documents for the rest)."""
    sizes = np.array([end - start for start, end in document_bounds(ids, eos_id)])
    return {"documents": int(len(sizes)),
            "share_at_least": {str(n): round(float((sizes >= n).mean()), 4) if len(sizes) else 0.0 for n in lengths}}


def save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, array)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
