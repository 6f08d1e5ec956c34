"""The files that install nnlab agree with each other, and notebooks are committed clean."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# PyPI name -> conda-forge name, where they differ.
CONDA_NAME = {"torch": "pytorch-cpu"}


def runtime_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = []
    for req in meta["project"]["dependencies"]:
        names.append(re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower())
    return names


def conda_packages(path):
    pkgs = []
    for line in path.read_text().splitlines():
        m = re.match(r"\s*-\s+([A-Za-z0-9_.\-]+)", line.split("#")[0])
        if m:
            pkgs.append(m.group(1).lower())
    return pkgs


@pytest.mark.parametrize("env_file", ["environment.yml", "binder/environment.yml"])
def test_environment_files_list_every_runtime_dependency(env_file):
    path = ROOT / env_file
    text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
    assert "conda-forge" in text and "defaults" not in text
    pkgs = conda_packages(path)
    missing = [d for d in runtime_dependencies() if CONDA_NAME.get(d, d) not in pkgs]
    assert not missing, f"{env_file} lacks {missing}"
    # CPU-only PyTorch, never an editable install of the local checkout.
    assert "pytorch-cpu" in pkgs and "cuda" not in text.lower()
    assert "-e ." not in text and "--editable" not in text


def test_every_conda_dependency_has_a_comment():
    for env_file in ("environment.yml", "binder/environment.yml"):
        for line in (ROOT / env_file).read_text().splitlines():
            m = re.match(r"\s*-\s+([A-Za-z0-9_.\-]+)", line)
            if m and m.group(1) not in ("python", "pip", "conda-forge"):
                assert "#" in line, f"{env_file}: say why {m.group(1)} is needed"


def test_binder_postbuild_installs_nnlab():
    post = ROOT / "binder" / "postBuild"
    text = post.read_text()
    assert post.stat().st_mode & 0o111, "postBuild must be executable"
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "postBuild must pip-install the checkout"


def notebooks():
    return sorted((ROOT / "notebooks").rglob("*.ipynb"))


def test_there_are_notebooks():
    assert any(p.name.startswith("00_") for p in notebooks())


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebooks_are_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: run `make strip`"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


def test_readme_quick_start_is_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make lab" in text and "make test" in text
    assert "conda env create -f environment.yml" in text
    assert "mybinder.org" in text and "00_" in text


@pytest.mark.parametrize("path", [p for p in notebooks() if p.parent.name == "notebooks"], ids=lambda p: p.name)
def test_notebook_has_colab_badge_and_guarded_install_cell(path):
    nb = json.loads(path.read_text())
    title = "".join(nb["cells"][0]["source"])
    address = dict(re.findall(r"^(REPO|REF) = (\S+)$", (ROOT / "binder" / "repo.mk").read_text(), re.M))
    assert f"colab.research.google.com/github/{address['REPO']}/blob/{address['REF']}/notebooks/{path.name}" in title
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    src = "".join(first_code["source"])
    assert src.startswith("# Colab only:")
    # Everything that installs is inside the Colab guard.
    body = src.split('if "google.colab" in sys.modules:\n', 1)
    assert len(body) == 2 and all(line.startswith("    ") for line in body[1].splitlines() if line.strip())


def test_binder_badge_opens_notebook_00():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"mybinder\.org/v2/gh/[^)\s]+", text)
    assert m and "urlpath=lab/tree/notebooks/00_choose_the_model.ipynb" in m.group(0)
    assert (ROOT / "notebooks" / "00_choose_the_model.ipynb").exists()
