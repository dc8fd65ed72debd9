"""Several devices under one PlanExecutor: where each value lives, and the work between devices.

Placement (`placement`): a graph's devices are its values' device ids. When any value is typed
`gpu:N`, the GPU ids are the devices and CPU-typed values (the max_lengths tensor of
KVCacheParams.input_types, say) "float": each lives on the device of the step that reads it.
A graph with CPU types only has its CPU ids as (virtual) devices, so a graph built for
`cpu:0, cpu:1` runs unchanged on two GPUs. `load` maps these logical ids onto CUDA ordinals.

`DeviceGroup` is the executor's view of several per-device objects (the single-device interface
of CudaDevice / the interpreter tests' device): transfers and collectives are staged through the
host here, which is what the CPU tests exercise. `CudaDeviceGroup` does them on the GPUs:
peer copies (cuMemcpyPeerAsync, or through the host when peer access is off) ordered by events
between the two devices' streams, and NCCL collectives on each device's stream.
"""
from __future__ import annotations

import ctypes
import weakref
from ctypes import c_int, c_size_t, c_uint, c_void_p
from typing import Any, Mapping, Sequence

import numpy as np

from graphir.types import ChainType


def typed_devices(graph) -> dict[int, int | None]:
    """id(value) -> logical device id, None for a floating (CPU-typed, in a GPU graph) value."""
    values = [v for v in graph.inputs if not isinstance(v.type, ChainType)]
    values += [r for n in graph.nodes for r in n.results if not isinstance(r.type, ChainType)]
    gpu = any(v.type.device.is_gpu() for v in values)
    return {id(v): (v.type.device.id if v.type.device.is_gpu() or not gpu else None)
            for v in values}


def logical_devices(graph) -> list[int]:
    """The graph's device ids, sorted (at least one)."""
    ids = {d for d in typed_devices(graph).values() if d is not None}
    return sorted(ids) or [0]


def placement(graph, plan: Mapping) -> tuple[dict[int, int], dict[int, int]]:
    """(value id -> device, step index -> device) for a plan of `graph` (see module docstring).

    Collective steps map to -1 (they span devices); transfer_to steps to their output's device.
    """
    from graphir.lowering.plan import value_table

    vids, _ = value_table(graph)
    typed = typed_devices(graph)
    dev: dict[int, int] = {vids[k]: d for k, d in typed.items() if d is not None and k in vids}
    default = logical_devices(graph)[0]
    step_dev: dict[int, int] = {}
    for i, s in enumerate(plan["steps"]):
        k, vals = s["kernel"], s["inputs"] + s["outputs"]
        if k == "host":
            continue
        if k == "collective":
            step_dev[i] = -1
            continue
        if k == "view" and s["inputs"][0] in dev:
            dev.setdefault(s["outputs"][0], dev[s["inputs"][0]])
        if s["op"] == "transfer_to":
            d = dev.get(s["outputs"][0], default)
            step_dev[i] = d
            for v in s["outputs"]:
                dev.setdefault(v, d)
            continue
        here = sorted({dev[v] for v in vals if v in dev})
        if len(here) > 1:
            raise ValueError(f"plan step {i} (gir.{s['op']}) reads and writes values on devices "
                             f"{here}; only transfer_to and collectives cross devices")
        d = here[0] if here else default
        step_dev[i] = d
        for v in vals:
            dev.setdefault(v, d)
    for v in range(len(plan["values"])):
        dev.setdefault(v, default)
    return dev, step_dev


class DeviceGroup:
    """Per-device objects by logical id; transfers and collectives staged through the host."""

    supports_graphs = False

    def __init__(self, members: Mapping[int, Any]):
        if not members:
            raise ValueError("DeviceGroup needs at least one device")
        self.members = dict(members)

    def __getitem__(self, lid: int):
        try:
            return self.members[lid]
        except KeyError:
            raise ValueError(f"the graph uses device {lid}, which this executor was not given "
                             f"(devices: {sorted(self.members)})") from None

    def __contains__(self, lid: int) -> bool:
        return lid in self.members

    # -- staging helpers ---------------------------------------------------------------------
    def offset(self, buf, off: int):
        """`buf` advanced by `off` bytes (a view)."""
        return buf[off:] if off else buf

    def read(self, lid: int, buf, off: int, nbytes: int) -> np.ndarray:
        return self[lid].download(buf, off + nbytes)[off:off + nbytes]

    def write(self, lid: int, buf, off: int, raw: np.ndarray) -> None:
        if raw.nbytes:
            self[lid].upload(self.offset(buf, off), raw)

    # -- between devices ---------------------------------------------------------------------
    def transfer(self, dst_lid, dst, dst_off, src_lid, src, src_off, nbytes: int) -> None:
        """Copy `nbytes` from device `src_lid` to device `dst_lid`."""
        if nbytes:
            self.write(dst_lid, dst, dst_off, self.read(src_lid, src, src_off, nbytes).copy())

    def all_reduce(self, parts: Sequence, count: int, dtype) -> None:
        """parts: (lid, src, dst) per rank; dst_i = the sum of the srcs (`count` elements)."""
        from graphir.dtype import from_bits, to_bits

        nb = count * dtype.size_in_bytes
        total = None
        for lid, src, _ in parts:
            x = from_bits(self.read(lid, src, 0, nb).copy(), dtype).astype(np.float64)
            total = x if total is None else total + x
        bits = np.ascontiguousarray(to_bits(total, dtype)).reshape(-1).view(np.uint8)
        for lid, _, dst in parts:
            self.write(lid, dst, 0, bits)

    def all_gather(self, parts: Sequence, counts: Sequence[int], dtype) -> None:
        """dst_i = the srcs (counts[k] elements each) concatenated in part order."""
        size = dtype.size_in_bytes
        raw = np.concatenate([self.read(lid, src, 0, c * size)
                              for (lid, src, _), c in zip(parts, counts)] or [np.empty(0, np.uint8)])
        for lid, _, dst in parts:
            self.write(lid, dst, 0, raw)

    def copy2d(self, lid, dst, dst_off, dst_pitch, src, src_off, src_pitch, width, height) -> None:
        """`height` rows of `width` bytes between pitched layouts on one device."""
        for r in range(height):
            self[lid].copy(dst, dst_off + r * dst_pitch, src, src_off + r * src_pitch, width)

    def synchronize(self) -> None:
        for m in {id(m): m for m in self.members.values()}.values():
            m.synchronize()


# --------------------------------------------------------------------------------------------
# CUDA
_CU_MEMORYTYPE_DEVICE = 2
_PEER_ALREADY_ENABLED = 704


class _Memcpy2D(ctypes.Structure):
    _fields_ = [("srcXInBytes", c_size_t), ("srcY", c_size_t), ("srcMemoryType", c_int),
                ("srcHost", c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", c_void_p),
                ("srcPitch", c_size_t), ("dstXInBytes", c_size_t), ("dstY", c_size_t),
                ("dstMemoryType", c_int), ("dstHost", c_void_p), ("dstDevice", ctypes.c_uint64),
                ("dstArray", c_void_p), ("dstPitch", c_size_t), ("WidthInBytes", c_size_t),
                ("Height", c_size_t)]


_EXTRA = {  # driver entry points only the multi-GPU path needs
    "cuDeviceCanAccessPeer": [ctypes.POINTER(c_int), c_int, c_int],
    "cuCtxEnablePeerAccess": [c_void_p, c_uint],
    "cuMemcpyPeerAsync": [ctypes.c_uint64, c_void_p, ctypes.c_uint64, c_void_p, c_size_t,
                          c_void_p],
    "cuMemcpy2DAsync_v2": [ctypes.POINTER(_Memcpy2D), c_void_p],
}


def _cu(name: str, *args, ok=(0,)) -> int:
    from graphir.runtime.cuda import driver

    lib = driver._load()
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = _EXTRA[name], c_int
    rc = fn(*args)
    if rc not in ok:
        driver.check(name, rc)
    return rc


class CudaDeviceGroup(DeviceGroup):
    """CudaDevices on distinct GPUs: peer copies and NCCL collectives between them.

    `peer`: "auto" enables peer access where the hardware allows it (copies then go GPU to
    GPU) and stages the others through the host; "host" always stages through the host.
    """

    def __init__(self, members: Mapping[int, Any], peer: str = "auto"):
        super().__init__(members)
        if peer not in ("auto", "host"):
            raise ValueError(f"peer must be 'auto' or 'host', got {peer!r}")
        from graphir.runtime.cuda import Event, driver

        self.ordinal = {lid: int(m.device) for lid, m in self.members.items()}
        if len(set(self.ordinal.values())) != len(self.ordinal):
            raise ValueError(f"each device of a multi-device graph needs its own GPU, got "
                             f"{self.ordinal} (logical device -> CUDA ordinal)")
        self._ctx = {}
        for lid, o in self.ordinal.items():
            driver.ensure_context(o)
            self._ctx[lid] = driver._primary[o]
        self._peer: dict[tuple[int, int], bool] = {}
        for a, oa in self.ordinal.items():
            for b, ob in self.ordinal.items():
                if a == b:
                    continue
                can = c_int(0)
                if peer == "auto":
                    _cu("cuDeviceCanAccessPeer", ctypes.byref(can), driver._device(oa),
                        driver._device(ob))
                if can.value:
                    driver.ensure_context(oa)
                    _cu("cuCtxEnablePeerAccess", c_void_p(self._ctx[b]), 0,
                        ok=(0, _PEER_ALREADY_ENABLED))
                self._peer[(a, b)] = bool(can.value)
        self._events = {lid: Event(timing=False, device=o) for lid, o in self.ordinal.items()}
        self._comms: dict[tuple[int, ...], Any] = {}

    def offset(self, buf, off: int):
        return buf.view((buf.nbytes - off,), "uint8", off) if off else buf

    def peer_enabled(self, a: int, b: int) -> bool:
        """Whether device a reads/writes device b's memory directly."""
        return self._peer.get((a, b), False)

    def _order(self, before: int, after: int) -> None:
        # Work queued later on `after` waits for what `before` has queued so far.
        from graphir.runtime.cuda import driver

        ev = self._events[before]
        driver.ensure_context(self.ordinal[before])
        ev.record(self[before].stream)
        self[after].stream.wait_event(ev)

    def transfer(self, dst_lid, dst, dst_off, src_lid, src, src_off, nbytes: int) -> None:
        if not nbytes:
            return
        if dst_lid == src_lid:
            self[dst_lid].copy(dst, dst_off, src, src_off, nbytes)
            return
        if not (self.peer_enabled(src_lid, dst_lid) and self.peer_enabled(dst_lid, src_lid)):
            # Through the host: the read waits for the source's stream, the upload is queued
            # on the destination's stream in order with its other work.
            return super().transfer(dst_lid, dst, dst_off, src_lid, src, src_off, nbytes)
        from graphir.runtime.cuda import driver

        # On the source's stream, after the destination finished with the memory it overwrites;
        # the destination's later work waits for the copy.
        self._order(dst_lid, src_lid)
        driver.ensure_context(self.ordinal[src_lid])
        _cu("cuMemcpyPeerAsync", dst.ptr + dst_off, c_void_p(self._ctx[dst_lid]),
            src.ptr + src_off, c_void_p(self._ctx[src_lid]), nbytes,
            c_void_p(self[src_lid].stream.handle))
        self._order(src_lid, dst_lid)

    def communicator(self, lids: Sequence[int]):
        """The NCCL communicator of these devices in this rank order (created once)."""
        key = tuple(lids)
        if key not in self._comms:
            from graphir.runtime.cuda.nccl import Communicator

            comm = Communicator([self.ordinal[lid] for lid in key])
            f = weakref.finalize(self, comm.destroy)
            f.atexit = False  # NCCL may already be torn down at exit
            self._comms[key] = comm
        return self._comms[key]

    def all_reduce(self, parts: Sequence, count: int, dtype) -> None:
        comm = self.communicator([p[0] for p in parts])
        comm.all_reduce([(src, dst, self[lid].stream) for lid, src, dst in parts], count,
                        dtype.name)

    def all_gather(self, parts: Sequence, counts: Sequence[int], dtype) -> None:
        comm = self.communicator([p[0] for p in parts])
        ps = [(src, dst, self[lid].stream) for lid, src, dst in parts]
        if len(set(counts)) == 1:
            comm.all_gather(ps, counts[0], dtype.name)
        else:
            comm.gather_varying(ps, list(counts), dtype.name)

    def copy2d(self, lid, dst, dst_off, dst_pitch, src, src_off, src_pitch, width, height) -> None:
        if not (width and height):
            return
        from graphir.runtime.cuda import driver

        p = _Memcpy2D(srcMemoryType=_CU_MEMORYTYPE_DEVICE, srcDevice=src.ptr + src_off,
                      srcPitch=src_pitch, dstMemoryType=_CU_MEMORYTYPE_DEVICE,
                      dstDevice=dst.ptr + dst_off, dstPitch=dst_pitch, WidthInBytes=width,
                      Height=height)
        driver.ensure_context(self.ordinal[lid])
        _cu("cuMemcpy2DAsync_v2", ctypes.byref(p), c_void_p(self[lid].stream.handle))
