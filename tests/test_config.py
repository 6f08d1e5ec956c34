import pytest
import torch

import nnlab
from nnlab import config


@pytest.mark.parametrize("env,expected", [({}, False), ({"CI": "true"}, True), ({"CI": "0"}, False),
                                          ({"CI": "true", "NNLAB_QUICK": "0"}, False),
                                          ({"NNLAB_QUICK": "1"}, True)])
def test_quick_mode(monkeypatch, env, expected):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("NNLAB_QUICK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert config.quick_mode() is expected
    assert config.pick(full="f", quick="q") == ("q" if expected else "f")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path / "c"))
    assert config.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_threads_respect_affinity_and_env(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert config.available_cpus() == 1
        monkeypatch.delenv("NNLAB_THREADS", raising=False)
        assert config.set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("NNLAB_THREADS", "2")
        assert config.set_threads() == 2
        with pytest.raises(ValueError, match="n must be a positive integer number of threads, got 0"):
            config.set_threads(0)
        monkeypatch.setenv("NNLAB_THREADS", "many")
        with pytest.raises(ValueError, match="NNLAB_THREADS='many' must be a positive integer"):
            config.set_threads()
    finally:
        torch.set_num_threads(before)


def test_cgroup_quota_caps_threads(monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(config, "_cgroup_cpu_limit", lambda: 1.0)
    assert config.available_cpus() == 1


def test_about():
    info = nnlab.about()
    assert info["nnlab"] == nnlab.__version__ and info["threads"] >= 1


def test_release_memory_collects_cycles_with_or_without_malloc_trim(monkeypatch):
    import gc
    import platform
    import weakref

    from nnlab import base

    class Node:
        pass

    original = base._malloc_trim
    if platform.libc_ver()[0] == "glibc":
        assert original() is not None  # glibc has malloc_trim
    for trim in (original(), None):
        monkeypatch.setattr(base, "_malloc_trim", lambda trim=trim: trim)
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle: only the collector frees it
        alive = weakref.ref(a)
        gc.disable()
        try:
            del a, b
            assert alive() is not None
            base.release_memory()
            assert alive() is None
        finally:
            gc.enable()
