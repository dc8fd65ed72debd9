"""Content-addressed compile cache (default ~/.cache/graphir, or $GRAPHIR_CACHE_DIR).

Entries are artifact directories named by the hash of what determines their content. Writers
build in a private temp dir and rename it into place, so two processes compiling the same graph
at once both succeed and readers never see a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .artifact import Artifact, ArtifactError, load_artifact, tool_versions


def cache_dir() -> Path:
    d = os.environ.get("GRAPHIR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphir")
    return Path(d)


def cache_key(graph_text: str, target: str, options: dict) -> str:
    blob = json.dumps({"graph": graph_text, "target": target, "options": options,
                       "tools": tool_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def lookup(key: str, target: str) -> Artifact | None:
    p = cache_dir() / f"{key}.gart"
    if not p.exists():
        return None
    try:
        return load_artifact(p, expect_target=target)
    except ArtifactError:
        return None  # a damaged entry is rebuilt, never used


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.gart"
