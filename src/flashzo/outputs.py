"""What the `flashzo` command writes: never over an input, replaced whole or not at all, a full disk in one line.

- An output may not be an input, hold one, or lie inside an input's directory (`check_output`): paths
  are compared by their real path (symlinks resolved) and, for files, by inode (hard links).
- A file is written under a temporary name beside it and renamed over the old one (`replacing_file`);
  a directory is written into a new directory beside it and swapped in (`new_dir_beside`,
  `swap_in`). A crash or Ctrl-C mid-write leaves the old output or the new one, never neither.
- A full disk (ENOSPC, EDQUOT, as an OSError or safetensors' error) while writing becomes a
  `WriteError` naming the path (`writing`); the command prints it as one line and exits with 1.
- `signals_deferred` holds SIGINT and SIGTERM back for a few renames that belong together.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import threading

from flashzo.errors import InputError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(Exception):
    """An output could not be written: the message names the path and why. What was there before is intact."""


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    if type(e).__name__ == "SafetensorError":  # its message ends with the OS error: "... (os error 28)"
        m = re.search(r"\(os error (\d+)\)", str(e))
        return int(m.group(1)) if m else None
    return None


@contextlib.contextmanager
def writing(path: str):
    """Raise a full disk while the block writes `path` as a WriteError naming it (other errors pass)."""
    try:
        yield
    except Exception as e:
        code = _errno(e)
        if code in _FULL:
            raise WriteError(f"cannot write {path}: the disk is full ({os.strerror(code)})") from None
        raise


# --------------------------------------------------------------------------------------------------
# Outputs are not inputs
# --------------------------------------------------------------------------------------------------

def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same real path, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (real paths)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_output(flag: str, out: str, inputs: dict[str, str | None]) -> None:
    """InputError if the output `out` (of `flag`) is one of `inputs` (flag -> path; None: not given),
    holds one, or lies inside an input directory."""
    for name, path in inputs.items():
        if path is None or not os.path.exists(path):
            continue
        if same_file(out, path):
            raise InputError(f"{flag} {out} is the {name} {path}: choose another")
        if inside(path, out):
            raise InputError(f"{flag} {out} holds the {name} {path}: choose another")
        if os.path.isdir(path) and inside(out, path):
            raise InputError(f"{flag} {out} is inside the {name} directory {path}: choose another")


# --------------------------------------------------------------------------------------------------
# Replaced whole or not at all
# --------------------------------------------------------------------------------------------------

def _beside(path: str, make) -> str:
    """A new hidden name beside `path`, created by `make(name)` (which fails if it exists)."""
    parent, base = os.path.split(os.path.abspath(path))
    while True:
        name = os.path.join(parent, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            make(name)
            return name
        except FileExistsError:
            continue


@contextlib.contextmanager
def replacing_file(path: str):
    """A text file whose content replaces `path` when the block ends (a rename); on any error, Ctrl-C
    included, the temporary file is removed and `path` is as it was."""
    with writing(path):
        fds = []
        tmp = _beside(path, lambda n: fds.append(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
        try:
            with os.fdopen(fds[0], "w", encoding="utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def new_dir_beside(path: str) -> str:
    """An empty directory beside `path` (hidden, unique) to write an output into before `swap_in`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _beside(path, os.mkdir)


def swap_in(new_dir: str, path: str) -> None:
    """Put the directory `new_dir` at `path` in one step and delete what was there.

    A rename when nothing is there; else the two are exchanged (Linux's renameat2 RENAME_EXCHANGE) and
    the old one, now at `new_dir`, is deleted. Where the OS cannot exchange, the old one is renamed
    aside first: a crash between the two renames leaves it under that hidden name.
    """
    with signals_deferred():
        if not os.path.lexists(path):
            os.rename(new_dir, path)
            return
        if not _exchange(new_dir, path):
            aside = _beside(path, lambda n: None)
            os.rename(path, aside)
            os.rename(new_dir, path)
            new_dir = aside
        remove(new_dir)


def remove(path: str) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree; nothing if it is not there."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive during the block take effect when it ends (main thread only; a
    signal ignored stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) not in (signal.SIG_IGN, None):
            old[s] = signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])  # now, to the handler that was there
