"""The report stage: a self-contained, escaped HTML report computed from the database."""
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html import escape, unescape
from html.parser import HTMLParser

import duckdb
import html5lib
import pytest
from tests.helpers import (ABSENT_CELL, HOSTILE, HOSTILE_CELL, MISSING_CELL, PPL, REPO, RULER_CELLS, RULER_LENGTHS,
                           RULER_TASKS, build_study, link_problems, ruler_score)

from workflow import report, stats, store
from workflow.report import cells, charts, claims, formatting, queries, style
from workflow.stages import report as report_stage

REPORT_PACKAGE = REPO / "workflow" / "report"


def _render(root, hostile):
    study = build_study(root / "results", hostile=hostile)
    db = study / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    out = study / "report.html"
    report.render_report(db, out)
    return out.read_text(), db


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The fixture study with hostile strings (HTML in the study name, a cell id, a config value, a task name)."""
    return _render(tmp_path_factory.mktemp("report"), hostile=True)


@pytest.fixture(scope="module")
def rendered_plain(tmp_path_factory):
    return _render(tmp_path_factory.mktemp("report-plain"), hostile=False)


def html_errors(html: str) -> list[str]:
    """The parse errors of the HTML5 parsing algorithm (html5lib): misnested or stray end tags, unclosed elements at
    the end of a section or of the body, bad attributes, ... each with its line and the text around it."""
    parser = html5lib.HTMLParser(strict=False)
    parser.parse(html)
    lines = html.splitlines()
    return [f"line {line}, col {col}: {code} {data or ''}: {lines[line - 1][max(0, col - 70):col + 10]!r}"
            for (line, col), code, data in parser.errors]


class TableCells(HTMLParser):
    """Rows of (class attribute, text) of the body cells (th and td) of the first <table> after an element with the
    given id."""

    def __init__(self, section_id):
        super().__init__()
        self.section_id, self.state, self.rows, self.cell = section_id, "before", [], None
        self.in_body = False
        self.in_ci = False  # the small confidence-interval line under a value is not part of its text

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.state == "before" and attrs.get("id") == self.section_id:
            self.state = "section"
        elif self.state == "section" and tag == "table":
            self.state = "table"
        elif self.state == "table" and tag == "tbody":
            self.in_body = True
        elif self.state == "table" and tag == "tr":
            self.rows.append([])
        elif self.state == "table" and self.in_body and tag in ("td", "th"):
            self.cell = [attrs.get("class") or "", ""]
        elif tag == "span" and attrs.get("class") == "ci":
            self.in_ci = True

    def handle_endtag(self, tag):
        if self.state == "table" and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append((self.cell[0], self.cell[1].strip()))
            self.cell = None
        elif self.state == "table" and tag == "tbody":
            self.in_body = False
        elif self.state == "table" and tag == "table":
            self.state = "done"
        elif tag == "span":
            self.in_ci = False

    def handle_data(self, data):
        if self.cell is not None and not self.in_ci:
            self.cell[1] += data


class HeaderScopes(HTMLParser):
    """(part of the table, scope) of every <th>, and the first cell of every body row as (tag, scope)."""

    def __init__(self):
        super().__init__()
        self.part, self.scopes, self.row_starts, self.row_open = None, [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("thead", "tbody"):
            self.part = tag
        elif tag == "tr":
            self.row_open = True
        elif tag in ("th", "td"):
            if tag == "th":
                self.scopes.append((self.part, attrs.get("scope")))
            if self.row_open and self.part == "tbody":
                self.row_starts.append((tag, attrs.get("scope"), attrs.get("colspan")))
            self.row_open = False


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
        assert re.search(rf'<tr class="missing">\s*<th scope="row" class="cell-id">{cell_id} '
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


def test_every_header_cell_has_a_scope(rendered):
    html, _ = rendered
    parser = HeaderScopes()
    parser.feed(html)
    assert len(parser.scopes) > 50
    assert {scope for part, scope in parser.scopes if part == "thead"} == {"col", "colgroup"}
    assert {scope for part, scope in parser.scopes if part == "tbody"} == {"row"}
    # every body row is led by its row header, except a row that spans the table to say it is empty
    assert all(cell == ("th", "row", None) for cell in parser.row_starts if cell[2] is None), parser.row_starts


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
    # links, not resources: anchors in the page, files beside it, and papers on arxiv.org
    assert hrefs and all(h.startswith(("#", "figures/", "docs/", "https://arxiv.org/abs/")) for h in hrefs), hrefs
    assert not [t for t, attrs in tags.seen if t in ("img", "image", "use", "source", "video", "audio")]
    assert "<style>" in html and ".best-key" in html  # the stylesheet is inline


def chart_svgs(html):
    return re.findall(r'<svg class="chart".*?</svg>', html, flags=re.S)


@pytest.mark.parametrize("variant", ["plain", "hostile"])
def test_every_link_resolves_in_the_output_folder(variant, rendered, rendered_plain):
    html, db = rendered if variant == "hostile" else rendered_plain
    assert link_problems(html, db.parent) == []
    assert len(re.findall(r'href="figures/', html)) == len(chart_svgs(html))


# The citable paper of each method (the Reddit posts of NTK-aware and Dynamic NTK are cited through the YaRN paper).
PAPERS = {"pi": ("2306.15595", None), "ntk": ("2309.00071", "Sec. 3.1"), "dynamic_ntk": ("2309.00071", "Sec. 3.3"),
          "yarn": ("2309.00071", None), "clex": ("2310.16450", None), "lm_infinite": ("2308.16137", None),
          "landmark": ("2305.16300", None)}


def test_methods_yaml_cites_each_method_on_arxiv():
    methods, paper = cells.load_reference()
    entries = {**methods["rope"], **methods["attention"]}
    for name, (arxiv, section) in PAPERS.items():
        assert (entries[name]["paper"]["arxiv"], entries[name]["paper"].get("section")) == (arxiv, section), name
    assert all(e.get("paper") for name, e in entries.items() if name != "exact")
    assert paper["arxiv"] == "2409.12181"  # LCEG, the reference study
    with pytest.raises(ValueError, match="not an arXiv identifier"):
        cells.paper_link({"arxiv": "javascript:alert(1)"})


def test_every_registered_method_has_its_overview_entry_and_label():
    """Adding a method to the registry needs its overview text: the report labels cells from methods.yaml."""
    from methods import ATTENTION_METHODS, METHODS

    methods, _ = cells.load_reference()
    assert set(methods["rope"]) == set(METHODS) and set(methods["attention"]) == set(ATTENTION_METHODS)
    assert all(entry.get("label") for group in ("rope", "attention") for entry in methods[group].values())
    assert cells.method_label("yarn", "lm_infinite", methods) == "YaRN + LM-Infinite"
    assert cells.method_label("pi", "longlora", methods) == "PI + LongLoRA"
    assert cells.method_label("none", "self_extend", methods) == "Self-Extend"


def test_method_overview_links_its_definition_and_paper(rendered):
    html, db = rendered
    body = re.search(r'<section id="cells">(.*?)</section>', html, flags=re.S).group(1)
    rows = {re.sub(r"<svg.*?</svg>", "", m.group(1), flags=re.S): m.group(2)
            for m in re.finditer(r'<th scope="row" class="cell-id">(.*?)</th>(.*?)</tr>', body, flags=re.S)}
    expected = {"none-exact-256-frozen": ("§0", "2104.09864"), "pi-exact-512-ft": ("§2", "2306.15595"),
                "ntk-exact-512-ft": ("§3.1", "2309.00071"), "yarn-exact-1024-ft": ("§4", "2309.00071")}
    for cell_id, (section, arxiv) in expected.items():
        assert f'<a href="docs/methods.md">{section}</a>' in rows[cell_id], cell_id
        assert f'<a href="https://arxiv.org/abs/{arxiv}"' in rows[cell_id] and f">arXiv:<wbr>{arxiv}</a>" in rows[cell_id]
    assert "Sec. 3.1" in rows["ntk-exact-512-ft"]
    assert '<a href="docs/reference-study.md">docs/reference-study.md §7</a>' in html
    assert '<a href="https://arxiv.org/abs/2409.12181">arXiv:2409.12181</a>' in html
    for name in report.DOCS:  # the documents it links to, copied beside it, their own links intact
        copy = db.parent / report.DOCS_DIR / name
        assert copy.read_bytes() == (REPO / "docs" / name).read_bytes()
        for target in re.findall(r"\]\(([^)\s#]+)", copy.read_text()):
            assert target.startswith("https://") or (copy.parent / target).is_file(), (name, target)


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.svg").write_text("<svg/>")
    good = '<p id="x"></p><a href="#x">x</a><a href="figures/a.svg">a</a><a href="https://arxiv.org/abs/1">p</a>'
    assert link_problems(good, tmp_path) == []
    bad = ('<a href="#nowhere">1</a><a href="figures/b.svg">2</a><a href="http://example.org">3</a>'
           '<a href="../secret.txt">4</a><img src="file:///etc/passwd"><a href="javascript:alert(1)">6</a>')
    problems = link_problems(bad, tmp_path)
    assert len(problems) == 6, problems


def test_svgs_are_well_formed(rendered):
    html, _ = rendered
    svgs = chart_svgs(html)
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
    keys = re.findall(r'<svg class="key".*?</svg>', html, flags=re.S)
    assert len(keys) == 6 and all(ET.fromstring(k).get("aria-hidden") == "true" for k in keys)  # Table 1


def _looks(element):
    """(colour, marker shape, hollow) of the first marker in an SVG element."""
    point = next(p for p in element.iter("path") if "point" in (p.get("class") or "").split())
    shape = next(c for c in point.get("class").split() if c.startswith("point-"))
    return point.get("stroke"), shape, point.get("fill") == "#ffffff"


def legend(svg_text):
    """{series name: (colour of its line, (colour, marker, hollow) of its marker)} of a line chart's legend."""
    out = {}
    for item in ET.fromstring(svg_text).iter("g"):
        if item.get("class") == "legend-item":
            out[item.find("text").text] = (item.find("line").get("stroke"), _looks(item))
    return out


def test_each_cell_looks_the_same_in_every_figure(rendered):
    html, _ = rendered
    svgs = chart_svgs(html)
    ppl, finetune = legend(svgs[0]), legend(svgs[-1])
    assert len(ppl) == 4 and len(finetune) == 4  # cells with perplexity; fine-tuned cells with a train log
    assert len(set(ppl.values())) == len(ppl)  # no two cells alike
    for name in set(ppl) & set(finetune):
        assert ppl[name] == finetune[name], name
    assert all(line == look[0] for line, look in [*ppl.values(), *finetune.values()])
    # every heat-map panel carries its cell's marker; Table 1 holds the same keys
    for svg in svgs[1:9]:
        root = ET.fromstring(svg)
        title = next(t.text for t in root.iter("text") if t.get("class") == "panel-title")
        assert _looks(root) == ppl[title][1], title
    table = {unescape(cell): ET.fromstring(key) for key, cell in
             re.findall(r'<th scope="row" class="cell-id">(<svg class="key".*?</svg>)(.*?)</th>', html, flags=re.S)}
    assert len(table) == 6
    for name, (_, look) in ppl.items():
        assert _looks(table[name]) == look, name
    frozen = [k for k in table.values() if k.find("line").get("stroke-dasharray")]
    assert len(frozen) == 1  # frozen cells' lines are dashed, in the key as in the charts


def test_cell_styles_stay_distinct_for_a_large_grid():
    styles = [style.cell_style(i) for i in range(style.DISTINCT)]
    assert style.DISTINCT >= 30 and len(set(styles)) == style.DISTINCT
    assert style.cell_style(style.DISTINCT) == styles[0]
    for a, b in zip(styles, styles[1:]):  # neighbours differ in colour and in marker
        assert a.color != b.color and a.marker != b.marker
    for color in style.PALETTE:  # lines and markers stand out from the white page (WCAG 1.4.11: 3:1)
        assert style.contrast_ratio(color, "#ffffff") >= 3, color
    for marker in style.MARKERS:
        assert style.marker_path(marker, 10, 10).startswith("M")


def test_a_legend_of_many_cells_fits_and_keeps_them_apart():
    series = [charts.Series(f"cell-{i:02d}-with-a-long-name", [(256, 10.0 + i), (512, 12.0 + i)],
                            style.cell_style(i), band=[(256, 9.0 + i, 11.0 + i), (512, 11.0 + i, 13.0 + i)])
              for i in range(32)]
    chart = charts.line_chart(series, title="t", xlabel="x", ylabel="y", name="many", x_kind="log2")
    root = ET.fromstring(chart.svg)
    height = float(root.get("viewBox").split()[3])
    entries = legend(chart.svg)
    assert len(entries) == 32 and len(set(entries.values())) == 32
    assert all(float(t.get("y")) < height - 4 for t in root.iter("text") if t.get("class") == "legend-label")
    assert len([p for p in root.iter("path") if p.get("class") == "band"]) == 32


def test_perplexity_curves_have_confidence_bands(rendered):
    html, db = rendered
    root = ET.fromstring(chart_svgs(html)[0])
    bands = [p for p in root.iter("path") if p.get("class") == "band"]
    lines = [p for p in root.iter("polyline")]
    assert sorted(b.get("fill") for b in bands) == sorted(line.get("stroke") for line in lines)
    for band, line in zip(sorted(bands, key=lambda e: e.get("fill")), sorted(lines, key=lambda e: e.get("stroke"))):
        ys = [float(pt.split(",")[1]) for pt in band.get("d")[1:-2].split(" L")]
        points = [tuple(map(float, pt.split(","))) for pt in line.get("points").split()]
        n = len(ys) // 2
        upper, lower = ys[:n], ys[n:][::-1]
        assert n == len(points)  # one band vertex above and one below each point of the curve
        assert all(hi <= y <= lo for hi, (_, y), lo in zip(upper, points, lower))  # pixels: the top is smaller
        assert any(lo - hi > 0.5 for hi, lo in zip(upper, lower))


def test_heatmap_labels_reach_wcag_contrast():
    assert style.contrast_ratio("#000000", "#ffffff") == pytest.approx(21)
    assert style.contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert style.contrast_ratio("#21918c", "#21918c") == 1
    worst = min(style.contrast_ratio(style.text_color_on(charts.accuracy_color(k / 1000)), charts.accuracy_color(k / 1000))
                for k in range(1001))
    assert worst >= 4.5
    # the rule it replaces: white below 60%, which gives about 3:1 around 55-60%
    assert style.contrast_ratio("#ffffff", charts.accuracy_color(0.58)) < 4.5


def test_rendered_heatmap_labels_contrast_with_their_squares(rendered):
    html, _ = rendered
    pairs = []
    for svg in chart_svgs(html)[1:9]:
        items = list(ET.fromstring(svg))
        pairs += [(a.get("fill"), b.get("fill")) for a, b in zip(items, items[1:])
                  if a.get("class") == "heat" and b.get("class") == "heat-label"]
    assert len(pairs) == 8 * 12
    assert all(style.contrast_ratio(text, square) >= 4.5 for square, text in pairs), pairs


def test_figures_are_standalone_svg_files(rendered):
    html, db = rendered
    folder = db.parent / report.FIGURES_DIR
    files = sorted(folder.glob("*.svg"))
    linked = re.findall(r'<a class="svg-file" href="(figures/[^"]+)"|Standalone SVG: <a href="(figures/[^"]+)"', html)
    linked = sorted(unescape(a or b) for a, b in linked)
    assert [f"figures/{f.name}" for f in files] == linked and len(files) == len(chart_svgs(html))
    assert sorted(p.name for p in folder.iterdir()) == [f.name for f in files]  # nothing else in the folder
    ns = "{http://www.w3.org/2000/svg}"
    for path in files:
        text = path.read_text()
        assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
        root = ET.fromstring(text.split("\n", 1)[1])
        assert root.tag == f"{ns}svg" and len(root.get("viewBox").split()) == 4
        assert float(root.get("width")) > 0 and float(root.get("height")) > 0
        assert root.find(f"{ns}title").text and ".series" in root.find(f"{ns}style").text
        assert not [e for e in root.iter() for k in e.attrib if k.endswith("href")]  # nothing to fetch
        assert HOSTILE not in text and "<img" not in text
    ppl = ET.fromstring((folder / "perplexity.svg").read_text().split("\n", 1)[1])
    assert len(ppl.findall(f"{ns}polyline")) == 4


def test_title_block_and_appendix(rendered):
    html, _ = rendered
    assert ("Pretraining: 4,000 steps: first 1,500 steps rows of 128 tokens with 40% key/value rows and 40% copy rows; "
            "then rows of the base window with 30% key/value rows and 20% copy rows (only their answers and copies "
            "scored, 50% of each step&#39;s loss on them)") in html
    assert "Fine-tuning: text only, as the reference study fine-tunes." in html
    assert "1.41M parameters" in html and "4 layers" in html and "base window 256 tokens" in html
    assert "6 cells (4 fine-tuned, 1 frozen;" in html
    assert "abc1234" in html
    assert "… 200 items in all" in html  # long manifest lists are abbreviated
    assert "Kendall τ" in html


@pytest.mark.parametrize("variant", ["plain", "hostile"])
def test_report_has_no_html_nesting_errors(variant, rendered, rendered_plain):
    html, _ = rendered if variant == "hostile" else rendered_plain
    assert html_errors(html) == []
    html5lib.HTMLParser(strict=True).parse(html)  # raises html5lib.html5parser.ParseError on the first error


def test_the_nesting_check_finds_planted_errors():
    page = "<!DOCTYPE html><html lang=en><head><title>t</title></head><body><main>{}</main></body></html>"
    assert html_errors(page.format("<section><div><p>x</p></div></section>")) == []
    stray = html_errors(page.format("<section><table><tr><td>x</td></tr></table></div></section>"))
    unclosed = html_errors(page.format("<section><div class=scroll><table></table></section><p>y</p>"))
    assert stray and "div" in stray[0] and unclosed and "section" in unclosed[0]
    with pytest.raises(html5lib.html5parser.ParseError):
        html5lib.HTMLParser(strict=True).parse(page.format("<div></span></div>"))


def test_report_opens_database_read_only(rendered, tmp_path, monkeypatch):
    _, db = rendered
    seen = []
    real = duckdb.connect

    def spy(path, *args, **kwargs):
        seen.append((str(path), kwargs.get("read_only")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", spy)
    report.render_report(db, tmp_path / "r.html")
    assert seen == [(str(db), True), (":memory:", None)]  # the second one writes the exports


def test_empty_study_and_missing_db(tmp_path, capsys):
    study = tmp_path / "empty"
    study.mkdir()
    db = tmp_path / "empty.duckdb"
    store.ingest(study, db, echo=False)
    report.render_report(db, tmp_path / "empty.html")
    assert "No results stored yet." in (tmp_path / "empty.html").read_text()
    assert report_stage.main(["--db", str(tmp_path / "nope.duckdb"), "--out", str(tmp_path / "x.html")]) == 2
    assert "run the store stage first" in capsys.readouterr().err


def test_scales_and_helpers():
    x = charts.Scale(256, 4096, 0, 400, "log2")
    assert [label for _, label in x.ticks()] == ["256", "512", "1k", "2k", "4k"]
    assert x(256) == 0 and x(4096) == 400 and x(1024) == pytest.approx(200)
    y = charts.Scale(10, 10000, 300, 0, "log10")
    assert [label for _, label in y.ticks()] == ["10", "100", "1,000", "10,000"]
    assert [label for _, label in charts.Scale(0, 1, 0, 1).ticks()][:3] == ["0", "0.2", "0.4"]
    assert charts.accuracy_color(0) == "#440154" and charts.accuracy_color(1) == "#fde725"
    assert charts.accuracy_color(0.5) == "#21918c"
    assert formatting.fmt_num(27.46) == "27.5" and formatting.fmt_num(3.4e5) == "340,000"
    assert set(queries.load_queries()) >= {"cells", "length_values", "retrieval_grid", "runs"}
    nested = {"b": [1, 2], "a": {"c": [{"d": None}], "e": ["x" * 60] * 3}, "f": []}
    assert json.loads(formatting.pretty(nested)) == nested
    assert '"b": [1, 2]' in formatting.pretty(nested)


def test_report_package_is_small_and_uses_the_study_statistics():
    """No module of the report package is over 400 lines, and its statistics come from workflow.stats only: no scipy,
    no statistics module, no median taken by indexing a sorted list."""
    modules = sorted(REPORT_PACKAGE.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "charts", "claims", "sections", "render"}
    assert (REPORT_PACKAGE / "queries.sql").is_file()
    for module in modules:
        text = module.read_text()
        assert len(text.splitlines()) <= 400, module.name
        assert not re.search(r"^\s*(from|import) (scipy|statistics|numpy)\b", text, flags=re.M), module.name
        assert not re.search(r"\[\s*len\([^)]*\)\s*//\s*2\s*\]", text), module.name


def _evidence(cells, ppl=None, downstream=None, extrapolation_hard=1.5):
    cells = [{"ok": True, "family": "exact", "regime": "finetuned", "rope": "pi", "attention": "exact", **c}
             for c in cells]
    return claims.Evidence(cells, ppl or {}, downstream or {}, "base", 256,
                           {"significance": 0.05, "extrapolation_hard": extrapolation_hard})


def test_claim_rules_take_the_median_of_an_even_count():
    """With four cells the median is the mean of the two middle values (1.13 here), not the upper one (1.15)."""
    rises = {"a": 1.0, "b": 1.11, "c": 1.15, "d": 1.3}
    cells = [{"cell_id": "base", "regime": "frozen", "rope": "none", "train_len": 256}]
    cells += [{"cell_id": cid, "train_len": 512} for cid in rises]
    ppl = {("base", 512): 50.0, **{(cid, 512): 10.0 for cid in rises},
           **{(cid, 1024): 10.0 * r for cid, r in rises.items()}}
    verdict, text, _ = claims.rule_finetuned_within_not_beyond(_evidence(cells, ppl, extrapolation_hard=1.14), [])
    assert "median 1.13×" in text and verdict == "not supported"  # the upper median 1.15 would pass 1.14
    verdict, _, _ = claims.rule_finetuned_within_not_beyond(_evidence(cells, ppl, extrapolation_hard=1.12), [])
    assert verdict == "supported"
    # claim 2: best approximate cell 55% against exact fine-tuned cells 20/40/60/80% (median 50%, upper median 60%)
    means = {"lm": 0.55, "a": 0.2, "b": 0.4, "c": 0.6, "d": 0.8}
    cells = [{"cell_id": "lm", "family": "approximate", "regime": "frozen", "attention": "lm_infinite"}]
    cells += [{"cell_id": cid} for cid in "abcd"]
    verdict, text, _ = claims.rule_approximate_underperforms(_evidence(cells, downstream={"passkey": means}), [])
    assert "median of 4 exact fine-tuned cells 50%" in text and verdict == "not supported"
    assert stats.median([1.0, 1.11, 1.15, 1.3]) == pytest.approx(1.13)


def section_tables(html, section_id):
    """Every table inside one <section id=...>, each as rows of (class, text)."""
    body = re.search(rf'<section id="{section_id}">(.*?)</section>', html, flags=re.S).group(1)
    tables = re.findall(r"<table\b.*?</table>", body, flags=re.S)
    out = []
    for t in tables:
        parser = TableCells("x")
        parser.feed(f'<div id="x"></div>{t}')
        out.append([r for r in parser.rows if r])
    return out


REACH = {"none-exact-256-frozen": 256, "pi-exact-512-ft": 512, "yarn-exact-1024-ft": 1024}


def test_task_suite_tables_average_and_per_task(rendered):
    html, _ = rendered
    tasks = RULER_TASKS + [HOSTILE]  # the hostile fixture adds a task named <script>...
    tables = section_tables(html, "tasks")
    assert len(tables) == 1 + len(tasks)  # the average, then one table per task
    average = {unescape(r[0][1]).split(" ")[0]: r for r in tables[0]}
    for cell in RULER_CELLS:
        texts = [text for _, text in average[cell][4:]]
        expected = [f"{100 * sum(ruler_score(i, n, REACH[cell]) for i in range(len(tasks))) / len(tasks):.1f}"
                    for n in RULER_LENGTHS]
        assert texts == expected, cell
    assert all(text == "—" for _, text in average[MISSING_CELL][4:])
    vt = {r[0][1].split(" ")[0]: r for r in tables[1 + sorted(tasks).index("vt")]}  # per-task tables sorted by name
    assert vt["pi-exact-512-ft"][4][1] == f"{100 * ruler_score(1, 256, 512):.1f}"
    assert "ruler / " + escape(HOSTILE) in html  # the hostile task name, escaped, in its table caption


def test_correlation_is_kendall_with_p_beside_the_paper(rendered):
    html, db = rendered
    con = duckdb.connect(str(db), read_only=True)
    ppl = dict(con.execute("SELECT cell_id, value FROM metrics WHERE task = 'ppl' AND metric = 'ppl' AND "
                           "eval_len = (SELECT max(eval_len) FROM metrics WHERE task = 'ppl')").fetchall())
    ruler = dict(con.execute("SELECT cell_id, avg(value) FROM metrics WHERE suite = 'ruler' GROUP BY cell_id").fetchall())
    con.close()
    from scipy.stats import kendalltau
    common = sorted(set(ppl) & set(ruler))
    expected = kendalltau([ppl[c] for c in common], [ruler[c] for c in common])
    rows = {r[0][1]: [t for _, t in r] for r in section_tables(html, "correlation")[0]}
    assert set(rows) == {"passkey", "needle", "ruler"}
    assert rows["ruler"][1:4] == [str(len(common)), f"{expected.statistic:+.2f}", f"{expected.pvalue:.3f}"]
    assert rows["ruler"][4:7] == ["RULER", "-0.7191", "0.0041"]  # the reference study's values
    assert rows["needle"][4:7] == ["Needle", "-0.7191", "0.0041"] and rows["passkey"][4] == "—"


def test_reference_column_and_claims_scoreboard(rendered):
    html, _ = rendered
    reference, claims = section_tables(html, "reference")
    by_cell = {r[0][1].split(" ")[0]: [t for _, t in r] for r in reference}
    assert by_cell["pi-exact-512-ft"][-5:] == ["PI", "5.95", "42.1", "57.66", "33.48"]
    assert by_cell["none-exact-256-frozen"][-5] == "LLaMA2 (4k)"
    assert by_cell[MISSING_CELL][-5:] == ["—"] * 5  # static NTK has no counterpart in the paper
    assert "published numbers of the reference study" in html
    verdicts = {int(r[0][1]): (r[3][1], r[4][1]) for r in claims}
    assert sorted(verdicts) == list(range(1, 8))
    assert all(v in ("supported", "not supported", "not testable") for v, _ in verdicts.values())
    assert verdicts[5][0] == verdicts[7][0] == "not testable"
    # claim 1: every tau is negative but, over 3-4 cells, none is significant: neither confirmed nor refuted
    assert verdicts[1][0] == "not testable" and "not significant at p < 0.05" in verdicts[1][1]
    # claim 6: base 31.0 at 128 tokens, fine-tuned 30.2 (pi) and 29.6 (yarn, and the hostile copy): all better
    assert verdicts[6] == ("not supported", "at 128 tokens the base reaches 31; 0 of 3 fine-tuned cells are "
                                            "worse (29.6 to 30.2)")
    # claim 3: pi 61.0/22.9 = 2.66x and yarn 36.0/20.7 = 1.74x one length beyond training; both beat the base
    assert verdicts[3][0] == "supported" and "3 of 3 cells beat the base" in verdicts[3][1]


def test_findings_cite_cells_and_name_absent_ones(rendered):
    html, _ = rendered
    items = re.findall(r'<ul class="findings">(.*?)</ul>', html, flags=re.S)[0].split("<li>")[1:]
    assert 4 <= len(items) <= 6
    assert all("Cells: <code>" in item for item in items)
    assert ABSENT_CELL in items[0] and "no cell record" in items[0] and MISSING_CELL in items[0]
    assert any("lowest perplexity is 152" in item for item in items)
    contradict = [i for i in items if i.startswith("The data contradict the reference study on")]
    assert contradict and "claim 6" in contradict[0]


def test_provenance_has_config_and_rerun_command_per_cell(rendered):
    html, _ = rendered
    assert html.count('<details class="cell-config">') == 6
    assert ("snakemake results/" + escape(HOSTILE) + "/cells/pi-exact-512-ft/eval/ppl.json --cores all "
            "--forcerun finetune evaluate") in html
    assert "--forcerun evaluate --config" in html  # the frozen base is only re-evaluated
    assert f"{95:064x}" in html  # a data split's hash
    assert "transformers" in html and "Database schema version" in html


def test_exports_hold_the_report_tables(rendered):
    html, db = rendered
    folder = db.parent / report.EXPORT_DIR
    names = {p.name for p in folder.iterdir()}
    for table in ("cells", "perplexity", "retrieval_passkey", "retrieval_needle", "suite_ruler_accuracy",
                  "correlation", "claims", "efficiency"):
        assert {f"{table}.csv", f"{table}.parquet"} <= names, table
    con = duckdb.connect(str(db), read_only=True)
    n_ppl = con.execute("SELECT count(*) FROM metrics WHERE task = 'ppl' AND metric = 'ppl'").fetchone()[0]
    assert con.execute(f"SELECT count(*) FROM '{folder / 'perplexity.parquet'}'").fetchone()[0] == n_ppl
    assert con.execute(f"SELECT count(*) FROM read_csv('{folder / 'perplexity.csv'}')").fetchone()[0] == n_ppl
    assert con.execute(f"SELECT count(*) FROM '{folder / 'claims.parquet'}'").fetchone()[0] == 7
    cells = con.execute(f"SELECT cell_id, status FROM '{folder / 'cells.parquet'}'").fetchall()
    con.close()
    assert (ABSENT_CELL, "no cell record") in cells and (HOSTILE_CELL, "ok") in cells


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Injected into a copy of the report only (the report itself has no scripts): after layout, record the
# rendered size of every SVG figure and every uncaught error on <body> for --dump-dom to show.
PROBE = """<script>
window.addEventListener("error", e => document.body.setAttribute("data-errors", (document.body.getAttribute("data-errors") || "") + e.message + ";"));
window.addEventListener("load", () => {
  const sizes = [...document.querySelectorAll("svg.chart")].map(s => { const r = s.getBoundingClientRect();
    return Math.round(r.width) + "x" + Math.round(r.height); });
  document.body.setAttribute("data-svg-sizes", sizes.join(","));
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs Debian's chromium package "
                                              "(apt-get install chromium); not installed here")
def test_report_in_headless_chromium(rendered, tmp_path):
    html, _ = rendered
    page = tmp_path / "report.html"
    page.write_text(html)
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0", "--window-size=1280,3000"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    assert "CONSOLE" not in run.stderr, run.stderr  # no console message: no errors, no blocked loads
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert "data-errors" not in body, body
    sizes = re.search(r'data-svg-sizes="([^"]*)"', body).group(1).split(",")
    assert len(sizes) == len(re.findall(r'<svg class="chart"', html)) > 0
    for size in sizes:
        width, height = map(int, size.split("x"))
        assert width > 0 and height > 0, sizes
    print(f"screenshot: {shot}")


PDFTOTEXT = shutil.which("pdftotext")
# Injected into a copy whose print rules apply on screen too, in a window as wide as an A4 page's text: after layout,
# record every table or figure wider than the page and every closed <details> whose content takes no space.
PRINT_PROBE = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth, bad = [];
  document.querySelectorAll("table, figure, pre, .scroll").forEach((e, i) => {
    const r = e.getBoundingClientRect();
    if (r.right > width + 1 || e.scrollWidth > e.clientWidth + 1) bad.push(e.tagName + i + ":" + Math.round(r.right));
  });
  document.querySelectorAll("details:not([open]) > :not(summary)").forEach((e, i) => {
    if (e.getBoundingClientRect().height === 0) bad.push("details" + i);
  });
  document.body.setAttribute("data-print-problems", bad.join(",") || "none");
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None or PDFTOTEXT is None,
                    reason="the print test needs Debian's chromium and poppler-utils (apt-get install chromium "
                           "poppler-utils); not installed here")
def test_printed_report_opens_every_details_and_clips_nothing(rendered, tmp_path):
    html, _ = rendered
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    page, pdf = tmp_path / "report.html", tmp_path / "report.pdf"
    page.write_text(html)
    subprocess.run([*flags, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()], capture_output=True,
                   timeout=120)
    text = subprocess.run([PDFTOTEXT, str(pdf), "-"], capture_output=True, text=True, timeout=60).stdout
    # only inside collapsed <details>: the per-task tables, the rerun commands, the resolved configurations
    assert "Table 4.1.1." in text and "--forcerun finetune evaluate" in text and '"steps": 30' in text
    assert "Appendix A" in text and "Table A.3." in text
    probed = tmp_path / "print-probed.html"
    probed.write_text(html.replace("@media print {", "@media all {").replace("</body>", PRINT_PROBE + "</body>"))
    # 703 px: the text width of an A4 page with the report's 12 mm side margins (186 mm at 96 px per inch)
    dom = subprocess.run([*flags, "--hide-scrollbars", "--window-size=703,3000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-print-problems="none"' in dom.stdout, re.search(r'data-print-problems="[^"]*"', dom.stdout)


def test_failed_cell_shows_its_reason(tmp_path):
    """A cell whose fine-tune diverged (failed.json) is reported as failed with the reason, not dropped."""
    study = build_study(tmp_path / "results")
    cell = "pi-exact-512-ft"
    (study / "cells" / cell / "failed.json").write_text(json.dumps({
        "schema_version": 1, "cell_id": cell, "stage": "finetune",
        "reason": "FloatingPointError: loss became nan at step 7 <b>", "config_hash": "x"}))
    db = study / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    out = study / "report.html"
    report.render_report(db, out)
    html = out.read_text()
    badge = escape("failed: finetune: FloatingPointError: loss became nan at step 7 <b>")
    assert f'<span class="badge">{badge}</span>' in html
    assert f"{cell} ({badge})" in html  # the first finding names it with its reason


def test_graded_retrieval_and_effective_lengths(rendered, tmp_path):
    """Per-token accuracy and the answer's log-probability get their own tables; each cell's effective length is
    the longest length up to which its accuracy stays at or above the threshold: the lower end of the 95% Wilson
    interval of the base cell's accuracy at the base window (the accuracy itself when its n is unknown)."""
    html, _ = rendered
    assert "per-answer-token accuracy (%)" in html and "mean log-probability of the answer" in html
    from workflow.report.sections import effective_lengths

    cells = [{"cell_id": c} for c in ("base", "a", "b", "c")]
    rows = [{"cell_id": cid, "eval_len": n, "value": v} for cid, vals in
            (("base", [0.9, 0.8, 0.1]), ("a", [0.95, 0.85, 0.7]), ("b", [0.8, 0.95, 0.95]), ("c", [1.0, 1.0, 0.95]))
            for n, v in zip((256, 512, 1024), vals)]
    eff = effective_lengths(cells, rows, "base", 256)
    assert eff["threshold"] == 0.9
    assert eff["cells"]["base"]["length"] == 256 and eff["cells"]["a"]["length"] == 256
    assert eff["cells"]["b"]["length"] is None and eff["cells"]["b"]["text"] == "—"   # below at the shortest
    assert eff["cells"]["c"]["length"] == 1024 and eff["cells"]["c"]["text"] == "≥ 1k"

    # with the base's prompt count: 50 of 50 correct gives the Wilson lower bound z² / (n + z²) = 0.9286
    z2 = 1.959963984540054 ** 2
    rows = [{"cell_id": cid, "eval_len": n, "value": v, "n": 50} for cid, vals in
            (("base", [1.0, 1.0, 0.0]), ("a", [0.98, 0.94, 0.92]), ("b", [1.0, 0.90, 1.0]))
            for n, v in zip((256, 512, 1024), vals)]
    eff = effective_lengths(cells, rows, "base", 256)
    assert eff["threshold"] == pytest.approx(50 / (50 + z2), abs=1e-9)
    assert (eff["base_accuracy"], eff["base_n"]) == (1.0, 50)
    assert eff["cells"]["a"]["length"] == 512       # 0.98 and 0.94 are within the noise of 50/50, 0.92 is not
    assert eff["cells"]["b"]["length"] == 256       # 0.90 at 512 ends it, whatever comes after
    assert "Effective needle length per cell" in html and "Effective passkey length per cell" in html
    assert "lower end of its 95% Wilson interval" in html


def test_benchmark_rows_written_into_the_study_database_are_shown(tmp_path):
    """A benchmark tool's rows (here: the generation benchmark's form) appear in Table 9 with their numbers; without
    any, the table is absent."""
    import datetime

    study = build_study(tmp_path / "results")
    db = study / "metrics.duckdb"
    store.ingest(study, db, echo=False)
    report.render_report(db, study / "report.html")
    assert "Table 9." not in (study / "report.html").read_text()
    row = {"run_id": "r1", "study": "fixture", "measured_at": datetime.datetime(2026, 12, 1), "hardware": "CPU x2",
           "phase": "generate", "cell_id": "none-lm_infinite-256-frozen", "rope": "none", "attention": "lm_infinite",
           "seq_len": 4096, "rows": 1, "tokens_per_s": 43.6, "peak_mem_mb": 28.0, "mfu": None, "flops_per_token": None,
           "throughput_vs_base": 1.58, "memory_vs_base": 0.65,
           "config": {"prefill_s": 0.6035, "decode_s_per_token": 0.004, "generate_over_forward": 0.96, "new_tokens": 32}}
    assert store.write_benchmarks(db, [row]) == 1
    report.render_report(db, study / "report.html")
    html = (study / "report.html").read_text()
    table = re.search(r"Table 9\..*?</table>", html, flags=re.S).group(0)
    cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", table.split("<tbody>")[1])
    assert cells[:13] == ["generate", "none-lm_infinite-256-frozen", "lm_infinite", "4k", "43.6", "603.5", "4.0",
                          "0.96", "28", "—", "1.58×", "0.65×", "CPU x2"]
    assert not html_errors(html)
    # a re-run of the same benchmark replaces the earlier row in the table (the database keeps both)
    again = {**row, "run_id": "r2", "measured_at": datetime.datetime(2026, 12, 2), "tokens_per_s": 50.1}
    assert store.write_benchmarks(db, [again]) == 1
    report.render_report(db, study / "report.html")
    table = re.search(r"Table 9\..*?</table>", (study / "report.html").read_text(), flags=re.S).group(0)
    cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", table.split("<tbody>")[1])
    assert len(cells) == 13 and cells[4] == "50.1"


def test_training_data_says_which_fine_tuning_recipe_was_used():
    from workflow.report.cells import describe_training_data

    def finetune(**synthetic):
        return describe_training_data({"finetune": {"synthetic": synthetic}}, None)["finetune"]

    assert finetune(kv=0.0, copy=0.0, length="train_len") == "text only, as the reference study fine-tunes"
    assert (finetune(kv=0.3, copy=0.2, length="train_len")
            == "30% key/value rows and 20% copy rows at the training length")
    replay = finetune(kv=0.3, copy=0.2, length="base_window")
    assert replay.startswith("30% key/value rows and 20% copy rows of the base window") and "replayed" in replay
