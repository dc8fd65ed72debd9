"""Content-addressed compile cache (default ~/.cache/graphir, or $GRAPHIR_CACHE_DIR).

Entries are artifact directories named by the hash of what determines their content. Writers
build in a private temp dir and rename it into place, so two processes compiling the same graph
at once both succeed and readers never see a half-written entry.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .artifact import Artifact, ArtifactError, load_artifact, tool_versions
from .fsutil import DAMAGED_PREFIX


def cache_dir() -> Path:
    d = os.environ.get("GRAPHIR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphir")
    return Path(d)


def cache_key(graph_text: str, target: str, options: dict) -> str:
    blob = json.dumps({"graph": graph_text, "target": target, "options": options,
                       "tools": tool_versions(), "code": code_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def lookup(key: str, target: str) -> Artifact | None:
    p = cache_dir() / f"{key}.gart"
    if not p.exists():
        return None
    try:
        return load_artifact(p, expect_target=target)
    except ArtifactError:
        # A damaged entry is never used: move it aside (atomically, so a concurrent reader
        # never sees half of it) and let the caller rebuild it.
        aside = p.with_name(f"{DAMAGED_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.rename(p, aside)
        except OSError:
            return None
        shutil.rmtree(aside, ignore_errors=True)
        return None


_SUBPACKAGE_DIRS = {"ops", "nn", "lowering", "runtime", "tools", "examples"}


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.gart"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Hash of the compiler's own sources: a changed lowering never reuses a stale entry."""
    import graphir
    import graphir.lowering
    import graphir.ops

    h = hashlib.sha256()
    for pkg in (graphir, graphir.ops, graphir.lowering):
        root = Path(pkg.__path__[0])
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            # In a wheel the subpackages sit inside graphir/: hash each once, under its own name.
            if pkg is graphir and rel.parts[0] in _SUBPACKAGE_DIRS:
                continue
            if f.suffix in (".py", ".c") and "__pycache__" not in f.parts:
                h.update(f"{pkg.__name__}/{rel}".encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]
