"""A catalogue of bad and edge inputs: each gets a clear error, a visible warning, or a FAIL with a hint.

Nothing is ever silent: no wrong number returned without a word, no hang,
no raw traceback, no trained model lost.  Every case asserts the message a
careless (or careful) user would see.  Long-running work is replaced by a
guard that fails the test if it starts, so a check that comes too late
fails here.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nnlab import _files, cache, checks, cli, config, pipeline
from nnlab import data as nd
from nnlab.quant import retraining

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=timeout)


@pytest.fixture
def no_work(monkeypatch):
    """Make loading data or training anything fail the test: the refusal must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, name in ((pipeline, "load_data"), (pipeline, "pretrained"), (nd, "load_data"),
                         (cache, "pretrained")):
        monkeypatch.setattr(module, name, forbidden)
    yield


# ---------------------------------------------------------------------------------------------------------
# Environment variables: each bad value names the variable.

@pytest.mark.parametrize("value", ["0", "x", "-2", "1.5", "two"])
def test_bad_nnlab_threads_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("NNLAB_THREADS", value)
    with pytest.raises(ValueError, match=rf"NNLAB_THREADS={value!r} must be a positive integer"):
        config.set_threads()
    assert any("NNLAB_THREADS" in p for p in config.check_environment())


@pytest.mark.parametrize("value", ["maybe", "2", "yess"])
def test_bad_nnlab_quick_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("NNLAB_QUICK", value)
    with pytest.raises(ValueError, match=rf"NNLAB_QUICK={value!r} is not understood"):
        config.quick_mode()


@pytest.mark.parametrize("value,expected", [("TRUE", True), ("yes", True), ("Off", False), ("", False)])
def test_nnlab_quick_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("NNLAB_QUICK", value)
    assert config.quick_mode() is expected


def test_bad_data_source_variable_names_it(monkeypatch):
    monkeypatch.setenv("NNLAB_DATA_SOURCE", "web")
    with pytest.raises(ValueError, match="NNLAB_DATA_SOURCE must be one of 'offline', 'torchvision', 'auto'; "
                                         "got 'web'"):
        nd.load_data(verbose=False)


def test_cache_variable_naming_a_file(monkeypatch, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("NNLAB_CACHE", str(f))
    with pytest.raises(NotADirectoryError, match="NNLAB_CACHE .* is a file"):
        config.cache_dir()
    assert any("NNLAB_CACHE" in p for p in config.check_environment())


def test_check_environment_lists_every_problem_at_once(monkeypatch):
    monkeypatch.setenv("NNLAB_THREADS", "0")
    monkeypatch.setenv("NNLAB_QUICK", "maybe")
    monkeypatch.setenv("NNLAB_DATA_SOURCE", "web")
    monkeypatch.setenv("NNLAB_SEED", "one")
    problems = config.check_environment()
    assert len(problems) == 4
    for name in ("NNLAB_THREADS", "NNLAB_QUICK", "NNLAB_DATA_SOURCE", "NNLAB_SEED"):
        assert sum(name in p for p in problems) == 1


@pytest.mark.parametrize("n", [0, -1, True, 1.0, "2"])
def test_set_threads_refuses_bad_counts(n):
    with pytest.raises(ValueError, match="n must be a positive integer number of threads"):
        config.set_threads(n)


def test_import_nnlab_with_bad_threads_warns_and_names_it():
    proc = _python("import nnlab, torch; print('imported', torch.get_num_threads())", {"NNLAB_THREADS": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout
    assert "NNLAB_THREADS='0' must be a positive integer" in proc.stderr


def test_threads_apply_when_torch_is_imported_after_nnlab():
    proc = _python("import sys, nnlab; before = 'torch' in sys.modules; import torch; "
                   "print(before, torch.get_num_threads())", {"NNLAB_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "1"]


# ---------------------------------------------------------------------------------------------------------
# The command line: refused before any work, one line per problem.

def _cli(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra,message", [
    (["--act-bits", "2"], "--act-bits 2: Series2NX-like NNA supports 4..16 bits per activation"),
    (["--act-bits", "3"], "supports 4..16 bits per activation"),
    (["--weight-bits", "17"], "--weight-bits must be in 2..16"),
    (["--seed", "-1"], "--seed must be in 0..2147483647"),
    (["--sparsity", "nan"], "--sparsity must be in [0.0, 1.0)"),
    (["--sparsity", "1"], "--sparsity must be in [0.0, 1.0)"),
    (["--model", "lenet300", "--dataset", "cifar10"], "model='lenet300' cannot take the cifar10 images (3x32x32)"),
    (["--model", "lenet5", "--dataset", "cifar10"], "model='lenet5' cannot take the cifar10 images"),
    (["--dataset", "cifar10", "--source", "offline"], "source='offline' is not available for dataset='cifar10'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--source", "web"], "invalid choice: 'web'"),
    (["--sim-images", "0"], "--sim-images must be a positive integer, got 0"),
    (["--sim-images", "all"], "--sim-images must be a positive integer, got 'all'"),
    (["--sim-batch-size", "-5"], "--sim-batch-size must be a positive integer, got -5"),
])
def test_cli_refuses_bad_options_before_work(no_work, tmp_path, capsys, extra, message):
    code, _, err = _cli(["compress", "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before even making the output directory


@pytest.mark.parametrize("name,value", [("NNLAB_THREADS", "0"), ("NNLAB_THREADS", "x"), ("NNLAB_QUICK", "maybe"),
                                        ("NNLAB_DATA_SOURCE", "web"), ("NNLAB_SEED", "-1")])
def test_cli_refuses_bad_environment(no_work, monkeypatch, tmp_path, capsys, name, value):
    monkeypatch.setenv(name, value)
    code, _, err = _cli(["compress", "--out", str(tmp_path)], capsys)
    assert code == 2 and f"{name}={value!r}" in err, err


def test_cli_out_under_a_file_is_refused(no_work, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _cli(["compress", "--out", str(f / "sub")], capsys)
    assert code == 2 and "is a file, so no directory can be made under it" in err


def test_cli_unwritable_out_is_refused(no_work, monkeypatch, tmp_path, capsys):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", read_only)
    code, _, err = _cli(["compress", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot write there (Permission denied)" in err


@pytest.mark.skipif(IS_ROOT, reason="root may write into a read-only directory")
def test_cli_read_only_out_is_refused(no_work, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = _cli(["compress", "--out", str(ro / "out")], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "--out" in err


@pytest.mark.parametrize("error,code,line", [
    (KeyboardInterrupt(), 130, "nnlab: interrupted (Ctrl-C)"),
    (RuntimeError("disk on fire\nsecond line"), 1, "nnlab compress: error: RuntimeError: disk on fire second line"),
    (ValueError("bad"), 1, "nnlab compress: error: ValueError: bad"),
])
def test_cli_run_failures_are_one_line(monkeypatch, tmp_path, capsys, error, code, line):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "compress", fail)
    got, _, err = _cli(["compress", "--quick", "--out", str(tmp_path)], capsys)
    assert got == code and err.strip() == line and "Traceback" not in err


@pytest.mark.parametrize("args", [["compress", "--help"], ["compress", "--sparsity", "lots", "--out", "x"],
                                  ["--version"]])
def test_cli_answers_without_loading_torch(args):
    proc = _python("import sys\nfrom nnlab import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n    pass\n"
                   "print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)" % (args,))
    assert "torch loaded: False" in proc.stderr, proc.stderr


def _default_sigint():
    """In the child: Ctrl-C back to its default, which Python turns into KeyboardInterrupt.

    A test session started as a background job (``make test &``, ``nohup``) inherits an ignored SIGINT, and so
    would the command under test, which would then never see the Ctrl-C this test sends.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_ctrl_c_in_a_real_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "NNLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "nnlab.cli", "compress", "--quick", "--out", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 300
        for line in proc.stdout:  # wait until training has started
            if line.startswith("Training") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=900)  # a guard against a hang, generous for a machine under load
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "nnlab: interrupted (Ctrl-C)" and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# Python entry points: every argument checked before any data is loaded or any model trained.

@pytest.mark.parametrize("kwargs,error,message", [
    ({"act_bits": 2}, ValueError, "act_bits=2 is outside what Series2NX-like NNA supports (4..16 bits)"),
    ({"act_bits": 3}, ValueError, "act_bits=3 is outside what"),
    ({"weight_bits": 17}, ValueError, "weight_bits must be <= 16"),
    ({"act_bits": 8.0}, TypeError, "act_bits must be an integer"),
    ({"hardware": "series2nx"}, TypeError, "hardware must be an nnlab.nna.NNAConfig"),
    ({"method": "magic"}, ValueError, "method must be one of"),
    ({"l1": "yes"}, TypeError, "l1 must be True or False"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"quick": "no"}, TypeError, "quick must be True or False"),
    ({"sparsity": float("nan")}, ValueError, "sparsity must be a number, got NaN"),
    ({"model": "lenet300", "dataset": "cifar10"}, ValueError, "cannot take the cifar10 images"),
    ({"dataset": "cifar10", "source": "offline"}, ValueError, "source='offline' is not available"),
    ({"source": "web"}, ValueError, "source must be one of"),
    ({"device": "gpu0"}, ValueError, "device must be"),
    ({"sim_images": 0}, ValueError, "sim_images must be None (every test image) or a positive integer, got 0"),
    ({"sim_images": 2.5}, TypeError, "sim_images must be None (every test image) or a positive integer, got 2.5 "
                                     "(float)"),
    ({"sim_images": True}, TypeError, "sim_images must be None (every test image) or a positive integer, got True"),
    ({"sim_batch_size": 0}, ValueError, "sim_batch_size must be a positive integer, got 0"),
    ({"sim_batch_size": None}, TypeError, "sim_batch_size must be a positive integer, got None"),
    ({"data": "mnist"}, TypeError, "data must be None or a DataBundle from nnlab.data.load_data, got str"),
    ({"keep_models": "no"}, TypeError, "keep_models must be True or False, got 'no' (str)"),
])
def test_compress_refuses_before_work(no_work, kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        pipeline.compress(**kwargs)


def test_compress_refuses_more_sim_images_than_the_test_set_before_training(monkeypatch):
    """The test set's size is known once the data is loaded: the refusal still comes before any training."""
    def forbidden(*args, **kwargs):
        raise AssertionError("training started before sim_images was checked")

    monkeypatch.setattr(pipeline, "pretrained", forbidden)
    with pytest.raises(ValueError, match=_literal("sim_images must be None (every test image) or at most the 1,000 "
                                                  "test images of mnist (offline), got 1,001")):
        pipeline.compress("lenet5", source="offline", sim_images=1001, verbose=False)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"weight_bits": 1}, ValueError, "weight_bits must be >= 2"),
    ({"act_bits": 17}, ValueError, "act_bits must be <= 16"),
    ({"overrides": {"conv9": 8}}, ValueError, "overrides names layer 'conv9', which lenet5 does not have; valid "
                                              "names: 'conv1', 'conv2', 'fc1', 'fc2', 'fc3'"),
    ({"overrides": {"conv1": 1}}, ValueError, "overrides['conv1'] must be >= 2"),
    ({"overrides": {"conv1": 4.5}}, TypeError, "overrides['conv1'] must be a bit-depth (int) or a QuantSpec"),
    ({"overrides": [("conv1", 8)]}, TypeError, "overrides must be a dict"),
    ({"method": "magic"}, ValueError, "method must be one of 'ste', 'random_subset', 'ptq'"),
    ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
    ({"sparsity": 1.0}, ValueError, "sparsity must be in [0, 1)"),
    ({"granularity": "per_row"}, ValueError, "granularity must be one of"),
    ({"lr": 0}, ValueError, "lr must be in (0, inf]"),
    ({"data": "mnist"}, TypeError, "data must be a DataBundle"),
    ({"model": "alexnet"}, ValueError, "model must be one of"),
])
def test_pretrained_quantised_refuses_before_work(no_work, kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        retraining.pretrained_quantised(**kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"model": "alexnet"}, ValueError, "model must be one of"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"quick": "yes"}, TypeError, "quick must be True or False"),
    ({"verbose": "no"}, TypeError, "verbose must be True or False"),
    ({"dataset": "imagenet"}, ValueError, "dataset must be one of"),
    ({"dataset": "cifar10", "source": "offline"}, ValueError, "source='offline' is not available"),
    ({"model": "lenet300", "dataset": "cifar10", "source": "torchvision"}, ValueError,
     "model='lenet300' cannot take the cifar10 images"),
    ({"data": "mnist"}, TypeError, "data must be a DataBundle"),
    ({"device": "gpu0"}, ValueError, "device must be"),
])
def test_pretrained_refuses_before_work(no_work, monkeypatch, kwargs, error, message):
    monkeypatch.setattr(cache, "pretrained", _REAL_PRETRAINED)  # the function under test, with data guarded
    with pytest.raises(error, match=_literal(message)):
        cache.pretrained(**kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"root": 5}, TypeError, "root must be a directory path"),
    ({"augment": "yes"}, TypeError, "augment must be True or False"),
    ({"verbose": None}, TypeError, "verbose must be True or False"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be a positive integer"),
    ({"test_batch_size": 0}, ValueError, "test_batch_size must be a positive integer, got 0"),
    ({"train_limit": -1}, ValueError, "train_limit must be >= 1"),
    ({"name": None}, ValueError, "name must be one of"),
    ({"name": "cifar10", "source": "offline"}, ValueError, "source='offline' is not available"),
])
def test_load_data_refuses_bad_arguments(no_network, kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        nd.load_data(**kwargs)


def test_load_data_root_that_is_a_file(no_network, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        nd.load_data(source="torchvision", root=f)


def _literal(text):
    import re

    return re.escape(text)


_REAL_PRETRAINED = cache.pretrained


# ---------------------------------------------------------------------------------------------------------
# The model cache: damage detected, writes that fail never lose the result, files readable by all.

def _payload():
    return {"weights": torch.arange(256, dtype=torch.float32), "metrics": {"top1": 97.5}}


def _entry(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    cache.cached("probe", {"a": 1}, _payload, verbose=False)
    (path,) = (tmp_path / "models").glob("probe-*.pt")
    return path


@pytest.mark.parametrize("where", [0, 5, 12, 20, 60, 80, 0.25, 0.5, 0.75, -1])
def test_a_flipped_byte_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys, where):
    path = _entry(tmp_path, monkeypatch)
    blob = bytearray(path.read_bytes())
    i = int(where * len(blob)) if isinstance(where, float) else where % len(blob)
    blob[i] ^= 0x10
    path.write_bytes(bytes(blob))
    built = []
    got = cache.cached("probe", {"a": 1}, lambda: built.append(1) or _payload(), verbose=True)
    out = capsys.readouterr().out
    assert built == [1] and torch.equal(got["weights"], _payload()["weights"])
    assert out.count("\n") == 1 and "is unreadable" in out and "rebuilding it" in out and str(path) in out
    assert torch.equal(cache.read_entry(path)["weights"], _payload()["weights"])  # the rebuilt file is sound


def test_flipped_bytes_anywhere_in_a_trained_model_are_detected(tmp_path):
    cache.pretrained("lenet5", quick=True, verbose=False)
    (path,) = sorted((config.cache_dir() / "models").glob("lenet5-mnist-offline-*.pt"))[:1]
    blob = path.read_bytes()
    copy = tmp_path / path.name
    positions = np.linspace(0, len(blob) - 1, 256).astype(int)
    for i in positions:
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        copy.write_bytes(bytes(damaged))
        with pytest.raises(cache.CacheEntryError):
            cache.read_entry(copy)
    copy.write_bytes(blob)
    assert "state_dict" in cache.read_entry(copy)


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b[: len(b) // 2], "checksum mismatch"),
    (lambda b: b"", "unknown header"),
    (lambda b: b"PK\x03\x04 an old torch.save zip", "older nnlab format"),
    (lambda b: b"GIF89a" + b[6:], "not an nnlab cache file"),
    (lambda b: b.replace(b"sha256 ", b"md5sum ", 1), "no checksum line"),
])
def test_damaged_or_foreign_files_are_rebuilt(tmp_path, monkeypatch, capsys, damage, reason):
    path = _entry(tmp_path, monkeypatch)
    path.write_bytes(damage(path.read_bytes()))
    cache.cached("probe", {"a": 1}, _payload, verbose=True)
    out = capsys.readouterr().out
    assert reason in out and "rebuilding it" in out


def test_unknown_format_version_is_reported(tmp_path, monkeypatch, capsys):
    path = _entry(tmp_path, monkeypatch)
    monkeypatch.setattr(cache, "FORMAT", 99)
    key = path.stem.rsplit("-", 1)[1]
    cache.write_entry(path, key, {}, _payload())  # a sound file of a format this version does not read
    monkeypatch.setattr(cache, "FORMAT", 2)
    with pytest.raises(cache.CacheEntryError, match="format 99, but this nnlab reads format 2"):
        cache.read_entry(path, key)


def test_another_entry_under_the_name_is_refused(tmp_path, monkeypatch):
    path = _entry(tmp_path, monkeypatch)
    cache.write_entry(path, "0123456789abcdef", {}, _payload())
    with pytest.raises(cache.CacheEntryError, match="holds another entry"):
        cache.read_entry(path, path.stem.rsplit("-", 1)[1])


def test_quiet_rebuild_still_warns(tmp_path, monkeypatch):
    path = _entry(tmp_path, monkeypatch)
    path.write_bytes(b"garbage")
    with pytest.warns(cache.CacheWarning, match="is unreadable .* rebuilding it"):
        cache.cached("probe", {"a": 1}, _payload, verbose=False)


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def fileno(self):
        return self.f.fileno()


def test_full_disk_warns_and_returns_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    real = os.fdopen
    monkeypatch.setattr(_files.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    with pytest.warns(cache.CacheWarning, match="No space left on device.*the result is returned") as record:
        got = cache.cached("probe", {"a": 1}, _payload, verbose=False)
    assert len(record) == 1 and torch.equal(got["weights"], _payload()["weights"])
    assert list((tmp_path / "models").iterdir()) == []  # no temporary file left behind


def test_full_disk_keeps_a_trained_model(tmp_path, monkeypatch):
    """The issue's case: training finishes, the disk is full, the model must still come back."""
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    real = os.fdopen
    monkeypatch.setattr(_files.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    data = nd.load_data(train_limit=256, test_limit=100, verbose=False)
    with pytest.warns(cache.CacheWarning, match="No space left on device"):
        net = cache.pretrained("lenet300", data=data, quick=True, verbose=False)
    from nnlab.models import build_model

    torch.manual_seed(0)
    untrained = build_model("lenet300")
    assert not torch.equal(net.fc1.weight, untrained.fc1.weight)  # trained, and handed back
    assert net.nnlab_metrics["top1"] > 10 and net.nnlab_metrics["epochs"] == 2 and not net.training
    assert list((tmp_path / "models").glob("*")) == []


def test_unwritable_cache_warns_and_returns_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(_files.tempfile, "mkstemp", denied)
    with pytest.warns(cache.CacheWarning, match="Permission denied"):
        got = cache.cached("probe", {"a": 1}, _payload, verbose=False)
    assert got["metrics"]["top1"] == 97.5


def test_uncreatable_cache_directory_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path / "sub"))
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "sub")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.warns(cache.CacheWarning, match="Permission denied"):
        assert cache.cached("probe", {"a": 1}, _payload, verbose=False)["metrics"]["top1"] == 97.5


def test_read_only_cache_with_the_entry_is_used(tmp_path, monkeypatch):
    _entry(tmp_path, monkeypatch)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(_files.tempfile, "mkstemp", denied)

    def build():
        raise AssertionError("rebuilt although the entry was there")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.cached("probe", {"a": 1}, build, verbose=False)["metrics"]["top1"] == 97.5


@pytest.mark.skipif(IS_ROOT, reason="root may write into a read-only directory")
def test_really_read_only_cache(tmp_path, monkeypatch):
    path = _entry(tmp_path, monkeypatch)
    models = path.parent
    models.chmod(0o555)
    try:
        assert cache.cached("probe", {"a": 1}, _payload, verbose=False)["metrics"]["top1"] == 97.5
        with pytest.warns(cache.CacheWarning, match="could not write"):
            cache.cached("probe", {"a": 2}, _payload, verbose=False)
    finally:
        models.chmod(0o755)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, monkeypatch, mask, expected):
    old = os.umask(mask)
    try:
        path = _entry(tmp_path, monkeypatch)
        report = _files.atomic_write(tmp_path / "out" / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == expected
    assert stat.S_IMODE(report.stat().st_mode) == expected
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o777 & ~mask


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    models = tmp_path / "models"
    models.mkdir()
    stale = models / "lenet5-mnist-offline-0123456789abcdef.pt.k2j4_x9a.tmp"
    fresh = models / "lenet5-mnist-offline-0123456789abcdef.pt.q8r7zz1b.tmp"
    other = models / "notes.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"half a model")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    cache.cached("probe", {"a": 1}, _payload, verbose=False)
    assert not stale.exists()  # left by a killed process: removed
    assert fresh.exists()  # may belong to a process writing right now: kept
    assert other.exists()  # not one of nnlab's temporary files: kept


def test_thread_count_is_part_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cache.cached("probe", {"a": 1}, _payload, verbose=False)
        assert cache.environment() == {"threads": 1}
        torch.set_num_threads(2)
        cache.cached("probe", {"a": 1}, _payload, verbose=False)
        assert cache.environment() == {"threads": 2}
    finally:
        torch.set_num_threads(before)
    assert len(list((tmp_path / "models").glob("probe-*.pt"))) == 2


# ---------------------------------------------------------------------------------------------------------
# Data: a network that never answers, and damaged downloads.

@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a swallowing proxy or firewall)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def _point_mnist_at(monkeypatch, url, resources=None):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    if resources is not None:
        monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)


@pytest.mark.parametrize("source", ["auto", "torchvision"])
def test_a_network_that_never_answers_times_out(silent_server, monkeypatch, tmp_path, capsys, source):
    monkeypatch.setattr(nd, "DOWNLOAD_TIMEOUT", 1.0)
    _point_mnist_at(monkeypatch, silent_server)
    start = time.perf_counter()
    if source == "auto":
        d = nd.load_data(source="auto", root=tmp_path, verbose=False)
        out = capsys.readouterr().out
        assert d.source == "offline" and len(d.train.dataset) == 4000
        assert "using the offline subset instead" in out and "timed out" in out
    else:
        with pytest.raises(RuntimeError, match="could not load MNIST through torchvision.*timed out"):
            nd.load_data(source="torchvision", root=tmp_path, verbose=False)
    assert time.perf_counter() - start < 300  # without the timeout it would wait forever (generous under load)
    assert socket.getdefaulttimeout() is None  # the timeout does not leak to the rest of the program


def test_auto_falls_back_when_the_connection_is_refused(closed_port, monkeypatch, tmp_path, capsys):
    _point_mnist_at(monkeypatch, closed_port)
    d = nd.load_data(source="auto", root=tmp_path, verbose=True)
    out = capsys.readouterr().out
    assert d.source == "offline" and "torchvision could not load MNIST" in out
    assert "torchvision unavailable" in d.description


def test_env_auto_falls_back_too(closed_port, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NNLAB_DATA_SOURCE", "auto")
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    _point_mnist_at(monkeypatch, closed_port)
    assert nd.load_data(verbose=False).source == "offline"
    assert "using the offline subset instead" in capsys.readouterr().out


def _idx(arr: np.ndarray, magic: int) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_mirror(tmp_path):
    """A local HTTP mirror serving a small MNIST in torchvision's layout; yields (url, resources, raw files)."""
    images, labels = nd.offline_mnist()
    site = tmp_path / "site"
    site.mkdir()
    files, resources = {}, []
    for prefix, sl in (("train", slice(0, 300)), ("t10k", slice(300, 400))):
        for kind, arr, magic in (("images-idx3", images[sl], 2051), ("labels-idx1", labels[sl], 2049)):
            name = f"{prefix}-{kind}-ubyte"
            raw = _idx(arr, magic)
            packed = gzip.compress(raw, mtime=0)
            (site / f"{name}.gz").write_bytes(packed)
            resources.append((f"{name}.gz", hashlib.md5(packed).hexdigest()))
            files[name] = raw

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", resources, files
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 16, b"not an idx file at all", b"\x08\x03\x00\x00"])
def test_garbage_torchvision_files_are_reported_and_replaced(mnist_mirror, monkeypatch, tmp_path, capsys, garbage):
    url, resources, files = mnist_mirror
    _point_mnist_at(monkeypatch, url, resources)
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in files:
        (raw / name).write_bytes(garbage)
    d = nd.load_data(source="torchvision", root=root, verbose=False)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("nnlab:")]
    assert len(lines) == 1 and "incomplete or damaged" in lines[0] and str(raw) in lines[0], out
    assert "Traceback" not in out
    assert d.source == "torchvision" and len(d.train.dataset) == 300 and len(d.test.dataset) == 100
    for name, raw_bytes in files.items():
        assert (raw / name).read_bytes() == raw_bytes  # replaced by the real files


def test_garbage_files_without_a_network_fall_back(closed_port, monkeypatch, tmp_path, capsys):
    _point_mnist_at(monkeypatch, closed_port)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"garbage")
    d = nd.load_data(source="auto", root=tmp_path, verbose=False)
    out = capsys.readouterr().out
    assert d.source == "offline" and "incomplete or damaged" in out and "using the offline subset" in out


# ---------------------------------------------------------------------------------------------------------
# Self-checks: a wrong answer of any shape or type is a FAIL with a hint, never a crash or a PASS.

def _nan_like_first(*args):
    return torch.full_like(args[0], float("nan"))


def _inf_like_first(*args):
    return torch.full_like(args[0], float("inf"))


@pytest.mark.parametrize("exercise,answer,expected", [
    ("fake_quantiser", _nan_like_first, "NaN or infinite"),
    ("fake_quantiser", _inf_like_first, "NaN or infinite"),
    ("nearest_level", _nan_like_first, "NaN or infinite"),
    ("nearest_level", _inf_like_first, "NaN or infinite"),
    ("fraction_coring", _nan_like_first, "NaN or infinite"),
    ("fake_quantiser", lambda *a: [1, 2, 3], "expected a torch.Tensor, got a list of 3 items"),
    ("fake_quantiser", lambda *a: None, "did you forget `return`?"),
    ("fake_quantiser", lambda *a: "x", "expected a torch.Tensor, got a value of type str"),
    ("fake_quantiser", lambda *a: torch.zeros(3), "expected shape (212,), got (3,)"),
    ("fake_quantiser", lambda x, *a: x.to(torch.complex64), "expected a real tensor"),
    ("fake_quantiser", lambda x, *a: x.numpy(), "expected a torch.Tensor, got a NumPy float32 array"),
    ("nearest_level", lambda w, l: w > 0, "entries differ"),
    ("fraction_coring", lambda w, f: [0] * w.numel(), "expected a torch.Tensor"),
    ("distillation_loss", lambda *a: float("nan"), "got nan: look for a division by zero"),
    ("distillation_loss", lambda *a: torch.tensor(float("inf")), "got inf"),
    ("distillation_loss", lambda *a: torch.ones(2), "got a float32 tensor of shape (2,)"),
    ("distillation_loss", lambda *a: "0.5", "expected a number"),
    ("l1_penalty", lambda *a: None, "did you forget `return`?"),
    ("l1_penalty", lambda *a: [1.0], "expected a number"),
    ("pack_bits", lambda v, b: [300], "not a sequence of bytes 0..255"),
    ("pack_bits", lambda v, b: [-1], "not a sequence of bytes 0..255"),
    ("pack_bits", lambda v, b: "abc", "expected bytes (or a bytearray), got a value of type str"),
    ("pack_bits", lambda v, b: None, "did you forget `return`?"),
    ("pack_bits", lambda v, b: 5, "expected bytes (or a bytearray), got a value of type int"),
    ("pack_bits", lambda v, b: [1.5], "not a sequence of bytes 0..255"),
    ("pack_bits", lambda v, b: object(), "not a sequence of bytes 0..255"),
    ("pack_bits", lambda v, b: b"", "expected 5 bytes, got 0"),
])
def test_self_checks_fail_wrong_answers_with_a_hint(capsys, exercise, answer, expected):
    check = checks.EXERCISES[exercise][2]
    result = check(answer)
    out = capsys.readouterr().out
    assert result.status == "fail" and not result
    assert expected in result.message, result.message
    assert "hint:" in out and out.startswith("FAIL")


def test_self_check_with_required_checks_raises_assertion(monkeypatch, capsys):
    monkeypatch.setenv("NNLAB_REQUIRE_CHECKS", "1")
    with pytest.raises(AssertionError, match="NaN or infinite"):
        checks.fake_quantiser(_nan_like_first)


# ---------------------------------------------------------------------------------------------------------
# The simulator: saved programs carry a checksum; bad headers and versions are named; nothing non-finite
# is quantised, compiled, simulated or saved; overflow is counted, reported and warned about.

from nnlab import nna, prune, quant  # noqa: E402
from nnlab.nna import storage  # noqa: E402
from nnlab.nna.program import FlattenLayer, InputLayer, Program, WeightLayer  # noqa: E402
from nnlab.quant import Grid, QuantSpec  # noqa: E402


def _act_grid(scale, zero_point=0, bits=8):
    return Grid(QuantSpec(bits, signed=False, symmetric=zero_point == 0), scale, zero_point)


def _small_program(weight=None, bias_float=None) -> Program:
    """Input -> 3x3 conv (4 channels, half zeros, ReLU) -> flatten -> linear (3 outputs)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-7, 8, (4, 1, 3, 3)) * (rng.random((4, 1, 3, 3)) < 0.5) if weight is None else weight
    conv = WeightLayer("conv", "conv2d", ("in",), w.astype(np.int32),
                       Grid(QuantSpec.for_weights(4), np.full(4, 0.01), np.zeros(4, int)),
                       np.arange(4, dtype=np.int32), _act_grid(0.05), _act_grid(0.1), activation=(0.0, None),
                       bias_float=bias_float)
    fc = WeightLayer("fc", "linear", ("flat",), rng.integers(-7, 8, (3, 16)).astype(np.int32),
                     Grid(QuantSpec.for_weights(4), np.full(3, 0.02), np.zeros(3, int)), np.zeros(3, np.int32),
                     _act_grid(0.1), None)
    return Program([InputLayer("in", _act_grid(0.05), (1, 4, 4)), conv, FlattenLayer("flat", ("conv",),
                                                                                      _act_grid(0.1)), fc], "small")


def _images(n=8, seed=0):
    return np.random.default_rng(seed).random((n, 1, 4, 4)).astype(np.float32)


def test_every_flipped_byte_of_a_saved_program_is_detected(tmp_path):
    path = tmp_path / "p.nna"
    nna.save(_small_program(), path)
    blob = path.read_bytes()
    assert nna.load(path) == _small_program()
    damaged = tmp_path / "d.nna"
    for i in range(len(blob)):  # every byte, the low and the high bit
        for bit in (0x01, 0x80):
            b = bytearray(blob)
            b[i] ^= bit
            damaged.write_bytes(bytes(b))
            with pytest.raises(storage.ProgramFileError):
                nna.load(damaged)
    assert len(blob) > 1000


def test_flipped_bytes_anywhere_in_a_compiled_network_are_detected(tmp_path):
    data = nd.load_data(train_limit=128, test_limit=64, verbose=False)
    torch.manual_seed(0)
    from nnlab.models import build_model

    program = nna.compile_model(quant.quantise_model(build_model("lenet5"), data, 5, 8))
    path = tmp_path / "lenet5.nna"
    nna.save(program, path)
    blob = path.read_bytes()
    damaged = tmp_path / "d.nna"
    for i in np.linspace(0, len(blob) - 1, 400).astype(int):
        b = bytearray(blob)
        b[i] ^= 0x04
        damaged.write_bytes(bytes(b))
        with pytest.raises(storage.ProgramFileError, match="is damaged: checksum mismatch|not a saved NNA|format"):
            nna.load(damaged)
    assert nna.load(path) == program and len(blob) > 10_000


@pytest.mark.parametrize("cut,message", [
    (0, "is empty, not a saved NNA program"), (3, "is truncated (3 bytes)"), (4, "is truncated"), (39, "is truncated"),
    (40, "checksum mismatch"), (0.5, "checksum mismatch"), (-1, "checksum mismatch"),
])
def test_truncated_program_files_are_refused(tmp_path, cut, message):
    path = tmp_path / "p.nna"
    nna.save(_small_program(), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: int(cut * len(blob)) if isinstance(cut, float) else cut])
    with pytest.raises(storage.ProgramFileError, match=_literal(message)):
        nna.load(path)


@pytest.mark.parametrize("magic,message", [
    (b"NNA1", "format 1, which this nnlab does not read (it reads formats 3 and 4); compile and save the model again"),
    (b"NNA2", "format 2, which this nnlab does not read"),
    (b"NNA9", "unknown format b'9' (this nnlab reads formats 3 and 4): a newer nnlab wrote it, or the file is damaged"),
    (b"NNA\xb3", "unknown format"),
    (b"PK\x03\x04", "not a saved NNA program (it does not start with b'NNA3' or b'NNA4')"),
])
def test_other_format_versions_are_named(tmp_path, magic, message):
    path = tmp_path / "p.nna"
    nna.save(_small_program(), path)
    path.write_bytes(magic + path.read_bytes()[4:])
    with pytest.raises(storage.ProgramFileError, match=_literal(message)):
        nna.load(path)
    with pytest.raises(storage.ProgramFileError, match=_literal(message)):
        nna.read_header(path)


def _rewrite_header(path, change):
    """Rewrite a saved program's JSON header with ``change(header)`` and a valid checksum (a foreign writer)."""
    import json

    header, offset, data = storage._parse_header(path.read_bytes(), path)
    new = change(header)
    text = (json.dumps(new) if not isinstance(new, bytes) else new)
    text = text.encode() if isinstance(text, str) else text
    rest = len(text).to_bytes(4, "little") + text + data[offset:]
    path.write_bytes(storage.MAGIC + hashlib.sha256(rest).digest() + rest)


def _drop(key):
    def change(h):
        del h[key]
        return h
    return change


def _layer_field(i, key, value=KeyError):
    def change(h):
        if value is KeyError:
            del h["layers"][i][key]
        else:
            h["layers"][i][key] = value
        return h
    return change


@pytest.mark.parametrize("change,message", [
    (lambda h: [h], "unexpected header: a JSON list, not an object"),
    (_drop("layers"), "unexpected header: it lacks 'layers'"),
    (_drop("grids"), "unexpected header: it lacks 'grids'"),
    (_layer_field(0, "kind"), "unexpected header (layer 0 'in': missing field 'kind')"),
    (_layer_field(1, "kind", "softmax"), "unknown layer kind 'softmax'"),
    (_layer_field(1, "encoding"), "unexpected header (layer 1 'conv': missing field 'encoding')"),
    (_layer_field(1, "in_grid", 99), "unexpected header (layer 1 'conv'"),
    (_layer_field(1, "weight_shape", "4x1x3x3"), "unexpected header (layer 1 'conv'"),
    (_layer_field(3, "inputs", ["nowhere"]), "reads 'nowhere', which is not an earlier layer"),
    (lambda h: {**h, "grids": [{"spec": {"bits": 8}, "scale": -1.0, "zero_point": 0}] + h["grids"][1:]},
     "unexpected header"),
    (lambda h: {**h, "grids": [{"spec": h["grids"][0]["spec"], "scale": float("nan"), "zero_point": 0}]
                + h["grids"][1:]}, "scale must be positive and finite"),
    (lambda h: b"\xff\xfe not json", "corrupt header"),
])
def test_an_unexpected_header_is_one_clear_error(tmp_path, change, message):
    path = tmp_path / "p.nna"
    nna.save(_small_program(), path)
    _rewrite_header(path, change)
    with pytest.raises(storage.ProgramFileError, match=_literal(message)):
        nna.load(path)


def test_trailing_bytes_after_the_body_are_refused(tmp_path):
    path = tmp_path / "p.nna"
    nna.save(_small_program(), path)
    _rewrite_header(path, lambda h: h)  # same header, valid checksum
    header, offset, data = storage._parse_header(path.read_bytes(), path)
    rest = data[36:] + b"\x00" * 5
    path.write_bytes(storage.MAGIC + hashlib.sha256(rest).digest() + rest)
    with pytest.raises(storage.ProgramFileError, match="5 unexpected trailing bytes"):
        nna.load(path)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_programs_follow_the_umask_and_leave_no_litter(tmp_path, mask, expected):
    old = os.umask(mask)
    try:
        info = nna.save(_small_program(), tmp_path / "out" / "p.nna")
    finally:
        os.umask(old)
    path = tmp_path / "out" / "p.nna"
    assert stat.S_IMODE(path.stat().st_mode) == expected
    assert info["file_bytes"] == path.stat().st_size == info["header_bytes"] + info["storage_bytes"]
    assert [p.name for p in path.parent.iterdir()] == ["p.nna"]


def test_a_failed_save_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "p.nna"
    nna.save(_small_program(), path)
    before = path.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(_files.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    with pytest.raises(OSError, match="No space left on device"):
        nna.save(_small_program(weight=np.ones((4, 1, 3, 3))), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.nna"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_save_refuses_a_program_with_non_finite_numbers(tmp_path, value):
    bias = np.zeros(4, np.float32)
    bias[2] = value
    with pytest.raises(ValueError, match=_literal("layer 'conv': its float bias: 1 NaN or infinite value(s)")):
        nna.save(_small_program(bias_float=bias), tmp_path / "p.nna")
    assert not (tmp_path / "p.nna").exists()


@pytest.mark.parametrize("config,error,message", [
    (nna.FP32_BASELINE, ValueError, "computes in fp32; save a program with an integer config"),
    ("series2nx", TypeError, "config must be an nnlab.nna.NNAConfig, got str"),
    (nna.SERIES2NX.replace(min_bits=5), ValueError, "layer 'conv' (weights) has 4-bit values but"),
])
def test_save_refuses_bad_configs(tmp_path, config, error, message):
    with pytest.raises(error, match=_literal(message)):
        nna.save(_small_program(), tmp_path / "p.nna", config)
    assert not (tmp_path / "p.nna").exists()


@pytest.mark.parametrize("value,what", [(np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1 infinite"),
                                        (-np.inf, "0 NaN and 1 infinite")])
@pytest.mark.parametrize("call", ["run", "predict"])
def test_simulator_refuses_non_finite_images(value, what, call):
    x = _images()
    x[5, 0, 2, 3] = value
    with pytest.raises(ValueError, match=_literal(f"x (the input of program 'small') holds {what} value(s), in 1 "
                                                  f"of 8 images (the first: image 5)")):
        getattr(nna, call)(_small_program(), x)


def _overflowing_program():
    """One linear layer whose sums reach 1000 * 255 * 127 = 32,385,000 (26 bits): they overflow 24 bits."""
    layer = WeightLayer("fc", "linear", ("in",), np.full((2, 1000), 127, np.int32),
                        Grid(QuantSpec.for_weights(8), np.full(2, 0.01), np.zeros(2, int)),
                        np.zeros(2, np.int32), _act_grid(1.0), None)
    layer.weight[1] = 1  # the second output stays small
    return Program([InputLayer("in", _act_grid(1.0), (1000,)), layer], "wide")


def test_the_accumulator_width_comes_from_the_config():
    program, x = _overflowing_program(), np.full((3, 1000), 255.0, np.float32)
    narrow = nna.SERIES2NX.replace(accumulator_bits=24)
    for result in (nna.run(program, x, config=narrow), nna.run(program, x, accumulator_bits=24)):
        assert result.saturations == {"fc": 3} and result.saturated == 3 and result.accumulator_bits == 24
        assert result.sum_bits == {"fc": 26} and result.accumulator_bits_needed == 26
        np.testing.assert_allclose(result.logits[:, 0], (2 ** 23 - 1) * 0.01, rtol=1e-6)  # saturated, as hardware does
    wide = nna.run(program, x, config=nna.SERIES2NX.replace(accumulator_bits=26))
    assert wide.saturated == 0 and np.allclose(wide.logits[:, 0], 32_385_000 * 0.01, rtol=1e-6)
    default = nna.run(program, x)
    assert default.accumulator_bits == nna.SERIES2NX.accumulator_bits == 32 and default.saturated == 0
    assert default.overflow_message() is None


@pytest.mark.parametrize("kwargs,error,message", [
    ({"accumulator_bits": 7}, ValueError, "accumulator_bits must be >= 8"),
    ({"accumulator_bits": 49}, ValueError, "accumulator_bits must be <= 48"),
    ({"accumulator_bits": 24.0}, TypeError, "accumulator_bits must be an integer"),
    ({"config": nna.SERIES2NX.replace(accumulator_bits=64)}, ValueError, "config.accumulator_bits must be <= 48"),
    ({"config": nna.FP32_BASELINE}, ValueError, "computes in fp32; the engine runs integer programs"),
    ({"config": "series2nx"}, TypeError, "config must be an nnlab.nna.NNAConfig, got str"),
    ({"config": nna.SERIES2NX, "accumulator_bits": 24}, ValueError,
     "accumulator_bits=24 contradicts config.accumulator_bits=32"),
])
def test_bad_accumulator_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        nna.run(_overflowing_program(), np.zeros((1, 1000), np.float32), **kwargs)


def test_predict_warns_about_overflow_with_the_width_that_avoids_it():
    program, x = _overflowing_program(), np.full((3, 1000), 255.0, np.float32)
    with pytest.warns(nna.AccumulatorOverflowWarning) as record:
        predictions = nna.predict(program, x, accumulator_bits=24)
    assert len(record) == 1 and predictions.tolist() == [0, 0, 0]
    message = str(record[0].message)
    assert message.startswith("accumulator overflow: 3 sums saturated the 24-bit accumulator on 3 images (fc: 3)")
    assert "use an accumulator of at least 26 bits (NNAConfig(accumulator_bits=26))" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nna.predict(program, x)  # 32 bits: no overflow, no warning
        nna.predict(program, x, accumulator_bits=26)


def test_the_cost_report_shows_saturations():
    program, x = _overflowing_program(), np.full((3, 1000), 255.0, np.float32)
    narrow = nna.SERIES2NX.replace(accumulator_bits=24)
    result = nna.run(program, x, config=narrow)
    table = nna.report(program, narrow, saturations=result)
    assert table.set_index("layer")["saturated"].to_dict() == {"in": 0, "fc": 3, "total": 3}
    assert table.set_index("layer").loc["fc", "sum_bits"] == 26
    assert nna.headline(table)["saturated"] == 3 and nna.headline(table)["accumulator_bits"] == 24
    assert "saturated" not in nna.report(program, narrow).columns  # not measured: no column, never a false 0
    with pytest.raises(ValueError, match="a run with a 24-bit accumulator, but config 'Series2NX-like NNA' has 32"):
        nna.report(program, nna.SERIES2NX, saturations=result)
    with pytest.raises(ValueError, match="saturations name layer 'conv9', which is not a weight layer"):
        nna.report(program, narrow, saturations={"conv9": 1})
    with pytest.raises(ValueError, match=r"saturations\['fc'\] must be a count"):
        nna.report(program, narrow, saturations={"fc": -1})
    with pytest.raises(TypeError, match="saturations must be the Result of nnlab.nna.run"):
        nna.report(program, narrow, saturations=[3])


# ---- quantisation, calibration and compilation refuse NaN and infinity, naming the tensor

@pytest.mark.parametrize("value,counts", [(float("nan"), "1 NaN and 0 infinite"),
                                          (float("inf"), "0 NaN and 1 infinite"),
                                          (float("-inf"), "0 NaN and 1 infinite")])
@pytest.mark.parametrize("call", [
    lambda x, s: quant.compute_qparams(x, s, name="w"),
    lambda x, s: quant.compute_qparams(x, s, "percentile", name="w"),
    lambda x, s: quant.compute_qparams(x, s, "mse", name="w"),
    lambda x, s: quant.value_range(x, s, name="w"),
    lambda x, s: quant.quantise(x, s, 0.1, 0, name="w"),
    lambda x, s: quant.fake_quantise(x, s, 0.1, 0, name="w"),
], ids=["qparams-max", "qparams-percentile", "qparams-mse", "value_range", "quantise", "fake_quantise"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_quantisation_refuses_non_finite_values(call, value, counts, granularity):
    x = torch.randn(4, 25)
    x[2, 7] = value
    spec = QuantSpec.for_weights(8, granularity=granularity)
    with pytest.raises(ValueError, match=_literal(f"w: {counts} value(s) among 100; only finite values")):
        call(x, spec)


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
@pytest.mark.parametrize("call", [quant.quantise, quant.fake_quantise, quant.dequantise])
def test_bad_scales_are_refused(call, scale):
    x = torch.ones(3, dtype=torch.int32) if call is quant.dequantise else torch.ones(3)
    with pytest.raises(ValueError, match="scale of .* must be positive and finite"):
        call(x, QuantSpec.for_weights(8), scale, 0)


@pytest.mark.parametrize("lo,hi", [(float("nan"), 1.0), (-1.0, float("inf")), (float("-inf"), 0.0)])
def test_ranges_must_be_finite(lo, hi):
    with pytest.raises(ValueError, match="the range's (lo|hi) must be finite"):
        quant.qparams_from_range(torch.tensor(lo), torch.tensor(hi), QuantSpec.for_activations(8))


def test_the_quantisers_never_turn_nan_into_a_level():
    """PyTorch's kernel alone maps NaN to the lowest level and an infinity sets a scale that zeroes the rest."""
    spec = QuantSpec.for_weights(8)
    assert torch.fake_quantize_per_tensor_affine(torch.tensor([float("nan")]), 0.1, 0, -128, 127).isfinite().all()
    with pytest.raises(ValueError):
        quant.quantise(torch.tensor([1.0, float("nan")]), spec, 0.1, 0)
    with pytest.raises(ValueError):
        quant.compute_qparams(torch.tensor([1.0, 2.0, float("inf")]), spec)


def _lenet5():
    from nnlab.models import build_model

    torch.manual_seed(0)
    return build_model("lenet5")


@pytest.mark.parametrize("method", ["max", "percentile"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_calibration_refuses_non_finite_images(value, method):
    x = torch.zeros(4, 1, 28, 28)
    x[1, 0, 3, 3] = value
    with pytest.raises(ValueError, match=r"the activations at 'input_quant' \(calibration batch 1\): "):
        quant.quantise_model(_lenet5(), [(x, torch.zeros(4, dtype=torch.long))], 8, 8, act_method=method)


def test_calibration_names_the_quantiser_that_overflows(tiny_data):
    net = _lenet5()
    with torch.no_grad():
        net.fc1.weight.fill_(3e38)  # finite weights, infinite activations after fc1
    with pytest.raises(ValueError, match=r"the activations at 'relu3_quant' \(calibration batch 1\): 0 NaN and"):
        quant.quantise_model(net, tiny_data, None, 8)


@pytest.mark.parametrize("where", ["conv2.weight", "fc3.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("weight_bits", [8, None])
def test_quantising_a_model_with_a_non_finite_parameter_names_it(tiny_data, where, value, weight_bits):
    net = _lenet5()
    with torch.no_grad():
        net.get_parameter(where).view(-1)[0] = value
    layer, what = where.split(".")
    with pytest.raises(ValueError, match=_literal(f"layer {layer!r}: its {what}: ")):
        quant.quantise_model(net, tiny_data, weight_bits, 8)


def test_a_weight_quantiser_names_its_layer(tiny_data):
    w = torch.ones(3, 4)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match=_literal("the weight of layer 'fc9': 1 NaN")):
        quant.WeightQuantiser(QuantSpec.for_weights(8), w, label="the weight of layer 'fc9'")


@pytest.fixture(scope="module")
def quantised(tiny_data):
    return quant.quantise_model(_lenet5(), tiny_data, 5, 8)


@pytest.mark.parametrize("where,message", [
    ("fc1.parametrizations.weight.original", "layer 'fc1': its weight: 1 NaN"),
    ("conv1.bias", "layer 'conv1': its bias: 1 NaN"),
    ("input_quant.scale", "layer 'input_quant': its scale: 1 NaN"),
])
def test_compiling_a_model_with_nan_names_the_layer(quantised, where, message):
    import copy

    bad = copy.deepcopy(quantised)
    with torch.no_grad():
        t = bad.get_parameter(where) if "scale" not in where else bad.get_buffer(where)
        t.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=_literal(message)):
        nna.compile_model(bad)


def test_a_quantised_model_refuses_nan_images_in_eval(quantised):
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=_literal("the activations at 'input_quant': 1 NaN and 0 infinite")):
        quantised(x)


def test_retraining_stops_at_the_first_nan_weight(quantised):
    import copy

    net = copy.deepcopy(quantised).train()
    for m in net.modules():
        if isinstance(m, quant.WeightQuantiser):
            m.track = True
    with torch.no_grad():
        net.get_parameter("conv2.parametrizations.weight.original").view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match=_literal("the weight of layer 'conv2': 0 NaN and 1 infinite")):
        net(torch.zeros(2, 1, 28, 28))


def test_a_quantiser_scale_damaged_after_calibration_is_refused(quantised):
    import copy

    net = copy.deepcopy(quantised)
    state = net.state_dict()
    state["pool1_quant.scale"] = torch.tensor(float("nan"))
    net.load_state_dict(state)
    with pytest.raises(ValueError, match=_literal("the scale of the activations at 'pool1_quant' must be positive")):
        net(torch.zeros(2, 1, 28, 28))


# ---- pruning a quantised model

@pytest.mark.parametrize("call", [
    lambda m: prune.core_by_fraction(m, 0.5),
    lambda m: prune.core_by_threshold(m, 0.1),
    lambda m: prune.core_channels(m, 0.25),
    lambda m: prune.apply_masks(m, {"conv1": torch.ones(6, 1, 5, 5)}),
    lambda m: prune.iterative_coring(m, lambda net: None, sparsities=[0.5]),
], ids=["fraction", "threshold", "channels", "apply_masks", "iterative"])
def test_pruning_a_quantised_model_is_refused_clearly(quantised, call):
    import copy

    with pytest.raises(ValueError, match=_literal("layer 'conv1' is quantised (its weight is computed by the "
                                                  "parametrizations [WeightQuantiser]), so a pruning mask cannot")):
        call(copy.deepcopy(quantised))


def test_a_pruned_then_quantised_model_keeps_its_mask_in_the_chain(tiny_data):
    net = prune.core_by_fraction(_lenet5(), 0.5)
    q = quant.quantise_model(net, tiny_data, 5, 8)
    chain = [type(p).__name__ for p in q.get_submodule("fc1").parametrizations.weight]
    assert chain == ["FixedMask", "WeightQuantiser"]
    assert prune.sparsity(q) >= 0.5
    with pytest.raises(ValueError, match="parametrizations \\[FixedMask, WeightQuantiser\\]"):
        prune.core_by_fraction(q, 0.9)


# ---- the command line: bit-depths and devices refused before PyTorch loads; overflow in the terminal

@pytest.mark.parametrize("args", [["compress", "--weight-bits", "3", "--out", "x"],
                                  ["compress", "--act-bits", "2", "--out", "x"],
                                  ["compress", "--device", "gpu0", "--out", "x"]])
def test_cli_range_checks_answer_without_loading_torch(args):
    proc = _python("import sys\nfrom nnlab import cli\ntry:\n    cli.main(%r)\nexcept SystemExit as e:\n"
                   "    print('exit', e.code, file=sys.stderr)\n"
                   "print('torch loaded:', 'torch' in sys.modules, file=sys.stderr)" % (args,))
    assert "exit 2" in proc.stderr and "torch loaded: False" in proc.stderr, proc.stderr
    assert "supports 4..16 bits" in proc.stderr or "device must be 'cpu', 'cuda'" in proc.stderr


def test_importing_the_hardware_description_loads_no_torch():
    proc = _python("import sys\nfrom nnlab.nna import PRESETS, NNAConfig, SERIES2NX\n"
                   "print(sorted(PRESETS), 'torch' in sys.modules, 'pandas' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.split() == ["['fp32',", "'series2nx',", "'series2nx-huffman']", "False",
                                                  "False"], proc


def test_nna_names_resolve_lazily_to_the_same_objects():
    import importlib

    from nnlab.nna import engine, report as report_function

    assert nna.run is engine.run and callable(report_function) and nna.report is report_function
    importlib.import_module("nnlab.nna.report")  # importing the submodule keeps nna.report the function
    assert callable(nna.report) and nna.report.__module__ == "nnlab.nna.costs"
    for name in nna.__all__:
        assert getattr(nna, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'compile'"):
        nna.compile  # noqa: B018


def _synthetic_result(saturated: int):
    """A CompressionResult whose NNA stage saturated ``saturated`` sums (no training: costs of a small program)."""
    import pandas as pd

    program = _overflowing_program()
    narrow = nna.SERIES2NX.replace(accumulator_bits=24)
    x = np.full((3, 1000), 255.0 if saturated else 1.0, np.float32)
    run = nna.run(program, x, config=narrow)
    rows = [{"stage": s, "accuracy": 90.0, "sparsity": 0.0, "weight_bits": 8, "act_bits": 8, "storage_bytes": 100,
             "energy_uj": 1.0, "latency_us": 1.0, "compression": 2.0, "energy_ratio": 2.0, "hardware": "x"}
            for s in pipeline.STAGES]
    stages = pd.DataFrame(rows)
    stages["saturated"] = pd.Series([None] * 6 + [run.saturated], dtype=object)
    overflow = pipeline._overflow(program, x, np.zeros(3, int), narrow, run, 90.0)
    settings = {"model": "lenet5", "dataset": "mnist", "hardware": narrow.name, "accumulator_bits": 24}
    return pipeline.CompressionResult(stages=stages, settings=settings, models={}, program=program,
                                      report=nna.report(program, narrow, saturations=run), overflow=overflow)


def test_cli_shows_overflow_in_the_terminal_and_both_reports(monkeypatch, tmp_path, capsys):
    import json

    result = _synthetic_result(3)
    assert result.overflow["accumulator_bits_needed"] == 26 and result.overflow["layers"] == {"fc": 3}
    assert result.overflow["accuracy_without_overflow"] is not None

    def fake_compress(*args, **kwargs):
        warnings.warn(result.overflow["message"], nna.AccumulatorOverflowWarning)
        return result

    monkeypatch.setattr(pipeline, "compress", fake_compress)
    code, out, err = _cli(["compress", "--quick", "--out", str(tmp_path)], capsys)
    assert code == 0 and "| 3 sums overflowed the accumulator |" in out
    assert err.count("accumulator overflow") == 1 and "nnlab compress: warning: accumulator overflow: 3 sums" in err
    doc = json.loads((tmp_path / "report.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"report.json holds {c}, which is not JSON"))
    assert doc["overflow"]["saturated"] == 3 and doc["headline"]["saturated"] == 3
    assert doc["stages"][-1]["saturated"] == 3 and doc["stages"][0]["saturated"] is None
    assert {r["layer"]: r["saturated"] for r in doc["nna_layers"]} == {"in": 0, "fc": 3, "total": 3}
    page = (tmp_path / "report.html").read_text()
    assert 'class="warning"' in page and "3 sums saturated the 24-bit accumulator" in page
    assert "<th>saturated</th>" in page and "<th>sum_bits</th>" in page


def test_cli_says_when_no_sum_overflowed(monkeypatch, tmp_path, capsys):
    import json

    result = _synthetic_result(0)
    assert result.overflow is None
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: result)
    code, out, err = _cli(["compress", "--quick", "--out", str(tmp_path)], capsys)
    assert code == 0 and "overflow" not in out + err
    assert json.loads((tmp_path / "report.json").read_text())["overflow"] is None
    assert "No sum overflowed the 24-bit accumulator" in (tmp_path / "report.html").read_text()
