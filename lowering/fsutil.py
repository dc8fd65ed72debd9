"""Filesystem pieces the compiler relies on: an atomic directory swap, scratch directories that
do not outlive their process, and a sweep of what killed processes left behind."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
import time
from pathlib import Path

STALE_AFTER_S = 3600  # a temp entry this old belongs to a compile that died
# Prefixes of our own temp entries beside artifacts: specific enough that a sweep never
# touches a user's files in the directory an artifact is written to.
TMP_PREFIX, OLD_PREFIX, DAMAGED_PREFIX = ".graphir-tmp-", ".graphir-old-", ".graphir-damaged-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_EXCHANGE = _renameat2()
AT_FDCWD = -100


def replace_dir(new: Path, dest: Path) -> None:
    """Put directory `new` at `dest`, replacing what is there; `new` is gone afterwards.

    On Linux the two directories are exchanged in one step (renameat2 RENAME_EXCHANGE), so a
    reader, or a process killed midway, sees the old or the new artifact and never neither.
    Elsewhere (or on filesystems without the flag) the old one is renamed aside first.
    """
    new, dest = Path(new), Path(dest)
    if dest.exists() and _EXCHANGE is not None:
        if _EXCHANGE(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(dest),
                     _RENAME_EXCHANGE) == 0:
            shutil.rmtree(new, ignore_errors=True)  # now holds the old artifact
            return
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=dest.parent))
        os.replace(dest, old / "a")
        os.rename(new, dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(new, dest)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: Path,
                prefixes=(TMP_PREFIX, OLD_PREFIX, DAMAGED_PREFIX)) -> int:
    """Remove temp entries of dead writers in `directory`: those older than an hour."""
    removed = 0
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return 0
    now = time.time()
    for p in entries:
        if not p.name.startswith(prefixes):
            continue
        try:
            if now - p.lstat().st_mtime < STALE_AFTER_S:
                continue
        except OSError:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


SCRATCH_PREFIX = "graphir-scratch-"


@contextlib.contextmanager
def scratch_dir(kind: str):
    """A temporary directory removed on exit; its name carries our pid, so a later compile can
    remove the ones a killed process left (`sweep_dead_scratch`)."""
    sweep_dead_scratch()
    d = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{kind}-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sweep_dead_scratch() -> int:
    """Remove scratch directories whose process is gone."""
    removed = 0
    try:
        entries = list(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"))
    except OSError:
        return 0
    for p in entries:
        pid = p.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed
