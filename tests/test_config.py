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
