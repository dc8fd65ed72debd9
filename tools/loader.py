"""Load a graph from `FILE.py[:FUNC]` (FUNC returns a Graph; default `build`) or a `.gir` file."""
from __future__ import annotations

import importlib.util
import os
import sys

from graphir import Graph, parse


def load_graph(spec: str) -> Graph:
    path, _, func = spec.partition(":")
    if path.endswith(".gir"):
        with open(path) as f:
            return parse(f.read())
    if not path.endswith(".py"):
        raise SystemExit(f"error: {path!r} is neither a .py graph builder nor a .gir file")
    if not os.path.exists(path):
        raise SystemExit(f"error: no such file {path!r}")
    func = func or "build"
    name = "graphir_user_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        mod_spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    fn = getattr(mod, func, None)
    if fn is None:
        raise SystemExit(f"error: {path} has no function {func!r} "
                         f"(functions: {[k for k, v in vars(mod).items() if callable(v) and not k.startswith('_')]})")
    g = fn()
    if not isinstance(g, Graph):
        raise SystemExit(f"error: {path}:{func} returned {type(g).__name__}, not a Graph")
    return g
