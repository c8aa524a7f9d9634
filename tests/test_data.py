"""Data stage: corpus sources, split by file, tokenizer, token files, retrieval sets, passkey mixer."""
import json
from pathlib import Path

import numpy as np
import pytest

from workflow import corpus, retrieval
from workflow.stages.data import build_data

FIXTURE = Path(__file__).parent / "fixtures" / "corpus"
LENGTHS = [128, 256, 512]  # 128 is too short for a passkey prompt with a 300-token vocabulary
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def fixture_config(**overrides) -> dict:
    cfg = {"source": "local", "path": str(FIXTURE), "hf_name": None, "max_files": None,
           "max_bytes_per_file": 200000, "split": {"validation": 0.15, "test": 0.2}, "seed": 1234,
           "tokenizer": {"vocab_size": 300, "min_frequency": 2, "train_bytes": 100000},
           "synthetic": {"kv": 0.3, "copy": 0.2, "multikey": 0.3, "code_haystack": 0.5, "answer_only": True,
                         "weight": 0.5},
           "retrieval": {"lengths": LENGTHS, "depths": DEPTHS, "samples": 2, "seed": 4321}}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two independent builds of the fixture corpus."""
    dirs = [tmp_path_factory.mktemp(f"data{i}") for i in range(2)]
    manifests = [build_data(fixture_config(), d) for d in dirs]
    return dirs, manifests


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built[0][0] / "tokenizer")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_manifest_fields(built):
    out, manifest = built[0][0], built[1][0]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["source"] == "local" and manifest["description"]
    assert manifest["python_version"]
    assert manifest["synthetic"]["kv"] == 0.3 and manifest["synthetic"]["copy"] == 0.2
    assert manifest["seeds"] == {"split": 1234, "retrieval": 4321}
    tok = manifest["tokenizer"]
    assert tok["vocab_size"] == 300
    assert (tok["unk_id"], tok["bos_id"], tok["eos_id"], tok["pad_id"]) == (0, 1, 2, 3)
    for split in corpus.SPLITS:
        info = manifest["splits"][split]
        assert info["files"] == len(manifest["files"][split]) > 0
        assert info["bytes"] > 0 and info["tokens"] > 0
        assert len(info["file_list_sha256"]) == 64 and len(info["text_sha256"]) == 64
        assert info["tokens"] == len(np.load(out / f"{split}.npy"))
    assert manifest["retrieval"]["passkey"]["skipped_lengths"] == [128]
    assert manifest["retrieval"]["passkey"]["lengths"] == [256, 512]
    assert manifest["wall_s"] >= 0


def test_split_by_file_is_disjoint_and_complete(built):
    files = built[1][0]["files"]
    names = [n for split in corpus.SPLITS for n in files[split]]
    assert len(names) == len(set(names))
    # every .txt/.md/.py file and every .jsonl line, except the blank file and the .csv
    expected = {p.relative_to(FIXTURE).as_posix() for p in FIXTURE.rglob("*") if p.suffix in (".txt", ".md", ".py")}
    expected -= {"empty.txt"}
    expected |= {f"notes/extra.jsonl:{i}" for i in range(1, 5)}
    assert set(names) == expected
    assert built[1][0]["corpus"]["blank_skipped"] == 1


def test_builds_are_deterministic(built):
    (a, b), (ma, mb) = built
    for name in ["train.npy", "validation.npy", "test.npy", "passkey.jsonl", "needle.jsonl", "tokenizer/tokenizer.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert ma["splits"] == mb["splits"] and ma["files"] == mb["files"]


def test_other_seed_gives_other_split(tmp_path):
    names = [f"f{i}" for i in range(40)]
    one = corpus.split_names(names, {"validation": 0.1, "test": 0.1}, seed=1)
    two = corpus.split_names(names, {"validation": 0.1, "test": 0.1}, seed=2)
    assert one != two
    assert sorted(sum(one.values(), [])) == sorted(names)
    few = corpus.split_names(names, {"validation": 0.1, "test": 0.1}, seed=1, max_files=10)
    assert sum(map(len, few.values())) == 10 and len(few["test"]) >= 1 and len(few["validation"]) >= 1


def test_a_documents_split_does_not_depend_on_the_other_documents():
    """Another corpus version (another Python's standard library) keeps every shared document in its split."""
    names = [f"lib/mod_{i}.py" for i in range(400)]
    split = corpus.split_names(names, {"validation": 0.05, "test": 0.05}, seed=1234)
    grown = corpus.split_names(names[:300] + [f"new/extra_{i}.py" for i in range(150)],
                               {"validation": 0.05, "test": 0.05}, seed=1234)
    where = {n: s for s, members in split.items() for n in members}
    assert all(where[n] == s for s, members in grown.items() for n in members if n in where)
    assert 10 <= len(split["test"]) <= 30 and 10 <= len(split["validation"]) <= 30


def test_token_files_are_uint16_with_eos_between_documents(built, tokenizer):
    out, manifest = built[0][0], built[1][0]
    eos = manifest["tokenizer"]["eos_id"]
    for split in corpus.SPLITS:
        ids = np.load(out / f"{split}.npy")
        assert ids.dtype == np.uint16 and ids.ndim == 1
        assert int((ids == eos).sum()) == len(manifest["files"][split]) - 1
        assert ids[0] != eos and ids[-1] != eos
    first = manifest["files"]["train"][0]
    ids = np.load(out / "train.npy")
    doc = ids[:int(np.flatnonzero(ids == eos)[0])]
    if ":" in first:  # a jsonl line
        path, line = first.rsplit(":", 1)
        text = json.loads((FIXTURE / path).read_text().splitlines()[int(line) - 1])["text"]
    else:
        text = (FIXTURE / first).read_text()
    assert tokenizer.decode(doc.tolist()) == text


def test_tokenizer_reloads_without_automatic_bos(tokenizer):
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.unk_token == "<unk>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.model_max_length == corpus.MODEL_MAX_LENGTH
    text = "def count(records):\n    return 42  # the heron"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_retrieval_rows_have_exact_lengths_and_needles_in_place(built, tokenizer):
    out = built[0][0]
    for task in retrieval.TASKS:
        rows = read_rows(out / f"{task}.jsonl")
        assert rows
        for row in rows:
            assert row["task"] == task
            assert len(row["input_ids"]) + len(row["answer_ids"]) == row["eval_len"]
            assert tokenizer.decode(row["answer_ids"]) == " " + row["answer"]
            assert len(row["answer"]) == 5 and row["answer"].isdigit()
            tail = tokenizer.decode(row["input_ids"][row["needle_pos"]:])
            template = retrieval.PASSKEY_KEY if task == "passkey" else retrieval.NEEDLE
            assert tail.startswith(template.format(key=row["answer"]))
    needle = read_rows(out / "needle.jsonl")
    assert {r["eval_len"] for r in needle} == set(LENGTHS)
    assert len(needle) == len(LENGTHS) * len(DEPTHS) * 2


def test_needle_position_grows_with_depth(tokenizer):
    haystack = np.arange(4, 200, dtype=np.uint16).repeat(10)
    for make in (lambda d: retrieval.passkey_example(tokenizer, 512, d, np.random.default_rng(0)),
                 lambda d: retrieval.needle_example(haystack, tokenizer, 512, d, np.random.default_rng(0))):
        positions = [make(d)["needle_pos"] for d in DEPTHS]
        assert positions == sorted(positions) and positions[0] < positions[-1]
    assert retrieval.needle_example(haystack, tokenizer, 512, 0.0, np.random.default_rng(0))["needle_pos"] == 0


def test_too_short_lengths_raise(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        retrieval.passkey_example(tokenizer, 64, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="too short"):
        retrieval.needle_example(np.zeros(1000, np.uint16), tokenizer, 10, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="haystack"):
        retrieval.needle_example(np.zeros(50, np.uint16), tokenizer, 512, 0.5, np.random.default_rng(0))


def test_retrieval_sets_skip_short_lengths_visibly(tokenizer, tmp_path, capsys):
    cfg = {"lengths": [64, 256], "depths": [0.5], "samples": 1, "seed": 1}
    summary = retrieval.build_retrieval_sets(tokenizer, np.arange(4, 300, dtype=np.uint16), cfg, tmp_path)
    assert summary["passkey"] == {"rows": 1, "lengths": [256], "skipped_lengths": [64]}
    assert "skipping passkey length 64" in capsys.readouterr().err


def test_hf_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="ctxext-no-such/dataset-xyz.*offline"):
        corpus.open_source({"source": "hf", "hf_name": "ctxext-no-such/dataset-xyz", "hf_split": "train"})


def test_local_source_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        corpus.open_source({"source": "local", "path": str(missing)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        corpus.open_source({"source": "local", "path": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="unknown data.source"):
        corpus.open_source({"source": "web"})


def test_failed_build_leaves_no_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        build_data(fixture_config(path=str(tmp_path / "nowhere")), tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_stdlib_lister_excludes_tests():
    files = corpus.stdlib_files()
    assert len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for name in files:
        parts = name.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), name
        assert name.endswith(".py")
    assert files == sorted(files)
