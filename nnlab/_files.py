"""Writing files safely: whole or not at all, readable by the whole class, no litter.

Every file nnlab writes (cached models, reports) goes through
:func:`atomic_write`:

* the bytes go to a temporary file next to the final name, which is renamed
  into place only once everything is written and flushed, so a crash or a
  full disk never leaves a half-written file under the final name;
* the file gets the permissions an ordinary ``open(..., "w")`` would give
  (``0o666`` minus the user's umask: ``0644`` by default), not the ``0600``
  of a bare temporary file, so a cache an instructor fills can be read by
  every student sharing it;
* temporary files left by a process that was killed mid-write (older than
  :data:`STALE_SECONDS`) are removed the next time the same directory is
  written to (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

__all__ = ["STALE_SECONDS", "TMP_SUFFIX", "atomic_write", "file_mode", "remove_stale_temporaries", "umask"]

#: Suffix of nnlab's temporary files.
TMP_SUFFIX = ".tmp"
#: A temporary file untouched for this long belongs to a process that died.
STALE_SECONDS = 15 * 60
# "<final name>.<random>.tmp", as atomic_write makes them.
_TMP_NAME = re.compile(r"^.+\.[A-Za-z0-9_]{6,}\.tmp$")


def umask() -> int:
    """The process's umask (read without changing it where the system allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it: put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file: ``0o666`` minus the umask (``0o644`` with the usual umask 022)."""
    return 0o666 & ~umask()


def remove_stale_temporaries(directory: str | os.PathLike, max_age: float = STALE_SECONDS) -> list:
    """Delete nnlab temporary files in ``directory`` not modified for ``max_age`` seconds.

    Only names of the form ``<name>.<random>.tmp`` are touched; files that
    cannot be removed (another user's, a read-only directory) are left.

    Returns:
        The paths removed.
    """
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.endswith(TMP_SUFFIX) and _TMP_NAME.match(entry.name)):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > max_age:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, data) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, with the usual permissions.

    Args:
        path: final file name; its directory is created if missing.
        data: ``bytes``, ``str`` (written as UTF-8), or a list or tuple of
            bytes-like pieces written one after the other (so that a large
            file need not be joined into one more copy in memory first).

    Returns:
        ``path`` as a Path.

    Raises:
        OSError: the directory or the file cannot be written (read-only,
            disk full ...).  No temporary file is left behind.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    pieces = list(data) if isinstance(data, (list, tuple)) else [data]
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
