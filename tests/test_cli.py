"""The headless pipeline: `nnlab compress` and nnlab.pipeline.compress."""

import json
import shutil
import subprocess
import sys

import pytest

from nnlab import cli, pipeline


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]
    for action in compress._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.dest != "help":
            assert action.help and len(action.help) > 10, f"{action.dest} has no help text"


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.5"], "--sparsity must be in [0.0, 1.0)"),
    (["--sparsity", "lots"], "--sparsity must be a number"),
    (["--weight-bits", "1"], "--weight-bits must be in 2..16"),
    (["--weight-bits", "3"], "supports 4..16 bits per weight"),
    (["--act-bits", "17"], "--act-bits must be in 2..16"),
    (["--model", "alexnet"], "invalid choice: 'alexnet'"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--device", "gpu0"], "--device: device must be"),
    (["--method", "magic"], "invalid choice: 'magic'"),
])
def test_bad_options_are_refused_before_training(monkeypatch, capsys, tmp_path, args, message):
    def no_training(*a, **k):
        raise AssertionError("training started despite a bad option")

    monkeypatch.setattr(pipeline, "compress", no_training)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", "--out", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_refuses_to_run_once_per_torchrun_process(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "benchmarks/ddp.py" in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["compress", "--out", str(f)])
    assert "--out must be a directory" in capsys.readouterr().err


def test_pipeline_validates_arguments():
    with pytest.raises(ValueError, match="sparsity must be in"):
        pipeline.compress(sparsity=1.0)
    with pytest.raises(ValueError, match="weight_bits must be >= 2"):
        pipeline.compress(weight_bits=1)
    with pytest.raises(ValueError, match="weight_bits=3 is outside what"):
        pipeline.compress(weight_bits=3)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    proc = subprocess.run([sys.executable, "-m", "nnlab.cli", "compress", "--quick", "--no-progress",
                           "--sparsity", "0.9", "--weight-bits", "5", "--act-bits", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_compress_writes_html_and_json(quick_run):
    out, stdout = quick_run
    doc = json.loads((out / "report.json").read_text())
    stages = [s["stage"] for s in doc["stages"]]
    assert stages == list(pipeline.STAGES)
    by = {s["stage"]: s for s in doc["stages"]}
    assert by["fp32 baseline"]["sparsity"] == 0 and by["fp32 baseline"]["weight_bits"] == 32
    assert abs(by["retrained low-bit"]["sparsity"] - 0.9) < 0.01
    assert by["NNA (integer)"]["weight_bits"] == 5 and by["NNA (integer)"]["act_bits"] == 8
    head = doc["headline"]
    assert head["compression"] > 10 and head["energy_ratio"] > 10
    assert head["accuracy_nna"] > 80
    # The simulator's accuracy comes from the integer engine, close to the fake-quant model's.
    assert abs(by["NNA (integer)"]["accuracy"] - by["retrained low-bit"]["accuracy"]) < 1.0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert f"{head['compression']:.1f}x" in html and "retrained low-bit" in html
    assert "report.html" in stdout


def test_html_report_opens_in_chromium_without_errors(quick_run):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        import os
        msg = "Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out, _ = quick_run
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto((out / "report.html").as_uri())
        assert page.locator("table").count() == 2
        images = page.locator("img")
        assert images.count() == 3
        for i in range(3):  # every inlined plot decoded to a real picture
            assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 100")
        assert "nnlab compress" in page.title()
        browser.close()
    assert not errors, errors


def test_quick_run_reports_no_overflow(quick_run):
    out, stdout = quick_run
    doc = json.loads((out / "report.json").read_text())
    assert doc["overflow"] is None and doc["headline"]["saturated"] == 0
    assert all(row["saturated"] == 0 for row in doc["nna_layers"])
    assert "No sum overflowed the 32-bit accumulator" in (out / "report.html").read_text()
    assert "overflow" not in stdout


def test_16_bit_overflow_shows_in_the_terminal_and_both_reports(tmp_path):
    """16-bit weights and activations overflow the 32-bit accumulator: a figure everywhere, never a secret."""
    import os

    proc = subprocess.run([sys.executable, "-m", "nnlab.cli", "compress", "--quick", "--no-progress", "--no-l1",
                           "--weight-bits", "16", "--act-bits", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    overflow = doc["overflow"]
    assert overflow is not None, "16-bit operands were expected to overflow a 32-bit accumulator"
    n = overflow["saturated"]
    assert n > 0 and n == sum(overflow["layers"].values()) == doc["stages"][-1]["saturated"]
    assert {r["layer"]: r["saturated"] for r in doc["nna_layers"] if r["saturated"]} == {**overflow["layers"],
                                                                                          "total": n}
    assert overflow["accumulator_bits"] == 32 and 32 < overflow["accumulator_bits_needed"] <= 48
    # With the width the sums need, the simulator gives back the accuracy of the model it simulates.
    retrained = doc["stages"][-2]["accuracy"]
    assert abs(overflow["accuracy_without_overflow"] - retrained) < 1.0, (overflow, retrained)
    assert f"| {n:,} sums overflowed the accumulator |" in proc.stdout
    assert f"nnlab compress: warning: accumulator overflow: {n:,} sums saturated the 32-bit accumulator" in proc.stderr
    assert f"at least {overflow['accumulator_bits_needed']} bits" in proc.stderr
    page = (tmp_path / "report.html").read_text()
    assert 'class="warning"' in page and f"{n:,} sums saturated" in page
