"""Security and isolation: weights load from safetensors only, no remote code, no pickle loads without
weights_only, templates autoescape, and only the store stage writes the database."""
import re

import pytest
import torch

from tests.helpers import REPO, tiny_llama
from workflow.modeling import load_model
from workflow.report import make_env

SOURCES = sorted([*REPO.glob("workflow/**/*.py"), *REPO.glob("methods/**/*.py"), REPO / "Snakefile",
                  *REPO.glob("workflow/rules/*.smk")])


def test_every_torch_load_is_weights_only():
    calls = [(p.name, m.group(0)) for p in SOURCES for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls, "expected the train checkpoint's torch.load"
    assert [c for c in calls if "weights_only=True" not in c[1]] == []
    assert not [p.name for p in SOURCES if re.search(r"\bpickle\b|\bdill\b", p.read_text())]


def test_remote_code_is_never_trusted():
    assert not [p.name for p in SOURCES if re.search(r"trust_remote_code\s*=\s*True", p.read_text())]


def test_pickle_only_checkpoint_is_refused(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")   # a pickle: could run code when loaded
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(tmp_path)


def test_templates_autoescape():
    env = make_env()
    assert env.from_string("{{ x }}").render(x="<script>") == "&lt;script&gt;"
    for name in env.list_templates(extensions=["html", "j2"]):
        assert env.get_template(name).environment.autoescape is not False


def test_only_the_store_opens_the_database_for_writing():
    """Parallel jobs never open metrics.duckdb: only the ingest rule has it as output, the report and
    publish rules only read it, and only workflow/store.py connects to a file without read_only."""
    rules = {}
    for path in REPO.glob("workflow/rules/*.smk"):
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            rules[block.split(":")[0]] = block
    touching = {name for name, text in rules.items() if "metrics.duckdb" in text}
    assert touching == {"ingest", "report", "publish"}
    assert re.search(r"output:\s*db=update\(f\"\{R\}/metrics.duckdb\"\)", rules["ingest"])
    assert "metrics.duckdb" not in rules["report"].split("output:")[1]
    assert "output:" not in rules["publish"]
    writers = [p.name for p in REPO.glob("workflow/**/*.py")
               for m in re.finditer(r"duckdb\.connect\((.*)\)", p.read_text())
               if "read_only=True" not in m.group(1) and m.group(1) != '":memory:"']
    assert set(writers) == {"store.py"}  # ingest and the benchmark writer
