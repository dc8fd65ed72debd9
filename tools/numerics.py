"""Random data for a graph's signature, checksums, and dtype-aware comparisons (CLI and demo)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from graphir.dtype import DType, round_to
from graphir.types import ChainType

# Largest max|got - want| / max|want| accepted when a compiled result is checked against the
# interpreter: a few ulps of the storage type after a chain of ops (integers must be exact).
REL_TOL = {DType.float32: 1e-4, DType.float16: 4e-3, DType.bfloat16: 3e-2,
           DType.float8_e4m3fn: 0.15}

DEFAULT_DIM = 4


def parse_dims(items: Sequence[str] | None) -> dict[str, int]:
    """`["batch=3", "seq=17"]` -> {"batch": 3, "seq": 17}."""
    dims: dict[str, int] = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--dim expects NAME=INT, got {item!r}")
        if int(value) < 0:
            raise ValueError(f"--dim {name}: size must be >= 0, got {value}")
        dims[name.strip()] = int(value)
    return dims


def symbols_of(types) -> list[str]:
    """Symbolic dim names appearing in types, sorted."""
    syms: set[str] = set()
    for t in types:
        if not isinstance(t, ChainType):
            for d in t.shape:
                syms |= d.symbols
    return sorted(syms)


def random_array(rng: np.random.Generator, dtype: DType, shape: Sequence[int],
                 scale: float = 1.0) -> np.ndarray:
    """Fresh random data in the interpreter's convention (bf16 / float8 as float32 holding
    representable values, so a buffer round-trips through the kernel's storage unchanged)."""
    shape = tuple(int(s) for s in shape)
    if dtype.is_float:
        return round_to(rng.standard_normal(shape) * scale, dtype).astype(dtype.storage)
    if dtype is DType.bool:
        return rng.random(shape) < 0.5
    return rng.integers(0, 4, size=shape).astype(dtype.storage)


def random_inputs(graph, dims: Mapping[str, int], rng: np.random.Generator
                  ) -> tuple[list[np.ndarray], dict[str, int]]:
    """Random arrays for every graph input; unnamed symbolic dims get DEFAULT_DIM.

    Returns the arrays and the dims used (given ones plus defaults)."""
    types = [v.type for v in graph.inputs]
    unknown = set(dims) - set(symbols_of(types))
    if unknown:
        raise ValueError(f"--dim {sorted(unknown)}: not a symbolic dim of the inputs "
                         f"(they have {symbols_of(types) or 'none'})")
    env = {s: dims.get(s, DEFAULT_DIM) for s in symbols_of(types)}
    env = ragged_dims(graph, env, dims)
    arrays = []
    for t in types:
        shape = [d.evaluate(env) for d in t.shape]
        if any(s < 0 for s in shape):
            raise ValueError(f"dims {env} give the negative shape {shape} for {t}")
        try:
            arrays.append(random_array(rng, t.dtype, shape))
        except MemoryError:   # the user's dims, not a bug: say which input and how big
            raise ValueError(f"dims {env} give the input shape {shape} ({t.dtype}), more memory "
                             f"than this machine can allocate; pass smaller --dim sizes") from None
    make_ragged_valid(graph, arrays, env, rng)
    return arrays, env


def random_weights(graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for every weight: matrices scaled by 1/sqrt(fan_in), so outputs stay O(1)."""
    out = {}
    for name, v in graph.weights.items():
        shape = v.type.static_shape()
        scale = 1.0 / np.sqrt(shape[-1]) if len(shape) >= 2 and shape[-1] else 1.0
        out[name] = random_array(rng, v.type.dtype, shape, scale)
    return out


def checksum(a: np.ndarray) -> str:
    a64 = np.asarray(a, dtype=np.float64)
    return f"sum={a64.sum():.6e} sum|x|={np.abs(a64).sum():.6e}"


def compare(got: np.ndarray, want: np.ndarray, dtype: DType) -> tuple[float, bool]:
    """(error, ok): relative max error for floats (exact match for ints / bool)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return float("inf"), False
    g64, w64 = got.astype(np.float64), want.astype(np.float64)
    if not dtype.is_float:
        err = float(np.max(np.abs(g64 - w64))) if g64.size else 0.0
        return err, err == 0.0
    if not np.array_equal(np.isnan(g64), np.isnan(w64)):
        return float("nan"), False
    finite = ~np.isnan(w64)
    if not finite.any():
        return 0.0, True
    scale = max(float(np.max(np.abs(w64[finite]))), 1e-30)
    err = float(np.max(np.abs(g64[finite] - w64[finite]))) / scale
    return err, err <= REL_TOL.get(dtype, 1e-4)


def ragged_dims(graph, env: dict[str, int], given) -> dict[str, int]:
    """Default sizes that make a paged-attention graph's random inputs valid: a page pool large
    enough for every sequence's lookup-table row (plus the null page). Dims the user gave win."""
    from graphir.runtime.ragged import RaggedCheck

    env = dict(env)
    check = RaggedCheck(graph)
    for g in check.groups:
        if g.lookup is None:
            continue
        batch, width = (d.evaluate(env) for d in check.types[g.lookup].shape)
        for pages_dim, _, _, _ in g.blocks:
            if len(pages_dim.symbols) == 1 and not (pages_dim.symbols & set(given)):
                # pages_dim is `name + c`: grow name until the pool holds every row's pages
                # and the null page.
                (name,) = pages_dim.symbols
                offset = pages_dim.evaluate(env) - env[name]
                env[name] = max(env[name], batch * width + 1 - offset)
    return env


def make_ragged_valid(graph, arrays: list, env: Mapping[str, int],
                      rng: np.random.Generator) -> None:
    """Overwrite the ragged metadata inputs in `arrays` with a valid random batch: offsets that
    split the rows, cache lengths that fit the pages and the RoPE table, distinct pages per
    sequence (padding with the null page, the pool's last)."""
    from graphir.runtime.ragged import RaggedCheck

    check = RaggedCheck(graph)
    for g, (rows, blocks, rope) in zip(check.groups, check.bounds(env)):
        o = arrays[g.offsets]
        batch = o.shape[0] - 1
        total = rows[0][0] if rows else int(o[-1]) if o.size else 0
        cuts = np.sort(rng.integers(0, total + 1, max(batch - 1, 0))) if batch else []
        offs = np.concatenate([[0], cuts, [total]]).astype(np.int64) if batch else np.zeros(1)
        arrays[g.offsets] = offs.astype(o.dtype)
        lens = np.diff(offs)
        if g.cache_lengths is None:
            continue
        cap = min([n for n, _ in rope], default=1 << 30)
        if g.lookup is not None:
            lut = arrays[g.lookup]
            page = min(p for _, p, _, _ in blocks)
            pool = min(n for n, _, _, _ in blocks)
            cap = min(cap, lut.shape[1] * page)
        clen = np.array([rng.integers(0, max(cap - n, 0) + 1) for n in lens], np.int64)
        arrays[g.cache_lengths] = clen.astype(arrays[g.cache_lengths].dtype)
        if g.lookup is not None:
            null = pool - 1
            new = np.full(lut.shape, null, np.int64)
            free = list(rng.permutation(null))
            for b, end in enumerate(clen + lens):
                k = -(-int(end) // page)
                if k > len(free):
                    raise ValueError(f"the page pool ({pool} pages) cannot hold a random batch: "
                                     f"pass a larger --dim for it")
                new[b, :k] = free[:k]
                del free[:k]
            arrays[g.lookup] = new.astype(lut.dtype)
    for k, t in enumerate(graph.inputs):
        name = (graph.input_names or [None] * len(graph.inputs))[k]
        if name == "max_lengths" and arrays[k].ndim == 2 and arrays[k].shape[1] == 2 \
                and check.groups:
            g = check.groups[0]
            lens = np.diff(arrays[g.offsets].astype(np.int64))
            ends = lens + (arrays[g.cache_lengths].astype(np.int64) if g.cache_lengths is not None
                           else 0)
            arrays[k][:] = [max(int(lens.max(initial=0)), 1), max(int(ends.max(initial=0)), 1)]
