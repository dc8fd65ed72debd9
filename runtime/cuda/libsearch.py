"""Where a CUDA library's shared object may be, without importing torch, and setting its ctypes
prototypes: what the bindings of cuBLASLt and NCCL share.

In order: the path an environment variable names (alone, when set), the files of installed
`nvidia-*` wheels whose distribution name starts with `dist_prefix`, the same names under every
site-packages directory's `patterns`, `ctypes.util.find_library`, then bare sonames for the
loader's own search. Duplicates are dropped, first place kept.
"""
from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import os
import ctypes
from typing import Any, Callable, Mapping, Sequence


def candidates(env_var: str, dist_prefix: str, stem: str, patterns: Sequence[str],
               find_name: str, sonames: Sequence[str], newest_first: bool = False) -> list[str]:
    """Paths and names to try for the library whose files start with `stem` (e.g.
    "libnccl.so"); `patterns` are globs relative to a site-packages directory, their matches
    newest version first when `newest_first`."""
    env = os.environ.get(env_var)
    if env:
        return [env]
    out: list[str] = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(dist_prefix):
            out += [str(dist.locate_file(f)) for f in dist.files or []
                    if os.path.basename(str(f)).startswith(stem)]
    for base in _site_dirs():
        for pattern in patterns:
            out += sorted(glob.glob(os.path.join(base, pattern)), reverse=newest_first)
    found = ctypes.util.find_library(find_name)
    if found:
        out.append(found)
    out += list(sonames)
    return list(dict.fromkeys(out))


def _site_dirs() -> list[str]:
    import site
    import sys

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def bind(lib: Any, prototypes: Mapping[str, tuple],
         optional: Mapping[str, tuple] | None = None) -> Any:
    """Set restype/argtypes of the entry points {name: (restype, argtypes)} on a ctypes library:
    a missing one of `prototypes` raises AttributeError, of `optional` is skipped."""
    for name, (res, args) in prototypes.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    for name, (res, args) in (optional or {}).items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = res, args
    return lib


def open_first(paths: Sequence[str], bind_fn: Callable[[Any], Any]) -> tuple[Any, list[str]]:
    """(the first of `paths` that loads and binds, or None; 'path (why)' for each that failed
    before it)."""
    tried = []
    for path in paths:
        try:
            return bind_fn(ctypes.CDLL(path)), tried
        except (OSError, AttributeError) as e:
            tried.append(f"{path} ({e})")
    return None, tried
