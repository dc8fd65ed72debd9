"""Device buffers: allocation, copies to/from numpy and between buffers, memset, DLPack in and out."""

from __future__ import annotations

import ctypes
import math
import weakref
from ctypes import c_void_p
from typing import Any, Sequence

import numpy as np

from graphir.runtime.cuda import dlpack, driver
from graphir.runtime.cuda.stream import stream_handle

DType = Any  # a dtype name ("bfloat16"), a numpy dtype, or an object with `.name` (graphir DType)


def dtype_name(dtype: DType) -> str:
    """Canonical dtype name used by buffers ('float32', 'bfloat16', 'float8_e4m3fn', ...)."""
    name = getattr(dtype, "name", None) if not isinstance(dtype, (str, np.dtype, type)) else None
    if name is None:
        try:
            name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in dlpack.DTYPES:
        raise ValueError(f"unsupported buffer dtype {dtype!r}; expected one of {sorted(dlpack.DTYPES)}")
    return name


def itemsize(dtype: DType) -> int:
    """Bytes per element."""
    return dlpack.DTYPES[dtype_name(dtype)][1] // 8


def numpy_dtype(dtype: DType) -> np.dtype:
    """numpy dtype holding the raw values (bfloat16 -> uint16 bits, float8 -> uint8 bits)."""
    return np.dtype(dlpack.DTYPES[dtype_name(dtype)][2])


def _finish_legacy_stream() -> None:
    # Plain cuMemcpyHtoD/DtoD/cuMemset* may return before the data lands (pageable staging,
    # device-side work); wait so that "no stream" means done, also for non-blocking streams.
    driver.call("cuStreamSynchronize", c_void_p(0))


def _free_device(ptr: int) -> None:
    driver.release("cuMemFree_v2", ptr)


class DeviceBuffer:
    """Linear device memory with a shape and dtype; owning (allocated here) or a view.

    Example:
        >>> a = DeviceBuffer.from_numpy(np.arange(8, dtype=np.float32))   # doctest: +SKIP
        >>> a.to_numpy()                                                   # doctest: +SKIP
    """

    def __init__(self, ptr: int, shape: Sequence[int], dtype: DType, device: int = 0, *,
                 base: Any = None, nbytes: int | None = None):
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in buffer shape {self.shape}")
        self.dtype = dtype_name(dtype)
        self.device = int(device)
        self.nbytes = math.prod(self.shape) * itemsize(self.dtype) if nbytes is None else int(nbytes)
        self.base = base  # what keeps the memory alive for views (a buffer or a DLPack import)
        # The stream whose queued work writes this memory, when known (executor outputs):
        # a DLPack export then orders the consumer after it instead of syncing the device.
        self.stream: int | None = getattr(base, "stream", None)
        self._finalizer: weakref.finalize | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, shape: Sequence[int] | int, dtype: DType = "uint8", device: int = 0) -> "DeviceBuffer":
        """Allocate uninitialized device memory (cuMemAlloc_v2)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * itemsize(dtype)
        driver.ensure_context(device)
        p = driver.CUdeviceptr()
        driver.call("cuMemAlloc_v2", ctypes.byref(p), max(nbytes, 1),
                    context=f"{nbytes} bytes for shape {shape} {dtype_name(dtype)}")
        buf = cls(p.value, shape, dtype, device)
        buf._finalizer = weakref.finalize(buf, _free_device, p.value)
        return buf

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: DType | None = None, device: int = 0,
                   stream: Any = None) -> "DeviceBuffer":
        """Allocate and copy `array` in; `dtype` overrides (e.g. 'bfloat16' for uint16 bits)."""
        array = np.asarray(array)
        buf = cls.empty(array.shape, dtype if dtype is not None else array.dtype, device)
        buf.copy_from_numpy(array, stream=stream)
        return buf

    @classmethod
    def from_pointer(cls, ptr: int, shape: Sequence[int], dtype: DType, device: int = 0,
                     owner: Any = None) -> "DeviceBuffer":
        """A non-owning view of device memory at `ptr`; `owner` is kept alive with it."""
        return cls(ptr, shape, dtype, device, base=owner)

    # ---- views ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def owns_memory(self) -> bool:
        return self._finalizer is not None

    def view(self, shape: Sequence[int] | None = None, dtype: DType | None = None,
             offset_bytes: int = 0) -> "DeviceBuffer":
        """A non-owning view (new shape/dtype/byte offset) that keeps this buffer alive."""
        dtype = self.dtype if dtype is None else dtype_name(dtype)
        if shape is None:
            rest = self.nbytes - offset_bytes
            if rest % itemsize(dtype):
                raise ValueError(f"{rest} bytes are not a whole number of {dtype} elements")
            shape = (rest // itemsize(dtype),)
        shape = tuple(int(d) for d in shape)
        need = math.prod(shape) * itemsize(dtype)
        if offset_bytes < 0 or offset_bytes + need > self.nbytes:
            raise ValueError(f"view of {need} bytes at offset {offset_bytes} exceeds the buffer's "
                             f"{self.nbytes} bytes")
        if offset_bytes % itemsize(dtype):
            raise ValueError(f"offset {offset_bytes} is not aligned to {dtype} ({itemsize(dtype)} B)")
        return DeviceBuffer(self.ptr + offset_bytes, shape, dtype, self.device, base=self)

    def alias(self) -> "DeviceBuffer":
        """A new object viewing the same memory, shape and dtype (no checks: cheap enough to
        hand out per call); it keeps this buffer alive."""
        out = DeviceBuffer.__new__(DeviceBuffer)
        out.__dict__.update(self.__dict__)
        out.base, out._finalizer = self, None
        return out

    def free(self) -> None:
        """Free now (owning buffers); later use of the pointer is the caller's bug."""
        if self._finalizer is not None:
            self._finalizer()
        self.ptr, self.nbytes, self.base = 0, 0, None

    # ---- copies ---------------------------------------------------------------------------
    def _check_host(self, array: np.ndarray) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"expected a numpy array, got {type(array).__name__}")
        if array.nbytes != self.nbytes:
            raise ValueError(f"host array has {array.nbytes} bytes ({array.shape} {array.dtype}); "
                             f"buffer has {self.nbytes} ({self.shape} {self.dtype})")
        if not array.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous (use np.ascontiguousarray)")
        return array

    def copy_from_numpy(self, array: np.ndarray, stream: Any = None) -> None:
        """Host -> device. Without `stream` it is complete on return; with one, asynchronous
        (keep `array` alive until the stream passes this point)."""
        array = self._check_host(np.asarray(array))
        if self.nbytes == 0:
            return
        driver.ensure_context(self.device)
        if stream is None:
            driver.call("cuMemcpyHtoD_v2", self.ptr, array.ctypes.data, self.nbytes)
            _finish_legacy_stream()
        else:
            driver.call("cuMemcpyHtoDAsync_v2", self.ptr, array.ctypes.data, self.nbytes,
                        c_void_p(stream_handle(stream)))

    def copy_to_numpy(self, out: np.ndarray, stream: Any = None) -> np.ndarray:
        """Device -> host into `out`. With `stream`, asynchronous: sync the stream before reading."""
        out = self._check_host(out)
        if not out.flags.writeable:
            raise ValueError("output array is read-only")
        if self.nbytes:
            driver.ensure_context(self.device)
            if stream is None:
                driver.call("cuMemcpyDtoH_v2", out.ctypes.data, self.ptr, self.nbytes)
            else:
                driver.call("cuMemcpyDtoHAsync_v2", out.ctypes.data, self.ptr, self.nbytes,
                            c_void_p(stream_handle(stream)))
        return out

    def to_numpy(self) -> np.ndarray:
        """Synchronous copy to a new host array (bfloat16/float8 come back as raw uint bits)."""
        return self.copy_to_numpy(np.empty(self.shape, numpy_dtype(self.dtype)))

    def copy_from(self, src: "DeviceBuffer", stream: Any = None) -> None:
        """Device -> device copy of `src` (same byte size); complete on return without `stream`."""
        if src.nbytes != self.nbytes:
            raise ValueError(f"copy_from: source has {src.nbytes} bytes, destination {self.nbytes}")
        if self.nbytes == 0:
            return
        driver.ensure_context(self.device)
        if stream is None:
            driver.call("cuMemcpyDtoD_v2", self.ptr, src.ptr, self.nbytes)
            _finish_legacy_stream()
        else:
            driver.call("cuMemcpyDtoDAsync_v2", self.ptr, src.ptr, self.nbytes,
                        c_void_p(stream_handle(stream)))

    def memset(self, byte: int = 0, stream: Any = None) -> None:
        """Set every byte to `byte` (0..255); complete on return without `stream`."""
        if not 0 <= int(byte) <= 255:
            raise ValueError(f"memset byte value must be in [0, 255], got {byte}")
        if self.nbytes == 0:
            return
        driver.ensure_context(self.device)
        if stream is None:
            driver.call("cuMemsetD8_v2", self.ptr, int(byte), self.nbytes)
            _finish_legacy_stream()
        else:
            driver.call("cuMemsetD8Async", self.ptr, int(byte), self.nbytes,
                        c_void_p(stream_handle(stream)))

    def fill_u32(self, word: int, stream: Any = None) -> None:
        """Set every 32-bit word to `word` (e.g. a float32 bit pattern such as NaN poison)."""
        if self.nbytes % 4 or self.ptr % 4:
            raise ValueError(f"fill_u32 needs a 4-byte aligned size and pointer (have {self.nbytes} B)")
        if not 0 <= int(word) < 2 ** 32:
            raise ValueError(f"fill_u32 word must fit in 32 bits, got {word}")
        if self.nbytes == 0:
            return
        driver.ensure_context(self.device)
        if stream is None:
            driver.call("cuMemsetD32_v2", self.ptr, int(word), self.nbytes // 4)
            _finish_legacy_stream()
        else:
            driver.call("cuMemsetD32Async", self.ptr, int(word), self.nbytes // 4,
                        c_void_p(stream_handle(stream)))

    # ---- DLPack ---------------------------------------------------------------------------
    def __dlpack_device__(self) -> tuple[int, int]:
        return (dlpack.KDLCUDA, self.device)

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: tuple[int, int] | None = None, copy: bool | None = None) -> Any:
        """Export a zero-copy DLPack capsule; the buffer stays alive until the consumer is done.

        Unless `stream == -1`, the consumer's `stream` is ordered after this buffer's writer:
        an event wait when the writer's stream is known (`self.stream`, set on executor
        outputs), else all work of this process's context is waited for first.
        """
        if copy:
            raise BufferError("DeviceBuffer.__dlpack__: copy=True is not supported")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"DeviceBuffer.__dlpack__: cannot export to device {tuple(dl_device)}; "
                              f"the buffer is on {self.__dlpack_device__()}")
        if stream != -1 and driver.is_initialized():
            self._order_before(stream)
        versioned = max_version is not None and int(max_version[0]) >= 1
        return dlpack.make_capsule(self.ptr, self.shape, self.dtype, dlpack.KDLCUDA, self.device,
                                   owner=self, versioned=versioned)

    def _order_before(self, stream: Any) -> None:
        # DLPack stream codes: None / 1 the legacy default stream, 2 per-thread default.
        consumer = 0 if stream in (None, 1) else int(stream)
        if self.stream is None or consumer == 2:
            driver.synchronize(self.device)
        elif consumer != self.stream:
            from graphir.runtime.cuda.stream import Event

            driver.ensure_context(self.device)
            ev = Event(timing=False, device=self.device).record(self.stream)
            driver.call("cuStreamWaitEvent", c_void_p(consumer), c_void_p(ev.handle), 0)

    def __repr__(self) -> str:
        kind = "owning" if self.owns_memory else "view"
        return (f"DeviceBuffer(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}, {kind})")


def from_dlpack(obj: Any, stream: Any = None) -> DeviceBuffer:
    """Zero-copy view of a CUDA tensor exported through DLPack (e.g. a torch CUDA tensor).

    `stream` is where the view will be used; the producer orders its pending work before it
    (-1: no ordering, the caller did it). The view keeps the producer's tensor alive and must be C-contiguous.
    """
    if hasattr(obj, "__dlpack__"):
        dev_type, dev_id = (int(v) for v in obj.__dlpack_device__())
        if dev_type != dlpack.KDLCUDA:
            raise ValueError(f"from_dlpack: expected a CUDA tensor (DLPack device type "
                             f"{dlpack.KDLCUDA}), got device type {dev_type} "
                             f"({dlpack.DEVICE_NAMES.get(dev_type, 'unknown')})")
        # -1: the caller has ordered the producer already (no handshake).
        h = -1 if stream == -1 else stream_handle(stream)
        try:
            capsule = obj.__dlpack__(stream=1 if h == 0 else h)  # 1: the legacy default stream
        except TypeError:
            capsule = obj.__dlpack__()
    else:
        capsule = obj
    info = dlpack.read_capsule(capsule)
    if info.device_type != dlpack.KDLCUDA:
        info.release()
        raise ValueError(f"from_dlpack: capsule is on device type {info.device_type} "
                         f"({dlpack.DEVICE_NAMES.get(info.device_type, 'unknown')}), not CUDA")
    if not info.is_contiguous():
        info.release()
        raise ValueError(f"from_dlpack: tensor with shape {info.shape} and strides {info.strides} "
                         "is not C-contiguous; make it contiguous first")
    return DeviceBuffer(info.ptr, info.shape, info.dtype, info.device_id, base=info)


def view_of_torch(obj: Any) -> DeviceBuffer | None:
    """A view of a contiguous torch CUDA tensor read off its attributes, or None for anything
    else. No DLPack round trip and no stream handshake: for callers that already ordered the
    tensor's producer before their own work (the executor on the caller's stream).
    A tensor that requires grad is read like any other (as a custom kernel would; autograd
    does not see the call), the same as the executor's fast path does."""
    if not type(obj).__module__.startswith("torch") or not getattr(obj, "is_cuda", False):
        return None
    name = str(obj.dtype).removeprefix("torch.")
    if name not in dlpack.DTYPES or not obj.is_contiguous():
        return None
    return DeviceBuffer(obj.data_ptr(), tuple(obj.shape), name, obj.device.index, base=obj)


def pinned_empty(shape: Sequence[int] | int, dtype: DType = "uint8", device: int = 0) -> np.ndarray:
    """A page-locked host array (cuMemAllocHost_v2): real async copies, capturable in graphs."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * itemsize(dtype)
    driver.ensure_context(device)
    p = c_void_p()
    driver.call("cuMemAllocHost_v2", ctypes.byref(p), max(nbytes, 1))
    raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(p.value)
    weakref.finalize(raw, _free_host, p.value)
    return np.frombuffer(raw, np.uint8)[:nbytes].view(numpy_dtype(dtype)).reshape(shape)


def _free_host(ptr: int) -> None:
    driver.release("cuMemFreeHost", c_void_p(ptr))
