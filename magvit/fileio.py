"""Atomic writes of files and folders whose permissions honour the umask, as ``cp`` would.

Every writer of the project that must never leave half a file under its final name (manifests, JSON reports,
shards, videos, EMA weights, exported models) goes through :func:`atomic_path` or :func:`atomic_folder`: the data
is written under a temporary name beside the target and renamed into place only when complete. Temporary files
from ``tempfile`` are created 0600 (folders 0700) and safetensors' ``save_file`` also writes 0600, so the final
file would be unreadable to anyone else whatever the umask; here the finished file gets ``0666 & ~umask`` and a
finished folder ``0777 & ~umask`` (and the same for everything inside it) before the rename.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible, so that it is never changed, even briefly)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permission bits a new file (``0666``) or folder (``0777``) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything inside it) the permissions ``cp`` would under the umask."""
    path = Path(path)
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
    os.chmod(path, dir_mode)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix: writers that pick a format from it keep working);
    when the block ends without an error, it gets the umask's permissions and replaces ``path``.

    On an error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``directory``; when the block succeeds, it (and what it holds) gets
    the umask's permissions and takes the place of ``directory`` (an existing one is replaced, never merged).

    The swap is one atomic exchange where the OS has it (Linux); elsewhere an interrupted swap can leave the old
    folder under ``.NAME.old`` and none under the final name, which :func:`recover_folder` (called by the next
    save, and by a trainer at its start) puts back. On an error the temporary folder is removed.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        honour_umask(tmp)
        replace_folder(tmp, directory, directory.with_name(f".{directory.name}.old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS, the
    C library or the filesystem cannot (nothing changed then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def recover_folder(target: Path, old: Path) -> bool:
    """Undo a swap interrupted between its two renames: ``target`` missing and the previous folder under ``old``
    -> it goes back under ``target``. True when it did."""
    if old.is_dir() and not target.exists():
        old.rename(target)
        return True
    return False


def replace_folder(source: Path, target: Path, old: Path) -> None:
    """Rename ``source`` to ``target``, replacing an existing ``target`` (never merging). With an atomic exchange
    ``target`` always holds the old or the new folder; without one the old folder waits under ``old`` until the new
    one is in place, so an interrupted swap loses nothing (:func:`recover_folder`)."""
    recover_folder(target, old)
    if not target.exists():
        source.rename(target)
    elif exchange_paths(source, target):  # target: the new folder; source: the old one
        shutil.rmtree(source, ignore_errors=True)
    else:
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written in it; ``ValueError`` saying why not.

    Commands call this before any long computation, so that a bad ``--out`` fails in a second, not at the end.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".write-test-", dir=directory):
            pass
    except OSError as err:
        raise ValueError(f"cannot write in {directory} ({err.strerror or err})") from None
    return directory


def check_writable_file(path: str | os.PathLike) -> Path:
    """Prove ``path`` can be written atomically (its folder is writable, it is not a folder); ``ValueError`` if not."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    check_writable_dir(path.parent)
    return path
