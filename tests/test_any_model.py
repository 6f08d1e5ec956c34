"""compress() and `nnlab compress` take any model: an nn.Module, a registered name, or file.py:function."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nnlab import cli, nna, pipeline
from nnlab._preflight import parse_model_argument
from nnlab.cache import RECIPES
from nnlab.graph import GraphError
from nnlab.models import from_factory

ROOT = Path(__file__).resolve().parents[1]

#: A small network of the user's own, defined in a file (as `--model nets.py:make_net` reads it).
NETS = textwrap.dedent('''
    import torch
    from torch import nn


    class Tiny(nn.Module):
        """Not a Sequential: its own forward, with a residual add."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
            self.pool = nn.MaxPool2d(4)
            self.fc = nn.Linear(6 * 7 * 7, 10)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            y = torch.relu(self.conv2(y) + y)
            return self.fc(torch.flatten(self.pool(y), 1))


    def make_net():
        return Tiny()


    def needs_width(width):
        return Tiny()


    def not_a_module():
        return "a string"


    def broken():
        raise RuntimeError("the weights file is missing")


    def wrong_outputs():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))


    def unsupported():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


    NOT_CALLABLE = 3
''')


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "nets.py"
    path.write_text(NETS)
    return path


# ---------------------------------------------------------------- reading the model argument (no PyTorch needed)

@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_registered_name_is_a_model_argument(name):
    assert parse_model_argument(name) == ("name", name)


def test_file_and_function_is_a_model_argument(nets):
    assert parse_model_argument(f"{nets}:make_net") == ("factory", nets, "make_net")


@pytest.mark.parametrize("text,error,message", [
    ("alexnet", ValueError, "'alexnet' is neither a registered model"),
    ("nets.txt:make_net", ValueError, "is neither a registered model"),
    ("{dir}/missing.py:make_net", FileNotFoundError, "missing.py' does not exist"),
    ("{nets}:", ValueError, "'' is not a Python function name"),
    ("{nets}:make-net", ValueError, "'make-net' is not a Python function name"),
    ("{dir}:make_net", ValueError, "is neither a registered model"),
])
def test_bad_model_arguments_are_named(nets, text, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_model_argument(text.format(nets=nets, dir=nets.parent))
    with pytest.raises(TypeError, match="model must be a model name"):
        parse_model_argument(3)


# ---------------------------------------------------------------- building a model from a file

def test_factory_builds_the_same_network_for_the_same_seed(nets):
    a, b, c = (from_factory(f"{nets}:make_net", seed=s) for s in (0, 0, 1))
    assert type(a).__name__ == "Tiny"
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)


@pytest.mark.parametrize("function,error,message", [
    ("nope", ValueError, "has no function 'nope'; the functions it defines: 'broken', 'make_net', 'needs_width', "
                         "'not_a_module', 'unsupported', 'wrong_outputs'"),
    ("needs_width", TypeError, r"needs_width\(width\) needs arguments"),
    ("not_a_module", TypeError, r"not_a_module\(\) returned str, not a torch.nn.Module"),
    ("broken", ValueError, r"broken\(\) raised RuntimeError: the weights file is missing"),
    ("NOT_CALLABLE", TypeError, r"'NOT_CALLABLE' in .* is 3 \(int\), not a function"),
])
def test_factory_errors_name_the_function_and_the_problem(nets, function, error, message):
    with pytest.raises(error, match=message):
        from_factory(f"{nets}:{function}")


def test_a_file_that_does_not_import_is_reported(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def make_net(:\n")
    with pytest.raises(ImportError, match="importing .*bad.py' failed: SyntaxError"):
        from_factory(f"{bad}:make_net")


# ---------------------------------------------------------------- compress(): refused before any training

@pytest.fixture
def no_training(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("data was loaded or a model trained before the model was checked")
    monkeypatch.setattr(pipeline, "load_data", forbidden)
    monkeypatch.setattr(pipeline, "pretrained", forbidden)


@pytest.mark.parametrize("function,error,message", [
    ("wrong_outputs", ValueError, r"gives outputs of shape \(1, 7\) .* \(1, 10\) is needed"),
    ("unsupported", GraphError, "Sigmoid"),
    ("not_a_module", TypeError, "returned str"),
])
def test_compress_refuses_a_bad_module_before_training(nets, no_training, function, error, message):
    with pytest.raises(error, match=message):
        pipeline.compress(f"{nets}:{function}")
    if function != "not_a_module":
        with pytest.raises(error, match=message):
            pipeline.compress(from_factory(f"{nets}:{function}"))


def test_compress_refuses_a_module_for_other_images(no_training):
    colour = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(ValueError, match=r"cannot take the mnist images \(1x28x28\)"):
        pipeline.compress(colour)


def test_compress_refuses_train_false_for_a_registered_name_and_other_types(no_training):
    with pytest.raises(ValueError, match="train=False needs an nn.Module"):
        pipeline.compress("lenet5", train=False)
    with pytest.raises(TypeError, match="model must be a model name, .* or a torch.nn.Module"):
        pipeline.compress(42)
    with pytest.raises(ValueError, match="neither a registered model"):
        pipeline.compress("lenet-5")


# ---------------------------------------------------------------- the command line

def _cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v2", "torchvision:resnet18", "mobilenet-mnist"])
def test_cli_passes_a_registered_name_to_compress(monkeypatch, tmp_path, capsys, name):
    seen = {}

    def fake_compress(model, *args, **kwargs):
        seen.update(model=model, name=kwargs.get("name"), train=kwargs.get("train"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "compress", fake_compress)
    code, _, err = _cli(["compress", "--model", name, "--out", str(tmp_path)], capsys)
    assert code == 1 and "stop here" in err
    assert seen == {"model": name, "name": name, "train": True}


def test_cli_builds_a_file_model_once_and_passes_the_module(monkeypatch, tmp_path, capsys, nets):
    seen = {}

    def fake_compress(model, *args, **kwargs):
        seen.update(model=model, name=kwargs.get("name"), train=kwargs.get("train"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "compress", fake_compress)
    code, _, err = _cli(["compress", "--model", f"{nets}:make_net", "--no-train", "--out", str(tmp_path)], capsys)
    assert code == 1 and "stop here" in err
    assert type(seen["model"]).__name__ == "Tiny" and seen["name"] == f"{nets}:make_net" and seen["train"] is False


@pytest.mark.parametrize("function,message", [
    ("nope", "model='{nets}:nope': '{nets}' has no function 'nope'"),
    ("not_a_module", "not_a_module() returned str, not a torch.nn.Module"),
    ("unsupported", "Sigmoid"),
])
def test_cli_refuses_a_bad_factory_with_exit_status_2(monkeypatch, tmp_path, capsys, nets, function, message):
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: pytest.fail("compress ran despite a bad model"))
    code, _, err = _cli(["compress", "--model", f"{nets}:{function}", "--out", str(tmp_path)], capsys)
    assert code == 2 and message.format(nets=nets) in err, err


def test_cli_refuses_no_train_for_a_registered_name(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: pytest.fail("compress ran despite a bad option"))
    code, _, err = _cli(["compress", "--no-train", "--out", str(tmp_path)], capsys)
    assert code == 2 and "train=False needs an nn.Module" in err


@pytest.mark.parametrize("model", ["alexnet", "/no/such/file.py:make_net", "nets.py:1net"])
def test_cli_refuses_a_bad_model_argument_without_loading_torch(model):
    code = ("import sys\nfrom nnlab import cli\ntry:\n    cli.main(['compress', '--model', %r, '--out', 'x'])\n"
            "except SystemExit as e:\n    print('exit', e.code, file=sys.stderr)\n"
            "print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)" % model)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "exit 2" in proc.stderr and "torch loaded: False" in proc.stderr, proc.stderr
    assert "argument --model" in proc.stderr and model in proc.stderr


# ---------------------------------------------------------------- a module, end to end

@pytest.fixture(scope="module")
def module_run(nets):
    """compress() on the user's module, recording the engine mode of every simulator run."""
    modes = []
    run = nna.run

    def spy(program, x, mode="torch", **kwargs):
        modes.append(mode)
        return run(program, x, mode, **kwargs)

    net = from_factory(f"{nets}:make_net")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nna, "run", spy)
        result = pipeline.compress(net, sparsity=0.5, weight_bits=8, act_bits=8, quick=True, l1=False,
                                   verbose=False)
    return result, modes, net, before


def test_a_module_goes_through_every_stage(module_run):
    result, _, net, before = module_run
    stages = list(result.stages["stage"])
    assert stages == [s for s in pipeline.STAGES if s != "L1 + pruned + distilled"]
    assert result.settings["model"] == "Tiny" and result.settings["trained"] is True
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "the given module was changed"
    by = result.stages.set_index("stage")
    assert by.loc["fp32 baseline", "accuracy"] > 80, by
    assert abs(by.loc["retrained low-bit", "sparsity"] - 0.5) < 0.02
    assert abs(by.loc["NNA (integer)", "accuracy"] - by.loc["retrained low-bit", "accuracy"]) < 1.0, by
    # The residual add of the module's own forward is in the program the simulator ran.
    assert any(type(layer).__name__ == "AddLayer" for layer in result.program.layers)


def test_a_second_lean_run_gives_the_same_table(module_run, nets):
    """From the cache, with keep_models=False (the PTQ network takes the retrained weights), the same figures."""
    result = module_run[0]
    again = pipeline.compress(from_factory(f"{nets}:make_net"), sparsity=0.5, weight_bits=8, act_bits=8, quick=True,
                              l1=False, verbose=False, keep_models=False)
    columns = ["stage", "accuracy", "sparsity", "storage_bytes", "energy_uj"]
    pd.testing.assert_frame_equal(result.stages[columns], again.stages[columns])
    assert list(again.models) == ["retrained low-bit", "NNA (integer)"]
    assert again.agreement == result.agreement


def test_the_integer_stage_runs_the_integer_requantisation_mode(module_run):
    result, modes, _, _ = module_run
    assert modes and set(modes) == {"integer"}, modes
    assert result.settings["requantisation"] == "integer"
    from nnlab.data import first_images, load_data

    images, labels = first_images(load_data(verbose=False))
    again = nna.run(result.program, images.numpy(), "integer", config=nna.SERIES2NX)
    accuracy = 100.0 * float(np.mean(again.predictions == labels.numpy()))
    assert accuracy == pytest.approx(result.stages.iloc[-1]["accuracy"])


def test_the_cli_compresses_a_file_model(nets, tmp_path):
    """`--model nets.py:make_net` runs every stage of the user's network to a report named after the file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}  # progress lines, no bars
    proc = subprocess.run([sys.executable, "-m", "nnlab.cli", "compress", "--model", f"{nets}:make_net", "--quick",
                           "--no-l1", "--sparsity", "0.5", "--weight-bits", "8", "--act-bits", "8",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["settings"]["model"] == f"{nets}:make_net" and doc["settings"]["requantisation"] == "integer"
    assert [s["stage"] for s in doc["stages"]] == [s for s in pipeline.STAGES if s != "L1 + pruned + distilled"]
    assert doc["headline"]["accuracy_nna"] > 80, doc["headline"]


def test_a_bad_cache_entry_leaves_the_network_to_retrain_untouched(monkeypatch, small_data):
    """The retrained stage loads into the PTQ network: an entry that does not fit is refused before any copy."""
    from nnlab import quant
    from nnlab.models import LeNet5

    torch.manual_seed(0)
    start = quant.quantise_model(LeNet5(), small_data, 8, 8)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    seen = {}

    def fake_cached(name, key_fields, build, *, validate=None, verbose=True):
        bad = {"state_dict": {k: torch.zeros(1) for k in before}}  # every tensor present, every shape wrong
        with pytest.raises(ValueError, match="other shapes"):
            validate(bad)
        with pytest.raises(ValueError, match="do not match"):
            validate({"state_dict": {}})
        seen["untouched"] = all(torch.equal(before[k], v) for k, v in start.state_dict().items())
        return build()

    monkeypatch.setattr(pipeline, "cached", fake_cached)
    net = pipeline._module_retrained(start, {"class": "LeNet5"}, "LeNet5", small_data, 8, 8, "ste", label="LeNet5",
                                     quick=True, device="cpu", seed=0, verbose=False)
    assert seen["untouched"]
    assert net is start and not net.training
