"""libcuda over ctypes: loading, checked calls, the primary context, device properties.

Every driver entry point is called through `call(name, *args)`, which raises `CudaError`
naming the call and the CUresult (e.g. `cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (2)`).
Symbols are the exported ABI names, i.e. the `_v2` names that cuda.h #defines the plain names to.
"""

from __future__ import annotations

import ctypes
import os
import threading
from ctypes import (POINTER, c_char_p, c_float, c_int, c_size_t, c_ubyte, c_uint, c_uint64, c_ulonglong,
                    c_void_p)
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CUdeviceptr = c_uint64
_P = c_void_p  # every opaque handle (CUcontext, CUmodule, CUfunction, CUstream, CUevent, CUgraph...)

# name -> argtypes; restype is always CUresult (int). Kept to what this package uses.
_PROTOTYPES: dict[str, list[Any]] = {
    "cuInit": [c_uint],
    "cuDriverGetVersion": [POINTER(c_int)],
    "cuGetErrorName": [c_int, POINTER(c_char_p)],
    "cuGetErrorString": [c_int, POINTER(c_char_p)],
    "cuDeviceGetCount": [POINTER(c_int)],
    "cuDeviceGet": [POINTER(c_int), c_int],
    "cuDeviceGetName": [c_char_p, c_int, c_int],
    "cuDeviceGetAttribute": [POINTER(c_int), c_int, c_int],
    "cuDeviceTotalMem_v2": [POINTER(c_size_t), c_int],
    "cuDevicePrimaryCtxRetain": [POINTER(_P), c_int],
    "cuCtxSetCurrent": [_P],
    "cuCtxGetCurrent": [POINTER(_P)],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [POINTER(c_size_t), POINTER(c_size_t)],
    "cuMemAlloc_v2": [POINTER(CUdeviceptr), c_size_t],
    "cuMemFree_v2": [CUdeviceptr],
    "cuMemAllocHost_v2": [POINTER(c_void_p), c_size_t],
    "cuMemFreeHost": [c_void_p],
    "cuMemHostGetDevicePointer_v2": [POINTER(CUdeviceptr), c_void_p, c_uint],
    "cuMemcpyHtoD_v2": [CUdeviceptr, c_void_p, c_size_t],
    "cuMemcpyDtoH_v2": [c_void_p, CUdeviceptr, c_size_t],
    "cuMemcpyDtoD_v2": [CUdeviceptr, CUdeviceptr, c_size_t],
    "cuMemcpyHtoDAsync_v2": [CUdeviceptr, c_void_p, c_size_t, _P],
    "cuMemcpyDtoHAsync_v2": [c_void_p, CUdeviceptr, c_size_t, _P],
    "cuMemcpyDtoDAsync_v2": [CUdeviceptr, CUdeviceptr, c_size_t, _P],
    "cuMemsetD8_v2": [CUdeviceptr, c_ubyte, c_size_t],
    "cuMemsetD32_v2": [CUdeviceptr, c_uint, c_size_t],
    "cuMemsetD8Async": [CUdeviceptr, c_ubyte, c_size_t, _P],
    "cuMemsetD32Async": [CUdeviceptr, c_uint, c_size_t, _P],
    "cuModuleLoadData": [POINTER(_P), c_void_p],
    "cuModuleUnload": [_P],
    "cuModuleGetFunction": [POINTER(_P), _P, c_char_p],
    "cuFuncGetAttribute": [POINTER(c_int), c_int, _P],
    "cuFuncSetAttribute": [_P, c_int, c_int],
    "cuLaunchKernel": [_P, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, _P,
                       c_void_p, c_void_p],
    # (const CUlaunchConfig*, CUfunction, void** params, void** extra): module.PdlLaunch
    "cuLaunchKernelEx": [c_void_p, _P, c_void_p, c_void_p],
    "cuStreamCreate": [POINTER(_P), c_uint],
    "cuStreamDestroy_v2": [_P],
    "cuStreamSynchronize": [_P],
    "cuStreamQuery": [_P],
    "cuStreamWaitEvent": [_P, _P, c_uint],
    "cuStreamBeginCapture_v2": [_P, c_int],
    "cuStreamEndCapture": [_P, POINTER(_P)],
    "cuStreamIsCapturing": [_P, POINTER(c_int)],
    "cuThreadExchangeStreamCaptureMode": [POINTER(c_int)],
    "cuEventCreate": [POINTER(_P), c_uint],
    "cuEventDestroy_v2": [_P],
    "cuEventRecord": [_P, _P],
    "cuEventSynchronize": [_P],
    "cuEventQuery": [_P],
    "cuEventElapsedTime_v2": [POINTER(c_float), _P, _P],
    "cuGraphInstantiateWithFlags": [POINTER(_P), _P, c_ulonglong],
    "cuGraphLaunch": [_P, _P],
    "cuGraphExecDestroy": [_P],
    "cuGraphDestroy": [_P],
}
# Used when a driver lacks the preferred symbol (cuEventElapsedTime_v2 appeared in 12.8).
_FALLBACK_SYMBOL = {"cuEventElapsedTime_v2": "cuEventElapsedTime"}

# CUresult names for messages when cuGetErrorName itself is unavailable.
_KNOWN_ERRORS = {
    0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED", 4: "CUDA_ERROR_DEINITIALIZED", 100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE", 200: "CUDA_ERROR_INVALID_IMAGE",
    201: "CUDA_ERROR_INVALID_CONTEXT", 209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
    400: "CUDA_ERROR_INVALID_HANDLE", 500: "CUDA_ERROR_NOT_FOUND", 600: "CUDA_ERROR_NOT_READY",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS", 701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT", 719: "CUDA_ERROR_LAUNCH_FAILED",
    900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", 901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
    999: "CUDA_ERROR_UNKNOWN",
}

# CUdevice_attribute / CUfunction_attribute values from cuda.h.
ATTR_MAX_SHARED_PER_BLOCK = 8
ATTR_MULTIPROCESSOR_COUNT = 16
ATTR_L2_CACHE_SIZE = 38
ATTR_CC_MAJOR = 75
ATTR_CC_MINOR = 76
ATTR_MAX_SHARED_PER_SM = 81
ATTR_MAX_SHARED_PER_BLOCK_OPTIN = 97
FUNC_ATTR_MAX_THREADS_PER_BLOCK = 0
FUNC_ATTR_SHARED_SIZE_BYTES = 1
FUNC_ATTR_LOCAL_SIZE_BYTES = 3
FUNC_ATTR_NUM_REGS = 4
FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

LIBCUDA_ENV = "GRAPHIR_LIBCUDA"


class CudaUnavailableError(RuntimeError):
    """No usable NVIDIA driver: libcuda.so.1 is missing, lacks a symbol, or sees no device."""


class CudaError(RuntimeError):
    """A driver call returned an error; `call`, `code` and `name` say which and what."""

    def __init__(self, call: str, code: int, context: str = ""):
        self.call, self.code, self.name = call, int(code), error_name(code)
        msg = f"{call} failed: {self.name} ({self.code})"
        desc = _error_string(code)
        if desc:
            msg += f": {desc}"
        if context:
            msg += f" [{context}]"
        if _init_pid not in (None, os.getpid()):
            msg += (f"; CUDA was initialized in process {_init_pid}, which this one was "
                    "forked from, and a forked child cannot use it: start worker processes "
                    "with multiprocessing's 'spawn' or 'forkserver' method, or use the GPU in "
                    "the child only")
        super().__init__(msg)


_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_funcs: dict[str, Any] = {}
_load_error: str | None = None
_initialized = False
# The process that ran cuInit: a child forked from it inherits `_initialized` but cannot use
# CUDA (the driver answers its calls with an "initialization error"), so its errors say why.
_init_pid: int | None = None
_primary: dict[int, int] = {}
_tls = threading.local()


def _load() -> ctypes.CDLL:
    global _lib, _load_error
    with _lock:
        if _lib is not None:
            return _lib
        if _load_error is not None:
            raise CudaUnavailableError(_load_error)
        path = os.environ.get(LIBCUDA_ENV, "libcuda.so.1")
        try:
            lib = ctypes.CDLL(path)
            funcs = {}
            for name, argtypes in _PROTOTYPES.items():
                sym = name if hasattr(lib, name) else _FALLBACK_SYMBOL.get(name, name)
                fn = getattr(lib, sym)
                fn.argtypes, fn.restype = argtypes, c_int
                funcs[name] = fn
        except (OSError, AttributeError) as e:
            _load_error = (f"cannot use the NVIDIA driver library {path!r} ({e}); runtime.cuda "
                           "needs a machine with an NVIDIA GPU and driver "
                           "(check runtime.cuda.is_available() first)")
            raise CudaUnavailableError(_load_error) from None
        _funcs.update(funcs)
        _lib = lib
        return lib


def error_name(code: int) -> str:
    """The CUresult enum name of `code` (cuGetErrorName, or a built-in table without a driver)."""
    if _lib is not None:
        s = c_char_p()
        if _funcs["cuGetErrorName"](int(code), ctypes.byref(s)) == 0 and s.value:
            return s.value.decode()
    return _KNOWN_ERRORS.get(int(code), f"CUresult {int(code)}")


def _error_string(code: int) -> str:
    if _lib is None:
        return ""
    s = c_char_p()
    if _funcs["cuGetErrorString"](int(code), ctypes.byref(s)) == 0 and s.value:
        return s.value.decode()
    return ""


def check(call_name: str, rc: int, context: str = "") -> None:
    """Raise `CudaError` unless `rc` is CUDA_SUCCESS."""
    if rc != 0:
        raise CudaError(call_name, rc, context)


def function(name: str) -> Any:
    """The raw ctypes function `name` (returns a CUresult; check it with `check`)."""
    if name not in _funcs:
        _load()
    return _funcs[name]


def call(name: str, *args: Any, context: str = "") -> None:
    """Call driver function `name` (exported symbol name) and check its CUresult."""
    if name not in _funcs:
        _load()
        if name not in _funcs:
            raise ValueError(f"driver function {name!r} is not declared in runtime.cuda.driver")
    check(name, _funcs[name](*args), context)


def release(name: str, *args: Any) -> None:
    """A free or destroy call from a finalizer (cuMemFree_v2, cuEventDestroy_v2, ...), errors
    ignored (the driver may be gone at interpreter exit). Python's garbage collector runs
    finalizers wherever it likes, and a free in the middle of a capture breaks the capture
    (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED at the next launch; seen on an H100 when an
    earlier model's buffers were collected during a prefill's capture) and leaks the memory.
    So while this thread runs one of graphir's captures the call waits for its end
    (`capturing`); otherwise it runs with the thread's capture mode relaxed, so that a
    capture graphir does not know of (torch.cuda.graph, torch.compile's reduce-overhead, in
    this thread or another, in CUDA's default global mode) is not broken either: a relaxed
    thread may make the calls such a capture forbids."""
    pending = getattr(_tls, "deferred", None)
    if pending is not None:
        pending.append((name, args))
        return
    try:
        with relaxed_capture_mode():
            call(name, *args)
    except CudaError:
        pass


CAPTURE_MODE_RELAXED = 2   # CUstreamCaptureMode: GLOBAL 0, THREAD_LOCAL 1, RELAXED 2


@contextmanager
def relaxed_capture_mode():
    """This thread's stream capture mode relaxed meanwhile (cuThreadExchangeStreamCaptureMode),
    the previous mode put back after."""
    mode = c_int(CAPTURE_MODE_RELAXED)
    call("cuThreadExchangeStreamCaptureMode", ctypes.byref(mode))
    try:
        yield
    finally:
        call("cuThreadExchangeStreamCaptureMode", ctypes.byref(mode))


@contextmanager
def capturing():
    """The span of a stream capture in this thread: `release` calls made meanwhile run when
    the outermost one ends."""
    outer = getattr(_tls, "deferred", None) is None
    if outer:
        _tls.deferred = []
    try:
        yield
    finally:
        if outer:
            pending, _tls.deferred = _tls.deferred, None
            for name, args in pending:
                release(name, *args)


def init() -> None:
    """Load libcuda and run cuInit(0) once; raise CudaUnavailableError/CudaError on failure."""
    global _initialized, _init_pid
    if _initialized:
        return
    with _lock:
        if not _initialized:
            _load()
            call("cuInit", 0)
            _init_pid = os.getpid()
            _initialized = True


def is_initialized() -> bool:
    """True once `init()` succeeded in this process (no driver call is made)."""
    return _initialized


def is_available() -> bool:
    """True when libcuda loads, initializes and reports at least one device. Never raises."""
    try:
        return device_count() > 0
    except (CudaUnavailableError, CudaError):
        return False


def device_count() -> int:
    """Number of CUDA devices the driver sees."""
    init()
    n = c_int()
    call("cuDeviceGetCount", ctypes.byref(n))
    return n.value


def driver_version() -> int:
    """The driver's CUDA version as 1000*major + 10*minor (e.g. 13000)."""
    _load()
    v = c_int()
    call("cuDriverGetVersion", ctypes.byref(v))
    return v.value


def _device(ordinal: int) -> int:
    init()
    n = device_count()
    if not 0 <= ordinal < n:
        raise ValueError(f"CUDA device {ordinal} does not exist ({n} device(s) present)")
    dev = c_int()
    call("cuDeviceGet", ctypes.byref(dev), int(ordinal))
    return dev.value


def ensure_context(device: int = 0) -> None:
    """Make the primary context of `device` current on this thread (shared with torch)."""
    if getattr(_tls, "device", None) == device:
        return
    with _lock:
        if device not in _primary:
            dev = _device(device)
            ctx = c_void_p()
            call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
            _primary[device] = ctx.value
    call("cuCtxSetCurrent", c_void_p(_primary[device]))
    _tls.device = device


def current_device() -> int:
    """The device whose context this thread last made current via `ensure_context` (default 0)."""
    return getattr(_tls, "device", 0)


def synchronize(device: int = 0) -> None:
    """Wait for all work of the device's primary context (cuCtxSynchronize)."""
    ensure_context(device)
    call("cuCtxSynchronize")


def device_attribute(attr: int, device: int = 0) -> int:
    """Raw cuDeviceGetAttribute value."""
    dev = _device(device)
    v = c_int()
    call("cuDeviceGetAttribute", ctypes.byref(v), int(attr), dev, context=f"attribute {attr}")
    return v.value


def mem_get_info(device: int = 0) -> tuple[int, int]:
    """(free, total) bytes of device memory."""
    ensure_context(device)
    free, total = c_size_t(), c_size_t()
    call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


@dataclass(frozen=True)
class DeviceProperties:
    """What kernels and launchers need to know about one device."""

    ordinal: int
    name: str
    sm_count: int
    compute_capability: tuple[int, int]
    max_shared_per_block: int
    max_shared_per_block_optin: int
    max_shared_per_sm: int
    l2_cache_bytes: int
    total_memory: int
    driver_version: int


def device_properties(device: int = 0) -> DeviceProperties:
    """Name, SM count, compute capability and shared-memory limits of `device`."""
    dev = _device(device)
    buf = ctypes.create_string_buffer(256)
    call("cuDeviceGetName", buf, 256, dev)
    total = c_size_t()
    call("cuDeviceTotalMem_v2", ctypes.byref(total), dev)
    a = lambda attr: device_attribute(attr, device)  # noqa: E731
    return DeviceProperties(
        ordinal=device, name=buf.value.decode(errors="replace"),
        sm_count=a(ATTR_MULTIPROCESSOR_COUNT),
        compute_capability=(a(ATTR_CC_MAJOR), a(ATTR_CC_MINOR)),
        max_shared_per_block=a(ATTR_MAX_SHARED_PER_BLOCK),
        max_shared_per_block_optin=a(ATTR_MAX_SHARED_PER_BLOCK_OPTIN),
        max_shared_per_sm=a(ATTR_MAX_SHARED_PER_SM), l2_cache_bytes=a(ATTR_L2_CACHE_SIZE),
        total_memory=total.value, driver_version=driver_version())
