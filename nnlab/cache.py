"""A model cache: train once, load in a second afterwards.

Every notebook stands alone: it asks :func:`pretrained` (or, for its own
artefacts such as a pruned network, :func:`cached`) for what it needs, and
whatever is missing is trained and cached.  The cache lives in
``nnlab.cache_dir()/models`` (``NNLAB_CACHE`` overrides the directory).

* The file name carries a hash of everything that determines the result
  (model, data set and source, training recipe, seed, quick/full mode and
  the cache format), so changing any of them trains anew.
* Writes are atomic: the file is written next to its final name and renamed.
* Loads use ``torch.load(..., weights_only=True)``; an unreadable, truncated
  or mismatching file is reported in one line and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import config
from ._args import check_choice
from .data import load_data, make_loader
from .models import MODELS, build_model, data_kwargs
from .train import evaluate, fit, resolve_device

__all__ = ["RECIPES", "pretrained", "cached", "cache_key", "atomic_save"]

FORMAT = 1

#: Training recipe of each model: (full-mode epochs, quick-mode epochs) and optimiser settings.
RECIPES = {
    "lenet300": {"epochs": (12, 2), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "lenet5": {"epochs": (12, 2), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "vgg-mnist": {"epochs": (8, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "vgg-cifar": {"epochs": (30, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 128, "augment": True},
    "mobilenet-mnist": {"epochs": (10, 2), "lr": 0.1, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "mobilenet-cifar": {"epochs": (30, 1), "lr": 0.1, "optimizer": "sgd", "batch_size": 128, "augment": True},
    "resnet-mnist": {"epochs": (10, 2), "lr": 0.1, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "resnet-cifar": {"epochs": (30, 1), "lr": 0.1, "optimizer": "sgd", "batch_size": 128, "augment": True},
    "torchvision:resnet18": {"epochs": (3, 1), "lr": 0.05, "optimizer": "sgd", "batch_size": 64, "augment": True},
    "torchvision:mobilenet_v2": {"epochs": (3, 1), "lr": 0.1, "optimizer": "sgd", "batch_size": 64,
                                 "augment": True},
}


def cache_key(spec: dict) -> str:
    """Short stable hash of a JSON-serialisable description."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cached(name: str, spec: dict, build: Callable[[], dict], *, validate: Callable[[dict], None] | None = None,
           verbose: bool = True) -> dict:
    """Return the dict that ``build()`` makes, computing it once per ``spec``.

    Args:
        name: readable prefix of the file name, e.g. ``"lenet5-pruned90"``.
        spec: everything the result depends on (JSON-serialisable); it is
            hashed into the file name and checked again on load.
        build: makes the payload: a dict of tensors, numbers, strings, lists
            and dicts (what ``torch.load(weights_only=True)`` accepts), e.g.
            ``{"state_dict": model.state_dict(), "metrics": {...}}``.
        validate: called on a loaded payload; if it raises, the file is
            treated as corrupt and rebuilt.
        verbose: print one line when a cached file is rebuilt.

    Returns:
        The payload dict.
    """
    spec = {**spec, "format": FORMAT}
    key = cache_key(spec)
    path = config.cache_dir() / "models" / f"{name}-{key}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("key") != key or "payload" not in blob:
                raise ValueError("its key does not match")
            if validate is not None:
                validate(blob["payload"])
            return blob["payload"]
        except Exception as exc:  # zip errors, pickle errors, truncation ...
            if verbose:
                reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                print(f"nnlab: cached file {path} is unreadable ({reason}); rebuilding it.")
    payload = build()
    atomic_save({"key": key, "spec": json.dumps(spec, sort_keys=True, default=str), "payload": payload}, path)
    return payload


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
    check_choice("model", model, RECIPES)
    dev = resolve_device(device)
    recipe = RECIPES[model]
    quick = config.quick_mode() if quick is None else bool(quick)
    epochs = recipe["epochs"][1 if quick else 0]
    if data is None:
        data = load_data(dataset, source, verbose=verbose)
    # Every constructor argument enters the cache key, the registered ones (a stem's stride, a width ...) as well
    # as those that fit the images, so that a changed architecture never loads weights trained for another.
    kwargs = data_kwargs(model, data.input_shape)
    spec = {"model": model, "model_kwargs": kwargs, "num_classes": data.num_classes,
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
    payload = cached(name, spec, build, validate=validate, verbose=verbose)
    net = fresh()
    net.load_state_dict(payload["state_dict"])
    net.nnlab_metrics = dict(payload["metrics"])
    return net.to(dev).eval()
