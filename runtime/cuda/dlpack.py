"""DLPack structs in ctypes: make capsules for our buffers and read capsules of others.

Producer: the DLManagedTensor (and its shape/strides arrays and the owning Python object) live in
`_LIVE` until the consumer calls the deleter, or until the capsule dies unconsumed (its
destructor then calls the deleter). Consumer: reading a capsule renames it `used_dltensor`
(spec) and hands back an `Imported` whose `release()` calls the producer's deleter once.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import (CFUNCTYPE, POINTER, Structure, c_int, c_int32, c_int64, c_uint8, c_uint16, c_uint32,
                    c_uint64, c_void_p)
from dataclasses import dataclass
from typing import Any, Sequence

KDLCPU, KDLCUDA, KDLCUDA_HOST = 1, 2, 3
DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                10: "rocm", 13: "cuda_managed", 14: "oneapi"}
FLAG_READ_ONLY = 1

# dtype name -> (DLDataTypeCode, bits, numpy dtype holding the raw values)
DTYPES: dict[str, tuple[int, int, str]] = {
    "float32": (2, 32, "float32"), "float16": (2, 16, "float16"), "float64": (2, 64, "float64"),
    "bfloat16": (4, 16, "uint16"), "float8_e4m3fn": (10, 8, "uint8"),
    "float8_e5m2": (12, 8, "uint8"), "bool": (6, 8, "bool"),
    "int8": (0, 8, "int8"), "int16": (0, 16, "int16"), "int32": (0, 32, "int32"),
    "int64": (0, 64, "int64"), "uint8": (1, 8, "uint8"), "uint16": (1, 16, "uint16"),
    "uint32": (1, 32, "uint32"), "uint64": (1, 64, "uint64"),
}
_BY_CODE = {(c, b): n for n, (c, b, _) in DTYPES.items()}


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [("data", c_void_p), ("device", DLDevice), ("ndim", c_int32),
                ("dtype", DLDataType), ("shape", POINTER(c_int64)),
                ("strides", POINTER(c_int64)), ("byte_offset", c_uint64)]


# The deleter slot is a plain address so foreign deleters can be read and called alike.
class DLManagedTensor(Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", c_void_p)]


class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", c_void_p), ("deleter", c_void_p),
                ("flags", c_uint64), ("dl_tensor", DLTensor)]


_DELETER_T = CFUNCTYPE(None, c_void_p)
_DESTRUCTOR_T = CFUNCTYPE(None, c_void_p)

# Capsule names must outlive every capsule: keep them in static buffers.
_NAMES = {k: ctypes.create_string_buffer(k) for k in
          (b"dltensor", b"used_dltensor", b"dltensor_versioned", b"used_dltensor_versioned")}

_api = ctypes.pythonapi
_api.PyCapsule_New.restype, _api.PyCapsule_New.argtypes = ctypes.py_object, [c_void_p, c_void_p, c_void_p]
_api.PyCapsule_IsValid.restype, _api.PyCapsule_IsValid.argtypes = c_int, [c_void_p, c_void_p]
_api.PyCapsule_GetPointer.restype, _api.PyCapsule_GetPointer.argtypes = c_void_p, [c_void_p, c_void_p]
_api.PyCapsule_SetName.restype, _api.PyCapsule_SetName.argtypes = c_int, [ctypes.py_object, c_void_p]

_LIVE: dict[int, tuple[Any, ...]] = {}
_live_lock = threading.Lock()


def _our_deleter(addr: int | None) -> None:
    with _live_lock:
        _LIVE.pop(addr or 0, None)


_DELETER = _DELETER_T(_our_deleter)
_DELETER_ADDR = ctypes.cast(_DELETER, c_void_p).value


def _call_deleter(deleter: int | None, managed_addr: int) -> None:
    if not deleter:
        return
    if deleter == _DELETER_ADDR:
        _our_deleter(managed_addr)
    else:
        _DELETER_T(deleter)(managed_addr)


def _capsule_destructor(cap: int | None) -> None:
    # Called with the dying capsule's address; only unconsumed capsules still own the tensor.
    for name, offset in ((b"dltensor", DLManagedTensor.deleter.offset),
                         (b"dltensor_versioned", DLManagedTensorVersioned.deleter.offset)):
        n = ctypes.addressof(_NAMES[name])
        if _api.PyCapsule_IsValid(cap, n):
            p = _api.PyCapsule_GetPointer(cap, n)
            if p:
                _call_deleter(c_void_p.from_address(p + offset).value, p)
            return


_DESTRUCTOR = _DESTRUCTOR_T(_capsule_destructor)


def live_count() -> int:
    """Number of exported tensors whose deleter has not run yet (for tests and leak checks)."""
    with _live_lock:
        return len(_LIVE)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides in elements."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(strides))


def make_capsule(ptr: int, shape: Sequence[int], dtype: str, device_type: int, device_id: int,
                 owner: Any, versioned: bool = False, read_only: bool = False) -> Any:
    """A `dltensor` (or `dltensor_versioned`) capsule viewing `ptr`; `owner` lives until the deleter."""
    if dtype not in DTYPES:
        raise ValueError(f"no DLPack type for dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    code, bits, _ = DTYPES[dtype]
    ndim = len(shape)
    shape_arr = (c_int64 * max(ndim, 1))(*[int(d) for d in shape])
    strides_arr = (c_int64 * max(ndim, 1))(*contiguous_strides(shape))
    if versioned:
        m = DLManagedTensorVersioned()
        m.version.major, m.version.minor = 1, 0
        m.flags = FLAG_READ_ONLY if read_only else 0
    else:
        m = DLManagedTensor()
    t = m.dl_tensor
    t.data = ptr or None
    t.device.device_type, t.device.device_id = device_type, device_id
    t.ndim = ndim
    t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
    t.shape = ctypes.cast(shape_arr, POINTER(c_int64))
    t.strides = ctypes.cast(strides_arr, POINTER(c_int64))
    t.byte_offset = 0
    m.manager_ctx = None
    m.deleter = _DELETER_ADDR
    addr = ctypes.addressof(m)
    with _live_lock:
        _LIVE[addr] = (m, shape_arr, strides_arr, owner)
    name = b"dltensor_versioned" if versioned else b"dltensor"
    try:
        return _api.PyCapsule_New(addr, ctypes.addressof(_NAMES[name]),
                                  ctypes.cast(_DESTRUCTOR, c_void_p))
    except BaseException:
        _our_deleter(addr)
        raise


@dataclass
class Imported:
    """A consumed DLPack tensor: where its data is and how to give it back."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None
    dtype: str
    device_type: int
    device_id: int
    read_only: bool
    _managed: int
    _deleter: int | None
    _released: bool = False

    def is_contiguous(self) -> bool:
        if self.strides is None:
            return True
        return all(st == want for st, want, d in
                   zip(self.strides, contiguous_strides(self.shape), self.shape) if d > 1)

    def release(self) -> None:
        """Call the producer's deleter (once)."""
        if not self._released:
            self._released = True
            _call_deleter(self._deleter, self._managed)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def read_capsule(capsule: Any) -> Imported:
    """Consume an unconsumed DLPack capsule (legacy or versioned) and describe its tensor."""
    cap = ctypes.c_void_p(id(capsule))
    if _api.PyCapsule_IsValid(cap, ctypes.addressof(_NAMES[b"dltensor_versioned"])):
        name, used, cls = b"dltensor_versioned", b"used_dltensor_versioned", DLManagedTensorVersioned
    elif _api.PyCapsule_IsValid(cap, ctypes.addressof(_NAMES[b"dltensor"])):
        name, used, cls = b"dltensor", b"used_dltensor", DLManagedTensor
    else:
        raise ValueError("expected an unconsumed DLPack capsule named 'dltensor' or "
                         f"'dltensor_versioned', got {capsule!r}")
    addr = _api.PyCapsule_GetPointer(cap, ctypes.addressof(_NAMES[name]))
    m = cls.from_address(addr)
    if cls is DLManagedTensorVersioned and m.version.major != 1:
        raise ValueError(f"unsupported DLPack major version {m.version.major} (this reads 1.x)")
    t = m.dl_tensor
    key = (int(t.dtype.code), int(t.dtype.bits))
    if key not in _BY_CODE or t.dtype.lanes != 1:
        raise ValueError(f"unsupported DLPack dtype code={key[0]} bits={key[1]} "
                         f"lanes={t.dtype.lanes}")
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = tuple(int(t.strides[i]) for i in range(t.ndim)) if t.strides else None
    read_only = bool(getattr(m, "flags", 0) & FLAG_READ_ONLY)
    info = Imported(ptr=(t.data or 0) + int(t.byte_offset), shape=shape, strides=strides,
                    dtype=_BY_CODE[key], device_type=int(t.device.device_type),
                    device_id=int(t.device.device_id), read_only=read_only, _managed=addr,
                    _deleter=m.deleter)
    if _api.PyCapsule_SetName(capsule, ctypes.addressof(_NAMES[used])) != 0:
        info._released = True
        raise RuntimeError("could not mark the DLPack capsule as consumed")
    return info
