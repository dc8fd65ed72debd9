"""The libcuda side of the CUDA executor: device memory, cubin modules, launches, CUDA graphs,
and `load()` which builds a model from an artifact."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .executor import PlanExecutor


class CudaDevice:
    """PlanExecutor's device on libcuda: DeviceBuffers, cubin kernels, one stream, graphs."""

    supports_graphs = True

    def __init__(self, kernels: Mapping[str, Any], device: int = 0):
        from graphir.runtime.cuda import Stream

        self.kernels, self.device = kernels, device
        self.stream = Stream(device=device)
        self._keep: list = []

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
            # still kept until the call's final synchronize.
            self._keep.append(raw)
            buf.view((raw.nbytes,), "uint8").copy_from_numpy(raw, stream=self.stream)

    def download(self, buf, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        if nbytes:
            self.stream.synchronize()
            buf.view((nbytes,), "uint8").copy_to_numpy(out)
        return out

    def copy(self, dst, dst_off, src, src_off, nbytes) -> None:
        if nbytes:
            d = dst.view((nbytes,), "uint8", dst_off)
            d.copy_from(src.view((nbytes,), "uint8", src_off), stream=self.stream)

    def launch(self, key, grid, args) -> None:
        k = self.kernels[key]
        vals = [a[0].ptr + a[1] if isinstance(a, tuple) else a for a in args]
        k.launch(grid, *vals, stream=self.stream)

    def key(self, op):
        """A hashable form of a resolved op with buffers replaced by their addresses."""
        def conv(a):
            if isinstance(a, tuple):
                return tuple(conv(x) for x in a)
            return a.ptr if hasattr(a, "ptr") else a
        return conv(op)

    def import_tensor(self, obj):
        from graphir.runtime.cuda import DeviceBuffer, from_dlpack

        buf = obj if isinstance(obj, DeviceBuffer) else from_dlpack(obj, stream=self.stream)
        return buf, buf.shape, buf.dtype

    def export(self, buf, nbytes, shape, dtype):
        from graphir.runtime.cuda import DeviceBuffer

        out = DeviceBuffer.empty(shape, dtype, self.device)
        out.copy_from(buf.view(shape, dtype), stream=self.stream)
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._keep.clear()

    def capture(self, fn):
        from graphir.runtime.cuda import CudaGraph

        g = CudaGraph()
        with g.capture(self.stream):
            fn()
        return g

    def replay(self, g) -> None:
        g.replay(self.stream)


class CudaModel:
    """A loaded cuda artifact: `execute(*inputs)` returns the graph's outputs."""

    def __init__(self, executor: PlanExecutor, artifact):
        self.executor, self.artifact = executor, artifact

    def _source(self, vid: int) -> int:
        while vid in self._alias:
            vid = self._alias[vid]
        return vid

    def execute(self, *inputs, return_numpy: bool | None = None):
        return self.executor.execute(*inputs, return_numpy=return_numpy)

    __call__ = execute


class _Kernels(dict):
    """The artifact's kernels loaded on one GPU, each on first use."""

    def __init__(self, art, table: Mapping[str, Any], device: int):
        super().__init__()
        self._art, self._table, self._device = art, table, device

    def __missing__(self, key):
        from graphir.runtime.cuda import Kernel

        md = self._table[key]
        k = self[key] = Kernel.from_cubin(self._art.file(md["cubin"]).read_bytes(), md,
                                          self._device)
        return k


def load(artifact, weights: Mapping[str, Any], devices=None, *, use_graphs: bool = True,
         peer: str = "auto"):
    """Open a cuda artifact and bind `weights`.

    The graph's devices (see runtime.cuda.multi_device) run on the GPUs `devices` names, in
    order (default: device id N on GPU N). A graph over several devices gets one stream per
    GPU, peer copies for transfer_to (`peer="host"` stages them through the host) and NCCL
    for allreduce / allgather.
    """
    from graphir.lowering.artifact import load_artifact
    from graphir.runtime.cuda import driver
    from graphir.runtime.cuda.multi_device import CudaDeviceGroup, logical_devices

    art = load_artifact(artifact.path if hasattr(artifact, "path") else artifact)
    m = art.manifest
    if m.get("backend") != "triton_gpu":
        raise ValueError(f"{art.path}: not a cuda (triton_gpu) artifact: target {art.target}")
    graph = art.graph()
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
    members = {lid: CudaDevice(_Kernels(art, m["kernels"], o), o) for lid, o in gpus.items()}
    dev = CudaDeviceGroup(members, peer=peer) if len(members) > 1 else members[lids[0]]
    ex = PlanExecutor(m["plan"], graph, dev, weights, use_graphs)
    return CudaModel(ex, art)
