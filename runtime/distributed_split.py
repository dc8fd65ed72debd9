"""Split a multi-device graph into one graph per process (rank) for graphir.runtime.distributed.

Rank r runs the part of the graph on the r-th device (the graph's GPU ids when it has GPU values,
else its CPU ids, sorted). Its graph holds:
  - every node whose values live on that device, in the original order (so the KV-cache writes
    keep their order and every rank issues its collectives in the same order);
  - each allreduce / allgather as this rank's part of a collective over the processes: the
    operand on this device in, the result on this device out, attribute `world_size`;
  - values it reads from another device through `transfer_to`: a graph input read there
    becomes an input of this rank (every rank that reads `x` is given `x`), and a value
    computed from weights and constants only (a RoPE table) is recomputed here;
  - in graphs with GPU values, CPU-typed values float to the ranks that read them (as the
    single-process CUDA executor places them).
A value computed from inputs on one device and moved to another has no process to come from
and is refused: across processes, devices meet only in collectives.

A rank's inputs are the original inputs it reads, in the original order (an input nobody reads
is dropped); `RankGraph.inputs` maps them to the original indices, `outputs` likewise.

Example:
    >>> ranks = split_graph(tp_graph)          # one RankGraph per device of tp_graph
    >>> ranks[1].graph.inputs, ranks[1].inputs  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

from graphir.device import DeviceRef
from graphir.graph import Graph
from graphir.types import BufferType, ChainType, TensorType

COLLECTIVES = ("allreduce", "allgather")
_FLOAT = "float"


class SplitError(ValueError):
    """The graph cannot run as one process per device; the message names the node."""


@dataclass
class RankGraph:
    """One process's graph and how it maps onto the original graph."""

    rank: int
    device: DeviceRef
    graph: Graph
    inputs: list[int]       # original input index of each input of `graph`
    outputs: list[int]      # original output index of each output of `graph`
    collectives: list[dict] = field(default_factory=list)  # in issue order

    @property
    def weights(self) -> list[str]:
        """The weight names this rank binds (its shard)."""
        return sorted(n.attrs["name"] for n in self.graph.nodes if n.op == "weight")


def _values(graph):
    vals = [v for v in graph.inputs if not isinstance(v.type, ChainType)]
    return vals + [r for n in graph.nodes for r in n.results if not isinstance(r.type, ChainType)]


def rank_devices(graph) -> list[DeviceRef]:
    """The devices of the ranks, in rank order: the GPU ids when any value is on a GPU (CPU
    values then float), else the CPU ids; sorted."""
    devs = {v.type.device for v in _values(graph)}
    gpu = sorted({d.id for d in devs if d.is_gpu()})
    if gpu:
        return [DeviceRef.GPU(i) for i in gpu]
    return [DeviceRef.CPU(i) for i in sorted({d.id for d in devs})] or [DeviceRef.CPU()]


def _where(n) -> str:
    return f"gir.{n.op}" + (f" at {n.loc}" if n.loc else "")


class _Splitter:
    def __init__(self, graph):
        self.g = graph
        self.devices = rank_devices(graph)
        self.gpu = self.devices[0].is_gpu()
        self.world = len(self.devices)
        # Values computed from weights and constants only: any rank may recompute them.
        self.static: set[int] = set()
        for n in graph.nodes:
            ins = [v for v in n.operands if not isinstance(v.type, ChainType)]
            if n.op not in COLLECTIVES and not n.opdef.effects and \
                    all(id(v) in self.static for v in ins):
                self.static.update(id(r) for r in n.results)
        for n in graph.nodes:
            if n.op in COLLECTIVES:
                got = [v.type.device for v in n.operands]
                if sorted(got, key=str) != sorted(self.devices, key=str):
                    raise SplitError(f"{_where(n)} spans devices {[str(d) for d in got]}; across "
                                     f"processes a collective must span every device of the "
                                     f"graph, {[str(d) for d in self.devices]}")

    def home(self, dev: DeviceRef):
        """The device a value of `dev` runs on, or _FLOAT."""
        if self.gpu and dev.is_cpu():
            return _FLOAT
        return dev

    def node_home(self, n):
        outs = [r for r in n.results if not isinstance(r.type, ChainType)]
        vals = outs or [v for v in n.operands if not isinstance(v.type, ChainType)]
        homes = {self.home(v.type.device) for v in vals}
        if len(homes) > 1:
            homes.discard(_FLOAT)
        if len(homes) != 1:
            raise SplitError(f"{_where(n)} has values on several devices "
                             f"({sorted(map(str, homes))}); only transfer_to and collectives "
                             f"cross devices")
        return homes.pop()

    def split(self, rank: int) -> RankGraph:
        dev = self.devices[rank]
        need: set[int] = {id(v) for v in self.g.outputs if self.home(v.type.device) in (dev, _FLOAT)}
        keep: dict[int, str] = {}  # id(node) -> own | float | clone | collective
        for n in reversed(self.g.nodes):
            if n.op == "chain":
                continue
            operands = [v for v in n.operands if not isinstance(v.type, ChainType)]
            if n.op in COLLECTIVES:
                keep[id(n)] = "collective"
                need.update(id(v) for v in operands if v.type.device == dev)
                continue
            home = self.node_home(n)
            if home == dev:
                keep[id(n)] = "own"
            elif not any(id(r) in need for r in n.results):
                continue
            elif home == _FLOAT:
                keep[id(n)] = "float"
            elif all(id(r) in self.static for r in n.results if not isinstance(r.type, ChainType)):
                keep[id(n)] = "clone"
            else:
                raise SplitError(f"{_where(n)} computes on {home} a value that device {dev} reads "
                                 f"(through transfer_to); across processes devices exchange "
                                 f"values only through allreduce / allgather, or give each rank "
                                 f"the input")
            need.update(id(v) for v in operands)
        return self._build(rank, dev, need, keep)

    def _build(self, rank, dev, need, keep) -> RankGraph:
        g = self.g
        ins = [i for i, v in enumerate(g.inputs) if id(v) in need]
        types = [self._retype(g.inputs[i].type, dev) for i in ins]
        names = [g.input_names[i] for i in ins] if g.input_names else None
        out = Graph(f"{g.name}.rank{rank}", input_types=types, input_names=names)
        vmap = {id(g.inputs[i]): v for i, v in zip(ins, out.inputs)}
        collectives = []
        for n in g.nodes:
            mode = keep.get(id(n))
            if mode is None:
                continue
            attrs = dict(n.attrs)
            if mode == "collective":
                k = next(i for i, v in enumerate(n.operands) if v.type.device == dev)
                operands = [vmap[id(n.operands[k])]]
                attrs["world_size"] = self.world
                res = out.apply(n.op, operands, attrs)
                vmap[id(n.results[k])] = res[0]
                collectives.append({"op": n.op, "dtype": res[0].type.dtype.short,
                                    "shape": [str(d) for d in operands[0].type.shape],
                                    "axis": int(attrs.get("axis", 0))})
            else:
                if mode == "clone" and isinstance(attrs.get("device"), DeviceRef):
                    attrs["device"] = dev
                operands = [vmap[id(v)] for v in n.operands if not isinstance(v.type, ChainType)]
                res = out.apply(n.op, operands, attrs)
                olds = [r for r in n.results if not isinstance(r.type, ChainType)]
                vmap.update((id(o), r) for o, r in zip(olds, res))
            out.nodes[-1].loc = n.loc
        outs = [i for i, v in enumerate(g.outputs)
                if self.home(v.type.device) in (dev, _FLOAT) and id(v) in vmap]
        out.output(*[vmap[id(g.outputs[i])] for i in outs])
        return RankGraph(rank, dev, out, ins, outs, collectives)

    def _retype(self, t, dev):
        if self.home(t.device) == _FLOAT or t.device == dev:
            return t
        cls = BufferType if isinstance(t, BufferType) else TensorType
        return cls(t.dtype, list(t.shape), dev)


def split_graph(graph) -> list[RankGraph]:
    """One RankGraph per device of `graph` (see the module docstring); SplitError when a
    value would have to move between processes outside a collective."""
    s = _Splitter(graph)
    return [s.split(r) for r in range(s.world)]


def split_rank(graph, rank: int) -> RankGraph:
    """The RankGraph of one rank (what a process compiles for itself)."""
    s = _Splitter(graph)
    if not 0 <= rank < s.world:
        raise ValueError(f"graph {graph.name!r} runs on {s.world} devices "
                         f"({[str(d) for d in s.devices]}); there is no rank {rank}")
    return s.split(rank)
