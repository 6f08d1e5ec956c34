"""Course-wide switches: quick mode, the cache directory and the CPU thread count.

Every switch can be set by an environment variable, so an instructor (or CI)
can change the whole course without editing a notebook:

``NNLAB_QUICK``
    ``1`` makes notebooks and benchmarks use fewer epochs and samples.  Quick
    mode is also on whenever ``CI`` is set (to anything but ``0``/``false``).
    Full mode is the default for users.  Accepted values: ``1``, ``true``,
    ``yes``, ``on`` and ``0``, ``false``, ``no``, ``off`` (any case);
    anything else is an error that names the variable.
``NNLAB_CACHE``
    Directory for downloaded data and trained models.  Default:
    ``$XDG_CACHE_HOME/nnlab`` or ``~/.cache/nnlab``.
``NNLAB_THREADS``
    Number of CPU threads PyTorch may use, a positive integer.  Default: the
    CPUs this process may actually run on (its CPU affinity, capped by a
    cgroup CPU quota such as a Binder pod's single CPU).  Training on the
    CPU gives slightly different weights with a different thread count
    (floating-point sums are split differently), so the thread count is
    part of every cached model's key: to share one cache with a class,
    fill it with the thread count the students will have (e.g.
    ``NNLAB_THREADS=1 make course``).
``NNLAB_SEED``
    The seed the notebooks pass to every training run (default 0), so an
    instructor can rerun the course with seed 1 or 2 and see which figures
    move (:func:`course_seed`).
``NNLAB_DATA_SOURCE``
    Where MNIST comes from by default: ``offline`` (the bundled 5,000-image
    subset; the default), ``torchvision`` (download the full set) or ``auto``
    (torchvision when reachable, else offline).

``import nnlab`` does not load PyTorch; the thread count is applied as soon
as PyTorch is imported (by nnlab or by you, before or after nnlab).  A bad
``NNLAB_THREADS`` then gives a warning that names it, and
:func:`set_threads` an error.  :func:`check_environment` lists every bad
setting at once (the command line refuses to start with one).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path

__all__ = ["quick_mode", "cache_dir", "available_cpus", "set_threads", "pick", "course_seed", "threads_setting",
           "check_environment"]

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}
_DATA_SOURCES = ("offline", "torchvision", "auto")


def _flag(name: str, strict: bool = True) -> bool | None:
    """The boolean value of environment variable ``name``, None when unset.

    An empty value means false.  ``strict``: anything but the accepted
    spellings raises a ValueError naming the variable; otherwise any value
    but a false one means true (``CI=github-actions`` ...).
    """
    value = os.environ.get(name)
    if value is None:
        return None
    text = value.strip().lower()
    if text == "" or text in _FALSE:
        return False
    if text in _TRUE or not strict:
        return True
    raise ValueError(f"environment variable {name}={value!r} is not understood: use 1, true, yes or on "
                     f"(or 0, false, no, off), or unset it")


def quick_mode() -> bool:
    """Return True when the course should run in quick mode.

    ``NNLAB_QUICK`` decides when set; otherwise quick mode is on exactly when
    the ``CI`` environment variable is set (and not ``0``/``false``).

    Raises:
        ValueError: ``NNLAB_QUICK`` is set to something that is neither true
            nor false (e.g. ``maybe``).
    """
    explicit = _flag("NNLAB_QUICK")
    if explicit is not None:
        return explicit
    return bool(_flag("CI", strict=False))


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
        seed = -1
    if seed < 0:
        raise ValueError(f"environment variable NNLAB_SEED={env!r} must be a non-negative integer (the seed of "
                         f"every training run), or unset for 0")
    return seed


def _cache_root() -> Path:
    root = os.environ.get("NNLAB_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "nnlab"


def cache_dir(create: bool = True) -> Path:
    """Directory where nnlab keeps downloaded data sets and trained models.

    Args:
        create: make the directory (and its parents) if missing.

    Raises:
        NotADirectoryError: ``NNLAB_CACHE`` (or the default) names a file.
        PermissionError: it does not exist and cannot be created.
    """
    path = _cache_root()
    where = "NNLAB_CACHE" if os.environ.get("NNLAB_CACHE") else "the cache directory"
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{where} {path} is a file, not a directory; point NNLAB_CACHE at a directory")
    if create and not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise type(exc)(exc.errno, f"{where} {path} cannot be created ({exc.strerror}); point NNLAB_CACHE "
                                       f"at a directory you can write") from None
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


def threads_setting() -> int | None:
    """The thread count ``NNLAB_THREADS`` asks for, or None when it is unset (or empty).

    Raises:
        ValueError: it is not a positive integer (``0``, ``x``, ``1.5`` ...).
    """
    env = os.environ.get("NNLAB_THREADS")
    if env is None or not env.strip():
        return None
    try:
        n = int(env.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"environment variable NNLAB_THREADS={env!r} must be a positive integer "
                         f"(e.g. NNLAB_THREADS=1), or unset to use every available CPU")
    return n


def set_threads(n: int | None = None) -> int:
    """Set PyTorch's intra-op thread count and return it.

    Args:
        n: threads to use; default ``NNLAB_THREADS`` or :func:`available_cpus`.

    Returns:
        The thread count now in force.

    Raises:
        ValueError: ``n`` or ``NNLAB_THREADS`` is not a positive integer.
    """
    # lazy: import nnlab must not load PyTorch (seconds); only setting threads needs it
    import torch

    if n is None:
        n = threads_setting() or available_cpus()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer number of threads, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def check_environment() -> list:
    """Every nnlab environment variable that is set to something nnlab cannot use.

    Returns:
        One message per bad variable, each naming it and what it accepts;
        empty when all is well.
    """
    problems = []
    for check in (quick_mode, threads_setting, course_seed):
        try:
            check()
        except ValueError as exc:
            problems.append(str(exc))
    source = os.environ.get("NNLAB_DATA_SOURCE")
    if source and source not in _DATA_SOURCES:
        problems.append(f"environment variable NNLAB_DATA_SOURCE={source!r} must be one of "
                        f"{', '.join(map(repr, _DATA_SOURCES))}, or unset")
    root = _cache_root()
    if root.exists() and not root.is_dir():
        problems.append(f"environment variable NNLAB_CACHE={str(root)!r} is a file, not a directory")
    return problems


def _apply_threads() -> None:
    try:
        set_threads()
    except ValueError as exc:
        # lazy: PyTorch is loading at this point already; import nnlab must not load it
        import torch

        warnings.warn(f"nnlab: {exc}; PyTorch keeps its default of {torch.get_num_threads()} threads",
                      RuntimeWarning, stacklevel=2)


class _ThreadsWhenTorchLoads:
    """Import hook: apply the thread setting right after ``torch`` is imported, then get out of the way."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _apply_threads()

        spec.loader.exec_module = exec_module
        return spec


def apply_threads_when_torch_loads() -> None:
    """Set PyTorch's thread count now if it is loaded, else as soon as it is (``import nnlab`` calls this)."""
    if "torch" in sys.modules:
        _apply_threads()
    elif not any(isinstance(f, _ThreadsWhenTorchLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _ThreadsWhenTorchLoads())
