"""A call plan's CUDA graph captured once per pinned staging slot, led by the upload.

On a cache hit the executor fills the current staging slot with the call's host inputs
(offsets, cache lengths, lookup table). Queued as a separate `cuMemcpyHtoDAsync` before the
graph launch, that copy is a driver call (3-14 us on the hosts we measured) on the path to
the launch, where a decode step at batch 1 is bound by the host. A copy node inside the graph
costs nothing per call, but it reads one fixed host address, so each slot of the ring gets a
graph of its own whose first node copies that slot: the hit then makes one driver call for
upload and launches together.

The copy need not come first: the step's leading kernels that read none of the staged bytes
(a layer's qkv projection reads only the hidden states) run beside it, as a branch of the
graph that joins before the first kernel that does (`lead`: how many launches lead; the
device forks the capture where it can, else puts the copy first).

A slot's memory can be replaced (the ring regrows a slot too small for a larger call): each
graph remembers the slot object it reads, and a slot that is not the same object any more is
captured again before its next launch. The ring waits for a slot's last use before replacing
it, so no graph that reads the old memory is still running; the graph object holds the old
slot until then.
"""
from __future__ import annotations

import os

# For A/B measurements, read when an executor loads: GRAPHIR_SLOT_GRAPHS=0 puts the upload
# in a copy of its own before the graph; GRAPHIR_SLOT_GRAPHS_FORK=0 puts it first in the
# graph, before every kernel.
ENABLED = os.environ.get("GRAPHIR_SLOT_GRAPHS", "1") != "0"
FORK = os.environ.get("GRAPHIR_SLOT_GRAPHS_FORK", "1") != "0"


def lead_launches(ops, area, nbytes: int) -> int:
    """How many of a plan's first ops are launches reading none of the first `nbytes` of
    `area` (the staged host inputs): those may run while the upload is in flight."""
    for n, op in enumerate(ops):
        if op[0] != "launch":
            return n
        for a in op[4]:
            if isinstance(a, tuple) and a[0] is area and a[1] < nbytes:
                return n
    return len(ops)


class SlotGraphs:
    """`launch()` replays a plan's launches (`calls`) with the copy of the current staging
    slot's first `nbytes` to `area` before the first launch past `lead`, capturing that
    slot's graph on its first use (see the module docstring). `dev` has staging_slot() ->
    (index, slot object), staging_depth, capture_upload(area, nbytes, calls, lead) and
    launcher(graph)."""

    __slots__ = ("_dev", "_calls", "_lead", "_area", "_nbytes", "_stats", "_slot", "_by_slot")

    def __init__(self, dev, calls, lead: int, area, nbytes: int, stats: dict):
        self._dev, self._calls, self._lead, self._area, self._nbytes, self._stats = \
            dev, calls, lead, area, nbytes, stats
        self._slot = dev.staging_slot
        # per slot index: (the slot object the graph reads, its launch, the graph)
        self._by_slot = [(None, None, None)] * dev.staging_depth

    def __call__(self) -> None:
        i, slot = self._slot()
        entry = self._by_slot[i]
        if entry[0] is not slot:
            entry = self._capture(i, slot)
        entry[1]()

    def _capture(self, i: int, slot) -> tuple:
        dev = self._dev
        g = dev.capture_upload(self._area, self._nbytes, self._calls, self._lead)
        launcher = getattr(dev, "launcher", None)
        entry = (slot, launcher(g) if launcher else (lambda: dev.replay(g)), g)
        self._by_slot[i] = entry
        self._stats["slot_captures"] += 1
        return entry

    @property
    def graphs(self) -> list:
        """The captured graphs, by slot index (None where none yet)."""
        return [e[2] for e in self._by_slot]
