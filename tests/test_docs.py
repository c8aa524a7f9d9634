"""References into the project's documentation (docs/) resolve, and nothing points outside the repository.

Scanned: every text file of the repository (`git ls-files`, tracked and untracked-but-not-ignored: code, config,
tests, Snakemake rules, templates, reference YAML, Markdown), except this file.

- (a) every path `docs/<name>.md` that a file mentions exists;
- (b) a section mark right after such a path (`docs/methods.md §5`, `§3.2e`, `§5e1`, `§7(a)`, `section 4`, several
  joined by commas, "and", dashes) names a section whose number (`5`, `3.2`, `7`, `4`) is a numbered heading of that
  document (`## 5. CLEX`, `### 3.2 Dynamic NTK`);
- (c) no file refers to the specification documents that live outside the repository (METHODS.md, PAPER.md,
  ECOSYSTEM.md, DESIGN.md, shared/spec, ../shared, /work/shared): a clone cannot follow such references.

The documents themselves are checked too: their own § marks, their references to each other and their Markdown
links resolve, and the report's `spec` column (reports/reference/methods.yaml) names sections of docs/methods.md.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SELF = "tests/test_docs.py"

TEXT_SUFFIXES = {".py", ".smk", ".yaml", ".yml", ".j2", ".md", ".toml", ".cfg", ".ini", ".txt", ".sql", ".sh",
                 ".css", ".html", ".json", ".rst"}
TEXT_NAMES = {"Snakefile"}
SKIP_DIRS = {".git", ".venv", "venv", "results", "__pycache__", ".snakemake", ".pytest_cache", "node_modules"}

# (c) references that a clone of the repository cannot follow
FORBIDDEN = re.compile(r"\b(?:METHODS|PAPER|ECOSYSTEM|DESIGN)\.md\b|shared/spec|\.\./shared|/work/shared")

# a path docs/<name>.md, from the repository root (optionally "./")
DOC_PATH = re.compile(r"(?<![\w./-])(?:\./)?(docs/(?:[\w-]+/)*[\w.-]+?\.md)(?![\w-])")
# inside docs/: a document named relative to docs/ ("methods.md §5", "[text](reference-study.md)")
DOC_NAME = re.compile(r"(?<![\w./-])(?:docs/)?((?:[\w-]+/)*[\w-]+\.md)(?![\w-])")
# a section mark; group 1 is the section number looked up among the headings
MARK = re.compile(r"(?:§\s?|\b(?i:sections?)\s+)(\d+(?:\.\d+)*)(?:[a-z]\d*)?(?:\([a-z]\)\d*)?")
LEAD = re.compile(r"[\s`'\"*)\]>,:(\[#-]*")  # between a path and its first mark (may cross a line break)
JOIN = re.compile(r"\s*#?\s*(?:,|;|/|&|\+|–|—|-|\band\b|\bor\b)?\s*#?\s*")  # between two marks of one chain
HEADING = re.compile(r"^#{1,6}\s+(?:§\s*)?(\d+(?:\.\d+)*)(?=[.):\s]|$)")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPEC_FIELD = re.compile(r"^\s*spec:\s*(.+?)\s*$")
SPEC_FIELDS = {"reports/reference/methods.yaml": "docs/methods.md"}  # YAML whose `spec:` values are § marks of a doc


# ---------------------------------------------------------------- the scanner
def repository_files(root: Path) -> list[str]:
    """Text files of the repository at `root` (POSIX paths relative to it): git's tracked and untracked-but-not-ignored
    files, or a walk of the tree without the usual output folders where git is unavailable."""
    try:
        command = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(command, check=True, capture_output=True).stdout.decode().split("\0")
        names = [n for n in listed if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            names += [Path(folder, f).relative_to(root).as_posix() for f in files]
    return sorted(n for n in set(names) if _is_text(root / n))


def _is_text(path: Path) -> bool:
    if not path.is_file():
        return False  # deleted in the working tree, or not a plain file
    if path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
        return True
    if path.suffix:
        return False
    with open(path, "rb") as handle:
        return handle.read(2) == b"#!"  # an extension-less script


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def heading_numbers(text: str) -> set[str]:
    """Section numbers of the Markdown headings of `text` ("## 5. CLEX" -> "5", "### 3.2 Dynamic NTK" -> "3.2")."""
    numbers, fenced = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            numbers.add(m.group(1))
    return numbers


def marks_after(text: str, start: int, stop: int) -> tuple[list[str], int]:
    """(section numbers, end position) of the chain of marks right after position `start` ("§3.2e and §5e1,
    section 4"), which ends at the first text that is neither a mark nor a separator, or at `stop`. The chain may
    continue on the next line (a wrapped comment)."""
    numbers, pos, gap = [], start, LEAD
    for m in MARK.finditer(text, start, stop):
        if not gap.fullmatch(text, pos, m.start()):
            break
        numbers.append(m.group(1))
        pos, gap = m.end(), JOIN
    return numbers, pos


def references(text: str, pattern: re.Pattern = DOC_PATH) -> list[tuple[int, str, list[str], tuple[int, int]]]:
    """(line number, document path, section numbers, (start, end) offsets of the path and its marks) of every
    reference to a document in `text`."""
    found = []
    matches = list(pattern.finditer(text))
    for k, m in enumerate(matches):
        stop = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        sections, end = marks_after(text, m.end(), stop)
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1), sections, (m.start(), end)))
    return found


def check_references(root: Path, files: list[str]) -> list[str]:
    """Problems (a) and (b) in `files` under `root`: missing docs/<name>.md files and section marks that are no
    heading of the referenced document."""
    problems, headings = [], {}
    for name in files:
        for number, doc, sections, _ in references(read(root / name)):
            path = root / doc
            if not path.is_file():
                problems.append(f"{name}:{number}: {doc} does not exist")
                continue
            known = headings.setdefault(doc, heading_numbers(read(path)))
            problems += [f"{name}:{number}: {doc} has no section {s} (headings: {', '.join(sorted(known)) or 'none'})"
                         for s in sections if s not in known]
    return problems


def check_forbidden(root: Path, files: list[str]) -> list[str]:
    """Problem (c): lines that refer to documents outside the repository."""
    problems = []
    for name in files:
        for number, line in enumerate(read(root / name).splitlines(), 1):
            problems += [f"{name}:{number}: refers to {m.group(0)!r}: {line.strip()[:120]}"
                         for m in FORBIDDEN.finditer(line)]
    return problems


def check_docs(root: Path) -> list[str]:
    """Inside docs/*.md: Markdown links to local files resolve, references to other documents ("methods.md §5") name
    existing documents and sections, and the remaining § marks are sections of the document itself."""
    problems, docs = [], root / "docs"
    for path in sorted(docs.glob("**/*.md")) if docs.is_dir() else []:
        name, text = path.relative_to(root).as_posix(), read(path)
        own = heading_numbers(text)
        for target in MD_LINK.findall(text):
            target = target.split("#", 1)[0]
            if target and not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                problems.append(f"{name}: link target {target} does not exist")
        claimed = []
        for number, doc, sections, span in references(text, DOC_NAME):
            claimed.append(span)
            target = root / doc if doc.startswith("docs/") else path.parent / doc
            if not target.is_file():
                if sections:  # a file name without § marks may be any file (e.g. a README elsewhere)
                    problems.append(f"{name}:{number}: {doc} does not exist")
                continue
            known = heading_numbers(read(target))
            problems += [f"{name}:{number}: {doc} has no section {s}" for s in sections if s not in known]
        for m in MARK.finditer(text):
            if m.group(0).startswith("§") and not any(a <= m.start() < b for a, b in claimed) \
                    and m.group(1) not in own:
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{name}:{line}: no section {m.group(1)} in this document")
    return problems


def check_spec_fields(root: Path, fields: dict[str, str] = SPEC_FIELDS) -> list[str]:
    """The `spec:` values of the files in `fields` (file -> document) are § marks of that document."""
    problems = []
    for name, doc in fields.items():
        if not (root / name).is_file():
            continue
        known = heading_numbers(read(root / doc)) if (root / doc).is_file() else set()
        for number, line in enumerate(read(root / name).splitlines(), 1):
            if m := SPEC_FIELD.match(line):
                sections = [s.group(1) for s in MARK.finditer(m.group(1))]
                if not sections:
                    problems.append(f"{name}:{number}: spec value {m.group(1)} has no § mark")
                problems += [f"{name}:{number}: {doc} has no section {s}" for s in sections if s not in known]
    return problems


def _scanned(root: Path = REPO) -> list[str]:
    return [n for n in repository_files(root) if n != SELF]


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


# ---------------------------------------------------------------- the repository
def test_the_docs_exist():
    for name in ("README.md", "methods.md", "reference-study.md"):
        assert (REPO / "docs" / name).is_file(), f"docs/{name} is missing"
    assert {"0", "1", "2", "3.1", "3.2", "4", "5", "6", "7", "8.1", "8.2", "9", "10", "11"} <= \
        heading_numbers(read(REPO / "docs" / "methods.md"))
    assert {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"} | {f"7.{k}" for k in range(1, 11)} <= \
        heading_numbers(read(REPO / "docs" / "reference-study.md"))


def test_referenced_docs_and_sections_exist():
    problems = check_references(REPO, _scanned())
    assert not problems, _report(problems)


def test_nothing_refers_to_documents_outside_the_repository():
    problems = check_forbidden(REPO, _scanned())
    assert not problems, _report(problems)


def test_the_docs_own_references_resolve():
    problems = check_docs(REPO)
    assert not problems, _report(problems)


def test_report_spec_column_names_sections_of_the_methods_doc():
    problems = check_spec_fields(REPO)
    assert not problems, _report(problems)


# ---------------------------------------------------------------- the scanner itself
@pytest.fixture
def tree(tmp_path):
    """A small repository: docs/a.md with sections 1, 3, 3.2, 5 and files that refer to it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n\n## 1. One\n\n## 3. Three\n\n### 3.2 Three two\n\n```\n## 9. not a heading (code)\n```\n"
        "## 5. Five\n\nSee §3.2e2 and b.md §1; [b](b.md).\n", encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("## 1. Only\n\nBad: §4. Bad link: [x](missing.md).\n", encoding="utf-8")
    (tmp_path / "code.py").write_text(
        '"""docs/a.md §3.2e and §5e1, section 1."""\n'      # fine
        "# (docs/a.md §7(a))\n"                              # no section 7
        "x = 1  # docs/a.md section 4\n"                     # no section 4
        "y = 2  # see docs/a.md; §4 of another text\n"       # the mark is not attached: fine
        "z = 3  # docs/missing.md §1\n"                      # no such file
        "w = 4  # docs/a.md §9 and docs/a.md §1\n"           # 9 is inside a code fence: no heading
        "v = 5  # spec METHODS.md §5, ../shared/spec/PAPER.md\n", encoding="utf-8")
    (tmp_path / "conf.yaml").write_text("# from docs/a.md §3.2 and §3.3\nspec: \"§5\"\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG docs/missing.md")
    return tmp_path


def test_heading_numbers():
    text = "# T\n## 0. Conventions\n### 3.2 Dynamic NTK\n## 10. Ten\n#### 7.1 Claim 1: x\n## Summary\n##5 no space\n"
    assert heading_numbers(text) == {"0", "3.2", "10", "7.1"}


def test_marks_after_a_path():
    line = "see docs/a.md §3.2e and §5e1, section 4 – §7(a); then §8"
    (_, doc, sections, _), = references(line)
    assert doc == "docs/a.md" and sections == ["3.2", "5", "4", "7"]
    (_, _, sections, _), = references("(docs/a.md §5.)")
    assert sections == ["5"]
    (_, _, sections, _), = references("`docs/a.md` Section 12")
    assert sections == ["12"]
    assert references("docs/a.md explains §4")[0][2] == []
    assert [r[1:3] for r in references("docs/a.md §1, docs/b.md §2")] == [("docs/a.md", ["1"]), ("docs/b.md", ["2"])]
    assert references("https://example.org/docs/a.md §1") == []


def test_scanner_finds_every_problem(tree):
    files = repository_files(tree)
    assert "image.png" not in files and {"code.py", "conf.yaml", "docs/a.md"} <= set(files)
    problems = check_references(tree, files)
    assert sorted(p.split(" (")[0] for p in problems) == [
        "code.py:2: docs/a.md has no section 7",
        "code.py:3: docs/a.md has no section 4",
        "code.py:5: docs/missing.md does not exist",
        "code.py:6: docs/a.md has no section 9",
        "conf.yaml:1: docs/a.md has no section 3.3",
    ]
    forbidden = check_forbidden(tree, files)
    assert [p.split(": refers to ")[1].split(":")[0] for p in forbidden] == ["'METHODS.md'", "'../shared'",
                                                                               "'PAPER.md'"]
    assert all(p.startswith("code.py:7:") for p in forbidden)


def test_docs_check_finds_bad_marks_and_links(tree):
    assert sorted(check_docs(tree)) == ["docs/b.md: link target missing.md does not exist",
                                        "docs/b.md:3: no section 4 in this document"]


def test_spec_fields_check(tree):
    fields = {"conf.yaml": "docs/a.md"}
    assert check_spec_fields(tree, fields) == []
    (tree / "conf.yaml").write_text("spec: \"§3.2\"\nother:\n  spec: \"§6\"\n  more:\n    spec: none\n")
    assert check_spec_fields(tree, fields) == ["conf.yaml:3: docs/a.md has no section 6",
                                       "conf.yaml:5: spec value none has no § mark"]
