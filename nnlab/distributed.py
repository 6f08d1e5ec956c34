"""Scaling up: nnlab's helpers on several processes or GPUs, with PyTorch's DistributedDataParallel.

Nothing here replaces PyTorch's engine: the training step is
``torch.nn.parallel.DistributedDataParallel`` (DDP), the processes are
started by ``torchrun`` and talk through ``torch.distributed`` (``nccl``
between GPUs, ``gloo`` between CPU processes).  This module only adds what
the course's techniques need so that every process (every *rank*) ends with
the same network:

* :func:`init_distributed` joins the process group ``torchrun`` describes
  (or does nothing when the script runs as one ordinary process) and returns
  this rank's device; :func:`shutdown` leaves it.
* :func:`distributed_loader` gives each rank its own share of the training
  images (``DistributedSampler`` inside a ``BatchSampler``, reshuffled every
  epoch by :func:`nnlab.train.fit`).
* :func:`wrap` / :func:`unwrap` put a model into DDP and take it out again.
* :func:`broadcast_model_state`, :func:`broadcast_norm_statistics`, :func:`all_reduce_min_max`,
  :func:`all_reduce_sum` and :func:`shared_generator` are the small
  collective operations the helpers use; :func:`differences_across_ranks`
  checks that the ranks agree, bit for bit.

Why the ranks stay identical
----------------------------
* **Weights.** DDP copies rank 0's parameters and buffers to every rank when
  it wraps a model, then averages the gradients at every step, so every rank
  applies the same update to the same weights.
* **Pruning masks** (:mod:`nnlab.prune`) are computed from the weights, which
  are identical, by deterministic code, so every rank computes the same mask.
  (:func:`broadcast_model_state` copies rank 0's masks too, if you ever need
  to force it.)
* **Calibration** (:class:`nnlab.quant.ActQuantiser`): when the process group
  is initialised, the observed activation ranges are all-reduced (MIN of the
  lows, MAX of the highs) before the scale is fixed, so every rank gets the
  scale of all the images seen by all the ranks.  :func:`nnlab.quant.calibrate`
  is therefore a collective: call it on every rank.
* **Random subsets** (:class:`nnlab.quant.RandomSubset`) are drawn from a
  generator of their own, seeded identically on every rank (never from a
  rank's global random state, which data augmentation and dropout consume).
* **Batch-norm statistics** are buffers: DDP broadcasts rank 0's before every
  forward pass, and :func:`nnlab.train.fit` broadcasts them once more after
  the last step, so the run ends with the same statistics on every rank.

The recipe
----------
Launch one process per GPU (or a few CPU processes) with
``torchrun --nproc_per_node=N script.py``; every rank runs the same script::

    device = init_distributed()                      # joins the group, picks this rank's GPU
    data = nnlab.data.load_data(...)                 # every rank loads the same data set
    train = distributed_loader(data, batch_size=64)  # ... and trains on its own share
    model = wrap(LeNet5(), device)                   # rank 0's initial weights everywhere
    fit(model, train, 4, device=device)              # an ordinary nnlab run, averaged gradients

    # Elimination: pruning works on the wrapped model (torch.nn.utils.prune keeps the
    # very Parameter object DDP registered, now called ``weight_orig``), so coring
    # steps, GradualCoring callbacks, distillation and L1 penalties run unchanged.
    prune_and_distill(model, teacher, train, target=0.9, device=device)

    # Reduction: quantise the plain module on every rank (calibration all-reduces the
    # ranges), then wrap the quantised model for retraining.
    qmodel = nnlab.quant.quantise_model(unwrap(model), train, 4, 8)
    qmodel = wrap(qmodel, device)
    nnlab.quant.retrain(qmodel, train, 2, method="random_subset", device=device)
    shutdown()

Rules that keep the ranks together:

* every rank calls the same nnlab functions in the same order (coring,
  calibration, evaluation of a wrapped model and broadcasts are collectives);
* prune either the wrapped model or the plain one on every rank; both work
  (torch's pruning keeps the parameter object), and wrapping again after a
  change is always safe: :func:`wrap` starts from rank 0's state;
* quantisation makes a new network (``attach_quantisers`` copies the one
  inside a DDP wrapper, never the wrapper): wrap the quantised copy again to
  retrain it;
* layer names: :mod:`nnlab.quant`, :mod:`nnlab.prune` and
  :mod:`nnlab.regularise` look inside the wrapper, so layers keep the plain
  model's names (``"conv1"``, ``"conv2"`` ... in LeNet-5) whether wrapped or not;
* the batch size of :func:`distributed_loader` is per rank: N ranks with 64
  images each train with batches of ``64 * N`` images; scale the learning
  rate accordingly.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from ._args import check_choice, check_int, check_positive_int
from .base import is_bundle, resolve_device, unwrap

__all__ = ["BACKENDS", "is_distributed", "rank", "world_size", "is_main_process", "launched_by_torchrun",
           "init_distributed", "shutdown", "distributed_loader", "wrap", "unwrap", "broadcast_model_state",
           "broadcast_norm_statistics",
           "all_reduce_min_max", "all_reduce_sum", "shared_generator", "state_digest", "differences_across_ranks"]

#: Backends :func:`init_distributed` accepts (``"auto"``: nccl for CUDA, gloo otherwise).
BACKENDS = ("auto", "gloo", "nccl")


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (this process is one of several ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: 0 .. world_size - 1 (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in an ordinary, single process): the one that prints and saves."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (its ``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device="auto", backend: str = "auto", timeout_s: int = 600) -> torch.device:
    """Join the process group ``torchrun`` started this process in, and return this rank's device.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    ``MASTER_ADDR``/``MASTER_PORT`` set) it initialises ``torch.distributed``
    and, on CUDA, selects GPU ``LOCAL_RANK``.  Started as an ordinary single
    process it initialises nothing, so the same script runs either way.

    Args:
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or
            ``"cuda"``; under torchrun a CUDA rank always gets ``cuda:LOCAL_RANK``.
        backend: ``"auto"`` (``"nccl"`` on CUDA, ``"gloo"`` on the CPU),
            ``"gloo"`` or ``"nccl"``.
        timeout_s: seconds a collective may wait for the other ranks before failing.

    Returns:
        The ``torch.device`` this rank computes on.

    Raises:
        ValueError: unknown backend, nccl without CUDA, or fewer GPUs than
            processes on this node.
    """
    check_choice("backend", backend, BACKENDS)
    check_positive_int("timeout_s", timeout_s)
    dev = resolve_device(device)
    if not launched_by_torchrun():
        return dev
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
                             f"start at most that many processes per node (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"backend='nccl' needs CUDA devices, but this rank runs on {dev}; use backend='gloo'")
    if not is_distributed():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dev


def shutdown() -> None:
    """Leave the process group (at the end of a distributed script); does nothing when not distributed."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def _dataset_of(data) -> Dataset:
    if is_bundle(data):  # a DataBundle: its training images
        data = data.train
    if isinstance(data, DataLoader):
        data = data.dataset
    if not isinstance(data, Dataset):
        raise TypeError(f"dataset must be a Dataset, a DataLoader or a DataBundle, got {type(data).__name__}")
    return data


def distributed_loader(dataset, batch_size: int, seed: int = 0, *, shuffle: bool = True, drop_last: bool = False,
                       num_replicas: int | None = None, rank: int | None = None) -> DataLoader:
    """A training loader that gives this rank its own share of ``dataset``, whole batches at a time.

    A ``torch.utils.data.DistributedSampler`` (shuffled from ``seed`` and the
    epoch, the same permutation on every rank) inside a ``BatchSampler``, as
    :func:`nnlab.data.make_loader` builds.  :func:`nnlab.train.fit` calls its
    ``set_epoch`` every epoch, so each epoch is shuffled differently.  Every
    rank gets the same number of batches (the sampler repeats a few images
    when the data set does not divide evenly), so the ranks step together.
    Outside a process group it is an ordinary seeded loader of the whole data set.

    Args:
        dataset: a Dataset, a DataLoader (its dataset) or a DataBundle (its
            training images, with their augmentation setting).
        batch_size: images per batch *on each rank*.
        seed: seed of the shuffle; give every rank the same one.
        shuffle: shuffle every epoch.
        drop_last: drop the last, smaller batch.
        num_replicas, rank: override the group's size and this process's rank
            (to see what another rank would get).

    Returns:
        A DataLoader yielding ``(images, labels)`` batches.
    """
    ds = _dataset_of(dataset)
    check_positive_int("batch_size", batch_size)
    check_int("seed", seed, minimum=0)
    replicas = world_size() if num_replicas is None else check_positive_int("num_replicas", num_replicas)
    if rank is None:
        rank = dist.get_rank() if is_distributed() else 0
    rank = check_int("rank", rank, minimum=0, maximum=replicas - 1)
    sampler = DistributedSampler(ds, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=drop_last), batch_size=None)


def wrap(model: nn.Module, device=None, **ddp_options) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in DistributedDataParallel (when distributed).

    Wrapping copies rank 0's parameters and buffers to every rank, so all
    ranks start identical.  A model that is already wrapped is unwrapped and
    wrapped again (after a change to the plain model, e.g. quantisers).
    Outside a process group the model is returned unwrapped, so a script runs
    unchanged as one process.

    Args:
        model: the network (plain or already wrapped).
        device: where this rank computes (from :func:`init_distributed`);
            default where the model's parameters are.
        **ddp_options: passed to ``DistributedDataParallel`` (e.g.
            ``broadcast_buffers``, ``find_unused_parameters``).

    Returns:
        The DDP-wrapped model (or ``model`` itself when not distributed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    dev = resolve_device(device, model)
    model.to(dev)
    if not is_distributed():
        return model
    if dev.type == "cuda":
        ddp_options.setdefault("device_ids", [dev.index if dev.index is not None else torch.cuda.current_device()])
    return nn.parallel.DistributedDataParallel(model, **ddp_options)


def _state_tensors(model: nn.Module):
    """(name, tensor) of everything in the model's state_dict, the tensors sharing the model's storage."""
    return [(k, v) for k, v in unwrap(model).state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)]


def _check_same_layout(items, what):
    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in items]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, layout)
    for r, other in enumerate(gathered):
        if other != layout:
            mine, theirs = set(layout), set(other)
            diff = sorted(mine ^ theirs)[:5]
            raise ValueError(f"{what}: the model on rank {r} has a different state (names, shapes or dtypes) "
                             f"from rank {rank()}: e.g. {diff}; every rank must prune and quantise the same way")


@torch.no_grad()
def broadcast_model_state(model: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers (masks, quantiser scales, batch-norm statistics) to every rank.

    Every tensor of the model's ``state_dict`` is overwritten in place, so a
    DDP wrapper around it keeps working.  Call it on every rank; it does
    nothing when not distributed.

    Args:
        model: the network (plain or DDP-wrapped); the same layers on every rank.
        src: the rank whose state wins.

    Returns:
        ``model``.

    Raises:
        ValueError: ``src`` is not a rank, or the models differ in their
            state's names, shapes or dtypes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_int("src", src, minimum=0, maximum=world_size() - 1)
    if not is_distributed():
        return model
    items = _state_tensors(model)
    _check_same_layout(items, "broadcast_model_state")
    for _, t in items:
        _broadcast(t.data, src)
    return model


def _broadcast(t: torch.Tensor, src: int) -> None:
    """In-place broadcast of ``t`` from rank ``src``, through the device the backend needs."""
    comm = _comm_device()
    if t.device == comm and t.is_contiguous():
        dist.broadcast(t, src)
        return
    tmp = t.detach().to(comm).contiguous()
    dist.broadcast(tmp, src)
    t.copy_(tmp)


@torch.no_grad()
def broadcast_norm_statistics(model: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s batch-norm running statistics to every rank (nothing else).

    DDP broadcasts rank 0's buffers *before* each forward pass, so after the
    last training step every rank holds the statistics of its own last batch;
    :func:`nnlab.train.fit` calls this at the end of a DDP run.  Call it on
    every rank; it does nothing when not distributed.

    Args:
        model: the network (plain or DDP-wrapped).
        src: the rank whose statistics win.

    Returns:
        ``model``.
    """
    check_int("src", src, minimum=0, maximum=world_size() - 1)
    if not is_distributed():
        return model
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            for b in m.buffers(recurse=False):
                _broadcast(b, src)
    return model


@torch.no_grad()
def all_reduce_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``lo`` by its minimum and ``hi`` by its maximum over all ranks, in place.

    This is how calibration statistics are combined: the range of all the
    activations every rank has seen.  Does nothing when not distributed.

    Args:
        lo, hi: tensors of the same shape on every rank (on the CPU for gloo,
            on this rank's GPU for nccl).

    Returns:
        ``(lo, hi)``, now the same on every rank.
    """
    for name, t in (("lo", lo), ("hi", hi)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if is_distributed():
        _all_reduce(lo, dist.ReduceOp.MIN)
        _all_reduce(hi, dist.ReduceOp.MAX)
    return lo, hi


def _all_reduce(t: torch.Tensor, op) -> None:
    """In-place all-reduce of ``t``, through the device the backend needs (gloo: CPU, nccl: GPU)."""
    comm = _comm_device()
    if t.device == comm and t.is_contiguous():
        dist.all_reduce(t, op=op)
        return
    tmp = t.detach().to(comm).contiguous()
    dist.all_reduce(tmp, op=op)
    t.copy_(tmp)


@torch.no_grad()
def all_reduce_sum(*tensors: torch.Tensor) -> tuple:
    """Replace each tensor by its sum over all ranks, in place (nothing changes when not distributed).

    Args:
        *tensors: tensors of the same shapes on every rank.

    Returns:
        The tuple of the same tensors.
    """
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if is_distributed():
        for t in tensors:
            _all_reduce(t, dist.ReduceOp.SUM)
    return tensors


def shared_generator(seed: int | None = None, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` that draws the same numbers on every rank.

    With a ``seed`` every rank seeds its own generator identically (no
    communication is needed: the same seed gives the same numbers).  With
    ``seed=None`` every rank draws a seed from torch's global generator (so a
    seeded run repeats) and rank 0's is sent to all the others (a collective:
    call it on every rank): the ranks agree even when their global
    generators do not, as data augmentation and dropout make them differ.

    Args:
        seed: a non-negative integer, or None for a seed drawn by rank 0.
        device: where the generator draws (``"cpu"``, or a CUDA device to draw
            random tensors directly on the GPU).

    Returns:
        A seeded ``torch.Generator`` on ``device``.
    """
    dev = resolve_device(device)
    if seed is None:
        # Every rank draws, so the ranks' global generators advance alike; rank 0's draw wins.
        value = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if is_distributed():
            comm = value.to(_comm_device())
            dist.broadcast(comm, 0)
            value = comm.cpu()
        seed = int(value.item())
    else:
        seed = check_int("seed", seed, minimum=0)
    return torch.Generator(device=dev).manual_seed(seed)


def _comm_device() -> torch.device:
    """Where tensors must be for the group's backend: this rank's GPU for nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def state_digest(model: nn.Module) -> dict:
    """A SHA-256 digest of every tensor of the model's state, ``{name: hex}``: equal digests, equal bits.

    Args:
        model: the network (plain or DDP-wrapped).

    Returns:
        Dict from state_dict key to the digest of that tensor's dtype, shape and bytes.
    """
    out = {}
    for k, v in _state_tensors(model):
        t = v.detach().contiguous().reshape(-1)
        raw = t.view(torch.uint8) if t.numel() else t.to(torch.uint8)
        h = hashlib.sha256(f"{t.dtype}{tuple(v.shape)}".encode())
        h.update(raw.cpu().numpy().tobytes())
        out[k] = h.hexdigest()
    return out


def differences_across_ranks(model: nn.Module, keys: Iterable[str] | None = None) -> list[str]:
    """Names of the state tensors that are not bit-identical on every rank (empty: the ranks agree).

    Call it on every rank (it gathers digests from all of them); every rank
    gets the same answer.  When not distributed it returns ``[]``.

    Args:
        model: the network (plain or DDP-wrapped).
        keys: only compare these state_dict keys (default all).

    Returns:
        Sorted list of differing keys (a key missing on some rank counts as differing).
    """
    digest = state_digest(model)
    if keys is not None:
        keys = list(keys)
        unknown = [k for k in keys if k not in digest]
        if unknown:
            raise ValueError(f"keys has names that are not in the model's state_dict: {unknown[:5]}")
        digest = {k: digest[k] for k in keys}
    if not is_distributed():
        return []
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, digest)
    names = set().union(*(g.keys() for g in gathered))
    return sorted(n for n in names if len({g.get(n) for g in gathered}) > 1)
