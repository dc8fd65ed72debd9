"""A call plan's CUDA graph captured once per pinned staging slot, led by the upload.

On a cache hit the executor fills the current staging slot with the call's host inputs
(offsets, cache lengths, lookup table). Queued as a separate `cuMemcpyHtoDAsync` before the
graph launch, that copy is a driver call (3-14 us on the hosts we measured) on the path to
the launch, where a decode step at batch 1 is bound by the host. A copy node inside the graph
costs nothing per call, but it reads one fixed host address, so each slot of the ring gets a
graph of its own whose first node copies that slot: the hit then makes one driver call for
upload and launches together. That node is the artifact's upload kernel reading the slot
through its device mapping where it can run (runtime/cuda/upload_kernel.py): after a copy
node the next kernel started 2.5-8 us later, after the kernel 0.3 us (an H100; queued steps
1-7 us shorter, synchronized ones unchanged).

The copy comes first. Forked instead beside the launches that read no metadata (the qkv
projection) and joined before rope_split_store, it was slower on an H100 (decode B1 61.0
against 59.1 us a step): the join replaces the programmatic (PDL) edge into rope_split_store
with a full dependency, 2.2 us, more than the 1 us it hid (BENCHMARKS.md, twentieth session).

A slot's memory can be replaced (the ring regrows a slot too small for a larger call): each
graph remembers the slot object it reads, and a slot that is not the same object any more is
captured again before its next launch. The ring waits for a slot's last use before replacing
it, so no graph that reads the old memory is still running; the graph object holds the old
slot until then.
"""
from __future__ import annotations

import os

# GRAPHIR_SLOT_GRAPHS=0: the upload as its own copy before the graph (for A/B measurements).
ENABLED = os.environ.get("GRAPHIR_SLOT_GRAPHS", "1") != "0"


def graph_launch(dev, graph):
    """A zero-argument callable replaying `graph` on `dev` (the device's prebound launcher
    where it has one)."""
    launcher = getattr(dev, "launcher", None)
    return launcher(graph) if launcher else (lambda: dev.replay(graph))


class SlotGraphs:
    """`launch()` replays `run`'s launches behind the copy of the current staging slot's first
    `nbytes` to `area`, capturing that slot's graph on its first use (see the module
    docstring). `dev` has staging_slot() -> (index, slot object), staging_depth,
    upload_staged(area, nbytes), capture(fn) and launcher(graph)."""

    __slots__ = ("_dev", "_run", "_area", "_nbytes", "_stats", "_slot", "_by_slot")

    def __init__(self, dev, run, area, nbytes: int, stats: dict):
        self._dev, self._run, self._area, self._nbytes, self._stats = \
            dev, run, area, nbytes, stats
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
        dev, area, nbytes, run = self._dev, self._area, self._nbytes, self._run

        def work():
            dev.upload_staged(area, nbytes)  # captured: a node reading this slot
            run()
        g = dev.capture(work)
        entry = (slot, graph_launch(dev, g), g)
        self._by_slot[i] = entry
        self._stats["slot_captures"] += 1
        return entry

    @property
    def graphs(self) -> list:
        """The captured graphs, by slot index (None where none yet)."""
        return [e[2] for e in self._by_slot]
