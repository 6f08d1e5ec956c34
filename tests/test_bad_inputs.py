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
    problems = config.check_environment()
    assert len(problems) == 3
    for name in ("NNLAB_THREADS", "NNLAB_QUICK", "NNLAB_DATA_SOURCE"):
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
])
def test_cli_refuses_bad_options_before_work(no_work, tmp_path, capsys, extra, message):
    code, _, err = _cli(["compress", "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before even making the output directory


@pytest.mark.parametrize("name,value", [("NNLAB_THREADS", "0"), ("NNLAB_THREADS", "x"), ("NNLAB_QUICK", "maybe"),
                                        ("NNLAB_DATA_SOURCE", "web")])
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


def test_cli_ctrl_c_in_a_real_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "NNLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "nnlab.cli", "compress", "--quick", "--out", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        for line in proc.stdout:  # wait until training has started
            if line.startswith("Training") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
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
    ({"l1_branch": "yes"}, TypeError, "l1_branch must be True or False"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"quick": "no"}, TypeError, "quick must be True or False"),
    ({"sparsity": float("nan")}, ValueError, "sparsity must be a number, got NaN"),
    ({"model": "lenet300", "dataset": "cifar10"}, ValueError, "cannot take the cifar10 images"),
    ({"dataset": "cifar10", "source": "offline"}, ValueError, "source='offline' is not available"),
    ({"source": "web"}, ValueError, "source must be one of"),
    ({"device": "gpu0"}, ValueError, "device must be"),
])
def test_compress_refuses_before_work(no_work, kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        pipeline.compress(**kwargs)


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
    assert time.perf_counter() - start < 60
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
