"""The reference interpreter: runs any graph on numpy, every op through its float64 reference.

Values are held in their dtype's numpy storage (bf16 / float8 as float32 rounded on store), so
results match what a faithful device computes op by op.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType, round_to
from graphir.opdef import lookup
from graphir.types import BufferType, ChainType, TensorType


class InterpreterError(RuntimeError):
    pass


def bind_dims(types: Sequence[TensorType], arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Solve the symbolic dims of the input types from the arrays' shapes."""
    env: dict[str, int] = {}
    pending = []
    for k, (t, a) in enumerate(zip(types, arrays)):
        if isinstance(t, ChainType):
            continue
        if a.ndim != t.rank:
            raise ValueError(f"input {k}: expected rank {t.rank} ({t}), got shape {a.shape}")
        pending += [(k, i, d, a.shape[i]) for i, d in enumerate(t.shape)]
    progress = True
    while pending and progress:
        progress, rest = False, []
        for k, i, d, n in pending:
            unknown = d.symbols - env.keys()
            if not unknown:
                if d.evaluate(env) != n:
                    raise ValueError(f"input {k}: dim {i} is {n} but the type says {d} = "
                                     f"{d.evaluate(env)} ({ {s: env[s] for s in d.symbols} })")
                progress = True
            elif len(unknown) == 1 and _linear_in(d, next(iter(unknown))):
                s = next(iter(unknown))
                coef = d._terms[(s,)]
                rest_val = (d - Dim({(s,): coef})).evaluate(env)
                if (n - rest_val) % coef or (n - rest_val) // coef < 0:
                    raise ValueError(f"input {k}: dim {i} of size {n} cannot be {d}")
                env[s] = (n - rest_val) // coef
                progress = True
            else:
                rest.append((k, i, d, n))
        pending = rest
    if pending:
        k, i, d, n = pending[0]
        raise ValueError(f"input {k}: cannot solve dim {d} from size {n}")
    return env


def _linear_in(d: Dim, s: str) -> bool:
    return all(m == () or m == (s,) or s not in m for m in d._terms) and (s,) in d._terms


def _resolve(v, env):
    if isinstance(v, Dim):
        return v.evaluate(env)
    if isinstance(v, tuple):
        return tuple(_resolve(x, env) for x in v)
    return v


def _check_input(k: int, t, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"input {k} must be a numpy array, got {type(a).__name__}")
    want = t.dtype.storage
    if t.dtype in (DType.bfloat16, DType.float8_e4m3fn):
        if a.dtype.kind != "f":
            raise TypeError(f"input {k}: expected {t.dtype.short} data as floats, got {a.dtype}")
        return a if isinstance(t, BufferType) else round_to(a, t.dtype)
    if a.dtype != want:
        raise TypeError(f"input {k}: expected dtype {want} for {t}, got {a.dtype}")
    return a


def check_buffers_writable(types, arrays) -> None:
    """Buffers are updated in place: a read-only array (np.memmap mode 'r', np.frombuffer of
    bytes, flags.writeable = False) is refused before anything runs."""
    for k, (t, a) in enumerate(zip(types, arrays)):
        if isinstance(t, BufferType) and isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"input {k} ({t}) is a buffer the graph writes in place, but the "
                             f"array given is read-only")


def check_call(graph, arrays, env) -> None:
    """Every check a runtime makes before running any op of `graph` on `arrays`: writable
    buffers, the symbolic dims' promises (runtime/dim_checks.py) and the ragged/paged metadata
    (runtime/ragged.py). Raises ValueError; nothing has been written then."""
    from .dim_checks import DimCheck
    from .ragged import RaggedCheck

    types = [v.type for v in graph.inputs]
    check_buffers_writable(types, arrays)
    DimCheck(graph).check(env)
    RaggedCheck(graph).check(lambda k: arrays[k], env)


def run(graph, *inputs: np.ndarray, weights: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Execute `graph` on numpy arrays; buffers (BufferType inputs) are updated in place.

    Example:
        >>> (y,) = run(g, np.ones((3, 4), np.float32))
    """
    if len(inputs) != len(graph.inputs):
        raise ValueError(f"graph {graph.name!r} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    types = [v.type for v in graph.inputs]
    arrays = [_check_input(k, t, a) for k, (t, a) in enumerate(zip(types, inputs))]
    env_dims = bind_dims(types, arrays)
    check_call(graph, arrays, env_dims)
    weights = dict(weights or {})
    vals: dict[int, object] = {id(v): a for v, a in zip(graph.inputs, arrays)}
    for n in graph.nodes:
        opdef = lookup(n.op)
        if n.op == "weight":
            vals[id(n.results[0])] = _bind_weight(n, weights)
            continue
        operands = [vals[id(v)] for v in n.operands]
        if opdef.effects:
            operands = operands[:-1]
        args = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                for a in operands]
        attrs = {k: _resolve(v, env_dims) for k, v in n.attrs.items()}
        res_types = [r.type for r in n.results if not isinstance(r.type, ChainType)]
        attrs["_out_shapes"] = [tuple(_resolve(tuple(t.shape), env_dims)) for t in res_types]
        attrs["_in_types"] = [v.type for v in n.operands]
        attrs["_out_types"] = res_types
        try:
            outs = list(opdef.reference(args, attrs))
        except (ValueError, IndexError, TypeError, KeyError) as e:
            raise InterpreterError(f"gir.{n.op}{' at ' + n.loc if n.loc else ''}: {e}") from e
        n_res = len(res_types)
        for w, new in zip(opdef.writes, outs[n_res:]):
            buf = operands[w]
            buf[...] = round_to(new, n.operands[w].type.dtype)
        for r, t, o in zip(n.results, res_types, outs[:n_res]):
            o = round_to(np.asarray(o), t.dtype)
            want = attrs["_out_shapes"][r.index]
            if tuple(o.shape) != tuple(want):
                raise InterpreterError(f"gir.{n.op}: reference produced shape {o.shape}, "
                                       f"type says {want}")
            vals[id(r)] = o
        for r in n.results:  # chain tokens (of gir.chain and of effectful ops) carry no data
            if isinstance(r.type, ChainType):
                vals[id(r)] = None
    return [np.array(vals[id(v)], copy=True) for v in graph.outputs]


def _bind_weight(n, weights) -> np.ndarray:
    name = n.attrs["name"]
    t = n.results[0].type
    if name not in weights:
        raise ValueError(f"weight {name!r} ({t}) was not given; weights given: {sorted(weights)}")
    a = np.asarray(weights[name])
    if tuple(a.shape) != t.static_shape():
        raise ValueError(f"weight {name!r}: expected shape {list(t.static_shape())}, got {list(a.shape)}")
    if t.dtype in (DType.bfloat16, DType.float8_e4m3fn, DType.float16, DType.float32):
        if a.dtype.kind != "f":
            raise TypeError(f"weight {name!r}: expected float data for {t.dtype.short}, got {a.dtype}")
        return round_to(a, t.dtype)
    if a.dtype != t.dtype.storage:
        raise TypeError(f"weight {name!r}: expected dtype {t.dtype.storage}, got {a.dtype}")
    return a
