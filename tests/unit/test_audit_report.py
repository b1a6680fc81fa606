"""The audit's report: the markdown's figures, the HTML's escaping and embedded plots, and the
files write_report leaves (strict JSON, PNGs; without matplotlib, a note instead)."""

from __future__ import annotations

import base64
import json
import math
import sys
from html.parser import HTMLParser

import pytest
from audit_support import example_summary

from megex.experiments.audit import cells
from megex.experiments.audit.html import render_html
from megex.experiments.audit.report import markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_the_answer_comes_first_with_each_verdict():
    md = markdown(example_summary())
    answer = md.index("## Answer")
    first_threat_model = md.index("## Data-free attacker")
    for verdict in ("at least 2.5x fewer queries", "the maps give no lead the intervals can see"):
        assert answer < md.index(verdict) < first_threat_model
    assert md.startswith("# megex audit\n")


def test_the_accuracy_table_writes_points_intervals_and_na():
    lines = _lines(markdown(example_summary()))
    assert "| 10k | 70.5 [69.0, 72.0] | 75.3 [74.0, 76.6] | +4.8 [4.0, 5.7] |" in lines
    # NaN ends and a missing paired difference.
    assert "| 20k | 86.1 [n/a, n/a] | 90.2 [88.0, 92.4] | n/a |" in lines
    assert "| 2k | 88.0 [87.0, 89.0] | 87.1 [86.0, 88.0] | -0.9 [-2.0, 0.3] |" in lines
    assert "nan" not in "\n".join(lines).lower()


def test_the_leakage_table_writes_factors_bounds_and_unreached_targets():
    lines = _lines(markdown(example_summary()))
    assert (
        "| 50% of the victim (48.5%) | 3/3 runs | 3/3 runs | 7.5k | 3.75k "
        "| predictions alone need 2.0x [1.5, 2.6] |"
    ) in lines
    assert (
        "| 80% of the victim (77.6%) | 2/3 runs | 3/3 runs | 20k | 8k "
        "| predictions alone need at least 2.5x |"
    ) in lines
    assert (
        "| 95% of the victim (92.2%) | 0/3 runs | 0/3 runs | n/a | n/a "
        "| not reached by either within 20k queries |"
    ) in lines


def test_the_defences_monitors_plan_and_victim():
    md = markdown(example_summary())
    lines = _lines(md)
    assert (
        "| quantize:bits=2 | explanation | 97.0 (+0.0) | 0.57 | 70.0 [68.0, 72.0] "
        "| +0.5 [-1.0, 2.0] | 71.2 [70.0, 72.4] | +4.1 [3.0, 5.2] | +1.2 [-0.4, 2.8] "
        "| takes most of the maps' lead at no cost to honest users |"
    ) in lines
    assert "| top1 | prediction | 96.2 (-0.8) | n/a |" in md
    assert "| prada | data-free | megex-predicted | 2/3 runs | 1.2k |" in lines
    assert "- **smoothgrad maps**: the service returns gradient maps only" in lines
    assert "- 3 attack seeds on one victim: the intervals are over seeds, not victims" in lines
    assert "- **Wall time**: estimated 4.0 min, took 5.2 min" in lines
    assert "- **Time limit**: 30.0 min" in lines
    assert "- budget 40k dropped to fit the time limit" in lines
    assert "megex audit --victim victims/digits.safetensors --out audit" in lines
    assert "| dfme | 0.80 ms | 2k |" in lines
    assert "97.0% top-1 on the test split (the victim's sidecar)" in md


def test_sections_not_run_say_why():
    summary = example_summary()
    summary["defenses"] = None
    summary["monitors"] = None
    summary["skipped"] = [{"part": "defences", "why": "the victim is a URL"}]
    summary["plan"]["reductions"] = []
    md = markdown(summary)
    assert "## Defences\n\nNot run: the victim is a URL.\n" in md
    assert "## Monitors\n\nNot run.\n" in md
    assert "No reductions." in md
    assert "taken from" not in md


def test_cells():
    assert cells.points_interval({"estimate": 0.048, "low": 0.040, "high": 0.057}) == (
        "+4.8 [4.0, 5.7]"
    )
    assert cells.points(-0.0001) == "+0.0"
    assert cells.points(None) == cells.pct(math.nan) == cells.pct_interval(None) == "n/a"
    assert cells.factor({"estimate": 2.14, "low": math.nan, "high": 3.0}) == "2.1x [n/a, 3.0]"
    row = {"factor": {"estimate": 0.6, "low": 0.4, "high": 0.8}, "bound": "at_most"}
    assert cells.leakage(row, 20000) == "predictions alone need at most 0.6x"
    row = {"factor": None, "bound": None, "baseline_reached": 1, "attacker_reached": 0}
    assert cells.leakage(row, 20000) == "no ratio (too few runs reached it)"
    assert [cells.duration(s) for s in (45, 240, 7200, None)] == ["45 s", "4.0 min", "2.0 h", "n/a"]


class _Cells(HTMLParser):
    """The text of every table cell, and whether each opened element was closed."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.open: list[str] = []
        self.errors: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(tag)
        if tag in ("td", "th"):
            # A figure's interval is kept whole on a line by non-breaking spaces.
            self.cells.append("".join(self._cell or []).replace("\xa0", " "))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _markdown_cells(md: str) -> list[str]:
    cells_ = []
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| :"):
            cells_ += [c.replace("\\|", "|") for c in line[2:-2].split(" | ")]
    return cells_


def _parsed(page: str) -> _Cells:
    parser = _Cells()
    parser.feed(page)
    parser.close()
    return parser


def test_html_has_the_markdowns_cells_and_is_well_formed():
    summary = example_summary()
    summary["defenses"][0]["rows"][0]["spec"] = "noise:sigma=0.1|clip"  # a pipe in a cell
    page = render_html(summary, {})
    parsed = _parsed(page)
    assert parsed.errors == [] and parsed.open == []
    assert parsed.cells == _markdown_cells(markdown(summary))
    assert "+4.8 [4.0, 5.7]" in parsed.cells and "86.1 [n/a, n/a]" in parsed.cells
    assert page.startswith("<!DOCTYPE html>") and "<title>megex audit</title>" in page


def test_html_escapes_the_summarys_strings():
    summary = example_summary()
    summary["victim"]["source"] = 'http://x/<script>alert("x")</script>'
    summary["threat_models"][0]["verdict"] = "<img src=x onerror=alert(1)> & more"
    summary["defenses"][0]["rows"][1]["spec"] = "<b>top1</b>"
    page = render_html(summary, {})
    assert "<script" not in page.lower() and "<b>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; more" in page
    assert "<td>&lt;b&gt;top1&lt;/b&gt;</td>" in page


def test_html_embeds_each_plot_and_loads_nothing():
    images = {
        "data-free": b"\x89PNG one",
        "with-images": b"\x89PNG two",
        "defenses-data-free": b"three",
    }
    page = render_html(example_summary(), images)
    for png in images.values():
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert page.count("<img ") == 3
    for loader in ("<link", "<script", "url(", "@import", 'src="http', "href="):
        assert loader not in page
    # A plot that was not drawn is left out.
    assert render_html(example_summary(), {"data-free": b"x"}).count("<img ") == 1


def _no_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def _same(written, original) -> bool:
    """JSON's copy of a value: NaN written as null, tuples as lists."""
    if isinstance(original, float) and math.isnan(original):
        return written is None
    if isinstance(original, dict):
        return written.keys() == original.keys() and all(
            _same(written[k], original[k]) for k in original
        )
    if isinstance(original, list | tuple):
        return len(written) == len(original) and all(map(_same, written, original))
    return written == original


def test_write_report_writes_strict_json_markdown_html_and_plots(tmp_path):
    summary = example_summary()
    paths = write_report(summary, tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert names == sorted(
        ["report.json", "report.md", "report.html"]
        + ["plots/data-free.png", "plots/with-images.png", "plots/defenses-data-free.png"]
    )
    text = (tmp_path / "report.json").read_text()
    written = json.loads(text, parse_constant=_no_constant)
    assert _same(written, summary)
    assert written["threat_models"][0]["accuracy"][2]["baseline"]["low"] is None
    assert written["threat_models"][0]["accuracy"][1]["difference"] == {
        "estimate": 0.048,
        "low": 0.040,
        "high": 0.057,
    }
    page = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    for key in ("data-free", "with-images", "defenses-data-free"):
        png = (tmp_path / "plots" / f"{key}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert base64.b64encode(png).decode() in page
        assert f"](plots/{key}.png)" in md
    assert md == markdown(
        summary, {k: f"plots/{k}.png" for k in ("data-free", "with-images", "defenses-data-free")}
    )
    assert not list(tmp_path.rglob("*.tmp*"))


def test_write_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    summary = example_summary()
    paths = write_report(summary, tmp_path)
    assert sorted(p.name for p in paths) == ["report.html", "report.json", "report.md"]
    assert not list(tmp_path.rglob("*.png"))
    md = (tmp_path / "report.md").read_text()
    assert "- **plots**: matplotlib is not installed (pip install 'megex[plots]')" in md
    assert "![" not in md
    page = (tmp_path / "report.html").read_text()
    assert "pip install &#x27;megex[plots]&#x27;" in page and "<img" not in page
    written = json.loads((tmp_path / "report.json").read_text(), parse_constant=_no_constant)
    assert written["skipped"][-1]["part"] == "plots"
    assert summary["skipped"] == [example_summary()["skipped"][0]]  # the input is left as it was


def test_a_summary_that_is_only_skips_still_reports(tmp_path):
    summary = example_summary()
    summary.update(threat_models=[], defenses=None, monitors=None, caveats=[])
    summary["skipped"] = [{"part": "attacks", "why": "the URL did not answer"}]
    write_report(summary, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No attack was run: see Skipped." in md
    assert "- **attacks**: the URL did not answer" in md
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_report_json_has_no_non_finite_numbers(tmp_path, value):
    summary = example_summary()
    summary["wall_s"] = value
    write_report(summary, tmp_path)
    written = json.loads((tmp_path / "report.json").read_text(), parse_constant=_no_constant)
    assert written["wall_s"] is None
