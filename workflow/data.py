"""Data stage: build the corpus, split it by file with a fixed seed, train a byte-level BPE tokenizer
on the train split (or take the tokenizer of an imported checkpoint), write the splits as flat uint16
token files (documents joined with the EOS id) and the passkey / needle evaluation sets.

    python -m workflow.data --config data.json --out results/tiny/data

manifest.json is written last: a killed run never leaves a manifest that looks complete.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from workflow.common import log, read_json, write_json
from workflow.retrieval import build_retrieval_sets

SCHEMA_VERSION = 1
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

def split_names(names: list[str], split_cfg: dict, seed: int, max_files: int | None = None) -> dict[str, list[str]]:
    """Shuffle the sorted names with `seed`, keep the first max_files, and cut them into test,
    validation and train (in that order). Validation and test get at least one file each when there
    are at least three."""
    names = sorted(names)
    order = np.random.default_rng(int(seed)).permutation(len(names))
    chosen = [names[i] for i in order]
    if max_files is not None:
        chosen = chosen[:int(max_files)]
    n = len(chosen)
    sizes = {}
    for split in ("test", "validation"):
        share = float(split_cfg.get(split, 0.0))
        if not 0.0 <= share < 1.0:
            raise ValueError(f"data.split.{split} must be in [0, 1), got {share!r}")
        sizes[split] = max(1, round(n * share)) if share > 0 and n >= 3 else round(n * share)
    if n - sizes["test"] - sizes["validation"] < 1:
        raise ValueError(f"{n} documents are too few for the requested split {split_cfg}")
    test = chosen[:sizes["test"]]
    validation = chosen[sizes["test"]:sizes["test"] + sizes["validation"]]
    return {"train": chosen[sizes["test"] + sizes["validation"]:], "validation": validation, "test": test}


def _sha256_lines(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------- tokenizer

@contextlib.contextmanager
def _tokenizers_parallel():
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


def documents_reaching(ids: np.ndarray, eos_id: int, lengths=tuple(2 ** k for k in range(7, 18))) -> dict:
    """Share of the split's documents with at least n tokens, for n = 128 ... 131072: how many of the
    evaluation spans can lie inside one document (evaluate.ppl_spans joins documents for the rest)."""
    from workflow.evaluate import document_bounds

    sizes = np.array([end - start for start, end in document_bounds(ids, eos_id)])
    return {"documents": int(len(sizes)),
            "share_at_least": {str(n): round(float((sizes >= n).mean()), 4) if len(sizes) else 0.0 for n in lengths}}


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, array)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- stage

def build_data(cfg: dict, out_dir: Path) -> dict:
    """Build the study's data directory (see the module docstring) and return its manifest."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    seed = int(cfg["seed"])

    source = open_source(cfg)
    log(f"data: {source.info['description']}")
    splits = split_names(source.names, cfg.get("split") or {}, seed, cfg.get("max_files"))
    texts: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}
    empty = 0
    for split in SPLITS:
        texts[split], files[split] = [], []
        for name in splits[split]:
            text = source.read(name)
            if not text.strip():
                empty += 1
                continue
            texts[split].append(text)
            files[split].append(name)
        if not texts[split] and (split != "validation" or splits[split]):
            raise ValueError(f"the {split} split is empty ({len(splits[split])} documents, all blank)")
    log(f"data: split {', '.join(f'{s} {len(files[s])}' for s in SPLITS)} documents ({empty} blank skipped)")

    tok_cfg = cfg.get("tokenizer") or {}
    with _tokenizers_parallel():
        t1 = time.perf_counter()
        if cfg.get("model_source", "scratch") != "scratch":  # the imported checkpoint's tokenizer
            spec = {"source": cfg["model_source"], "path": cfg.get("model_path"), **(cfg.get("model_import") or {})}
            from workflow.modeling import import_location, import_tokenizer

            tokenizer = import_tokenizer(spec)
            tok_info = {"kind": "checkpoint", **import_location(spec)[2]}
            log(f"data: using the tokenizer of the imported checkpoint ({tok_info})")
        else:
            tokenizer, used = train_tokenizer(texts["train"], tok_cfg["vocab_size"], tok_cfg.get("min_frequency", 2),
                                              tok_cfg.get("train_bytes"))
            tok_info = {"kind": "byte_level_bpe", "requested_vocab_size": int(tok_cfg["vocab_size"]),
                        "min_frequency": int(tok_cfg.get("min_frequency", 2)), **used}
            log(f"data: trained a {len(tokenizer)}-token BPE tokenizer on {used['train_bytes_used']:,} bytes "
                f"in {time.perf_counter() - t1:.1f}s")
        vocab_size = len(tokenizer)
        if vocab_size >= 65536:
            raise ValueError(f"vocabulary of {vocab_size} tokens does not fit the uint16 token files")
        eos_id = int(tokenizer.eos_token_id)
        tok_dir = out_dir / "tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        tokenizer.save_pretrained(tok_dir)

        split_info, token_arrays = {}, {}
        for split in SPLITS:
            t1 = time.perf_counter()
            ids = encode_documents(tokenizer, texts[split], eos_id)
            _save_npy(out_dir / f"{split}.npy", ids)
            token_arrays[split] = ids
            text_hash = hashlib.sha256()
            for text in texts[split]:
                text_hash.update(text.encode("utf-8") + b"\0")
            split_info[split] = {"files": len(files[split]), "bytes": sum(len(t.encode("utf-8")) for t in texts[split]),
                                 "tokens": int(len(ids)), "file_list_sha256": _sha256_lines(files[split]),
                                 "text_sha256": text_hash.hexdigest()}
            log(f"data: {split}: {split_info[split]['files']} files, {split_info[split]['bytes']:,} bytes, "
                f"{len(ids):,} tokens ({time.perf_counter() - t1:.1f}s)")

    retrieval_cfg = cfg["retrieval"]
    retrieval = build_retrieval_sets(tokenizer, token_arrays["test"], retrieval_cfg, out_dir)
    log("data: retrieval sets: " + ", ".join(f"{t} {r['rows']} rows" for t, r in retrieval.items()))

    special = {name.replace("_token", "_id"): getattr(tokenizer, f"{name}_id") for name in SPECIAL_TOKENS}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **source.info,
        "python_version": platform.python_version(),
        "corpus": {"documents": len(source.names), "name_list_sha256": _sha256_lines(source.names),
                   "max_files": cfg.get("max_files"), "max_bytes_per_file": cfg.get("max_bytes_per_file"),
                   "blank_skipped": empty},
        "splits": split_info,
        "split_shares": dict(cfg.get("split") or {}),
        "text_sha256_of": "UTF-8 text of each document in split order, each followed by one NUL byte",
        "file_list_sha256_of": "the split's document names in split order, joined with newlines",
        "files": files,
        "tokenizer": {"vocab_size": vocab_size, **special, **tok_info},
        "token_files": {"dtype": "uint16", "separator": "eos_id between documents"},
        "seeds": {"split": seed, "retrieval": int(retrieval_cfg["seed"])},
        "passkey_share": float(cfg.get("passkey_share", 0.0)),
        "retrieval": {**{k: retrieval_cfg[k] for k in ("lengths", "depths", "samples")}, **retrieval},
        "test_documents_reaching": documents_reaching(token_arrays["test"], eos_id),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    write_json(out_dir / "manifest.json", manifest)
    tokens = ", ".join(f"{s} {split_info[s]['tokens']:,}" for s in SPLITS)
    log(f"data: done in {manifest['wall_s']:.1f}s: vocab {vocab_size}, tokens {tokens}; manifest at "
        f"{out_dir / 'manifest.json'}")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the data stage's resolved config (JSON)")
    parser.add_argument("--out", required=True, type=Path, help="the study's data directory")
    args = parser.parse_args(argv)
    try:
        build_data(read_json(args.config), args.out)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        log(f"data: error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
