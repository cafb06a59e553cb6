"""The losses chapter (notebooks/07_losses.ipynb) has the shape the book relies on: typed,
documented parameters that point at the book's model by default, a colour bar with every heat map,
and the closing "What we saw" and "Exercises" sections with one folded solution per exercise.
Its execution is tested by test_notebooks.py; this file only reads the notebook."""

from __future__ import annotations

import json
import re

import pytest

PARAMETER = re.compile(r"^(\w+): (str|int|float|bool|list\[str\]) = .+  # \S.*$")


@pytest.fixture(scope="module")
def chapter(repo_root):
    return json.loads((repo_root / "notebooks" / "07_losses.ipynb").read_text())


def sources(nb, kind):
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_parameters_are_typed_and_default_to_the_book_model(chapter):
    lines = sources(chapter, "code")[0].splitlines()
    assignments = [line for line in lines if not line.startswith("#")]
    assert assignments and all(PARAMETER.match(line) for line in assignments), assignments
    assert assignments[0] == (
        'model_dir: str = ""  # run folder of a trained model; empty: the book\'s model '
        "(runs/book_model)"
    )


def test_every_heat_map_has_a_colour_bar(chapter):
    for src in sources(chapter, "code"):
        if "imshow(" in src and "denormalize" not in src:  # the image thumbnails need none
            assert "colorbar" in src, src[:200]


def test_ends_with_conclusions_and_exercises_with_folded_solutions(chapter):
    text = "\n".join(sources(chapter, "markdown"))
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings[-2:] == ["What we saw", "Exercises"]
    exercises = re.findall(r":::\{exercise\}\n:label: (losses-ex-\d+)", text)
    solutions = re.findall(r":::\{solution\} (losses-ex-\d+)\n:class: dropdown", text)
    assert 2 <= len(exercises) <= 4 and len(set(exercises)) == len(exercises)
    assert solutions == exercises


def test_prose_names_no_internal_files(chapter):
    text = "\n".join(sources(chapter, "markdown") + sources(chapter, "code"))
    for word in ("METHOD.md", "PROVENANCE", "/work/", "ticket"):
        assert word not in text, word
