"""The CUDA executor's fast path: a call whose input signature and ragged facts were seen
before, after its key was captured into a CUDA graph (see PlanExecutor.execute).

A signature is each input's shape and dtype, plus for a device tensor its GPU and, for a
buffer input (the KV blocks), its address: everything the general path derives the call's
dims, storage and checks from, read in one pass (`_signature`; a torch tensor costs five
attribute reads, a small numpy input one `tobytes`). Per signature the ragged check is a
`FastFacts` (runtime/ragged.py) that answers the bucketed facts from a scalar read or one
reduction of the cache lengths and byte comparisons with the last call's offsets and lookup
table; the facts pick a `FastIO`: the staging byte ranges to fill, the device copies, the
prebound graph launch, the output objects. The graph launched is the one of the current
staging slot, led by the copy of that slot into the input area (runtime/cuda/slot_graphs.py),
so the upload costs no driver call of its own. A hit then makes four driver calls (the
staging slot's event query, one device copy per device tensor, the graph launch, the slot's
event record; the copy goes when the tensor is read in place, below) and no numpy call
beyond that one reduction. The work that need not precede the launch (the counters, the
slot's event record, the output objects) follows it.

Device tensors bound in place: the input area gives a device-tensor input (the hidden states
x) a fixed address, so each call copies it there. Serving loops and torch's caching allocator
hand the same few addresses back, so once the device-tensor inputs of a (signature, facts)
arrive at the same addresses `DIRECT_AFTER` times, a graph is captured that reads them where
they lie (`_direct_plan`: the same launches with those pointers) and later calls from those
addresses replay it with no copy: three driver calls. The key is the addresses; the signature
above them fixes the shape and dtype, hence the bytes read. A replay reads whatever tensor
occupies those bytes at the time, which is the caller's input of that call. Kept
per (signature, facts): `DIRECT_SLOTS` such graphs (least recently used evicted), at most
`DIRECT_BUILDS` captures, then only the copy for other addresses. Refused (the copy it is):
an address not 256-byte aligned (the kernels and cuBLASLt plans assume it), or one
overlapping any buffer the plan uses (its outputs, scratch, the KV blocks: a replay
would read what it writes, where the copy took a snapshot first).

Anything unusual (a new signature or key, facts the fast check is not sure of, return_numpy,
metadata on the device, inputs DLPack must import) takes the general path, which checks
everything, names what is wrong, and teaches the fast path what it built (`_learn`).
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np

from graphir.dtype import DType, to_bits

from .call_plan import _BITS, ALIGN, CallPlan
from .slot_graphs import SlotGraphs

MAX_SIGNATURES = 256  # input signatures the fast path remembers
BLOB_MAX = 1 << 16  # host inputs up to this size are staged from their bytes on the fast path
DIRECT_AFTER = 2    # calls from one set of device-tensor addresses before it gets its graph
DIRECT_SLOTS = 4    # such graphs per (signature, facts), least recently used evicted
DIRECT_BUILDS = 8   # captures per (signature, facts); then other addresses are copied
_REFUSED = -(1 << 30)  # a `seen` count that never reaches DIRECT_AFTER
_NDARRAY = np.ndarray
_USED, _BUFFER = "used", "buffer"  # input roles (None: not read by the plan)


class FastIO:
    """What a cache hit of one (input signature, CallPlan) does, resolved once: the byte
    ranges of the staging slot each host input fills (with a conversion when its numpy dtype
    is not the raw one), the device-to-device copies, the launch and the output objects."""

    __slots__ = ("cp", "area", "host_bytes", "blobs", "copies", "launch", "stat", "outs",
                 "view", "upload", "dk", "direct", "seen", "builds", "bound", "used")

    def __init__(self, cp: CallPlan, area, host_bytes: int, blobs: list, copies: list,
                 outs: list, dev=None, slot_stats: dict | None = None):
        self.cp, self.area, self.host_bytes = cp, area, host_bytes
        self.blobs, self.copies, self.outs = blobs, copies, list(outs)
        self.launch, self.stat = cp.launch, cp.stat
        # view(nbytes): the staging bytes to fill; upload(): their copy to the area (None
        # when the launch is a graph of the slot that copies them itself)
        self.view = self.upload = None
        if host_bytes and dev is not None:
            stager = getattr(dev, "stager", None)
            if stager is not None:  # bound once: two calls, no context check
                self.view, self.upload = stager(area, host_bytes)
            else:
                self.view = dev.staging_view
                self.upload = partial(dev.upload_staged, area, host_bytes)
            if slot_stats is not None:  # graphs led by the upload (slot_graphs.py)
                if cp.slot_graphs is None:
                    cp.slot_graphs = SlotGraphs(dev, cp.run, area, host_bytes, slot_stats)
                self.launch, self.upload = cp.slot_graphs, None
        # Graphs reading the device-tensor inputs in place (see the module docstring): `dk`
        # the input whose address keys `direct` (-1: the tuple of every copied input's), the
        # address -> FastIO; `seen` counts calls per address (None: no more captures).
        self.dk, self.direct, self.seen, self.builds = -1, None, None, 0
        if copies and cp.graph is not None:
            self.dk = copies[0][0] if len(copies) == 1 else -1
            self.direct, self.seen = {}, {}
        self.bound = None  # a direct FastIO: its own CallPlan (cp stays the base, for LRU)
        self.used = 0

    @classmethod
    def of(cls, cp: CallPlan, inputs, blobs, outs, dev, slot_stats=None) -> "FastIO | None":
        """For a plan on one device (`dev`) whose host inputs all arrived as bytes; else
        None. `slot_stats`: the executor's stats, when a captured plan may replay graphs led
        by the upload (one per staging slot), which count their captures there."""
        if len(cp.areas) > 1 or cp.launch is None:
            return None
        if not cp.areas:
            return cls(cp, None, 0, [], [], outs)
        (buf, host_bytes, host, device), = cp.areas.values()
        fills = []
        for k, off, nb, dt, bits_dt, _ in host:
            x = inputs[k]
            if not isinstance(x, np.ndarray):
                return None
            # Bytes of the right kind are copied as they are; a large input (no bytes made)
            # or another dtype goes through a raw view, converted first if need be.
            conv = None if blobs[k] is not None and x.dtype == bits_dt else \
                _converter(dt, bits_dt)
            fills.append((k, off, off + nb, conv))
        return cls(cp, buf, host_bytes, fills, [c for c in device if c[2]], outs, dev,
                   slot_stats if cp.graph is not None else None)


def _converter(dt: DType, bits_dt: np.dtype):
    """x -> a uint8 array of the raw contents a value of `dt` stages (as CallPlan.stage
    converts: bf16 / float8 values given as floats become bits, other dtypes are cast)."""
    def conv(x):
        if dt in _BITS and x.dtype != bits_dt:
            x = to_bits(x, dt)
        return np.ascontiguousarray(x, dtype=bits_dt).reshape(-1).view(np.uint8)
    return conv


class FastPath:
    """PlanExecutor's fast half (a mixin): `_signature`, `_hit` and `_learn`."""

    def _signature(self, inputs) -> tuple:
        """(signature, blobs): the inputs' shapes and dtypes (device tensors: also their GPU,
        and for buffer inputs the address), and per input its bytes (small host inputs the
        plan reads) or device address. (None, None) when an input is not cheap to read."""
        sig, blobs, read = [], [], self._read
        for x, role in zip(inputs, self._roles):
            if type(x) is _NDARRAY:
                if role is _USED:
                    sig.append((x.shape, x.dtype))
                    blobs.append(x.tobytes() if x.nbytes <= BLOB_MAX else None)
                else:  # unused: its free dims may change every call (max_lengths)
                    sig.append((x.ndim if role is None else x.shape, x.dtype))
                    blobs.append(None)
            else:
                t = read(x)  # (handle, address, shape, dtype, GPU)
                if t is None:
                    return None, None
                sig.append((t[2], t[3], t[4], t[1] if role is _BUFFER else 0))
                blobs.append(t)
        return tuple(sig), blobs

    def _hit(self, io, inputs, blobs):
        dev = self.dev
        if io.host_bytes:
            mv = io.view(io.host_bytes)
            for k, a, b, conv in io.blobs:
                mv[a:b] = blobs[k] if conv is None else conv(inputs[k])
            upload = io.upload
            if upload is not None:
                upload()
        for k, off, nb in io.copies:
            dev.copy_in(io.area, off, blobs[k][0], nb)
        io.launch()
        self._tick += 1
        io.cp.used = self._tick
        stats = self.stats
        stats[io.stat] += 1
        stats["fast_hits"] += 1
        dev.end_call(inputs)  # device tensors live until the stream passes this call
        return list(io.outs)

    def _direct(self, io, key, blobs):
        """The FastIO for device-tensor addresses `key` that have no graph of their own yet:
        one is captured when they came `DIRECT_AFTER` times (and pass the checks), else the
        copying `io` it is."""
        seen = io.seen
        if seen is None:
            return io
        n = seen.get(key, 0) + 1
        if n < DIRECT_AFTER:
            if len(seen) >= 64:
                seen.clear()
            seen[key] = n
            return io
        d = self._direct_plan(io, blobs)
        if d is None:
            seen[key] = _REFUSED
            return io
        seen.pop(key, None)
        direct = io.direct
        if len(direct) >= DIRECT_SLOTS:
            old = min(direct, key=lambda a: direct[a].used)
            self.group.synchronize()  # its graph may still be running
            del direct[old]
        direct[key] = d
        io.builds += 1
        if io.builds >= DIRECT_BUILDS:
            io.seen = None
        self.stats["direct_builds"] += 1
        return d

    def _direct_plan(self, io, blobs) -> "FastIO | None":
        """io's plan with its device-tensor inputs bound at this call's addresses, captured;
        None when an address is unaligned or overlaps a buffer the plan uses."""
        cp, dev = io.cp, self.dev
        if self._plans.get(cp.key) is not cp:
            return None
        spans = []
        for buf in {id(b): b for b, _ in cp.storage.values()}.values():
            lo = _address(buf)
            spans.append((lo, lo + dev.nbytes(buf)))
        for k, _, nb in io.copies:
            a = blobs[k][1]
            if a % ALIGN or any(a < hi and lo < a + nb for lo, hi in spans):
                return None
        st = dict(cp.storage)
        bind = getattr(dev, "bind", None)
        vids = self.plan["inputs"]
        rebound = set()
        for k, _, nb in io.copies:
            h = blobs[k][0]
            st[vids[k]] = (bind(h, nb) if bind else h, 0)
            rebound.add(vids[k])
        for v in self.values:  # views of those inputs (reshapes) follow them
            b = self._viewed(v["id"])
            if b != v["id"] and b in rebound:
                st[v["id"]] = st[b]
        ks = {k for k, _, _ in io.copies}
        areas = {lid: (buf, hb, host, [c for c in device if c[0] not in ks])
                 for lid, (buf, hb, host, device) in cp.areas.items()}
        ops = self._resolve(cp.env, st, frozenset(cp.key[3]))
        calls = [self._prepare(op, cp.env, st) for op in ops]
        if self._plans.get(cp.key) is not cp:  # a pool grew meanwhile (never expected)
            return None
        addrs = tuple(blobs[k][1] for k, _, _ in io.copies)
        vcp = CallPlan(cp.key + (("direct", addrs),), cp.env, st, ops, calls, areas,
                       cp.outputs)
        if io.host_bytes and io.upload is None:  # graphs led by the upload, one a slot
            d = FastIO(vcp, io.area, io.host_bytes, io.blobs, [], io.outs, dev, self.stats)
        else:
            self._capture(vcp)
            d = FastIO(vcp, io.area, io.host_bytes, io.blobs, [], io.outs)
            d.view, d.upload = io.view, io.upload
        d.cp, d.bound, d.stat = cp, vcp, cp.stat
        return d

    def _learn(self, sig, blobs, inputs, bounds, fvals, cp, outs) -> None:
        """Let later calls of this signature and facts take the fast path."""
        entry = self._sigs.get(sig)
        if entry is None:
            shapes, dtypes = [], []
            for x in inputs:
                nd = isinstance(x, np.ndarray)
                shapes.append(tuple(x.shape))
                dtypes.append(x.dtype if nd else None)
            facts = self._ragged.fast(bounds, shapes, dtypes, self._wanted)
            if facts is None:
                return
            if len(self._sigs) >= MAX_SIGNATURES:
                self._sigs.clear()
            entry = self._sigs[sig] = SimpleNamespace(facts=facts, plans={})
        io = FastIO.of(cp, inputs, blobs, outs, self.dev,
                       self.stats if self._slot_graphs else None)
        if io is not None:
            entry.plans[fvals] = io


def _address(handle) -> int:
    """The device address of a buffer (DeviceBuffer.ptr, a tensor's data_ptr())."""
    ptr = getattr(handle, "ptr", None)
    if ptr is None and hasattr(handle, "data_ptr"):
        ptr = handle.data_ptr()
    return ptr if ptr is not None else id(handle)
