"""Pinned host staging for the per-call inputs: a small ring of page-locked buffers.

A call writes all its host inputs into one slot and issues one asynchronous host-to-device
copy from it. The copy reads the slot when the stream gets there, so a slot is rewritten only
after an event recorded behind its copy has completed; with a few slots a serving loop that
runs ahead of the GPU rarely waits. Each slot also holds whatever the call needs alive until
the stream has passed it (imported device tensors), released when the slot is reused.
"""
from __future__ import annotations

import ctypes

import numpy as np

from graphir.runtime.cuda import driver
from graphir.runtime.cuda.driver import CUdeviceptr
from graphir.runtime.cuda.memory import pinned_empty
from graphir.runtime.cuda.stream import CUDA_ERROR_NOT_READY, Event

MIN_SLOT_BYTES = 4096


class _Slot:
    __slots__ = ("array", "view", "nbytes", "address", "event", "handle", "pending", "keep",
                 "device_address")

    def __init__(self, nbytes: int, device: int):
        size = max(MIN_SLOT_BYTES, 1 << max(nbytes - 1, 0).bit_length())
        self.array = pinned_empty(size, "uint8", device)
        self.view = memoryview(self.array)  # slice assignment from bytes: no numpy call
        self.nbytes = size
        self.address = self.array.ctypes.data
        self.event = Event(timing=False, device=device)
        self.handle = self.event.handle
        self.pending, self.keep = False, None
        self.device_address = None  # asked for when a kernel first reads the slot


class PinnedRing:
    """Round-robin page-locked staging slots; see the module docstring.

    Example:
        >>> ring = PinnedRing(device=0)                       # doctest: +SKIP
        >>> img = ring.acquire(nbytes)                        # doctest: +SKIP
        >>> img[:] = data; ring.copy_to(dst_ptr, nbytes, stream_handle)   # doctest: +SKIP
        >>> ring.commit(stream_handle, keep=inputs)          # doctest: +SKIP
    """

    def __init__(self, device: int = 0, depth: int = 3):
        if depth < 1:
            raise ValueError(f"PinnedRing depth must be >= 1, got {depth}")
        self.device, self.depth = device, depth
        self._slots: list[_Slot | None] = [None] * depth
        self._i = 0
        self.waits = 0  # how often a slot was still in flight (the host ran far ahead)
        # Bound once: these run on every call.
        self._query = driver.function("cuEventQuery")
        self._record = driver.function("cuEventRecord")
        self._copy = driver.function("cuMemcpyHtoDAsync_v2")

    def _acquire(self, nbytes: int) -> _Slot:
        slot = self._slots[self._i]
        if slot is not None:
            if slot.pending:
                rc = self._query(slot.handle)
                if rc:
                    if rc != CUDA_ERROR_NOT_READY:
                        driver.check("cuEventQuery", rc, "staging slot")
                    self.waits += 1
                    slot.event.synchronize()
                slot.pending, slot.keep = False, None
            if slot.nbytes >= nbytes:
                return slot
        slot = self._slots[self._i] = _Slot(nbytes, self.device)
        return slot

    def acquire(self, nbytes: int) -> np.ndarray:
        """The current slot (at least `nbytes` bytes, free to overwrite). The same array object
        comes back each time a slot is reused, so callers may cache views of it."""
        return self._acquire(nbytes).array

    def acquire_view(self, nbytes: int) -> memoryview:
        """`acquire` as a byte memoryview: `view[a:b] = some_bytes` fills it."""
        slot = self._slots[self._i]
        if slot is not None and not slot.pending and slot.nbytes >= nbytes:
            return slot.view  # known free (commit asked), large enough: the usual case
        return self._acquire(nbytes).view

    def copy_to(self, dst_ptr: int, nbytes: int, stream: int) -> None:
        """Queue the copy of the acquired slot's first `nbytes` to device address `dst_ptr`."""
        if nbytes:
            rc = self._copy(dst_ptr, self._slots[self._i].address, nbytes, stream)
            if rc:
                driver.check("cuMemcpyHtoDAsync_v2", rc, f"{nbytes} staged bytes")

    def device_address(self) -> tuple[int, int]:
        """(address, size) of the acquired slot in the device's address space, where a
        kernel reads it (pinned memory is mapped there under unified addressing;
        kernels/upload.py); address 0 where the driver maps it nowhere."""
        slot = self._slots[self._i]
        if slot.device_address is None:
            p = CUdeviceptr()
            rc = driver.function("cuMemHostGetDevicePointer_v2")(
                ctypes.byref(p), ctypes.c_void_p(slot.address), 0)
            slot.device_address = 0 if rc else p.value
        return slot.device_address, slot.nbytes

    def commit(self, stream: int, keep=None) -> None:
        """Mark the slot in use until `stream` passes this point (call it after the call's
        last work is queued) and move to the next one; `keep` is held until then."""
        slot = self._slots[self._i]
        if slot is None:
            return
        rc = self._record(slot.handle, stream)
        if rc:
            driver.check("cuEventRecord", rc, "staging slot")
        slot.pending, slot.keep = True, keep
        self._i = (self._i + 1) % len(self._slots)
        # Ask now whether the next slot is free: this call's work is queued, so the query
        # costs nothing on the path to the next call's launch (only a slot still in flight
        # is asked again there).
        nxt = self._slots[self._i]
        if nxt is not None and nxt.pending and nxt is not slot:
            rc = self._query(nxt.handle)
            if not rc:
                nxt.pending, nxt.keep = False, None
            elif rc != CUDA_ERROR_NOT_READY:
                driver.check("cuEventQuery", rc, "staging slot")
