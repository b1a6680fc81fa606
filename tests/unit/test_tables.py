"""The markdown table every report writes: header, rule, rows."""

from __future__ import annotations

import pytest

from megex.tables import markdown_table


def test_header_rule_and_rows():
    rows = [["dfme", "12.5%", "40.0%"], ["megex", "-", "x"]]
    assert markdown_table(["method", "1k", "10k"], rows) == [
        "| method | 1k | 10k |",
        "| --- | --- | --- |",
        "| dfme | 12.5% | 40.0% |",
        "| megex | - | x |",
    ]


def test_cells_that_are_not_strings_are_written_with_str():
    lines = markdown_table(("size", "d", "ratio", "note"), [(28, 784, 0.5, None)])
    assert lines[2] == "| 28 | 784 | 0.5 | None |"


def test_rows_may_be_any_iterable_of_sequences():
    lines = markdown_table(["a", "b"], ((i, i * i) for i in range(3)))
    assert lines[2:] == ["| 0 | 0 |", "| 1 | 1 |", "| 2 | 4 |"]


def test_a_table_without_rows_is_its_header_and_rule():
    assert markdown_table(["monitor", "kind"], []) == ["| monitor | kind |", "| --- | --- |"]
    assert markdown_table(["monitor"]) == ["| monitor |", "| --- |"]


def test_alignment_marks_the_rule_of_the_columns_given():
    lines = markdown_table(["a", "b", "c", "d"], [], align=["", "right", "center", "left"])
    assert lines[1] == "| --- | ---: | :---: | :--- |"
    # Columns past the end of `align` keep the plain rule.
    assert markdown_table(["a", "b", "c"], align=["", "right"])[1] == "| --- | ---: | --- |"


def test_a_tight_rule_has_no_spaces():
    lines = markdown_table(["defence", "dfme"], [["none", "80%"]], tight_rule=True)
    assert lines == ["| defence | dfme |", "|---|---|", "| none | 80% |"]
    assert markdown_table(["a", "b"], align=["right"], tight_rule=True)[1] == "|---:|---|"


@pytest.mark.parametrize(
    ("header", "rows", "align"),
    [
        ([], [], []),  # no columns
        (["a", "b"], [["only one"]], []),  # a row shorter than the header
        (["a"], [["x", "y"]], []),  # a row longer than the header
        (["a"], [], ["right", "right"]),  # more alignments than columns
        (["a"], [], ["middle"]),  # an alignment that does not exist
    ],
)
def test_a_malformed_table_is_refused(header, rows, align):
    with pytest.raises(ValueError, match="markdown table"):
        markdown_table(header, rows, align=align)
