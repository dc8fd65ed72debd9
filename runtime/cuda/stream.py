"""Streams, events and CUDA graphs captured from a stream."""

from __future__ import annotations

import ctypes
import weakref
from contextlib import contextmanager
from ctypes import c_float, c_int, c_void_p
from typing import Any, Iterator

from graphir.runtime.cuda import driver

CU_STREAM_NON_BLOCKING = 1
CU_EVENT_BLOCKING_SYNC = 1
CU_EVENT_DISABLE_TIMING = 2
CUDA_ERROR_NOT_READY = 600
CAPTURE_MODES = {"global": 0, "thread_local": 1, "relaxed": 2}
_CAPTURE_STATUS = {0: "none", 1: "active", 2: "invalidated"}


def _destroy_quietly(fn_name: str, handle: int) -> None:
    # Finalizers can run at interpreter exit after the driver deinitialized (nothing to do
    # then) or in the middle of a capture (deferred): driver.release.
    driver.release(fn_name, c_void_p(handle))


class Stream:
    """A CUDA stream of the current device's primary context.

    Example:
        >>> s = Stream()                       # doctest: +SKIP
        >>> buf.copy_from_numpy(x, stream=s)   # doctest: +SKIP
        >>> s.synchronize()                    # doctest: +SKIP
    """

    def __init__(self, non_blocking: bool = True, device: int = 0, *, _handle: int | None = None):
        self.device = device
        if _handle is not None:
            self.handle = _handle
            return
        driver.ensure_context(device)
        h = c_void_p()
        driver.call("cuStreamCreate", ctypes.byref(h),
                    CU_STREAM_NON_BLOCKING if non_blocking else 0)
        self.handle = h.value or 0
        self._finalizer = weakref.finalize(self, _destroy_quietly, "cuStreamDestroy_v2",
                                           self.handle)

    @classmethod
    def null(cls, device: int = 0) -> "Stream":
        """The legacy default stream (handle 0); it cannot be captured into a graph."""
        return cls(device=device, _handle=0)

    def synchronize(self) -> None:
        """Block until all work queued on the stream is done."""
        driver.ensure_context(self.device)
        driver.call("cuStreamSynchronize", c_void_p(self.handle))

    def query(self) -> bool:
        """True when all queued work is done (never blocks)."""
        driver.ensure_context(self.device)
        rc = driver._funcs["cuStreamQuery"](c_void_p(self.handle))
        if rc == CUDA_ERROR_NOT_READY:
            return False
        driver.check("cuStreamQuery", rc)
        return True

    def wait_event(self, event: "Event") -> None:
        """Make later work on this stream wait for `event` (no host blocking)."""
        driver.call("cuStreamWaitEvent", c_void_p(self.handle), c_void_p(event.handle), 0)

    def record_event(self, timing: bool = True) -> "Event":
        """A new event recorded on this stream."""
        ev = Event(timing=timing, device=self.device)
        ev.record(self)
        return ev

    def capture_status(self) -> str:
        """'none', 'active' or 'invalidated' (cuStreamIsCapturing)."""
        st = c_int()
        driver.call("cuStreamIsCapturing", c_void_p(self.handle), ctypes.byref(st))
        return _CAPTURE_STATUS.get(st.value, str(st.value))

    def __int__(self) -> int:
        return self.handle

    def __repr__(self) -> str:
        return f"Stream(handle=0x{self.handle:x}, device={self.device})"


def stream_handle(stream: Any) -> int:
    """CUstream handle of a `Stream`, an int handle, or None (the legacy default stream, 0)."""
    if stream is None:
        return 0
    if isinstance(stream, Stream):
        return stream.handle
    if isinstance(stream, int) and not isinstance(stream, bool) and stream >= 0:
        return stream
    raise TypeError(f"expected a runtime.cuda.Stream, a CUstream int handle or None, "
                    f"got {type(stream).__name__}")


class Event:
    """A CUDA event; with timing=True, `start.elapsed_time(end)` gives milliseconds."""

    def __init__(self, timing: bool = True, blocking: bool = False, device: int = 0):
        driver.ensure_context(device)
        flags = (0 if timing else CU_EVENT_DISABLE_TIMING) | (CU_EVENT_BLOCKING_SYNC if blocking else 0)
        h = c_void_p()
        driver.call("cuEventCreate", ctypes.byref(h), flags)
        self.handle, self.timing, self.device = h.value or 0, timing, device
        self._finalizer = weakref.finalize(self, _destroy_quietly, "cuEventDestroy_v2", self.handle)

    def record(self, stream: Any = None) -> "Event":
        """Record on `stream` (default: the legacy default stream); returns self."""
        driver.call("cuEventRecord", c_void_p(self.handle), c_void_p(stream_handle(stream)))
        return self

    def synchronize(self) -> None:
        """Block until the recorded work is done."""
        driver.call("cuEventSynchronize", c_void_p(self.handle))

    def query(self) -> bool:
        """True when the recorded work is done (never blocks)."""
        rc = driver._funcs["cuEventQuery"](c_void_p(self.handle))
        if rc == CUDA_ERROR_NOT_READY:
            return False
        driver.check("cuEventQuery", rc)
        return True

    def elapsed_time(self, end: "Event") -> float:
        """Milliseconds from this event to `end`; waits for `end` to complete first."""
        if not (self.timing and end.timing):
            raise ValueError("elapsed_time needs two events created with timing=True")
        end.synchronize()
        ms = c_float()
        driver.call("cuEventElapsedTime_v2", ctypes.byref(ms), c_void_p(self.handle),
                    c_void_p(end.handle))
        return float(ms.value)


class CudaGraph:
    """Work captured from a stream once, replayed with one launch.

    Kernel arguments (pointers, scalars) are frozen at capture: replays read and write the same
    buffers, so refresh inputs by copying into them. Buffers used by the captured work must outlive
    the graph; `keep(...)` holds references for that. Warm up (first launches allocate Triton
    scratch) before capturing: allocation is not allowed while a stream captures.

    Example:
        >>> g = CudaGraph()                              # doctest: +SKIP
        >>> with g.capture(stream):                      # doctest: +SKIP
        ...     kernel.launch(grid, a, b, c, n, stream=stream)
        >>> g.replay(stream); stream.synchronize()       # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._exec: int | None = None
        self._graph: int | None = None
        self._keep: list[Any] = []
        self._finalizer: weakref.finalize | None = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    def keep(self, *objs: Any) -> None:
        """Hold references to buffers the captured work uses."""
        self._keep.extend(objs)

    @contextmanager
    def capture(self, stream: Stream, mode: str = "thread_local") -> Iterator["CudaGraph"]:
        """Capture the work queued on `stream` inside the block, then instantiate it."""
        if self._exec is not None:
            raise ValueError("this CudaGraph was already captured; make a new one")
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture mode {mode!r}; expected one of {sorted(CAPTURE_MODES)}")
        h = stream_handle(stream)
        if h == 0:
            raise ValueError("CUDA graph capture needs a created Stream, not the legacy default "
                             "stream (handle 0)")
        driver.ensure_context(getattr(stream, "device", 0))
        graph = c_void_p()
        # Frees by finalizers meanwhile (the garbage collector's) wait for the capture's end.
        with driver.capturing():
            driver.call("cuStreamBeginCapture_v2", c_void_p(h), CAPTURE_MODES[mode])
            try:
                yield self
            except BaseException:
                # End the capture so the stream is usable again; the partial graph is
                # discarded.
                if driver._funcs["cuStreamEndCapture"](c_void_p(h), ctypes.byref(graph)) == 0 \
                        and graph.value:
                    driver._funcs["cuGraphDestroy"](graph)
                raise
            driver.call("cuStreamEndCapture", c_void_p(h), ctypes.byref(graph),
                        context="the captured work used an operation not allowed during "
                                "capture (e.g. a synchronous copy, an allocation or a sync) or "
                                "another thread broke the capture")
        exe = c_void_p()
        try:
            driver.call("cuGraphInstantiateWithFlags", ctypes.byref(exe), graph, 0)
        except driver.CudaError:
            driver._funcs["cuGraphDestroy"](graph)
            raise
        self._graph, self._exec = graph.value, exe.value
        self._finalizer = weakref.finalize(self, _destroy_graph, self._exec, self._graph)

    def replay(self, stream: Any = None) -> None:
        """Launch the captured work on `stream` (asynchronous)."""
        if self._exec is None:
            raise ValueError("CudaGraph.replay before a successful capture")
        driver.call("cuGraphLaunch", c_void_p(self._exec), c_void_p(stream_handle(stream)))

    def destroy(self) -> None:
        """Free the graph now."""
        if self._finalizer is not None:
            self._finalizer()
        self._exec = self._graph = None
        self._keep.clear()


def _destroy_graph(exe: int, graph: int) -> None:
    _destroy_quietly("cuGraphExecDestroy", exe)
    _destroy_quietly("cuGraphDestroy", graph)
