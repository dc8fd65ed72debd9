"""Call functions of a graphir CPU shared object through ctypes; needs numpy only (no MLIR).

The .so comes from lowering/mlir_cpu/toolchain.py. Each public function `f` is exported as
`_mlir_ciface_f(in_0*, ..., in_n*, out_0*, ..., out_m*)`: one pointer per tensor to a ranked
memref descriptor

    struct { T *allocated; T *aligned; int64 offset; int64 sizes[rank]; int64 strides[rank]; }

(rank 0: the first three fields only). Results were turned into out-params, so the caller
preallocates every output. Function boundaries use the identity layout: every buffer is
C-contiguous; inputs that are not get copied, outputs that are not are rejected.

`bool` tensors must cross the boundary as MLIR `i8` holding 0/1 (numpy's bool layout): LLVM 22's
memref-to-llvm lowering asserts on loads/stores of `memref<...xi1>`; compute in `i1` after
`arith.trunci` and store with `arith.extui`.

Example:
    >>> lib = CpuLibrary("model.so")                       # doctest: +SKIP
    >>> fn = lib.function("matmul", n_inputs=2, n_outputs=1)  # doctest: +SKIP
    >>> fn([a, b], [out])                                  # doctest: +SKIP
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import threading
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

SUPPORTED_DTYPES = tuple(np.dtype(d) for d in (
    "float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
    "int64", "uint64", "bool"))


@lru_cache(maxsize=None)
def descriptor_type(rank: int) -> type[ctypes.Structure]:
    """The ctypes struct of a rank-`rank` memref descriptor."""
    if rank < 0:
        raise ValueError(f"descriptor_type: rank must be >= 0, got {rank}")
    fields = [("allocated", ctypes.c_void_p), ("aligned", ctypes.c_void_p),
              ("offset", ctypes.c_int64)]
    if rank:
        fields += [("sizes", ctypes.c_int64 * rank), ("strides", ctypes.c_int64 * rank)]
    return type(f"MemRef{rank}D", (ctypes.Structure,), {"_fields_": fields})


def make_descriptor(array: np.ndarray) -> ctypes.Structure:
    """A memref descriptor viewing `array` (which must stay alive while it is used)."""
    _check_dtype(array)
    desc = descriptor_type(array.ndim)()
    desc.allocated = desc.aligned = array.ctypes.data
    desc.offset = 0
    if array.ndim:
        item = array.itemsize
        for i, (size, stride) in enumerate(zip(array.shape, array.strides)):
            if stride % item:
                raise ValueError(f"make_descriptor: stride {stride} of axis {i} is not a "
                                 f"multiple of the item size {item}")
            desc.sizes[i] = size
            desc.strides[i] = stride // item if size > 1 else _contiguous_strides(array.shape)[i]
    return desc


class CpuFunction:
    """One exported function; call it as `fn(inputs, outputs)`."""

    def __init__(self, lib: "CpuLibrary", name: str, n_inputs: int, n_outputs: int):
        symbol = f"_mlir_ciface_{name}"
        try:
            self._fn = getattr(lib.handle, symbol)
        except AttributeError:
            raise ValueError(f"CpuLibrary {lib.path}: no function {name!r} "
                             f"(symbol {symbol} not exported)") from None
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p] * (n_inputs + n_outputs)
        self.name, self.n_inputs, self.n_outputs = name, n_inputs, n_outputs
        self._bufs: list = []   # descriptor buffers between calls (list.pop/append: thread-safe)
        self.raw = self._fn     # the ctypes function: one pointer argument a descriptor

    def __call__(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        if len(inputs) != self.n_inputs or len(outputs) != self.n_outputs:
            raise ValueError(f"{self.name}: expected {self.n_inputs} inputs and {self.n_outputs} "
                             f"outputs, got {len(inputs)} and {len(outputs)}")
        # Every descriptor goes into one int64 buffer, built from a flat list: on a decode step
        # this path runs once a kernel, and a ctypes Structure a tensor cost more than the kernel.
        keep, fields, starts = [], [], []
        for i, a in enumerate(inputs):
            if not isinstance(a, np.ndarray):
                raise ValueError(f"{self.name}: input {i} is {type(a).__name__}, not np.ndarray")
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
                keep.append(a)
            describe(a, fields, starts)
        for i, o in enumerate(outputs):
            if not isinstance(o, np.ndarray):
                raise ValueError(f"{self.name}: output {i} is {type(o).__name__}, not np.ndarray")
            if not (o.flags.c_contiguous and o.flags.writeable):
                raise ValueError(f"{self.name}: output {i} must be a writeable C-contiguous "
                                 f"array (shape {o.shape}, dtype {o.dtype})")
            describe(o, fields, starts)
        # A buffer of the last calls is reused (filled by a slice: ~1.5 us, a new one ~9 us).
        try:
            buf = self._bufs.pop()
        except IndexError:
            buf = None
        if buf is None or len(buf) != len(fields):
            buf = (ctypes.c_int64 * len(fields))()
        buf[:] = fields
        base = ctypes.addressof(buf)
        # ctypes drops the GIL for the call: other Python threads keep running.
        self._fn(*[base + 8 * k for k in starts])
        del keep
        if len(self._bufs) < 4:
            self._bufs.append(buf)


_SUPPORTED = frozenset(SUPPORTED_DTYPES)


def _check_dtype(a: np.ndarray) -> None:
    if a.dtype not in _SUPPORTED:
        raise ValueError(f"make_descriptor: unsupported dtype {a.dtype}; "
                         f"supported: {[str(d) for d in SUPPORTED_DTYPES]}")


@lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The identity layout's strides in elements (what every function boundary expects)."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def data_ptr(a: np.ndarray) -> int:
    """The address of a's first element."""
    try:   # a third of a.ctypes.data's cost; read-only or empty arrays take the latter
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):
        return a.ctypes.data


def describe(a: np.ndarray, fields: list, starts: list) -> None:
    """Append the memref descriptor of C-contiguous `a` to `fields` (int64s: allocated,
    aligned, offset, sizes, strides) and its first index to `starts`."""
    _check_dtype(a)
    p = data_ptr(a)
    starts.append(len(fields))
    fields += (p, p, 0)
    if a.ndim:
        fields += a.shape
        fields += _contiguous_strides(a.shape)


# path -> (device, inode, size, mtime) of the file first dlopen'ed under that name
_OPENED: dict[str, tuple[int, int, int, int]] = {}
_OPENED_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _copies_dir() -> str:
    """The private folder of renamed copies, made on first need and removed at exit; named as
    lowering/fsutil.py names scratch folders (our pid in it), so the next compile's
    sweep_dead_scratch removes one a killed process left."""
    from graphir.lowering.fsutil import SCRATCH_PREFIX

    d = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-so-")
    atexit.register(shutil.rmtree, d, True)
    return d


def _dlopen(path: str) -> ctypes.CDLL:
    """dlopen `path`, or a copy of it named by its content when another file was loaded under
    that name earlier in this process.

    The dynamic loader answers a name it has loaded with the library already in memory, never
    reading the file again (ctypes never unloads one): an artifact recompiled in place (the same
    `out` path, a new graph) would run the old kernels against the new manifest, wrong numbers
    or reads past the new buffers. A file that is not the one first loaded under its name goes
    through a copy whose name is its content's SHA-256, which any later load of those bytes
    shares. RTLD_LOCAL: two loaded artifacts never see each other's symbols."""
    mode = os.RTLD_NOW | os.RTLD_LOCAL
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _OPENED_LOCK:
        if _OPENED.setdefault(path, ident) == ident:
            return ctypes.CDLL(path, mode=mode)
        with open(path, "rb") as f:
            data = f.read()
        copy = os.path.join(_copies_dir(), hashlib.sha256(data).hexdigest() + ".so")
        if not os.path.exists(copy):
            tmp = copy + ".part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, copy)
        return ctypes.CDLL(copy, mode=mode)


# The environment the libraries' thread pool reads (parallel_runtime.c), read there with atoi:
# a typo would silently mean "every CPU" or a spin of 0.
_POOL_ENV = {"GRAPHIR_NUM_THREADS": (1, "the CPU kernels' thread count; unset for every CPU "
                                        "this process may run on"),
             "GRAPHIR_SPIN_US": (0, "how long idle workers spin before they sleep; unset "
                                    "for 200")}


def check_pool_env() -> None:
    """Raise ValueError naming a pool variable that is set to anything but a whole number in
    its range (an empty value counts as unset, as the pool reads it)."""
    for name, (least, what) in _POOL_ENV.items():
        text = os.environ.get(name, "").strip()
        if text and not (text.isdigit() and int(text) >= least):
            raise ValueError(f"{name}={os.environ[name]!r}: expected a whole number >= {least} "
                             f"({what})")


class CpuLibrary:
    """A loaded graphir CPU shared object."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ValueError(f"CpuLibrary: no such file {self.path!r}")
        check_pool_env()
        self.handle = _dlopen(os.path.abspath(self.path))

    def abi(self) -> dict | None:
        """What the library's kernels were compiled to expect (lowering/mlir_cpu/backend.py
        `kernel_abi`: kernel name -> [[operand, layout], ...] of its pre-packed operands);
        None for a library that declares nothing."""
        try:
            fn = self.handle.graphir_abi
        except AttributeError:
            return None
        fn.restype, fn.argtypes = ctypes.c_char_p, []
        try:
            out = json.loads(fn().decode())
        except (UnicodeDecodeError, ValueError):
            out = None
        if not isinstance(out, dict):
            raise ValueError(f"{self.path}: its graphir_abi() is not a JSON object")
        return out

    def function(self, name: str, n_inputs: int, n_outputs: int) -> Callable[
            [Sequence[np.ndarray], Sequence[np.ndarray]], None]:
        """The callable for exported function `name` with the given argument counts."""
        if n_inputs < 0 or n_outputs < 0:
            raise ValueError(f"function {name!r}: negative argument count "
                             f"({n_inputs}, {n_outputs})")
        return CpuFunction(self, name, n_inputs, n_outputs)
