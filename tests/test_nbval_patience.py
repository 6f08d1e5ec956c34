"""The notebook tests wait long enough for a busy kernel (the root conftest.py raises nbval's waits)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''
def pytest_collection_finish(session):
    for item in session.items:
        if hasattr(item, "cell_num"):
            print("output_timeout", item.output_timeout)
    print("kernel_startup_timeout", session.config.option.nbval_kernel_startup_timeout)
'''


@pytest.mark.parametrize("paths", [
    ["tests/test_config.py", "notebooks/00_choose_the_model.ipynb"],  # as make test collects them
    ["notebooks/03_l1_regularisation.ipynb"],  # a notebook alone: tests/conftest.py is not loaded
])
def test_nbval_waits_are_raised_for_notebook_cells(tmp_path, paths):
    (tmp_path / "nbval_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "--collect-only", "-q",
         "-p", "no:cacheprovider", "-p", "nbval_probe", *paths],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    waits = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("output_timeout")]
    assert waits and all(w >= 60 for w in waits), proc.stdout[-2000:]
    assert "kernel_startup_timeout 180" in proc.stdout
