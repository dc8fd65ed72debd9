"""cuBLASLt over ctypes: C = A @ B^T (+ bias) as an object launched like a `Kernel`.

The tuner may pick cuBLASLt for a matmul bucket where it beats our Triton kernels (as
torch.compile's autotuner picks between its templates and cuBLAS). Such a manifest kernel entry
has `"kind": "cublaslt"` and no cubin; `_Kernels` in device_model.py builds a `CublasLtMatmul`
for it, whose `.launch(grid, a, b, bias, c, M, N, K, stream=)` takes the arguments of the Triton
fallback the entry names (the grid is the fallback's and is ignored here), so the plan and the
executor need no change. Where the library is missing or has no algorithm for a shape, the
Triton fallback runs instead: a plan that chose cuBLASLt never fails to run.

The library is found without importing torch: `GRAPHIR_LIBCUBLASLT` (a path), the files of an
installed `nvidia-cublas*` wheel, `nvidia/*/lib` under site-packages, torch's lib folder, then
the loader's search. Descriptors, the algorithm heuristic per row count and a 32 MiB workspace
(shared per device: one stream runs the plan) are made once, ahead of launches, so launches are
capturable into CUDA graphs. The heuristic is told the pointers' real alignment (up to 256
bytes, as torch does for its cuBLASLt path), so plans are kept per (M, alignment).

A manifest entry may pin an algorithm (`"algo"`: a record of cublaslt_algo.py, the rank the
compile-time tuner measured fastest); rank 0 is the heuristic's own per-M choice and pins
nothing. A pinned algorithm runs every M of its bucket that cublasLtMatmulAlgoCheck accepts, at
the alignment it was tuned for or better; other launches take the heuristic's first choice.

Row-major C[M, N] = A[M, K] @ B[N, K]^T is, in cuBLAS's column-major terms, D[N, M] =
op(B')[N, K] @ A'[K, M] with B' the weight seen as [K, N] (transposed: CUBLAS_OP_T) and A' the
activations seen as [K, M]; the bias epilogue adds a vector over D's N rows.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_int64, c_size_t, c_uint64, \
    c_void_p
from typing import Any, Callable, Iterable

from . import cublaslt_algo as la
from . import libsearch

LIBCUBLASLT_ENV = "GRAPHIR_LIBCUBLASLT"
WORKSPACE_BYTES = 32 << 20

CUDA_TYPES = {"bf16": 14, "fp16": 2, "fp32": 0}   # cudaDataType_t
COMPUTE_32F = 68                                   # cublasComputeType_t: fp32 accumulation
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER, DESC_BIAS_DATA_TYPE = 3, 4, 7, 8, 26
EPILOGUE_BIAS = 4
PREF_MAX_WORKSPACE_BYTES = 1
PREF_MIN_ALIGNMENT = (5, 6, 7, 8)                  # A, B, C, D (bytes)
ALIGNMENT = 16                                     # required of every pointer
ALIGN_MAX = 256                                    # alignment the heuristic is told at most
STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
          3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
          8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
          13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
          15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}


_Algo, _Heuristic = la.Algo, la.Heuristic


_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "cublasLtCreate": (c_int, [POINTER(c_void_p)]),
    "cublasLtGetVersion": (c_size_t, []),
    "cublasLtMatmulDescCreate": (c_int, [POINTER(c_void_p), c_int, c_int]),
    "cublasLtMatmulDescSetAttribute": (c_int, [c_void_p, c_int, c_void_p, c_size_t]),
    "cublasLtMatrixLayoutCreate": (c_int, [POINTER(c_void_p), c_int, c_uint64, c_uint64,
                                           c_int64]),
    "cublasLtMatmulPreferenceCreate": (c_int, [POINTER(c_void_p)]),
    "cublasLtMatmulPreferenceSetAttribute": (c_int, [c_void_p, c_int, c_void_p, c_size_t]),
    "cublasLtMatmulAlgoGetHeuristic": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p,
                                               c_void_p, c_void_p, c_void_p, c_int,
                                               POINTER(_Heuristic), POINTER(c_int)]),
    "cublasLtMatmul": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                               c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                               POINTER(_Algo), c_void_p, c_size_t, c_void_p]),
    **la.PROTOTYPES,
}
_OPTIONAL = {"cublasLtGetStatusString": (c_char_p, [c_int])}


class CublasLtUnavailableError(RuntimeError):
    """libcublasLt could not be found or loaded (the message lists the places tried)."""


class CublasLtError(RuntimeError):
    """A cuBLASLt call failed; `call` and `status` say which and how."""

    def __init__(self, call: str, status: int, detail: str = ""):
        self.call, self.status = call, int(status)
        name = STATUS.get(self.status, f"cublasStatus {status}")
        super().__init__(f"{call} failed: {name} ({self.status})" + (f": {detail}" if detail
                                                                     else ""))


def candidates() -> list[str]:
    """Library paths and names to try, in order (see the module docstring)."""
    return libsearch.candidates(LIBCUBLASLT_ENV, "nvidia-cublas", "libcublasLt.so",
                                ("nvidia/*/lib/libcublasLt.so*", "nvidia/*/*/lib/libcublasLt.so*",
                                 "torch/lib/libcublasLt.so*"), "cublasLt",
                                ("libcublasLt.so.13", "libcublasLt.so.12"), newest_first=True)


_lock = threading.Lock()
_lib: Any = None
_error: str | None = None


def bind(lib: Any) -> Any:
    """Set restype/argtypes of the entry points on a ctypes library (missing ones raise)."""
    return libsearch.bind(lib, _PROTOTYPES, _OPTIONAL)


def load() -> Any:
    """The loaded libcublasLt with prototypes set (cached); raises CublasLtUnavailableError."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise CublasLtUnavailableError(_error)
        _lib, tried = libsearch.open_first(candidates(), bind)
        if _lib is not None:
            return _lib
        _error = ("cannot load cuBLASLt (libcublasLt.so), which a matmul tuned to cuBLASLt "
                  "runs on; install the nvidia-cublas wheel or set "
                  f"{LIBCUBLASLT_ENV}. Tried: " + "; ".join(tried))
        raise CublasLtUnavailableError(_error)


def is_available() -> bool:
    """True when libcublasLt loads. Never raises."""
    try:
        load()
        return True
    except CublasLtUnavailableError:
        return False


def _check(lib: Any, call: str, status: int) -> None:
    if status == 0:
        return
    detail = ""
    fn = getattr(lib, "cublasLtGetStatusString", None)
    if fn is not None:
        try:
            detail = (fn(int(status)) or b"").decode(errors="replace")
        except (TypeError, ctypes.ArgumentError, AttributeError):
            pass
    raise CublasLtError(call, status, detail)


def _ptr(p: Any) -> int:
    if p is None:
        return 0
    if isinstance(p, int):
        return p
    if isinstance(getattr(p, "ptr", None), int):
        return p.ptr
    if callable(getattr(p, "data_ptr", None)):
        return int(p.data_ptr())
    raise TypeError(f"expected a device pointer (int, DeviceBuffer, tensor), got "
                    f"{type(p).__name__}")


_handles: dict[int, int] = {}
_workspaces: dict[int, Any] = {}


def _shared(device: int, lib: Any) -> tuple[int, Any]:
    """The per-device handle and workspace (one stream runs a plan, so they can be shared)."""
    from graphir.runtime.cuda import driver
    from graphir.runtime.cuda.memory import DeviceBuffer

    with _lock:
        if device not in _handles:
            driver.ensure_context(device)
            h = c_void_p()
            _check(lib, "cublasLtCreate", lib.cublasLtCreate(byref(h)))
            _handles[device] = h.value
            _workspaces[device] = DeviceBuffer.empty(WORKSPACE_BYTES, "uint8", device)
        return _handles[device], _workspaces[device]


class CublasLtMatmul:
    """C[M, N] = A[M, K] @ B[N, K]^T (+ bias) on cuBLASLt, launched like a `Kernel`.

    N, K, the dtype and the bias are fixed; M varies per launch (algorithms are chosen once per
    M and pointer alignment, ahead of time for `m_hints`). `algo` pins an algorithm (a record
    of cublaslt_algo.py; see the module docstring). `fallback` (a callable returning a
    Kernel-like object) runs instead when cuBLASLt has no algorithm for an M.

    Example:
        >>> mm = CublasLtMatmul("bf16", N=6144, K=4096, m_hints=(1, 64))        # doctest: +SKIP
        >>> mm.launch((1, 1, 1), a, w, a, c, 64, 6144, 4096, stream=s)          # doctest: +SKIP
    """

    def __init__(self, dtype: str, N: int, K: int, has_bias: bool = False, device: int = 0,
                 m_hints: Iterable[int] = (), *, lib: Any = None,
                 workspace: tuple[int, int] | None = None,
                 fallback: Callable[[], Any] | None = None, algo: dict | None = None):
        if dtype not in CUDA_TYPES:
            raise ValueError(f"cuBLASLt matmul: dtype must be one of {sorted(CUDA_TYPES)}, "
                             f"got {dtype!r}")
        for what, v in (("N", N), ("K", K)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"cuBLASLt matmul: {what} must be a positive int, got {v!r}")
        self.dtype, self.N, self.K, self.has_bias, self.device = dtype, N, K, has_bias, device
        rec = la.validate_record(algo) if algo is not None else None
        self.pin = rec if rec is not None and rec["index"] > 0 else None
        self.name = f"cublaslt_{dtype}_n{N}_k{K}{'_bias' if has_bias else ''}"
        self._fallback_factory, self._fallback = fallback, None
        self.lib = lib if lib is not None else load()
        if workspace is None:
            self.handle, ws = _shared(device, self.lib)
            self._ws_keep, self.ws_ptr, self.ws_size = ws, ws.ptr, ws.nbytes
        else:
            h = c_void_p()
            _check(self.lib, "cublasLtCreate", self.lib.cublasLtCreate(byref(h)))
            self.handle, (self.ws_ptr, self.ws_size) = h.value, workspace
        self.version = int(self.lib.cublasLtGetVersion() or 0)
        self._plans: dict[tuple[int, int], tuple] = {}
        self._layouts: dict[int, tuple[int, int]] = {}
        self._prefs: dict[int, int] = {}
        self._pinned: Any = None   # the restored Algo, False once it proved unusable
        self._make_descriptors()
        for m in m_hints:
            self.plan(int(m))

    def _set(self, fn: str, obj: int, attr: int, value: Any) -> None:
        _check(self.lib, fn, getattr(self.lib, fn)(c_void_p(obj), attr, byref(value),
                                                   ctypes.sizeof(value)))

    def _make_descriptors(self) -> None:
        lib, t = self.lib, CUDA_TYPES[self.dtype]
        d = c_void_p()
        _check(lib, "cublasLtMatmulDescCreate",
               lib.cublasLtMatmulDescCreate(byref(d), COMPUTE_32F, CUDA_TYPES["fp32"]))
        self.desc = d.value
        self._set("cublasLtMatmulDescSetAttribute", self.desc, DESC_TRANSA, c_int(OP_T))
        self._set("cublasLtMatmulDescSetAttribute", self.desc, DESC_TRANSB, c_int(OP_N))
        if self.has_bias:
            self._set("cublasLtMatmulDescSetAttribute", self.desc, DESC_EPILOGUE,
                      ctypes.c_uint32(EPILOGUE_BIAS))
            self._set("cublasLtMatmulDescSetAttribute", self.desc, DESC_BIAS_DATA_TYPE, c_int(t))
        self.layout_w = self._layout(self.K, self.N)

    def _pref(self, align: int) -> int:
        """The preference for pointers aligned to `align` bytes (made once per alignment)."""
        if align not in self._prefs:
            p = c_void_p()
            _check(self.lib, "cublasLtMatmulPreferenceCreate",
                   self.lib.cublasLtMatmulPreferenceCreate(byref(p)))
            self._set("cublasLtMatmulPreferenceSetAttribute", p.value, PREF_MAX_WORKSPACE_BYTES,
                      c_uint64(self.ws_size))
            for attr in PREF_MIN_ALIGNMENT:
                self._set("cublasLtMatmulPreferenceSetAttribute", p.value, attr,
                          ctypes.c_uint32(align))
            self._prefs[align] = p.value
        return self._prefs[align]

    def _layout(self, rows: int, cols: int) -> int:
        lay = c_void_p()
        _check(self.lib, "cublasLtMatrixLayoutCreate",
               self.lib.cublasLtMatrixLayoutCreate(byref(lay), CUDA_TYPES[self.dtype], rows,
                                                   cols, rows))
        return lay.value

    def _layouts_for(self, M: int) -> tuple[int, int]:
        if M not in self._layouts:
            self._layouts[M] = (self._layout(self.K, M), self._layout(self.N, M))
        return self._layouts[M]

    def ranked(self, M: int, align: int = ALIGN_MAX, count: int = la.RANKS) -> list:
        """The heuristic's first `count` algorithms for M rows (Heuristic structs, best first)."""
        lay_a, lay_c = self._layouts_for(M)
        res, got = (_Heuristic * count)(), c_int(0)
        _check(self.lib, "cublasLtMatmulAlgoGetHeuristic", self.lib.cublasLtMatmulAlgoGetHeuristic(
            c_void_p(self.handle), c_void_p(self.desc), c_void_p(self.layout_w),
            c_void_p(lay_a), c_void_p(lay_c), c_void_p(lay_c), c_void_p(self._pref(align)),
            count, res, byref(got)))
        return [res[i] for i in range(min(got.value, count)) if res[i].state == 0]

    def _pinned_algo(self):
        """The pinned algorithm restored once: same-version bytes, else its config, else the
        serving library's own rank `index` (see cublaslt_algo.py); None when none works."""
        if self._pinned is None:
            rec, algo = self.pin, None
            if "bytes" in rec and rec.get("version") == self.version:
                algo = la.from_hex(rec["bytes"])
            elif rec.get("config"):
                t = CUDA_TYPES[self.dtype]
                algo = la.from_config(self.lib, self.handle,
                                      (COMPUTE_32F, CUDA_TYPES["fp32"], t, t, t, t), rec["config"])
            if algo is None:
                ranks = self.ranked(rec["at_m"], rec.get("align", ALIGN_MAX), rec["index"] + 1)
                algo = ranks[rec["index"]].algo if len(ranks) > rec["index"] else None
            if algo is None:
                warnings.warn(f"{self.name}: pinned algorithm {la.describe(rec)} is not "
                              f"available in cuBLASLt {self.version}; using the heuristic's "
                              f"first choice", RuntimeWarning)
            self._pinned = algo if algo is not None else False
        return self._pinned or None

    def plan(self, M: int, align: int = ALIGN_MAX) -> tuple:
        """(activation layout, output layout, algorithm, "pinned" | "heuristic") for M rows
        and pointers aligned to `align` bytes, made once."""
        got = self._plans.get((M, align))
        if got is not None:
            return got
        lay_a, lay_c = self._layouts_for(M)
        if self.pin is not None and align >= self.pin.get("align", ALIGN_MAX):
            algo = self._pinned_algo()
            if algo is not None and la.check(self.lib, self.handle, self.desc,
                                             (self.layout_w, lay_a, lay_c, lay_c), algo,
                                             self.ws_size):
                self._plans[(M, align)] = (lay_a, lay_c, algo, "pinned")
                return self._plans[(M, align)]
        ranks = self.ranked(M, align, 1)
        if not ranks:
            raise CublasLtError("cublasLtMatmulAlgoGetHeuristic", 15,
                                f"no algorithm for M={M}, N={self.N}, K={self.K} {self.dtype}")
        self._plans[(M, align)] = (lay_a, lay_c, ranks[0].algo, "heuristic")
        return self._plans[(M, align)]

    def algo_record(self, M: int, align: int = ALIGN_MAX) -> dict:
        """The record of the algorithm that runs M rows (what a manifest pins)."""
        _, _, algo, how = self.plan(M, align)
        return {"index": self.pin["index"] if how == "pinned" else 0,
                "at_m": self.pin["at_m"] if how == "pinned" else M, "align": align,
                "version": self.version, "bytes": la.to_hex(algo),
                "config": la.read_config(self.lib, algo)}

    def check_args(self, args: tuple) -> tuple[int, int, int, int, int, int]:
        """(a, b, bias, c, M, alignment) from a launch's arguments; ValueError naming a bad
        one. The alignment is the largest power of two (<= ALIGN_MAX) dividing every pointer."""
        if len(args) != 7:
            raise ValueError(f"{self.name} takes 7 arguments (a, b, bias, c, M, N, K), got "
                             f"{len(args)}")
        a, b, bias, c, M, N, K = args
        if (N, K) != (self.N, self.K):
            raise ValueError(f"{self.name}: built for N={self.N}, K={self.K}, launched with "
                             f"N={N}, K={K}")
        if not isinstance(M, int) or isinstance(M, bool) or M < 0:
            raise ValueError(f"{self.name}: M must be an int >= 0, got {M!r}")
        ptrs = {"a": _ptr(a), "b": _ptr(b), "c": _ptr(c)}
        if self.has_bias:
            ptrs["bias"] = _ptr(bias)
        for what, p in ptrs.items():
            if M and (p == 0 or p % ALIGNMENT):
                raise ValueError(f"{self.name}: pointer {what}=0x{p:x} must be non-null and "
                                 f"{ALIGNMENT}-byte aligned")
        align = min([ALIGN_MAX] + [p & -p for p in ptrs.values() if p])
        return ptrs["a"], ptrs["b"], ptrs.get("bias", 0), ptrs["c"], M, align

    def _fallback_kernel(self, err: Exception):
        if self._fallback_factory is None:
            raise err
        if self._fallback is None:
            warnings.warn(f"{self.name}: {err}; running the Triton fallback", RuntimeWarning)
            self._fallback = self._fallback_factory()
        return self._fallback

    def launch(self, grid: Any, *args: Any, stream: Any = None) -> None:
        """Queue C = A @ B^T (+ bias) on `stream`; `grid` belongs to the fallback kernel."""
        from graphir.runtime.cuda.stream import stream_handle

        a, b, bias, c, M, align = self.check_args(args)
        if M == 0:
            return
        try:
            plan = self.plan(M, align)
        except CublasLtError as e:
            self._fallback_kernel(e).launch(grid, *args, stream=stream)
            return
        self._run(plan, a, b, bias, c, stream_handle(stream))

    def prepare(self, grid: Any, args: Any) -> Callable[[Any], None]:
        """Check the arguments and choose the algorithm once; the result enqueues the matmul
        on the stream it is given (as Kernel.prepare does), with no per-call checks."""
        from graphir.runtime.cuda.stream import stream_handle

        a, b, bias, c, M, align = self.check_args(tuple(args))
        if M == 0:
            return lambda stream=0: None
        try:
            plan = self.plan(M, align)
        except CublasLtError as e:
            fb = self._fallback_kernel(e)
            if hasattr(fb, "prepare"):
                return fb.prepare(grid, list(args))
            return lambda stream=0: fb.launch(grid, *args, stream=stream)
        return lambda stream=0: self._run(plan, a, b, bias, c, stream_handle(stream))

    def _run(self, plan: tuple, a: int, b: int, bias: int, c: int, stream: int) -> None:
        from graphir.runtime.cuda import driver

        lay_a, lay_c, algo, _ = plan
        driver.ensure_context(self.device)
        if self.has_bias:
            self._set("cublasLtMatmulDescSetAttribute", self.desc, DESC_BIAS_POINTER,
                      c_void_p(bias))
        alpha, beta = c_float(1.0), c_float(0.0)
        _check(self.lib, "cublasLtMatmul", self.lib.cublasLtMatmul(
            c_void_p(self.handle), c_void_p(self.desc), byref(alpha), c_void_p(b),
            c_void_p(self.layout_w), c_void_p(a), c_void_p(lay_a), byref(beta), c_void_p(c),
            c_void_p(lay_c), c_void_p(c), c_void_p(lay_c), byref(algo), c_void_p(self.ws_ptr),
            self.ws_size, c_void_p(stream)))

    def __repr__(self) -> str:
        pin = f", pinned {la.describe(self.pin)}" if self.pin else ""
        return f"CublasLtMatmul({self.name!r}, cached (M, align)={sorted(self._plans)}{pin})"


def load_matmul(entry: dict, device: int, fallback: Callable[[], Any]) -> Any:
    """The launchable of a manifest entry of kind "cublaslt": a CublasLtMatmul (pinned to the
    entry's "algo" record, if any), or the Triton fallback (with a warning) where cuBLASLt is
    missing or refuses the shape. A malformed pin is dropped (with a warning), not fatal."""
    algo = entry.get("algo")
    try:
        if algo is not None:
            la.validate_record(algo)
    except ValueError as e:
        warnings.warn(f"{entry.get('name', 'cublaslt')}: {e}; ignoring the pinned algorithm",
                      RuntimeWarning)
        algo = None
    try:
        return CublasLtMatmul(entry["dtype"], int(entry["N"]), int(entry["K"]),
                              bool(entry["has_bias"]), device, entry.get("m_hints", ()),
                              fallback=fallback, algo=algo)
    except (CublasLtUnavailableError, CublasLtError) as e:
        warnings.warn(f"{entry.get('name', 'cublaslt')}: {e}; running the Triton fallback "
                      f"{entry.get('fallback')}", RuntimeWarning)
        return fallback()
