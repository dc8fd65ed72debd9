"""Named passes; `PASSES[name]` is a callable `graph -> bool (changed)`.

Each pass lives in its own file and registers itself here via `register_pass`.
"""
from __future__ import annotations

from typing import Callable

PASSES: dict[str, Callable] = {}
DEFAULT_PIPELINE: list[str] = []


def register_pass(name: str, default_position: int | None = None):
    def deco(fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = fn
        fn.pass_name = name
        if default_position is not None:
            DEFAULT_PIPELINE.append((default_position, name))
            DEFAULT_PIPELINE.sort()
        return fn
    return deco


def default_pipeline() -> list[str]:
    return [n for _, n in DEFAULT_PIPELINE]


from . import canonicalize, cse, dce  # noqa: E402,F401
from . import elementwise_fusion, fuse_qkv, fuse_rope_split_store  # noqa: E402,F401
from .manager import PassManager, run_passes  # noqa: E402,F401
