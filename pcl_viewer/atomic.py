"""Atomic file and folder writes, an exclusive lock on an output folder, full-disk messages.

One module for every writer that must never leave half a file behind:

- :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_writer` /
  :func:`atomic_path`: write to a uniquely named temporary file in the same folder
  (``tempfile.mkstemp(dir=...)``), ``fsync``, ``os.replace`` over the target, ``fsync`` the
  folder. Readers see the old file or the new one, never a truncated one; two writers of the
  same file never share a temporary name; on any error the temporary file is removed.
  :func:`atomic_path` / :func:`atomic_save` hand out the temporary *path*, for writers that
  want a file name (``nibabel.save``, ``np.save``, ``fig.savefig``) rather than an open file.
- :func:`atomic_dir`: the same for a folder (checkpoints, bundles): fill a temporary sibling
  folder, then swap it in with two renames.
- :class:`FolderLock`: an exclusive, non-blocking lock on a folder (``fcntl.flock`` on POSIX,
  ``msvcrt.locking`` on Windows). The kernel drops the lock when its process dies, so a
  ``kill -9`` never leaves a stale lock; the holder's pid is written in the lock file so a
  second writer can name it. (``filelock`` does the locking too, but it does not expose
  who holds the lock, and a second writer must say that.)
- :func:`disk_full` / :func:`one_line_os_error`: recognise ENOSPC / EDQUOT and turn an
  ``OSError`` into one line for a command-line message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

LOCK_NAME = ".lock"


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it is durable (no-op where folders cannot be opened)."""
    if sys.platform.startswith("win"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _extension(path: Path) -> str:
    """``.nii.gz`` for a gzipped NIfTI, else the last suffix (``.png``), else ``""``."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a unique temporary sibling of ``path`` to write; on success it replaces ``path``.

    The temporary name is ``.NAME.<random>.tmp``; with ``keep_suffix`` it ends in the
    target's extension too (``.NAME.<random>.tmp.nii.gz``), for writers that choose the
    format from the file name. The caller writes the file (and closes it); on leaving the
    block it is fsynced and renamed over ``path``. On any exception (a full disk, a bug,
    Ctrl-C) the temporary file is removed and the old ``path`` is kept.
    """
    path = Path(path)
    suffix = ".tmp" + (_extension(path) if keep_suffix else "")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "r+b") as fh:  # writable: Windows cannot fsync a read-only handle
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                  newline: str | None = "") -> Iterator[IO[Any]]:
    """Open a unique temporary sibling of ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` (text, ``encoding``/``newline`` apply) or ``"wb"``. On any exception
    (a full disk, a bug, Ctrl-C) the temporary file is removed and the old ``path`` is kept.
    """
    binary = "b" in mode
    with atomic_path(path) as tmp, open(
            tmp, mode, **({} if binary else {"encoding": encoding, "newline": newline})) as fh:
        yield fh


def atomic_save(path: str | os.PathLike, save: Callable[[Path], object]) -> Path:
    """Create ``path``'s folder, then ``save(tmp)`` under :func:`atomic_path` (the temporary
    name keeps the extension); returns ``path``. For file-name writers, e.g.
    ``atomic_save(p, lambda t: nib.save(img, t))``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, keep_suffix=True) as tmp:
        save(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`); returns ``path``."""
    with atomic_writer(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns ``path``."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file in ``folder`` (not recursive) and the folder itself."""
    for p in Path(folder).iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder; on success it replaces the folder ``path``.

    The swap is two renames (old -> ``.NAME.old``, new -> ``NAME``), then the old copy is
    removed; a kill between the renames leaves ``.NAME.old`` complete, which readers such
    as :func:`pcl_viewer.train.checkpoint.load_checkpoint` fall back to. On any exception
    the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
        tmp.rename(path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ lock


class LockedError(RuntimeError):
    """The folder is locked by another live process (``holder``: its pid, or None if unknown)."""

    def __init__(self, folder: Path, holder: int | None) -> None:
        self.folder, self.holder = folder, holder
        who = f"process {holder}" if holder else "another process"
        super().__init__(f"{folder} is in use by {who} (another review writing there); "
                         "wait for it to finish or use another --out")


class FolderLock:
    """Exclusive, non-blocking lock on ``folder`` through ``folder/.lock``.

    Use as a context manager; :meth:`acquire` raises :class:`LockedError` at once when
    another process holds it. The lock file stays (removing it would race with a second
    writer opening it); the kernel releases the lock when the holder exits or is killed.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fh: IO[str] | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="ascii")  # noqa: SIM115 - held while locked
        try:
            _lock(fh)
        except OSError:
            fh.seek(0)
            text = fh.read().strip()
            fh.close()
            raise LockedError(self.folder, int(text) if text.isdigit() else None) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                _unlock(self._fh)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


if sys.platform.startswith("win"):  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fh: IO[str]) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(fh: IO[str]) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fh: IO[str]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fh: IO[str]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------- full disk


def disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` meaning no space left (ENOSPC) or quota exceeded (EDQUOT)."""
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    return isinstance(exc, OSError) and exc.errno in codes


def one_line_os_error(exc: OSError, action: str = "writing") -> str:
    """One line for a command-line message, e.g. ``disk full while writing report/x: ...``."""
    where = exc.filename if exc.filename is not None else "the output"
    if disk_full(exc):
        return (f"disk full while {action} {where} ({exc.strerror or exc}); free some space "
                "and run the same command again (finished work is kept)")
    return f"error while {action} {where}: {exc.strerror or exc}"
