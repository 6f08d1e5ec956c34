import os

import pytest
import torch

from nnlab import cache


def test_pretrained_is_cached_and_identical(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    a = cache.pretrained("lenet5", quick=True, verbose=False)
    files = list((tmp_path / "models").glob("lenet5-mnist-offline-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = cache.pretrained("lenet5", quick=True, verbose=False)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert a.nnlab_metrics["top1"] > 80 and not a.training
    # No temporary files are left behind.
    assert [p.name for p in (tmp_path / "models").iterdir()] == [files[0].name]


def test_key_covers_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    cache.pretrained("lenet5", quick=True, verbose=False)
    cache.pretrained("lenet5", quick=True, seed=1, verbose=False)
    assert len(list((tmp_path / "models").glob("*.pt"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-payload"])
def test_corrupt_file_is_reported_and_rebuilt(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("NNLAB_CACHE", str(tmp_path))
    good = cache.pretrained("lenet5", quick=True, verbose=False)
    (path,) = (tmp_path / "models").glob("*.pt")
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:  # a sound file (right key and checksum) whose payload does not fit the model
        key = path.stem.rsplit("-", 1)[1]
        payload = cache.read_entry(path, key)
        payload["state_dict"].pop("conv1.weight")
        cache.write_entry(path, key, {}, payload)
    capsys.readouterr()
    again = cache.pretrained("lenet5", quick=True, verbose=True)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and str(path) in lines[0] and "rebuilding" in lines[0]
    assert torch.equal(again[0].weight, good[0].weight)  # deterministic retraining
    cache.read_entry(path)  # the rebuilt file is sound


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.pt"

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(Exception):
        cache.atomic_save({"a": Boom()}, target)
    assert not target.exists() and os.listdir(tmp_path) == []


def test_unknown_model_rejected():
    with pytest.raises(ValueError, match="model must be one of"):
        cache.pretrained("alexnet")
