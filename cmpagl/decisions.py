"""The decisions page (``book/decisions.md``) read as data: every [decision] with its evidence.

The page holds one Markdown table per part of the method, each row a decision: ``#``, what was
decided, the default, the config switch and the evidence. :func:`read_decisions` returns those
rows; :func:`evidence_kind` sorts each row's evidence into the kinds a reader asks about (was it
measured on a validation split, taken from a published method, a design argument, a budget, or
still open), so the reproduction chapter can count them and list what is still to be measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EVIDENCE_KINDS", "Decision", "evidence_kind", "read_decisions"]

#: Kinds of evidence, in the order the book lists them.
EVIDENCE_KINDS = (
    "validation run",
    "paper or published method",
    "design argument",
    "budget",
    "open",
)

_PUBLISHED = ("as in albef", "the paper's", "bert's rule", "the dsl code")
_OPEN = ("to be chosen", "to be confirmed")


@dataclass(frozen=True)
class Decision:
    """One row of the decisions page.

    Attributes:
        number: the row's ``#``; section: the ``##`` heading above its table.
        decision, default, switch, evidence: the row's cells, Markdown as written.
        kind: :func:`evidence_kind` of ``evidence``.
        open: the evidence says the value is still to be chosen or confirmed on validation.
    """

    number: int
    section: str
    decision: str
    default: str
    switch: str
    evidence: str
    kind: str
    open: bool


def evidence_kind(evidence: str) -> str:
    """The kind of an evidence cell (one of :data:`EVIDENCE_KINDS`).

    ``validation …`` (a measured validation result) -> "validation run"; ``design: …`` ->
    "design argument" (even where it adds that the value is to be chosen on validation; see
    :attr:`Decision.open`); a published source (ALBEF, the paper, BERT's rule, the DSL code) ->
    "paper or published method"; ``budget`` -> "budget"; "to be chosen …" alone -> "open".
    """
    text = evidence.strip().lower()
    if text.startswith("validation"):
        return "validation run"
    if text.startswith("design"):
        return "design argument"
    if text.startswith(_PUBLISHED):
        return "paper or published method"
    if text.startswith("budget"):
        return "budget"
    if any(p in text for p in _OPEN):
        return "open"
    raise ValueError(f"evidence of an unknown kind: {evidence[:80]!r}")


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row; a pipe inside backticks or escaped stays in its cell."""
    body = line.strip()[1:-1]
    cells, current, in_code = [], [], False
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            current.append("|")
            i += 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    cells.append("".join(current).strip())
    return cells


def read_decisions(path: str | Path) -> list[Decision]:
    """Every decision row of the page at ``path``, in page order.

    A decision table is a Markdown table whose header row starts ``| # | decision``; its rows
    have five cells. Raises ValueError naming the line of a row with another number of cells,
    a repeated ``#``, or evidence of an unknown kind.
    """
    rows: list[Decision] = []
    section, in_table = "", False
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("## "):
            section, in_table = line[3:].strip(), False
            continue
        if re.match(r"^\|\s*#\s*\|\s*decision\s*\|", line):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if re.match(r"^\|[\s|:-]+\|$", line):  # the separator row
            continue
        cells = _cells(line)
        if len(cells) != 5:
            raise ValueError(f"{path}:{lineno}: a decision row needs 5 cells, found {len(cells)}")
        number, decision, default, switch, evidence = cells
        try:
            kind = evidence_kind(evidence)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        rows.append(
            Decision(
                int(number),
                section,
                decision,
                default,
                switch,
                evidence,
                kind,
                any(p in evidence.lower() for p in _OPEN),
            )
        )
    numbers = [r.number for r in rows]
    if len(set(numbers)) != len(numbers):
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        raise ValueError(f"{path}: decision numbers used twice: {twice}")
    return rows
