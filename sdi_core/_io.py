"""File-system failures as :class:`SDIError` messages, and output locations checked before work starts.

Every OS error the store and the commands can meet (a full disk, an I/O
error, a read-only file system, a path through a file, missing permissions)
becomes an ``SDIError`` that names what was being done, the file, the cause
and the remedy, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from typing import Iterator

from .factors import SDIError

__all__ = ["os_error", "io_errors", "check_writable_dir", "check_writable_file"]

PROBE_PREFIX = ".sdi-probe-"  # the empty files that prove a folder writable (removed at once)

# errno -> what to do about it
_REMEDIES = {
    errno.ENOSPC: "the disk is full: free space or choose a location with room, then run the same command again "
                  "(work already committed is kept)",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota, then run the same command again",
    errno.EIO: "the disk or file system reported an I/O error: check the device (e.g. dmesg) and copy what you "
               "need to healthy storage; a feature store that cannot be read back must be featurised again",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you may write, or fix its permissions",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.EISDIR: "this path is a folder where a file is expected: choose a file name",
    errno.EEXIST: "something already exists at this path: choose another path",
    errno.ENOENT: "it does not exist (was it moved or deleted?)",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and run again",
    errno.ENFILE: "the system ran out of file handles: close other programs and run again",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ENOTEMPTY: "a folder that should be empty is not: another process may be writing here",
}


def os_error(exc: OSError, what: str, path: str | os.PathLike | None = None) -> SDIError:
    """An :class:`SDIError` for ``exc``, raised while ``what`` (e.g. ``"writing feature store 'x'"``).

    The message names the file (the error's own, else ``path``), the cause
    (errno name and text) and a remedy for the common causes.
    """
    name = exc.filename if exc.filename is not None else path
    code = errno.errorcode.get(exc.errno, None) if exc.errno is not None else None
    cause = exc.strerror or str(exc) or type(exc).__name__
    if code:
        cause = f"{cause} [{code}]"
    remedy = _REMEDIES.get(exc.errno, "fix the cause and run the same command again")
    where = f" on {os.fspath(name)!r}" if name is not None else ""
    return SDIError(f"{what}: {cause}{where}; {remedy}.")


@contextlib.contextmanager
def io_errors(what: str, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into :func:`os_error` (``SDIError`` passes through)."""
    try:
        yield
    except SDIError:
        raise
    except OSError as exc:
        raise os_error(exc, what, path) from exc


def _probe(folder: str, what: str) -> None:
    """Create and remove one empty file in ``folder`` (proves that it is writable now)."""
    probe = os.path.join(folder, f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    with io_errors(f"{what}: the folder {folder!r} is not writable", folder):
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        try:
            os.unlink(probe)
        except FileNotFoundError:  # a store's cleanup removes probes left by killed runs
            pass


def check_writable_dir(path: str | os.PathLike, option: str, *, create: bool = True) -> str:
    """Make sure ``path`` is (or can be created as) a folder this process can write.

    Args:
        path: the output folder.
        option: how the user named it (``"--out"``), for the message.
        create: create the folder (and prove it writable with a probe file);
            otherwise a missing folder is checked through its nearest existing
            parent, and nothing is created.

    Returns:
        the path as a string.

    Raises:
        SDIError: when the path (or a parent) is a file, or the folder cannot be created or written.
    """
    root = os.fspath(path)
    what = f"{option} {root!r}"
    if os.path.exists(root) and not os.path.isdir(root):
        raise SDIError(f"{what} is a file, not a folder; choose a folder path (a new one is created).")
    if os.path.isdir(root) or create:
        with io_errors(f"{what}: cannot create the folder", root):
            os.makedirs(root, exist_ok=True)
        _probe(root, what)
        return root
    parent = os.path.dirname(os.path.abspath(root))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SDIError(f"{what}: {parent!r} is a file, not a folder; choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(parent).f_flag & os.ST_RDONLY else errno.EACCES
        raise os_error(OSError(code, os.strerror(code), parent), f"{what}: cannot create the folder")
    return root


def check_writable_file(path: str | os.PathLike, option: str) -> str:
    """Make sure a file can be written at ``path`` (its folder exists and is writable; it is not a folder).

    Creates nothing but a probe file, which it removes again.
    """
    target = os.fspath(path)
    what = f"{option} {target!r}"
    if os.path.isdir(target):
        raise SDIError(f"{what} is a folder; give a file name (e.g. scores.npz).")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise SDIError(f"{what}: {folder!r} is a file, not a folder; choose another path.")
        raise SDIError(f"{what}: the folder {folder!r} does not exist; create it first or choose another path.")
    _probe(folder, what)
    return target
