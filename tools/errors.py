"""How the CLI reports a failure: one line on stderr, with a hint where one helps; the
traceback only with -v (it is for bug reports, not for users' mistakes)."""
from __future__ import annotations

import shutil


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if "\n" not in text[:300] else " ".join(text.split())[:600]


def describe(e: BaseException) -> str:
    """The one line for exception `e`: what went wrong, then '; hint: ...' when we know one."""
    from graphir.lowering.artifact import ArtifactError
    from graphir.optional import MissingDependency

    msg = _first_line(e)
    if isinstance(e, MissingDependency):
        return msg  # already says what to install
    if isinstance(e, ArtifactError):
        return f"{msg}; hint: `graphir inspect ART` shows what it holds, `graphir compile` " \
               f"rebuilds it"
    if isinstance(e, FileNotFoundError):
        return f"{msg}; hint: check the path"
    if "no C compiler" in msg or (isinstance(e, OSError) and not shutil.which("cc")
                                  and not shutil.which("gcc")):
        return f"{msg}; hint: the CPU target links with a C compiler: install gcc (Debian: " \
               f"apt-get install gcc)"
    if "libcuda" in msg or "CUDA driver" in msg or "no CUDA" in msg:
        return f"{msg}; hint: cuda artifacts run on a machine with an NVIDIA GPU and its driver; " \
               f"compile with --target cpu to run here"
    if isinstance(e, (ValueError, TypeError)):
        return msg
    return f"{type(e).__name__}: {msg}; hint: rerun with -v for the traceback and report it"
