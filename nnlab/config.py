"""Course-wide switches: quick mode, the cache directory and the CPU thread count.

Every switch can be set by an environment variable, so an instructor (or CI)
can change the whole course without editing a notebook:

``NNLAB_QUICK``
    ``1`` makes notebooks and benchmarks use fewer epochs and samples.  Quick
    mode is also on whenever ``CI`` is set (to anything but ``0``/``false``).
    Full mode is the default for users.
``NNLAB_CACHE``
    Directory for downloaded data and trained models.  Default:
    ``$XDG_CACHE_HOME/nnlab`` or ``~/.cache/nnlab``.
``NNLAB_THREADS``
    Number of CPU threads PyTorch may use.  Default: the CPUs this process may
    actually run on (its CPU affinity, capped by a cgroup CPU quota such as a
    Binder pod's single CPU).
``NNLAB_SEED``
    The seed the notebooks pass to every training run (default 0), so an
    instructor can rerun the course with seed 1 or 2 and see which figures
    move (:func:`course_seed`).
``NNLAB_DATA_SOURCE``
    Where MNIST comes from by default: ``offline`` (the bundled 5,000-image
    subset; the default), ``torchvision`` (download the full set) or ``auto``
    (torchvision when reachable, else offline).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["quick_mode", "cache_dir", "available_cpus", "set_threads", "pick", "course_seed"]

_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() not in _FALSE


def quick_mode() -> bool:
    """Return True when the course should run in quick mode.

    ``NNLAB_QUICK`` decides when set; otherwise quick mode is on exactly when
    the ``CI`` environment variable is set (and not ``0``/``false``).
    """
    explicit = _flag("NNLAB_QUICK")
    if explicit is not None:
        return explicit
    return bool(_flag("CI"))


def pick(full, quick):
    """Return ``quick`` in quick mode and ``full`` otherwise.

    Notebooks use it for every knob that only trades time for quality, e.g.
    ``epochs = nnlab.pick(full=8, quick=1)``.
    """
    return quick if quick_mode() else full


def course_seed() -> int:
    """The seed of the course's training runs: ``NNLAB_SEED``, default 0.

    The notebooks pass it as ``seed=`` to every call that trains, so one
    variable reruns the whole course with other random initialisations and
    batch orders (cached models are kept per seed).

    Raises:
        ValueError: ``NNLAB_SEED`` is not a non-negative integer.
    """
    env = os.environ.get("NNLAB_SEED", "").strip()
    if not env:
        return 0
    try:
        seed = int(env)
    except ValueError:
        raise ValueError(f"NNLAB_SEED must be a non-negative integer, got {env!r}") from None
    if seed < 0:
        raise ValueError(f"NNLAB_SEED must be a non-negative integer, got {seed}")
    return seed


def cache_dir(create: bool = True) -> Path:
    """Directory where nnlab keeps downloaded data sets and trained models."""
    root = os.environ.get("NNLAB_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        path = Path(base) / "nnlab"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _cgroup_cpu_limit() -> float | None:
    """CPU quota of this process's cgroup (v2 or v1), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """Number of CPUs this process may actually use (affinity and cgroup quota)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def set_threads(n: int | None = None) -> int:
    """Set PyTorch's intra-op thread count and return it.

    Args:
        n: threads to use; default ``NNLAB_THREADS`` or :func:`available_cpus`.

    Returns:
        The thread count now in force.
    """
    import torch

    if n is None:
        env = os.environ.get("NNLAB_THREADS")
        if env:
            try:
                n = int(env)
            except ValueError:
                raise ValueError(f"NNLAB_THREADS must be a positive integer, got {env!r}") from None
        else:
            n = available_cpus()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer number of threads, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
