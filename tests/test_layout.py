"""The layout of the code: the project's import graph (read from the source with `ast`, module- and function-level
imports alike) has no cycle; stage and tool modules are entry points that nothing imports; `methods` never
imports `workflow`; every module with a command line lives under workflow/stages or workflow/tools."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("methods", "workflow")
ENTRY_PACKAGES = ("workflow.stages", "workflow.tools")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that `path` (module `name`) imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest known module that is the target or contains it
            parts = target.split(".")
            for k in range(len(parts), 0, -1):
                candidate = ".".join(parts[:k])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. A package's own __init__ importing its
    submodules is not a cycle with a submodule importing a sibling through the package."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _without_package_init_edges(graph):
    """Drop edges into a package's __init__ from its own submodules (`from methods.rope import X` loads the package
    first, but the package's __init__ importing its submodules is the registry, not a cycle of the code)."""
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(_without_package_init_edges(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    for pkg, body in (("methods", ""), ("workflow", "")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(body)
    (tmp_path / "workflow" / "a.py").write_text("from workflow.b import x\n")
    (tmp_path / "workflow" / "b.py").write_text("def f():\n    from workflow import a\n")
    cycle = find_cycle(_without_package_init_edges(import_graph(tmp_path)))
    assert cycle is not None and set(cycle) == {"workflow.a", "workflow.b"}


def test_entry_points_are_imported_by_no_module():
    graph = import_graph()
    offenders = [(m, t) for m, targets in graph.items() for t in targets
                 if t.startswith(ENTRY_PACKAGES) and t not in ENTRY_PACKAGES]
    assert not offenders, f"stage/tool modules imported by other modules: {offenders}"


def test_methods_import_no_workflow_module():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith("workflow"))
                 for m, targets in graph.items() if m.startswith("methods")}
    assert not any(offenders.values()), offenders


@pytest.mark.parametrize("name,path", sorted(project_modules().items()))
def test_command_lines_live_in_stages_or_tools(name, path):
    tree = ast.parse(path.read_text())
    has_main = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    if has_main:
        assert name.startswith(ENTRY_PACKAGES), f"{name} has a command line but is not under workflow/stages or tools"


# ---------------------------------------------------------------------------------------------- generated artefacts
GENERATED = ["results/tiny/metrics.duckdb", "results/tiny/cells/pi-exact-512-ft/model/model.safetensors",
             "scratch/metrics.duckdb", "scratch/metrics.duckdb.wal", "out/model.safetensors", "run/ckpt/trainer.pt",
             "run/pytorch_model.bin", "weights/model.gguf", "reports/screenshots/tiny-1-summary.png"]


def _git(*args):
    import subprocess
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_generated_artefacts_are_ignored_and_only_shipped_models_carry_weights():
    ignored = set(_git("check-ignore", "--no-index", *GENERATED).stdout.split())
    assert ignored == set(GENERATED), f"not ignored: {sorted(set(GENERATED) - ignored)}"
    assert not _git("check-ignore", "--no-index", "models/tiny-base/model.safetensors").stdout, \
        "the shipped base model is part of the repository"
    tracked = _git("ls-files").stdout.split()
    weights = [p for p in tracked if p.endswith((".safetensors", ".pt", ".bin", ".gguf", ".duckdb"))]
    shipped = [p for p in weights if p.startswith("models/") and (REPO / Path(p).parent / "provenance.json").is_file()]
    assert weights == shipped, f"tracked generated files: {sorted(set(weights) - set(shipped))}"
    assert not [p for p in tracked if p.startswith(("results/", "reports/screenshots/"))]
