"""What the course shows a student: claims, seeds, pictures, layer names, badges and the HTML report.

The explorers' own tests are in test_widgets.py, the plots' in test_plots.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import nnlab
from nnlab import claims, config, nna, prune, quant
from nnlab.models import LeNet300100, LeNet5, VGGSmall, summary

ROOT = Path(__file__).resolve().parents[1]
#: A layer named by its position (``7``, ``3_quant``) instead of what it is (``fc1``, ``pool1_quant``).
NUMERIC = re.compile(r"^\d+(_quant)?$")


# -- claims ----------------------------------------------------------------------------------------

def test_claim_prints_what_it_checked(capsys):
    claims.claim("a network beats chance", 97.25, above=10, unit="%", means="training failed")
    out = capsys.readouterr().out
    assert out.startswith("✓ a network beats chance") and "97.25%" in out and "> 10%" in out


def test_failed_claim_says_expected_measured_and_meaning():
    with pytest.raises(claims.ClaimFailed) as err:
        claims.claim("retraining gains", 0.2, above=0.5, at_most=5, unit=" pp", means="within the noise")
    text = str(err.value)
    assert "retraining gains" in text and "expected: > 0.5 pp and <= 5 pp" in text
    assert "measured: 0.2 pp" in text and "what it means: within the noise" in text
    assert isinstance(err.value, AssertionError)


@pytest.mark.parametrize("kwargs,ok", [({"equals": 3}, True), ({"equals": 4}, False), ({"at_least": 3}, True),
                                       ({"above": 3}, False), ({"at_most": 3}, True), ({"below": 3}, False)])
def test_claim_bounds(kwargs, ok):
    if ok:
        claims.claim("three", 3, means="m", **kwargs)
    else:
        with pytest.raises(claims.ClaimFailed):
            claims.claim("three", 3, means="m", **kwargs)


def test_claim_nan_never_passes():
    with pytest.raises(claims.ClaimFailed):
        claims.claim("accuracy", float("nan"), at_least=0, means="m")


def test_claim_accepts_tensors_and_numpy_and_refuses_nonsense():
    claims.claim("tensor", torch.tensor(2.0), equals=2, means="m")
    claims.claim("numpy", np.float32(2.0), equals=2, means="m")
    with pytest.raises(ValueError, match="needs a bound"):
        claims.claim("no bound", 1.0, means="m")
    with pytest.raises(ValueError, match="means must say"):
        claims.claim("no meaning", 1.0, above=0, means="")
    with pytest.raises(TypeError, match="measured must be a real number"):
        claims.claim("text", "97%", above=0, means="m")
    with pytest.raises(TypeError, match="above must be a real number"):
        claims.claim("bool bound", 1.0, above=True, means="m")


def test_claims_log_and_keep_going(tmp_path, monkeypatch, capsys):
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv("NNLAB_CLAIMS_LOG", str(log))
    monkeypatch.setenv("NNLAB_CLAIMS_KEEP_GOING", "1")
    monkeypatch.setenv("NNLAB_SEED", "2")
    claims.claim("passes", 1.5, above=1, means="m")
    claims.claim("fails", 0.5, above=1, means="m")  # recorded and printed, not raised
    assert "✗ claim not shown by this run: fails" in capsys.readouterr().out
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c["claim"], c["measured"], c["passed"], c["seed"]) for c in lines] == [
        ("passes", 1.5, True, 2), ("fails", 0.5, False, 2)]
    assert lines[0]["bounds"] == {"above": 1} and lines[0]["threads"] == torch.get_num_threads()


def test_claims_spread_collects_every_configuration():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import claims as bench
    finally:
        sys.path.pop(0)
    runs = [{"seed": s, "threads": t, "notebook": "02_x", "claims": [
        {"claim": "gain", "measured": v, "bounds": {"above": 0.5}, "passed": v > 0.5, "unit": " pp"}]}
        for s, t, v in ((0, 1, 1.4), (0, 2, 1.7), (1, 1, 0.4))]
    (row,) = bench.spread(runs)
    assert row["values"] == {"seed0-threads1": 1.4, "seed0-threads2": 1.7, "seed1-threads1": 0.4}
    assert (row["min"], row["max"], row["failed_in"]) == (0.4, 1.7, ["seed1-threads1"])
    assert row["spread"] == pytest.approx(1.3)


# -- the course-wide seed, and the first picture ----------------------------------------------------

def test_course_seed(monkeypatch):
    monkeypatch.delenv("NNLAB_SEED", raising=False)
    assert config.course_seed() == 0
    monkeypatch.setenv("NNLAB_SEED", "2")
    assert config.course_seed() == 2
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("NNLAB_SEED", bad)
        with pytest.raises(ValueError, match=rf"NNLAB_SEED={bad!r} must be a non-negative integer"):
            config.course_seed()


def test_random_images_show_every_kind_of_digit(data):
    x, y = nnlab.data.random_images(data, 16, seed=0)
    assert x.shape == (16, 1, 28, 28) and len(set(y.tolist())) >= 5
    x2, y2 = nnlab.data.random_images(data, 16, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded
    assert len(set(nnlab.data.first_images(data, 16)[1].tolist())) == 1  # the stored order is by class
    loader_x, loader_y = nnlab.data.random_images(data.test, 8, seed=1)  # a loader works too
    assert loader_x.shape[0] == 8
    with pytest.raises(ValueError, match="n must be at most the 1,000 images"):
        nnlab.data.random_images(data, 1001)


# -- layer names a student recognises ---------------------------------------------------------------

def _numeric(names):
    return [n for n in names if NUMERIC.match(str(n))]


@pytest.mark.parametrize("builder,shape", [(LeNet5, (1, 28, 28)), (LeNet300100, (1, 28, 28)),
                                           (lambda: VGGSmall(in_channels=1, width=8, input_size=28), (1, 28, 28))])
def test_no_numeric_layer_names_in_tables(builder, shape, data):
    torch.manual_seed(0)
    model = builder().eval()
    assert not _numeric(summary(model, shape)["layer"])
    assert not _numeric(prune.sparsity_report(prune.core_by_fraction(model, 0.5))["layer"])
    q = quant.quantise_model(builder().eval(), data, 4, 8)
    assert not _numeric(quant.describe_quantisers(q)["name"])
    assert not _numeric(quant.distinct_values(q)["layer"])
    report = nna.report(nna.compile_model(q, shape))
    assert not _numeric(report["layer"])


def test_no_numeric_layer_names_in_plots_widgets_and_report(lenet, data, program, tmp_path):
    from nnlab.plots import plot_nna_costs, plot_sensitivity
    from nnlab.widgets import BitExplorer, CoringExplorer, NNAExplorer

    table = prune.sensitivity_analysis(lenet, data, sparsities=(0.0, 0.5))
    labels = [line.get_label().split()[1] for line in plot_sensitivity(table).lines]  # "layer fc1 (...)"
    assert labels and not _numeric(labels)
    fig = plot_nna_costs(nna.report(program))
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks and not _numeric(ticks)
    assert not _numeric(CoringExplorer(lenet, data, max_test=50).layer.options)
    assert not _numeric(BitExplorer(lenet, data, max_test=50).layer.options)
    assert not _numeric(d.split()[0] for d in (s.description for s in NNAExplorer(program, data, max_test=50)
                                                  .bits.values()))
    page = _report(program, data, tmp_path)
    layer_table = [t for t in re.findall(r"<table.*?</table>", page, re.S) if re.search(r">layer</th>", t)]
    assert len(layer_table) == 1
    names = [re.findall(r"<td[^>]*>([^<]*)</td>", row)[0].strip()
             for row in re.findall(r"<tr>(.*?)</tr>", layer_table[0].split("</thead>")[-1], re.S)]
    assert "fc1" in names and not _numeric(names)


# -- the HTML report ----------------------------------------------------------------------------------

def _report(program, data, out: Path) -> str:
    """write_report on a small run (untrained stages are enough to check the page)."""
    from nnlab.cli import write_report
    from nnlab.pipeline import STAGES, CompressionResult

    table = nna.report(program)
    s = nna.headline(table)
    rows = []
    for k, stage in enumerate(STAGES):
        floating = k < 4
        rows.append({"stage": stage, "accuracy": 97.123 - k * 0.1, "sparsity": 0.949992 if k else 0.0,
                     "weight_bits": 32 if floating else 4, "act_bits": 32 if floating else 8,
                     "storage_bytes": s["fp32_bytes"] if floating else s["storage_bytes"],
                     "energy_uj": s["fp32_energy_uj"] if floating else s["energy_uj"],
                     "latency_us": s["fp32_latency_us"] if floating else s["latency_us"],
                     "compression": 1.0 if floating else s["compression"],
                     "energy_ratio": 1.0 if floating else s["energy_ratio"], "hardware": s["config"]})
    result = CompressionResult(stages=pd.DataFrame(rows), settings={
        "model": "lenet5", "dataset": "mnist", "sparsity": 0.95, "weight_bits": 4, "act_bits": 8,
        "hardware": "Series2NX-like NNA"}, models={}, program=program, report=table,
        data_description=data.description, seconds=1.0)
    write_report(result, out)
    return (out / "report.html").read_text()


def test_html_report_is_rounded_for_people(program, data, tmp_path):
    page = _report(program, data, tmp_path)
    text = re.sub(r"<[^>]+>", " ", page.split("<body>", 1)[1])
    assert "NaN" not in text and "nan" not in text.split() and " uJ" not in text and "µJ" in text
    assert "0.949992" not in text and "95.0%" in text
    # Byte columns: whole numbers (report.json keeps the exact figures).
    assert json.loads((tmp_path / "report.json").read_text())["nna_layers"]
    for table in re.findall(r"<table.*?</table>", page, re.S):
        headers = [h.strip() for h in re.findall(r"<th[^>]*>([^<]*)</th>", table.split("</thead>")[0])]
        for row in re.findall(r"<tr>(.*?)</tr>", table.split("</thead>")[-1], re.S):
            cells = [c.strip() for c in re.findall(r"<td[^>]*>([^<]*)</td>", row)]
            for h, c in zip(headers, cells):
                if h.endswith("_B") or "bytes" in h:
                    assert re.fullmatch(r"[\d,]*", c), (h, c)


def test_html_report_fits_a_1300_pixel_window(program, data, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium not found (Debian: apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    _report(program, data, tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto((tmp_path / "report.html").as_uri())
        width = page.evaluate("document.documentElement.scrollWidth")
        too_wide = page.evaluate("""() => Array.from(document.querySelectorAll('table, img'))
            .filter(e => e.getBoundingClientRect().right > 1300).map(e => e.tagName)""")
        browser.close()
    assert width <= 1300 and not too_wide, (width, too_wide)


# -- one repository address for every badge -----------------------------------------------------------

def test_badges_agree_with_the_configured_address():
    proc = subprocess.run([sys.executable, str(ROOT / "binder" / "badges.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    address = dict(re.findall(r"^(REPO|REF) = (\S+)$", (ROOT / "binder" / "repo.mk").read_text(), re.M))
    readme = (ROOT / "README.md").read_text()
    assert f"mybinder.org/v2/gh/{address['REPO']}/{address['REF']}?" in readme
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        text = nb.read_text()
        assert f"colab.research.google.com/github/{address['REPO']}/blob/{address['REF']}/notebooks/{nb.name}" in text
        assert f"--branch {address['REF']} https://github.com/{address['REPO']} " in text


def test_make_badges_rewrites_every_link(tmp_path):
    (tmp_path / "binder").mkdir()
    (tmp_path / "notebooks").mkdir()
    for name in ("README.md", "pyproject.toml", "binder/repo.mk"):
        shutil.copy(ROOT / name, tmp_path / name)
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(nb, tmp_path / "notebooks" / nb.name)
    script = [sys.executable, str(ROOT / "binder" / "badges.py"), "--root", str(tmp_path)]
    proc = subprocess.run([*script, "--repo", "myorg/fork", "--ref", "v1.0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0
    texts = "".join(p.read_text() for p in [tmp_path / "README.md", *(tmp_path / "notebooks").glob("*.ipynb")])
    assert not re.search(r"https://[^\s)\"]*nnlab/nnlab", texts)  # no link left behind
    assert texts.count("myorg/fork") >= 2 * len(list(tmp_path.glob("notebooks/*")))
    for nb in (tmp_path / "notebooks").glob("*.ipynb"):
        json.loads(nb.read_text())  # still a notebook
    (tmp_path / "README.md").write_text((tmp_path / "README.md").read_text().replace("myorg/fork/v1.0", "x/y/main"))
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 1
    bad = subprocess.run([*script, "--repo", "not a repo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "REPO must be a GitHub owner/name" in bad.stderr


# -- first start ----------------------------------------------------------------------------------------

def test_lab_settings_silence_the_news_and_are_used_by_make_lab_and_binder():
    overrides = json.loads((ROOT / "binder" / "lab-settings" / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert "--LabApp.app_settings_dir=$(LAB_SETTINGS)" in (ROOT / "Makefile").read_text()
    assert "binder/lab-settings/overrides.json" in (ROOT / "binder" / "postBuild").read_text()


def test_readme_quick_start_says_how_to_get_the_cpu_only_pytorch():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    on_gpu = quick_start.find("### On a GPU")
    cpu = quick_start.find("download.pytorch.org/whl/cpu")
    assert cpu != -1 and (on_gpu == -1 or cpu < on_gpu)
