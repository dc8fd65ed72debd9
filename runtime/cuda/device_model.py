"""The libcuda side of the CUDA executor: device memory, cubin modules, launches, CUDA graphs,
and `load()` which builds a model from an artifact."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .executor import PlanExecutor


class CudaDevice:
    """PlanExecutor's device on libcuda: DeviceBuffers, cubin kernels, one stream, graphs.

    `stream=None` gives the executor a private stream; a device tensor passed to a call is then
    ordered after its producer's current stream, once per call: for torch tensors with an
    event recorded on torch's current stream and waited for on ours (what torch's DLPack
    stream handshake does, without the capsule), for other producers through DLPack's
    handshake. An external `stream` (an int
    CUstream handle, a runtime.cuda Stream or an object with `.cuda_stream`, such as
    `torch.cuda.current_stream()`) runs everything on the caller's stream instead: tensors made
    on it need no handshake and are imported from their attributes. Graphs are captured on a
    private stream and replayed on the run stream.
    """

    supports_graphs = True

    def __init__(self, kernels: Mapping[str, Any], device: int = 0, stream: Any = None):
        from graphir.runtime.cuda import Stream, driver
        from graphir.runtime.cuda.staging import PinnedRing
        from graphir.runtime.cuda.stream import stream_handle
        from graphir.runtime.cuda.upload_kernel import StagedUpload

        self.kernels, self.device = kernels, device
        driver.ensure_context(device)
        self.external_stream = stream is not None
        if stream is None:
            self.stream = Stream(device=device)
        else:
            h = getattr(stream, "cuda_stream", None)
            self.stream = Stream(device=device, _handle=int(h if h is not None
                                                             else stream_handle(stream)))
        self._cur = self.stream.handle      # where launches and copies go (capture switches it)
        self._ring = PinnedRing(device)
        self._upload_kernel = StagedUpload(kernels)
        self._capturing = False
        self._capture_stream = None
        self._ordered = False               # this call already did its DLPack handshake
        self._keep: list = []
        self._views: dict = {}
        self._imports: dict = {}
        self._dtod = driver.function("cuMemcpyDtoDAsync_v2")
        self._ctx = driver.ensure_context
        self._run_stream = self.stream.handle
        self._kinds: dict[type, int] = {}
        self._order_event = None

    # -- memory ------------------------------------------------------------------------------
    def alloc(self, nbytes: int):
        from graphir.runtime.cuda import DeviceBuffer

        return DeviceBuffer.empty(nbytes, "uint8", self.device)

    def nbytes(self, buf) -> int:
        return buf.nbytes

    def upload_new(self, bits: np.ndarray):
        buf = self.alloc(max(bits.nbytes, 1))
        self.upload(buf, bits)
        return buf

    def upload(self, buf, bits: np.ndarray) -> None:
        raw = np.ascontiguousarray(bits).reshape(-1).view(np.uint8)
        if raw.nbytes:
            # From pageable memory the copy returns once the bytes are staged; the array is
            # still kept until the next synchronize.
            self._keep.append(raw)
            buf.view((raw.nbytes,), "uint8").copy_from_numpy(raw, stream=self._cur)

    def download(self, buf, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        if nbytes:
            self.stream.synchronize()
            buf.view((nbytes,), "uint8").copy_to_numpy(out)
        return out

    def copy(self, dst, dst_off, src, src_off, nbytes) -> None:
        if nbytes:
            self._copy_raw(dst.ptr + dst_off, src.ptr + src_off, nbytes)

    def _copy_raw(self, dst: int, src: int, nbytes: int) -> None:
        self._ctx(self.device)  # several GPUs: each one's work under its own context
        rc = self._dtod(dst, src, nbytes, self._cur)
        if rc:
            from graphir.runtime.cuda import driver

            driver.check("cuMemcpyDtoDAsync_v2", rc, f"{nbytes} bytes")

    # -- per-call staging (see runtime/cuda/staging.py) --------------------------------------
    def begin_call(self) -> None:
        self._ctx(self.device)  # a serving thread may not be the loading one
        self._ordered = self.external_stream  # the caller's stream orders its tensors

    def staging(self, nbytes: int) -> np.ndarray:
        """Pinned bytes to fill with this call's host inputs."""
        return self._ring.acquire(nbytes)

    def staging_view(self, nbytes: int) -> memoryview:
        """`staging` as a byte memoryview (filled by slice assignment from bytes)."""
        return self._ring.acquire_view(nbytes)

    def upload_staged(self, buf, nbytes: int) -> None:
        """One async copy of the staged bytes to the start of `buf`; captured into a graph
        (a slot graph's first node), the artifact's upload kernel where it can run
        (runtime/cuda/upload_kernel.py): the next kernel then starts 0.3 us after it, not
        2.5-8 us after a copy node."""
        self._ctx(self.device)  # several GPUs: begin_call of another one ran since ours
        if self._capturing and self._upload_kernel.available():
            src, size = self._ring.device_address()
            if self._upload_kernel(src, size, buf.ptr, buf.nbytes, nbytes, self._cur):
                return
        self._ring.copy_to(buf.ptr, nbytes, self._cur)

    def stager(self, buf, nbytes: int):
        """The fast path's (view, upload) for `nbytes` staged bytes bound for `buf`:
        `view(nbytes)` is staging_view, `upload()` queues the copy on the run stream. Bound
        once per plan, with no context check: the fast path runs on one device, made current
        by begin_call."""
        from functools import partial

        ring = self._ring
        return ring.acquire_view, partial(ring.copy_to, buf.ptr, nbytes, self._run_stream)

    @property
    def staging_depth(self) -> int:
        return self._ring.depth

    def staging_slot(self) -> tuple:
        """(index, slot object) of the current staging slot: graphs led by its upload are
        captured per slot and recaptured when the object changes (runtime/cuda/slot_graphs.py)."""
        ring = self._ring
        i = ring._i
        return i, ring._slots[i]

    def end_call(self, keep=None) -> None:
        """The call's work is queued: the staging slot (and `keep`) are held until it ran."""
        self._ring.commit(self._run_stream, keep)

    # -- the executor's per-call fast path ---------------------------------------------------
    def read_tensor(self, obj):
        """(handle, address, shape, dtype name, GPU ordinal) of a device tensor read off its
        attributes, or None for anything this cannot read cheaply (the executor then takes
        its general path, which imports through DLPack and names what is wrong). On the
        executor's own stream the first torch tensor of a call orders it after torch's
        current stream, as DLPack's stream handshake would."""
        kind = self._kinds.get(type(obj))
        if kind is None:
            kind = self._kinds[type(obj)] = _tensor_kind(type(obj))
        if kind == _TORCH:
            name = _TORCH_DTYPES.get(obj.dtype)
            if name is None or not obj.is_contiguous():
                return None
            gpu = obj.get_device()
            if not self._ordered and gpu == self.device:
                self._order_after_torch()
            p = obj.data_ptr()
            return p, p, obj.shape, name, gpu
        if kind == _BUFFER:
            return obj.ptr, obj.ptr, obj.shape, obj.dtype, obj.device
        return None

    def _order_after_torch(self) -> None:
        self._ordered = True
        import sys

        theirs = sys.modules["torch"].cuda.current_stream(self.device).cuda_stream
        if theirs != self._run_stream:
            from graphir.runtime.cuda import driver

            if self._order_event is None:
                from graphir.runtime.cuda.stream import Event

                self._order_event = Event(timing=False, device=self.device)
            ev = self._order_event.handle
            rc = driver.function("cuEventRecord")(ev, theirs)
            if not rc:
                rc = driver.function("cuStreamWaitEvent")(self._run_stream, ev, 0)
            if rc:
                driver.check("cuEventRecord/cuStreamWaitEvent", rc, "ordering after torch")

    def copy_in(self, dst, dst_off: int, src_ptr: int, nbytes: int) -> None:
        """Device-to-device copy from address `src_ptr` (after begin_call)."""
        rc = self._dtod(dst.ptr + dst_off, src_ptr, nbytes, self._cur)
        if rc:
            from graphir.runtime.cuda import driver

            driver.check("cuMemcpyDtoDAsync_v2", rc, f"{nbytes} bytes")

    def bind(self, ptr: int, nbytes: int):
        """A non-owning buffer at address `ptr` (a device-tensor input a graph reads in
        place; the call that replays the graph keeps the tensor alive)."""
        from graphir.runtime.cuda import DeviceBuffer

        return DeviceBuffer(ptr, (nbytes,), "uint8", self.device)

    def launcher(self, graph):
        """A zero-argument callable replaying `graph` on the run stream (one driver call)."""
        from graphir.runtime.cuda import driver

        fn, exe, stream = driver.function("cuGraphLaunch"), graph._exec, self._run_stream

        def launch():
            rc = fn(exe, stream)
            if rc:
                driver.check("cuGraphLaunch", rc, "replaying a captured call")
        return launch

    # -- launches ----------------------------------------------------------------------------
    def launch(self, key, grid, args) -> None:
        k = self.kernels[key]
        vals = [a[0].ptr + a[1] if isinstance(a, tuple) else a for a in args]
        k.launch(grid, *vals, stream=self._cur)

    def early_reads(self, key) -> tuple[int, ...]:
        """The argument indices kernel `key` reads before its PDL wait (none for most; a
        library call none). Loads the kernel, as preparing its launch next does."""
        return getattr(getattr(self.kernels[key], "spec", None), "early_reads", ())

    def prepare(self, key, grid, args, early: bool = False):
        """A zero-argument callable launching `key` with `args` packed once (on the stream
        current when it is called, so it can be replayed into a capture). `early`: the
        caller vouches that no kernel ahead of this one in the call writes what it reads
        before its PDL wait (early_reads); it then starts early inside a captured graph only,
        where what precedes the graph is finished before the graph starts (ahead of an eager
        launch may be a copy of its input)."""
        k = self.kernels[key]
        vals = [a[0].ptr + a[1] if isinstance(a, tuple) else a for a in args]
        if hasattr(k, "prepare"):
            p, ctx, device = k.prepare(grid, vals), self._ctx, self.device
            if early:  # a Kernel's PreparedLaunch (a library call reads nothing early)
                def run():
                    ctx(device)
                    p(self._cur, self._capturing)
                return run

            def run():
                ctx(device)
                p(self._cur)
            return run
        return lambda: k.launch(grid, *vals, stream=self._cur)

    def prepare_copy(self, dst, dst_off, src, src_off, nbytes):
        d, s_ = dst.ptr + dst_off, src.ptr + src_off
        return (lambda: self._copy_raw(d, s_, nbytes)) if nbytes else (lambda: None)

    # -- tensors in and out ------------------------------------------------------------------
    def import_tensor(self, obj):
        from graphir.runtime.cuda import DeviceBuffer, from_dlpack
        from graphir.runtime.cuda.memory import view_of_torch

        if isinstance(obj, DeviceBuffer):
            return obj, obj.shape, obj.dtype
        buf = None
        if self.external_stream or self._ordered:
            buf = self._known(obj)
            if buf is None:
                buf = view_of_torch(obj)
                if buf is not None:
                    self._remember(obj, buf)
        if buf is None:
            buf = from_dlpack(obj, stream=self.stream)
            self._ordered = True
        return buf, buf.shape, buf.dtype

    def _known(self, obj):
        """A view of a torch tensor imported before (the KV blocks every step), re-checked
        against the tensor's current address and shape; None if not known."""
        hit = self._imports.get(id(obj))
        if hit is None or hit[0]() is not obj:
            return None
        tmpl = hit[1]
        if obj.data_ptr() != tmpl.ptr or tuple(obj.shape) != tmpl.shape:
            return None
        buf = tmpl.alias()
        buf.base = obj
        return buf

    def _remember(self, obj, buf) -> None:
        import weakref

        try:
            ref = weakref.ref(obj)
        except TypeError:
            return
        if len(self._imports) >= 16:
            self._imports.clear()
        tmpl = buf.alias()
        tmpl.base = None  # the cache does not keep the tensor alive
        self._imports[id(obj)] = (ref, tmpl)

    def view(self, buf, offset, shape, dtype):
        """A new view of the output at `offset` of `buf`, marked as written on this device's
        stream (one template per output, aliased per call)."""
        key = (id(buf), offset, tuple(shape), dtype)
        hit = self._views.get(key)
        if hit is None or hit.base is not buf:
            from graphir.runtime.cuda import DeviceBuffer

            hit = DeviceBuffer(buf.ptr + offset, shape, dtype, self.device, base=buf)
            hit.stream = self.stream.handle
            if len(self._views) >= 64:
                self._views.clear()
            self._views[key] = hit
        return hit.alias()

    def export(self, buf, nbytes, shape, dtype, offset: int = 0):
        """A fresh copy of the output at `offset` of `buf`."""
        from graphir.runtime.cuda import DeviceBuffer

        out = DeviceBuffer.empty(shape, dtype, self.device)
        self.copy(out, 0, buf, offset, nbytes)
        out.stream = self.stream.handle
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._keep.clear()

    # -- CUDA graphs -------------------------------------------------------------------------
    def capture(self, fn):
        """Capture fn()'s launches (on a private stream; nothing runs) into a CUDA graph."""
        from graphir.runtime.cuda import CudaGraph, Stream

        if self._capture_stream is None:
            self._capture_stream = Stream(device=self.device)
        g = CudaGraph()
        self._upload_kernel.load()  # a slot graph may lead with it (upload_staged)
        self._cur, self._capturing = self._capture_stream.handle, True
        try:
            with g.capture(self._capture_stream):
                fn()
        finally:
            self._cur, self._capturing = self.stream.handle, False
        return g

    def replay(self, g) -> None:
        g.replay(self.stream)


_OTHER, _TORCH, _BUFFER = 0, 1, 2
# torch dtype -> buffer dtype name, filled from the names torch and dlpack.DTYPES share.
_TORCH_DTYPES: dict = {}


def _tensor_kind(cls) -> int:
    from graphir.runtime.cuda import DeviceBuffer

    if issubclass(cls, DeviceBuffer):
        return _BUFFER
    if cls.__module__.startswith("torch") and hasattr(cls, "data_ptr"):
        if not _TORCH_DTYPES:
            import sys

            from graphir.runtime.cuda import dlpack

            torch = sys.modules["torch"]
            _TORCH_DTYPES.update({getattr(torch, n): n for n in dlpack.DTYPES
                                  if isinstance(getattr(torch, n, None), torch.dtype)})
        return _TORCH
    return _OTHER


class CudaModel:
    """A loaded cuda artifact: `execute(*inputs)` returns the graph's outputs."""

    def __init__(self, executor: PlanExecutor, artifact):
        self.executor, self.artifact = executor, artifact

    def execute(self, *inputs, return_numpy: bool | None = None):
        return self.executor.execute(*inputs, return_numpy=return_numpy)

    __call__ = execute


class _Kernels(dict):
    """The artifact's kernels loaded on one GPU, each on first use."""

    def __init__(self, art, table: Mapping[str, Any], device: int):
        super().__init__()
        self._art, self._table, self._device = art, table, device

    def __contains__(self, key) -> bool:
        """Whether the artifact has kernel `key` (loaded or not)."""
        return key in self._table

    def metadata(self, key) -> Mapping[str, Any]:
        """Kernel `key`'s manifest entry."""
        return self._table[key]

    def __missing__(self, key):
        from graphir.runtime.cuda import Kernel

        md = self._table[key]
        if md.get("kind") == "cublaslt":
            # A library call chosen by the tuner; its Triton fallback takes the same launch.
            from graphir.runtime.cuda.cublaslt import load_matmul

            k = self[key] = load_matmul(md, self._device, lambda: self[md["fallback"]])
            return k
        k = self[key] = Kernel.from_cubin(self._art.file(md["cubin"]).read_bytes(), md,
                                          self._device)
        return k


def _check_arch(art, ordinals, driver) -> None:
    """Refuse a GPU whose compute capability is not the artifact's: its cubins would not load
    there (sm_90a code on any other part), and the driver's error would not say why."""
    from graphir.lowering.driver import CUDA_ARCHS, Target

    want = Target.parse(str(art.target)).arch
    for o in sorted(set(ordinals)):
        p = driver.device_properties(o)
        cc = 10 * p.compute_capability[0] + p.compute_capability[1]
        if cc != want:
            raise ValueError(f"{art.path}: built for {art.target}, but GPU {o} ({p.name}) is "
                             f"sm_{cc}; graphir's GPU kernels run on "
                             f"{', '.join(f'sm_{a}' for a in CUDA_ARCHS)} (H100, H200) only")


def load(artifact, weights: Mapping[str, Any], devices=None, *, use_graphs: bool = True,
         peer: str = "auto", stream: Any = None, copy_outputs: bool = False):
    """Open a cuda artifact and bind `weights`.

    The graph's devices (see runtime.cuda.multi_device) run on the GPUs `devices` names, in
    order (default: device id N on GPU N). A graph over several devices gets one stream per
    GPU, peer copies for transfer_to (`peer="host"` stages them through the host) and NCCL
    for allreduce / allgather.

    `stream` (one device only): run on the caller's CUDA stream, e.g.
    `torch.cuda.current_stream()`, so tensors made on it are used without a per-call stream
    handshake (see CudaDevice). `copy_outputs`: return each call's outputs in fresh device
    buffers instead of the executor's reused ones (see PlanExecutor.execute).

    Example:
        >>> model = load(compile_graph(g, "cuda:sm_90"), weights)     # doctest: +SKIP
        >>> (y,) = model.execute(x, offsets, blocks, cache_lengths, lookup_table, max_lengths)
    """
    from graphir.lowering.artifact import load_artifact
    from graphir.runtime.cuda import driver
    from graphir.runtime.cuda.multi_device import CudaDeviceGroup, logical_devices

    art = load_artifact(artifact.path if hasattr(artifact, "path") else artifact)
    m = art.manifest
    if m.get("backend") != "triton_gpu":
        raise ValueError(f"{art.path}: not a cuda (triton_gpu) artifact: target {art.target}")
    graph = art.graph()
    from .launch_check import check_launch_data

    check_launch_data(m, graph, art.path)
    lids = logical_devices(graph)
    if devices:
        if len(devices) < len(lids):
            raise ValueError(f"graph {graph.name!r} runs on {len(lids)} devices (ids {lids}); "
                             f"load was given {len(devices)}: {list(devices)}")
        gpus = {lid: int(getattr(d, "id", d)) for lid, d in zip(lids, devices)}
    else:
        gpus = {lid: lid for lid in lids}
    n = driver.device_count()
    if max(gpus.values()) >= n:
        raise ValueError(f"graph {graph.name!r} needs GPUs {sorted(gpus.values())} (one per "
                         f"device of the graph) but this machine has {n} CUDA device(s)")
    _check_arch(art, gpus.values(), driver)
    if stream is not None and len(gpus) > 1:
        raise ValueError(f"graph {graph.name!r} runs on {len(gpus)} devices; stream= names one "
                         f"stream and applies to single-device graphs only")
    members = {lid: CudaDevice(_Kernels(art, m["kernels"], o), o, stream)
               for lid, o in gpus.items()}
    dev = CudaDeviceGroup(members, peer=peer) if len(members) > 1 else members[lids[0]]
    ex = PlanExecutor(m["plan"], graph, dev, weights, use_graphs, copy_outputs=copy_outputs)
    return CudaModel(ex, art)
