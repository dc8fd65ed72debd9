"""Load a graph from `FILE.py[:FUNC]` (FUNC returns a Graph; default `build`) or a `.gir` file."""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys

from graphir import Graph, parse


def load_graph(spec: str, **kwargs) -> Graph:
    """The Graph of FILE.py[:FUNC] (FUNC called with `kwargs`) or of a .gir file."""
    path, _, func = spec.partition(":")
    if path.endswith(".gir"):
        if kwargs:
            raise ValueError(f"{path} is a .gir file: {sorted(kwargs)} apply to FILE.py builders")
        with open(path) as f:
            return parse(f.read())
    if not path.endswith(".py"):
        raise ValueError(f"{path!r} is neither a .py graph builder nor a .gir file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file {path!r}")
    func = func or "build"
    name = "graphir_user_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        mod_spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise ValueError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}") from None
    finally:
        sys.path.pop(0)
    fn = getattr(mod, func, None)
    if fn is None:
        raise ValueError(f"{path} has no function {func!r} "
                         f"(functions: {_functions(mod)})")
    if kwargs:
        params = inspect.signature(fn).parameters
        missing = [k for k in kwargs if k not in params]
        if missing:
            raise ValueError(f"{path}:{func} takes no {missing[0]} argument (its parameters: "
                             f"{list(params)})")
    g = fn(**kwargs)
    if not isinstance(g, Graph):
        raise ValueError(f"{path}:{func} returned {type(g).__name__}, not a Graph")
    return g


def _functions(mod) -> list[str]:
    return [k for k, v in vars(mod).items()
            if inspect.isfunction(v) and v.__module__ == mod.__name__ and not k.startswith("_")]
