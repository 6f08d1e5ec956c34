"""A model cache: train once, load in a second afterwards.

Every notebook stands alone: it asks :func:`pretrained` (or, for its own
artefacts such as a pruned network, :func:`cached`) for what it needs, and
whatever is missing is trained and cached.  The cache lives in
``nnlab.cache_dir()/models`` (``NNLAB_CACHE`` overrides the directory).

* The file name carries a hash of everything that determines the result
  (model, data set and source, training recipe, seed, quick/full mode, the
  cache format and :func:`environment`: PyTorch's CPU thread count, since
  CPU training gives slightly different weights with a different count),
  so changing any of them trains anew.
* Every file carries a SHA-256 checksum of its contents, verified on load:
  a damaged file (a flipped byte anywhere), a truncated one, an unknown
  format or a mismatching key is reported in one line and rebuilt.
* Writes are atomic (a temporary file renamed into place) and use the
  user's umask (``0644`` by default), so an instructor's cache can serve a
  class.  A cache that cannot be written (read-only, disk full) gives one
  :class:`CacheWarning` and the result is still returned; a read-only cache
  that holds the entry is used as it is.
* Loads use ``torch.load(..., weights_only=True)``.

Importing this module does not load PyTorch (the command line reads
:data:`RECIPES` before it does).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import config
from ._catalogue import DATASETS, RECIPES
from .base import atomic_write
from ._preflight import check_common, check_model_fits, model_kwargs

if TYPE_CHECKING:
    from torch import nn

__all__ = ["RECIPES", "CacheWarning", "pretrained", "cached", "cache_key", "atomic_save", "environment",
           "read_entry", "write_entry"]

FORMAT = 2
#: First line of every cache file.
MAGIC = b"nnlab cache\n"


class CacheWarning(UserWarning):
    """A trained result could not be written to the model cache (it is still returned)."""


class CacheEntryError(ValueError):
    """A cache file is damaged, of an unknown format, or holds another entry."""




def cache_key(key_fields: dict) -> str:
    """Short stable hash of a JSON-serialisable description."""
    text = json.dumps(key_fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment() -> dict:
    """The part of every cache key that describes where a result is computed.

    CPU training sums in an order that depends on PyTorch's thread count, so
    the same recipe gives slightly different weights (and accuracies a few
    tenths of a percent apart) with 1 thread and with 2.  The count is
    therefore part of the key: a result is only ever reused by a process
    that would have computed the very same one.  Set ``NNLAB_THREADS`` to
    share one cache between machines with different CPU counts.

    Returns:
        ``{"threads": torch.get_num_threads()}``.
    """
    # lazy: importing the cache must not load PyTorch (the command line reads RECIPES first)
    import torch

    return {"threads": torch.get_num_threads()}


def _serialise(obj) -> memoryview:
    """The ``torch.save`` bytes of ``obj``, as a view of the buffer they were saved into (no copy)."""
    # lazy: importing the cache must not load PyTorch (the command line reads RECIPES first)
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` whole or not at all, with the user's umask.

    The bytes are made in memory, written to a temporary file in the same
    directory and renamed into place.

    Raises:
        OSError: the file cannot be written (no temporary file is left).
    """
    atomic_write(path, _serialise(obj))


def write_entry(path: str | os.PathLike, key: str, key_fields: dict, payload) -> None:
    """Write a cache file: magic line, SHA-256 line, then a JSON header line and the ``torch.save`` bytes.

    The checksum covers everything after it (header and payload).

    Raises:
        OSError: the file cannot be written.
    """
    # The header names the key fields "spec", as every file written so far does.
    header = json.dumps({"format": FORMAT, "key": key, "spec": key_fields}, sort_keys=True, default=str).encode()
    blob = _serialise(payload)  # hashed and written in pieces: a ResNet's entry is 100 MB, joined it is 200
    digest = hashlib.sha256(header + b"\n")
    digest.update(blob)
    atomic_write(path, [MAGIC, b"sha256 " + digest.hexdigest().encode() + b"\n", header, b"\n", blob])


def read_entry(path: str | os.PathLike, key: str | None = None):
    """Read and verify a cache file written by :func:`write_entry`; return its payload.

    Args:
        path: the file.
        key: the key it must hold (None: any).

    Raises:
        CacheEntryError: not an nnlab cache file, a format this version does
            not read, a checksum that does not match (the file is damaged),
            another key, or a payload that cannot be loaded.
        OSError: the file cannot be read.
    """
    # lazy: importing the cache must not load PyTorch (the command line reads RECIPES first)
    import torch

    blob = Path(path).read_bytes()
    if not blob.startswith(MAGIC):
        kind = "an older nnlab format" if blob.startswith(b"PK") else "not an nnlab cache file"
        raise CacheEntryError(f"unknown header: {kind}")
    # Positions, not slices: a slice of the file's bytes is a copy, and a ResNet's entry is 100 MB.
    end_line = blob.find(b"\n", len(MAGIC))
    line = blob[len(MAGIC):end_line]
    if end_line < 0 or not line.startswith(b"sha256 ") or len(line) != len(b"sha256 ") + 64:
        raise CacheEntryError("unknown header: no checksum line")
    view = memoryview(blob)
    body = view[end_line + 1:]
    if hashlib.sha256(body).hexdigest().encode() != line[len(b"sha256 "):]:
        raise CacheEntryError("checksum mismatch: the file is damaged or was changed after it was written")
    end_head = blob.find(b"\n", end_line + 1)
    if end_head < 0:
        end_head = len(blob)
    head, payload = blob[end_line + 1:end_head], view[end_head + 1:]
    try:
        header = json.loads(head)
    except ValueError:
        raise CacheEntryError("unknown header: not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CacheEntryError(f"format {found!r}, but this nnlab reads format {FORMAT}")
    if key is not None and header.get("key") != key:
        raise CacheEntryError("it holds another entry (its key does not match)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CacheEntryError(f"payload cannot be loaded: {type(exc).__name__}: {exc}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:160]


def cached(name: str, key_fields: dict, build: Callable[[], dict], *, validate: Callable[[dict], None] | None = None,
           verbose: bool = True, environment_key: bool = True) -> dict:
    """Return the dict that ``build()`` makes, computing it once per ``key_fields``.

    Args:
        name: readable prefix of the file name, e.g. ``"lenet5-pruned90"``.
        key_fields: everything the result depends on (JSON-serialisable); it is
            hashed into the file name and checked again on load.
        build: makes the payload: a dict of tensors, numbers, strings, lists
            and dicts (what ``torch.load(weights_only=True)`` accepts), e.g.
            ``{"state_dict": model.state_dict(), "metrics": {...}}``.
        validate: called on a loaded payload; if it raises, the file is
            treated as corrupt and rebuilt.
        verbose: print one line when a cached file is rebuilt (otherwise
            the same line comes as a :class:`CacheWarning`).
        environment_key: add :func:`environment` (the CPU thread count) to
            the key; leave it on for anything trained or computed with
            floating-point sums.

    Returns:
        The payload dict.  When the cache cannot be written (read-only
        directory, disk full) a :class:`CacheWarning` says so and the
        payload is returned all the same.
    """
    key_fields = {**key_fields, "format": FORMAT}
    if environment_key:
        key_fields["environment"] = environment()
    key = cache_key(key_fields)
    path = config.cache_dir(create=False) / "models" / f"{name}-{key}.pt"
    if path.exists():
        try:
            payload = read_entry(path, key)
            if not isinstance(payload, dict):
                raise CacheEntryError(f"payload is a {type(payload).__name__}, not a dict")
            if validate is not None:
                validate(payload)
            return payload
        except Exception as exc:  # damaged, truncated, unreadable, another format or key ...
            message = f"nnlab: cached file {path} is unreadable ({_one_line(exc)}); rebuilding it."
            if verbose:
                print(message)
            else:
                warnings.warn(message, CacheWarning, stacklevel=2)
    payload = build()
    try:
        write_entry(path, key, key_fields, payload)
    except OSError as exc:
        warnings.warn(f"nnlab: could not write the model cache file {path} ({type(exc).__name__}: "
                      f"{_one_line(exc)}); the result is returned but will be computed again next time. "
                      f"Point NNLAB_CACHE at a writable directory with free space to keep it.",
                      CacheWarning, stacklevel=2)
    return payload


def _builder_name(builder) -> str:
    """A name of a model constructor that is the same in every process (no memory address, unlike a repr).

    ``functools.partial(torchvision_model, "resnet18")`` is
    ``"torchvision_model('resnet18')"``.
    """
    if isinstance(builder, functools.partial):
        args = [repr(a) for a in builder.args] + [f"{k}={v!r}" for k, v in sorted(builder.keywords.items())]
        return f"{_builder_name(builder.func)}({', '.join(args)})"
    return getattr(builder, "__qualname__", type(builder).__qualname__)


def pretrained(
    model: str = "lenet5",
    dataset: str = "mnist",
    *,
    source: str | None = None,
    seed: int = 0,
    quick: bool | None = None,
    device="cpu",
    verbose: bool = True,
    data=None,
) -> nn.Module:
    """A trained baseline model, trained on first use and loaded from the cache afterwards.

    Args:
        model: a name from :data:`nnlab.models.MODELS` with a recipe in :data:`RECIPES`.
        dataset: data set name for :func:`nnlab.data.load_data`.
        source: data source (default as in :func:`~nnlab.data.load_data`).
        seed: initialisation and training seed.
        quick: train the quick-mode recipe; default :func:`nnlab.quick_mode`.
        device: where to train (on a cache miss) and where the model is returned.
        verbose: print what is happening.
        data: a DataBundle whose images to use, instead of loading
            ``dataset``; its fingerprint (data set, source, size, checksum)
            enters the cache key.  Batch size and augmentation always come
            from the model's recipe, so any bundle of the same images finds
            the same cached model.

    Returns:
        The model in eval mode on ``device``; ``model.nnlab_metrics`` holds
        its test accuracy and training time as measured when it was trained.
    """
    # lazy: PyTorch, data, models and train load only when a model is asked for: importing the cache must not load PyTorch
    import torch

    from .data import DataBundle, load_data, make_loader
    from .models import MODELS, build_model
    from .train import evaluate, fit, resolve_device

    check_common(model, dataset if data is None else None, source, seed, quick, verbose)
    if data is not None and not isinstance(data, DataBundle):
        raise TypeError(f"data must be a DataBundle from nnlab.data.load_data, got {type(data).__name__}")
    dev = resolve_device(device)
    recipe = RECIPES[model]
    quick = config.quick_mode() if quick is None else bool(quick)
    epochs = recipe["epochs"][1 if quick else 0]
    if data is None:
        ds = DATASETS[dataset]
        check_model_fits(model, (ds.channels, ds.size, ds.size), len(ds.classes), dataset)
        data = load_data(dataset, source, verbose=verbose)
    else:
        check_model_fits(model, data.input_shape, data.num_classes, data.name)
    kwargs = model_kwargs(model, data.input_shape)
    # Every constructor argument enters the cache key, the registered ones (a stem's stride, a width ...) as well
    # as those that fit the images, so that a changed architecture never loads weights trained for another.
    cls, defaults = MODELS[model]
    architecture = {"builder": _builder_name(cls), **defaults, **kwargs}
    key_fields = {"model": model, "model_kwargs": kwargs, "architecture": architecture, "num_classes": data.num_classes,
            "data": data.fingerprint, "recipe": recipe, "epochs": epochs, "seed": seed}

    def build():
        if verbose:
            print(f"Training {model} for {epochs} epochs (done once, then cached) ...")
        train = make_loader(data.train.dataset.with_augment(recipe["augment"]), recipe["batch_size"], shuffle=True)
        torch.manual_seed(seed)
        net = build_model(model, num_classes=data.num_classes, **kwargs)
        history = fit(net, train, epochs, lr=recipe["lr"], optimizer=recipe["optimizer"], seed=seed,
                      device=dev, desc=f"train {model}", progress=verbose)
        result = evaluate(net, data, device=dev)
        net.to("cpu")
        metrics = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
                   "train_seconds": float(history["seconds"].sum()), "epochs": epochs}
        return {"state_dict": net.state_dict(), "metrics": metrics}

    def fresh():
        torch.manual_seed(seed)
        return build_model(model, num_classes=data.num_classes, **kwargs)

    def validate(payload):
        fresh().load_state_dict(payload["state_dict"])
        float(payload["metrics"]["top1"])

    name = f"{model.replace(':', '-')}-{data.name}-{data.source}"  # no ':' in file names (Windows)
    payload = cached(name, key_fields, build, validate=validate, verbose=verbose)
    net = fresh()
    net.load_state_dict(payload["state_dict"])
    net.nnlab_metrics = dict(payload["metrics"])
    return net.to(dev).eval()
