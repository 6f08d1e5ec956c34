"""The notebooks with their exercises solved: every self-check must pass.

For each notebook, the exercise cells (those starting ``# %load solutions/...``)
are replaced by the solution file, as ``%load`` does, and run with the
notebook's setup cell and the check that follows each exercise, under
``NNLAB_REQUIRE_CHECKS=1`` so a check that does not pass raises.  The
unsolved notebooks run top to bottom under nbval (``make test``), where each
check prints NOT YET.  Each exercise is self-contained: no later cell uses it.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LOAD = re.compile(r"^# %load (solutions/\S+\.py)\s*$", re.M)


def exercise_notebooks():
    found = []
    for path in sorted(NOTEBOOKS.glob("0*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any(c.cell_type == "code" and LOAD.match(c.source.split("\n")[0]) for c in nb.cells):
            found.append(path.name)
    return found


def test_every_course_notebook_from_01_to_06_has_an_exercise():
    names = exercise_notebooks()
    for n in ("01", "02", "03", "04", "05", "06"):
        assert any(name.startswith(n) for name in names), f"notebook {n} has no exercise"


def solved_cells(nb):
    """The setup cell, then each exercise's solution and its check."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = next(c for c in code if "import nnlab" in c.source)
    cells = [nbformat.v4.new_code_cell(setup.source)]
    for i, cell in enumerate(code):
        m = LOAD.match(cell.source.splitlines()[0]) if cell.source else None
        if m:
            solution = (NOTEBOOKS / m.group(1)).read_text()
            cells.append(nbformat.v4.new_code_cell(f"# %load {m.group(1)}\n{solution}"))
            check = code[i + 1]
            assert "checks." in check.source, f"the cell after {m.group(1)} must run its self-check"
            cells.append(nbformat.v4.new_code_cell(check.source))
    return cells


@pytest.mark.parametrize("name", exercise_notebooks())
def test_solutions_pass_their_checks(name, monkeypatch):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    solved = nbformat.v4.new_notebook(metadata=nb.metadata)
    solved.cells = solved_cells(nb)
    assert len(solved.cells) >= 3
    monkeypatch.setenv("NNLAB_REQUIRE_CHECKS", "1")
    monkeypatch.setenv("NNLAB_QUICK", "1")
    NotebookClient(solved, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = "".join(o.get("text", "") for c in solved.cells for o in c.get("outputs", []))
    assert outputs.count("PASS") == (len(solved.cells) - 1) // 2, outputs
    assert "FAIL" not in outputs and "NOT YET" not in outputs
