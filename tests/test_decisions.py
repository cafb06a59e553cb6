"""The decisions page read as data: every row found, every evidence cell of a known kind."""

from __future__ import annotations

import re

import pytest

from cmpagl.decisions import EVIDENCE_KINDS, evidence_kind, read_decisions


def test_the_book_decisions_page_reads_completely(repo_root):
    page = repo_root / "book" / "decisions.md"
    rows = read_decisions(page)
    table_rows = re.findall(r"^\| \d+ \|", page.read_text(encoding="utf-8"), re.M)
    assert len(rows) == len(table_rows) > 40
    assert [r.number for r in rows] == list(range(1, len(rows) + 1))
    assert {r.kind for r in rows} <= set(EVIDENCE_KINDS)
    assert all(r.section and r.decision and r.default and r.switch for r in rows)
    # each validation row names the record or script that produced its numbers
    for r in rows:
        if r.kind == "validation run":
            assert "results/" in r.evidence or "experiments/" in r.evidence, r.number


@pytest.mark.parametrize(
    "text,kind,open_",
    [
        ("validation split of the UCM subset: 8.07 vs 7.14", "validation run", False),
        ("design: the test split never chooses a setting", "design argument", False),
        (
            "design: γ = 0 makes it Swin; the value is to be chosen on the validation split",
            "design argument",
            True,
        ),
        ("as in ALBEF; to be confirmed on the validation split", "paper or published method", True),
        ("the paper's split", "paper or published method", False),
        ("budget", "budget", False),
        ("to be chosen on the validation split", "open", True),
    ],
)
def test_evidence_kinds(tmp_path, text, kind, open_):
    assert evidence_kind(text) == kind
    page = tmp_path / "d.md"
    page.write_text(
        f"## Part\n\n| # | decision | default | switch | evidence |\n|---|---|---|---|---|\n"
        f"| 1 | a `x \\| y` choice | `a|b` | `model.x` | {text} |\n\nafter the table\n",
        encoding="utf-8",
    )
    (row,) = read_decisions(page)
    assert (row.kind, row.open, row.section) == (kind, open_, "Part")
    assert row.decision == "a `x | y` choice" and row.default == "`a|b`"


def test_bad_rows_are_named_by_line(tmp_path):
    page = tmp_path / "d.md"
    head = "## P\n\n| # | decision | default | switch | evidence |\n|---|---|---|---|---|\n"
    page.write_text(head + "| 1 | a | b | c |\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.md:5: a decision row needs 5 cells, found 4"):
        read_decisions(page)
    page.write_text(head + "| 1 | a | b | c | because I said so |\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.md:5: evidence of an unknown kind"):
        read_decisions(page)
    page.write_text(
        head + "| 1 | a | b | c | budget |\n| 1 | a | b | c | budget |\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"numbers used twice: \[1\]"):
        read_decisions(page)
