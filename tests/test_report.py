"""The report stage: a self-contained, escaped HTML report computed from the database."""
import json
import re
import xml.etree.ElementTree as ET
from html import escape, unescape
from html.parser import HTMLParser

import duckdb
import pytest
from results_fixture import (ABSENT_CELL, HOSTILE, HOSTILE_CELL, MISSING_CELL, PPL, RULER_CELLS, RULER_LENGTHS,
                             RULER_TASKS, build_study, ruler_score)

from workflow import report, store


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    study = build_study(root / "results", hostile=True)
    db = study / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    out = study / "report.html"
    report.render_report(db, out)
    return out.read_text(), db


class TableCells(HTMLParser):
    """Rows of (class attribute, text) of the first <table> after an element with the given id."""

    def __init__(self, section_id):
        super().__init__()
        self.section_id, self.state, self.rows, self.cell = section_id, "before", [], None
        self.in_ci = False  # the small confidence-interval line under a value is not part of its text

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.state == "before" and attrs.get("id") == self.section_id:
            self.state = "section"
        elif self.state == "section" and tag == "table":
            self.state = "table"
        elif self.state == "table" and tag == "tr":
            self.rows.append([])
        elif self.state == "table" and tag == "td":
            self.cell = [attrs.get("class") or "", ""]
        elif tag == "span" and attrs.get("class") == "ci":
            self.in_ci = True

    def handle_endtag(self, tag):
        if self.state == "table" and tag == "td":
            self.rows[-1].append((self.cell[0], self.cell[1].strip()))
            self.cell = None
        elif self.state == "table" and tag == "table":
            self.state = "done"
        elif tag == "span":
            self.in_ci = False

    def handle_data(self, data):
        if self.cell is not None and not self.in_ci:
            self.cell[1] += data


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def handle_starttag(self, tag, attrs):
        self.seen.append((tag, dict(attrs)))


def table_rows(html, section_id):
    parser = TableCells(section_id)
    parser.feed(html)
    return [r for r in parser.rows if r]


def test_every_cell_appears_and_missing_is_marked(rendered):
    html, _ = rendered
    for cell_id in [*PPL, MISSING_CELL, HOSTILE_CELL, ABSENT_CELL]:
        assert escape(cell_id) in html
    rows = table_rows(html, "perplexity")
    by_id = {re.sub(r" (missing results|no cell record)$", "", unescape(r[0][1])): r for r in rows}
    assert set(by_id) == {*PPL, MISSING_CELL, HOSTILE_CELL, ABSENT_CELL}
    assert by_id[MISSING_CELL][0][1].endswith("missing results")
    assert by_id[ABSENT_CELL][0][1].endswith("no cell record")  # expected by study.json, never produced
    assert all(text == "—" for _, text in by_id[MISSING_CELL][4:])
    for cell_id, status in ((MISSING_CELL, "missing results"), (ABSENT_CELL, "no cell record")):
        assert re.search(rf'<tr class="missing">\s*<td class="cell-id">{cell_id} '
                         rf'<span class="badge">{status}</span>', html)
    assert "2 without results" in html


def test_best_value_per_perplexity_column_is_marked(rendered):
    html, _ = rendered
    rows = table_rows(html, "perplexity")
    n_cols = len(rows[0])
    for col in range(4, n_cols):
        values = {}
        for row in rows:
            cls, text = row[col]
            if text != "—":
                values[row[0][1]] = (float(text.replace(",", "")), "best" in cls.split())
        best = min(v for v, _ in values.values())
        assert values, col
        for cell, (value, marked) in values.items():
            assert marked == (value == best), (col, cell)
    assert re.search(r'<td class="num beyond best"[^>]*><strong>152</strong><span class="ci">147–157</span></td>', html)


def test_training_length_and_beyond_are_marked(rendered):
    html, _ = rendered
    rows = {r[0][1]: r for r in table_rows(html, "perplexity")}
    pi = rows["pi-exact-512-ft"]  # columns: 128 256 512 1k 2k 4k
    classes = [c.split() for c, _ in pi[4:]]
    assert "at-train" in classes[2]
    assert all("beyond" in c for c in classes[3:])
    assert not any("beyond" in c or "at-train" in c for c in classes[:2])


def test_hostile_strings_are_escaped(rendered):
    html, _ = rendered
    assert HOSTILE not in html
    assert "<img" not in html and "onerror=alert(1)>" not in html
    assert escape(HOSTILE) in html or escape(HOSTILE, quote=False) in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_no_external_resources(rendered):
    html, _ = rendered
    lowered = html.lower()
    for needle in ("<script", "<link", "<iframe", "<object", "<embed", "@import", "url("):
        assert needle not in lowered
    tags = Tags()
    tags.feed(html)
    assert not [t for t, attrs in tags.seen if "src" in attrs or "xlink:href" in attrs]
    hrefs = [attrs["href"] for t, attrs in tags.seen if "href" in attrs]
    assert hrefs and all(h.startswith("#") for h in hrefs)
    assert "<style>" in html and ".best-key" in html  # the stylesheet is inline


def test_svgs_are_well_formed(rendered):
    html, _ = rendered
    svgs = re.findall(r"<svg\b.*?</svg>", html, flags=re.S)
    # perplexity curves + 2 tasks x 4 cells with results + 2 training charts
    assert len(svgs) == 1 + 2 * 4 + 2
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag == "svg"
    ppl = ET.fromstring(svgs[0])
    assert len(ppl.findall("polyline")) == 4  # one curve per cell with perplexity results
    assert len([p for p in ppl.findall("path") if p.get("class") == "clip-mark"]) == 2
    assert "drawn at the top edge" in html
    heat = ET.fromstring(svgs[1])
    assert len(heat.findall("rect")) == 4 * 3 and heat.find("title").text


def test_title_block_and_appendix(rendered):
    html, _ = rendered
    assert "A share of 15% of pretraining and fine-tuning rows are" in html
    assert "1.41M parameters" in html and "4 layers" in html and "base window 256 tokens" in html
    assert "6 cells (4 fine-tuned, 1 frozen;" in html
    assert "abc1234" in html
    assert "… 200 items in all" in html  # long manifest lists are abbreviated
    assert "Kendall τ" in html


def test_report_opens_database_read_only(rendered, tmp_path, monkeypatch):
    _, db = rendered
    seen = []
    real = duckdb.connect

    def spy(path, *args, **kwargs):
        seen.append((str(path), kwargs.get("read_only")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(report.duckdb, "connect", spy)
    report.render_report(db, tmp_path / "r.html")
    assert seen == [(str(db), True), (":memory:", None)]  # the second one writes the exports


def test_empty_study_and_missing_db(tmp_path, capsys):
    study = tmp_path / "empty"
    study.mkdir()
    db = tmp_path / "empty.duckdb"
    store.ingest(study, db, echo=False)
    report.render_report(db, tmp_path / "empty.html")
    assert "No results stored yet." in (tmp_path / "empty.html").read_text()
    assert report.main(["--db", str(tmp_path / "nope.duckdb"), "--out", str(tmp_path / "x.html")]) == 2
    assert "run the store stage first" in capsys.readouterr().err


def test_scales_and_helpers():
    x = report.Scale(256, 4096, 0, 400, "log2")
    assert [label for _, label in x.ticks()] == ["256", "512", "1k", "2k", "4k"]
    assert x(256) == 0 and x(4096) == 400 and x(1024) == pytest.approx(200)
    y = report.Scale(10, 10000, 300, 0, "log10")
    assert [label for _, label in y.ticks()] == ["10", "100", "1,000", "10,000"]
    assert [label for _, label in report.Scale(0, 1, 0, 1).ticks()][:3] == ["0", "0.2", "0.4"]
    assert report.kendall([1, 2, 3, 4], [4, 3, 2, 1])[0] == -1
    assert report.kendall([1, 2, 3], [1, 2, 3])[0] == 1
    assert report.kendall([1, 2], [1, 2]) == (None, None) and report.kendall([1, 2, 3], [5, 5, 5]) == (None, None)
    assert report.accuracy_color(0) == "#440154" and report.accuracy_color(1) == "#fde725"
    assert report.accuracy_color(0.5) == "#21918c"
    assert report.fmt_num(27.46) == "27.5" and report.fmt_num(3.4e5) == "340,000"
    assert set(report.load_queries()) >= {"cells", "length_values", "retrieval_grid", "runs"}
    nested = {"b": [1, 2], "a": {"c": [{"d": None}], "e": ["x" * 60] * 3}, "f": []}
    assert json.loads(report.pretty(nested)) == nested
    assert '"b": [1, 2]' in report.pretty(nested)
