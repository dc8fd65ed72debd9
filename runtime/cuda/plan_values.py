"""Host-side helpers of the CUDA plan runner: the manifest's launch-rule expressions (a
whitelisted arithmetic subset, never eval of arbitrary code), the runtime facts they read
(names, buckets) and the load-time reference evaluation of host steps."""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType, round_to
from graphir.types import ChainType

_FUNCS = {"min": min, "max": max, "cdiv": lambda a, b: -(-a // b)}
_BIN = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_CMP = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
        ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}


_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.USub,
          ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.Call, *_BIN, *_CMP)


@lru_cache(maxsize=4096)
def _compile(text: str):
    """Validate a rule against the whitelist once, then compile it (evaluated many times)."""
    tree = ast.parse(text, mode="eval")
    for n in ast.walk(tree):
        ok = isinstance(n, _NODES)
        if isinstance(n, ast.Constant):
            ok = isinstance(n.value, (int, float, bool))
        if isinstance(n, ast.Call):
            ok = isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords
        if isinstance(n, ast.Name) and n.id in ("__builtins__",):
            ok = False
        if not ok:
            raise ValueError(f"launch rule {text!r}: unsupported syntax {ast.dump(n)[:60]}")
    return compile(tree, "<launch rule>", "eval")


_GLOBALS = {"__builtins__": {}, **_FUNCS}


def evaluate(text: str, env: Mapping[str, Any]):
    """Value of a launch-rule expression (ints, + - * // %, comparisons, and/or, min/max/cdiv)."""
    code = _compile(text)
    try:
        return eval(code, _GLOBALS, env)  # noqa: S307  (whitelisted AST, no builtins)
    except NameError as e:
        raise ValueError(f"launch rule {text!r}: unknown name ({e})") from None


# -- host <-> device value conversion -------------------------------------------------------
def eval_node(node, arrays: Sequence[np.ndarray], env: Mapping[str, int] | None = None):
    """Run one node's float64 reference as the interpreter does; (results, written buffers)."""
    env = dict(env or {})
    opdef = node.opdef
    args = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    res = lambda v: v.evaluate(env) if isinstance(v, Dim) else (  # noqa: E731
        tuple(res(x) for x in v) if isinstance(v, tuple) else v)
    attrs = {k: res(v) for k, v in node.attrs.items()}
    types = [r.type for r in node.results if not isinstance(r.type, ChainType)]
    attrs["_out_shapes"] = [tuple(res(tuple(t.shape))) for t in types]
    attrs["_in_types"] = [v.type for v in node.operands]
    attrs["_out_types"] = types
    outs = list(opdef.reference(args, attrs))
    results = [round_to(np.asarray(o), t.dtype) for o, t in zip(outs, types)]
    ins = [v for v in node.operands if not isinstance(v.type, ChainType)]
    writes = {w: round_to(np.asarray(o), ins[w].type.dtype)
              for w, o in zip(opdef.writes, outs[len(types):])}
    return results, writes


# Runtime facts (lowering/triton_gpu/lowerings/base.py names them): rt_seqmax_<offsets vid>
# and rt_kvmax_<offsets vid>_<cache-lengths vid>, each optionally bucketed (`_b<n>`).
_RT = re.compile(r"rt_(?:seqmax_\d+|kvmax_\d+_\d+)(?:_b\d+)?")
_FACT = re.compile(r"rt_(seqmax|kvmax)_(\d+)(?:_(\d+))?(?:_b(\d+))?$")


def parse_fact(name: str) -> tuple[str, tuple[int, ...], int]:
    """(kind, value ids, bucket) of a runtime-fact name: ('kvmax', (1, 3), 256)."""
    m = _FACT.match(name)
    if m is None or (m[1] == "kvmax") != (m[3] is not None):
        raise ValueError(f"not a runtime fact name: {name!r}")
    vids = (int(m[2]),) if m[3] is None else (int(m[2]), int(m[3]))
    return m[1], vids, int(m[4] or 1)


def bucketed(value: int, bucket: int) -> int:
    """A fact as the launch rules see it: 0 and 1 exact (decode tests `<= 1`), larger values
    rounded up to a multiple of `bucket`, so launches (and CUDA graphs) change only per bucket."""
    if value <= 1 or bucket <= 1:
        return value
    return -(-value // bucket) * bucket


def fact_names(steps) -> list[str]:
    """Every runtime fact the steps' launch rules read, sorted."""
    return sorted({n for s in steps for x in step_exprs(s) for n in _RT.findall(x)})


def step_exprs(step):
    """Every expression text of a step (lets, conditions, grids, args, sizes)."""
    a = step.get("attrs", {})
    yield from (x for _, x in a.get("lets", []))
    for v in a.get("variants", []):
        if v["when"]:
            yield v["when"]
        yield from (c for _, _, c in v.get("scratch", []))
        for op in v.get("ops", []):
            yield from op.get("grid", [])
            if "bytes" in op:
                yield op["bytes"]
            for arg in op.get("args", []) + op.get("copy", []):
                if arg[0] == "v":
                    yield arg[2]
                elif arg[0] == "i":
                    yield arg[1]


_exprs = step_exprs


def _dev_name(dt: DType) -> str:
    return dt.name
