"""docs/paper.md: one row per protocol element; each row that names a spec setting is checked
against the committed paper specs, and the page is regenerated from the rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.spec.paper_doc import ROWS, render, specs

DOC = Path(__file__).resolve().parent.parent / "docs" / "paper.md"


@pytest.mark.parametrize("row", [r for r in ROWS if r.check], ids=lambda r: r.element)
def test_the_row_matches_the_committed_specs(row):
    fixed, faithful = specs()
    assert row.check(fixed, faithful), row.element


def test_docs_paper_md_is_fresh():
    assert DOC.read_text() == render(), "run: python -m service.spec.paper_doc > docs/paper.md"


def test_the_table_covers_the_elements_the_issue_names():
    elements = " ".join(r.element.lower() for r in ROWS)
    for word in (
        "selection",
        "validation",
        "runs",
        "accuracy",
        "resolution",
        "augmentation",
        "normalisation",
        "optimiser",
        "patience",
        "sgd phase",
        "ties",
        "epoch cap",
        "precision",
        "batch",
        "weights",
        "splits",
    ):
        assert word in elements, word
