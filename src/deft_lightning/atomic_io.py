"""Atomic writes: a file (or folder) appears complete under its name, or not at all.

Checkpoints and exports are written to a temporary in the destination folder, flushed to disk
(``fsync``) and renamed over the destination (``os.replace``, atomic on POSIX filesystems), so
a process killed at any moment leaves the previous file intact. Files are first written to an
unnamed ``O_TMPFILE`` inode that the kernel frees if the process dies, and only given a
(hidden, ``.<name>.partial-<pid>``) name just before the rename; where ``O_TMPFILE`` is
unsupported the named temporary is written directly. Temporaries left by a killed process
(its pid no longer running) are deleted by the next write to the same folder.

Only the standard library and torch are imported here (the kill test runs this file alone).
:class:`~deft_lightning.checkpoint_io.AtomicCheckpointIO` makes Lightning save through it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``.<name>.partial-<pid>`` / ``.<name>.old-<pid>`` entries of processes that are
    no longer running; returns what was deleted."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and int(match["pid"]) != os.getpid() and not _pid_running(int(match["pid"])):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _temporary_name(path: Path, kind: str = "partial") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open folders for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unnamed_file(folder: Path) -> int:
    return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)


@functools.lru_cache(maxsize=None)
def _unnamed_files_work_on(device: int, folder: Path) -> bool:
    probe = _temporary_name(folder / "probe")
    try:
        fd = _unnamed_file(folder)
    except (AttributeError, OSError):
        return False
    try:
        os.link(f"/proc/self/fd/{fd}", probe, follow_symlinks=True)
    except OSError:  # e.g. EXDEV where /proc is another mount (some sandboxes)
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return True


def _unnamed_files_work(folder: Path) -> bool:
    """Whether ``O_TMPFILE`` + ``linkat`` work in ``folder``'s filesystem (probed once per device)."""
    return _unnamed_files_work_on(folder.stat().st_dev, folder)


def atomic_write_bytes(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` atomically: ``write(file)`` fills a temporary that replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    temporary = _temporary_name(path)
    fd = _unnamed_file(path.parent) if _unnamed_files_work(path.parent) else None
    try:
        if fd is None:
            with open(temporary, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
        else:
            with os.fdopen(fd, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
                os.link(f"/proc/self/fd/{file.fileno()}", temporary, follow_symlinks=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write_bytes(path, lambda file: torch.save(obj, file))


def atomic_write_folder(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Create or replace the folder ``path`` atomically: ``fill(folder)`` writes a temporary
    folder beside it, which then takes its name (the old folder goes only after that)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    temporary, old = _temporary_name(path), _temporary_name(path, "old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        fill(temporary)
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        _fsync_folder(temporary)
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
