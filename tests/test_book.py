"""The book's reference pages stay true to the code: every config key the decisions page names is
a real key of the config dataclasses, and every ``cmpagl.…`` object it names can be imported."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import re

import pytest

from cmpagl.config import ExperimentConfig

SECTIONS = {
    name for name, value in vars(ExperimentConfig()).items() if dataclasses.is_dataclass(value)
}


def decision_rows(repo_root) -> list[list[str]]:
    text = (repo_root / "book" / "decisions.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"\| \d+[a-z]? \|", line)]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def resolve_key(key: str) -> None:
    """Walk ``a.b.c`` through ExperimentConfig; a pattern (``data.aug_*``,
    ``retrieval.*_grid_*``) matches at least one field."""
    node: object = ExperimentConfig()
    *path, last = key.split(".")
    for part in path:
        node = getattr(node, part)
    names = {f.name for f in dataclasses.fields(node)}
    if "*" in last:
        assert fnmatch.filter(names, last), key
    else:
        assert last in names, f"{key} is not a config key"


def resolve_object(dotted: str) -> None:
    """Import the longest module prefix of ``cmpagl.a.b.C.meth`` and getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{dotted} cannot be imported")


def test_decision_rows_are_numbered_in_order(repo_root):
    rows = decision_rows(repo_root)
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(len(r) == 5 for r in rows), "each row: number, choice, default, switch, evidence"


def test_every_switch_is_a_config_key_and_every_function_exists(repo_root):
    keys, objects = set(), set()
    for row in decision_rows(repo_root):
        for token in re.findall(r"`([^`]+)`", row[3]):
            head = token.split(".")[0]
            if head in SECTIONS:
                keys.add(token)
            elif head == "cmpagl":
                objects.add(token)
    assert len(keys) > 50 and len(objects) > 15  # the page was parsed, not skipped
    for key in sorted(keys):
        resolve_key(key)
    for dotted in sorted(objects):
        resolve_object(dotted)


def test_resolvers_catch_a_stale_name():
    with pytest.raises(AssertionError, match="not a config key"):
        resolve_key("train.learning_rate")
    with pytest.raises(AttributeError):
        resolve_object("cmpagl.train.param_groups")  # moved to cmpagl.optim
