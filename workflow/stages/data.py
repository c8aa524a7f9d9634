"""Data stage: build the corpus, split it by file with a fixed seed, train a byte-level BPE tokenizer
on the train split (or take the tokenizer of an imported checkpoint), write the splits as flat uint16
token files (documents joined with the EOS id) and the passkey / needle evaluation sets.

    python -m workflow.stages.data --config data.json --out results/tiny/data

manifest.json is written last: a killed run never leaves a manifest that looks complete.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import sys
import time
from pathlib import Path

from workflow.common import RESULT_SCHEMA_VERSION, log, read_json, write_json
from workflow.corpus import (SPECIAL_TOKENS, SPLITS, documents_reaching, encode_documents, open_source, save_npy,
                             sha256_lines, split_names, tokenizers_parallel, train_tokenizer)
from workflow.modeling import PROVENANCE_FILE, import_location, import_tokenizer
from workflow.retrieval import build_retrieval_sets


def check_held_out(files: dict[str, list[str]], source_info: dict, provenance: dict | None) -> None:
    """A shipped base model was pretrained on some corpus' train split: stop when this study's validation or test
    split holds any of those documents (another data.seed or data.split than the one it was made with), since its
    evaluation would then score text the model has seen."""
    if not provenance:
        return
    pretrained = provenance.get("data", {})
    if pretrained.get("source") != source_info.get("source"):
        return
    seen = set(pretrained.get("train_files") or [])
    leaked = {split: sorted(seen & set(files[split])) for split in ("validation", "test")}
    if any(leaked.values()):
        listed = "; ".join(f"{split}: {len(names)} ({', '.join(names[:3])}...)" for split, names in leaked.items()
                           if names)
        raise ValueError(f"the shipped base model was pretrained on documents that this study holds out ({listed}): "
                         f"keep data.seed and data.split as the model was made with ({pretrained.get('seed')}, "
                         f"{pretrained.get('split')}), or pretrain from scratch (study=tiny_scratch)")


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
    with tokenizers_parallel():
        t1 = time.perf_counter()
        if cfg.get("model_source", "scratch") != "scratch":  # the imported checkpoint's tokenizer
            spec = {"source": cfg["model_source"], "path": cfg.get("model_path"), **(cfg.get("model_import") or {})}
            tokenizer = import_tokenizer(spec)
            where, _, provenance = import_location(spec)
            made = Path(where) / PROVENANCE_FILE
            check_held_out(files, source.info, read_json(made) if made.is_file() else None)
            tok_info = {"kind": "checkpoint", **provenance}
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
            save_npy(out_dir / f"{split}.npy", ids)
            token_arrays[split] = ids
            text_hash = hashlib.sha256()
            for text in texts[split]:
                text_hash.update(text.encode("utf-8") + b"\0")
            split_info[split] = {"files": len(files[split]), "bytes": sum(len(t.encode("utf-8")) for t in texts[split]),
                                 "tokens": int(len(ids)), "file_list_sha256": sha256_lines(files[split]),
                                 "text_sha256": text_hash.hexdigest()}
            log(f"data: {split}: {split_info[split]['files']} files, {split_info[split]['bytes']:,} bytes, "
                f"{len(ids):,} tokens ({time.perf_counter() - t1:.1f}s)")

    retrieval_cfg = cfg["retrieval"]
    retrieval = build_retrieval_sets(tokenizer, token_arrays["test"], retrieval_cfg, out_dir)
    log("data: retrieval sets: " + ", ".join(f"{t} {r['rows']} rows" for t, r in retrieval.items()))

    special = {name.replace("_token", "_id"): getattr(tokenizer, f"{name}_id") for name in SPECIAL_TOKENS}
    manifest = {
        "schema_version": RESULT_SCHEMA_VERSION,
        **source.info,
        "python_version": platform.python_version(),
        "corpus": {"documents": len(source.names), "name_list_sha256": sha256_lines(source.names),
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
        "synthetic": cfg["synthetic"],   # the synthetic retrieval rows of pretraining (workflow.synthetic)
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
