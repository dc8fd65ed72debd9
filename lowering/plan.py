"""Backend-neutral execution plan: the schedule of kernel calls and the memory plan.

Every tensor value gets an id. A step runs one kernel (one op, or a fused group a backend
formed) reading and writing value ids. Reshapes of contiguous values are views: no kernel, the
runtime reinterprets the base's storage. Intermediates live in slots; a slot is reused by values
whose lifetimes do not overlap, and is sized at run time as the largest of its values once the
symbolic dims are known (so the plan holds for every shape the graph accepts).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from graphir.types import BufferType, ChainType

VIEW_OPS = {"reshape"}


@dataclass
class ValueInfo:
    id: int
    kind: str            # input | weight | constant | intermediate | output | buffer
    dtype: str
    shape: list[str]     # dims as printed (symbolic allowed)
    slot: int | None = None
    view_of: int | None = None
    name: str | None = None   # weight name / input index as text


@dataclass
class Step:
    kernel: str          # symbol in the compiled code (or "view")
    op: str
    inputs: list[int]
    outputs: list[int]
    attrs: dict = field(default_factory=dict)


@dataclass
class Plan:
    values: list[ValueInfo]
    steps: list[Step]
    inputs: list[int]
    outputs: list[int]
    n_slots: int

    def to_json(self) -> dict:
        return {"values": [asdict(v) for v in self.values], "steps": [asdict(s) for s in self.steps],
                "inputs": self.inputs, "outputs": self.outputs, "n_slots": self.n_slots}

    @staticmethod
    def from_json(d: dict) -> "Plan":
        return Plan([ValueInfo(**v) for v in d["values"]], [Step(**s) for s in d["steps"]],
                    d["inputs"], d["outputs"], d["n_slots"])


def value_table(graph) -> tuple[dict[int, int], list[ValueInfo]]:
    """Number every non-chain value; returns id(value) -> vid and the infos."""
    vid: dict[int, int] = {}
    infos: list[ValueInfo] = []

    def add(v, kind, name=None):
        vid[id(v)] = len(infos)
        infos.append(ValueInfo(len(infos), kind, v.type.dtype.short, [str(d) for d in v.type.shape],
                               name=name))

    for i, v in enumerate(graph.inputs):
        if not isinstance(v.type, ChainType):
            add(v, "buffer" if isinstance(v.type, BufferType) else "input", str(i))
    for n in graph.nodes:
        for r in n.results:
            if isinstance(r.type, ChainType):
                continue
            if n.op == "weight":
                add(r, "weight", n.attrs["name"])
            elif n.op == "constant":
                add(r, "constant")
            else:
                add(r, "intermediate")
    for v in graph.outputs:
        if infos[vid[id(v)]].kind == "intermediate":
            infos[vid[id(v)]].kind = "output"
    return vid, infos


def assign_slots(infos: list[ValueInfo], steps: list[Step]) -> int:
    """Greedy liveness-based slot assignment for intermediates; views share their base's slot."""
    def base(v: int) -> int:
        while infos[v].view_of is not None:
            v = infos[v].view_of
        return v

    last_use: dict[int, int] = {}
    for i, s in enumerate(steps):
        for v in s.inputs + s.outputs:
            last_use[base(v)] = i
    free: list[int] = []
    slot_shapes: dict[int, list[str]] = {}
    n_slots = 0
    live: dict[int, int] = {}  # base value -> slot
    for i, s in enumerate(steps):
        for v in s.outputs:
            if infos[v].kind != "intermediate" or infos[v].view_of is not None:
                continue
            same = [k for k in free if k in slot_shapes and slot_shapes[k] == infos[v].shape]
            slot = same[0] if same else (free[0] if free else None)
            if slot is None:
                slot, n_slots = n_slots, n_slots + 1
            else:
                free.remove(slot)
            slot_shapes[slot] = infos[v].shape
            infos[v].slot = slot
            live[v] = slot
        for b, slot in list(live.items()):
            if last_use.get(b, -1) <= i:
                free.append(slot)
                del live[b]
    for v in infos:
        if v.view_of is not None and infos[base(v.id)].slot is not None:
            v.slot = infos[base(v.id)].slot
    return n_slots


def build_plan(graph, kernel_name) -> Plan:
    """One step per non-structural node; `kernel_name(node, index)` names its compiled symbol."""
    vid, infos = value_table(graph)
    steps: list[Step] = []
    for i, n in enumerate(graph.nodes):
        if n.op in ("chain", "weight", "constant"):
            continue
        ins = [vid[id(v)] for v in n.operands if not isinstance(v.type, ChainType)]
        outs = [vid[id(r)] for r in n.results if not isinstance(r.type, ChainType)]
        if n.op in VIEW_OPS and infos[outs[0]].kind == "intermediate":
            infos[outs[0]].view_of = ins[0]
            steps.append(Step("view", n.op, ins, outs))
            continue
        steps.append(Step(kernel_name(n, i), n.op, ins, outs))
    n_slots = assign_slots(infos, steps)
    return Plan(infos, steps, [vid[id(v)] for v in graph.inputs if not isinstance(v.type, ChainType)],
                [vid[id(v)] for v in graph.outputs], n_slots)


def host_nodes(graph) -> set[int]:
    """id() of nodes whose values depend only on constants and weights (static shapes, no
    effects): the executor computes them once at load time with the op references."""
    known: set[int] = set()
    host: set[int] = set()
    for n in graph.nodes:
        if n.op == "chain":
            continue
        if n.op in ("weight", "constant"):
            host.add(id(n))
            known.update(id(r) for r in n.results)
            continue
        if n.opdef.effects or any(isinstance(r.type, ChainType) for r in n.results):
            continue
        if all(id(v) in known for v in n.operands) \
                and all(r.type.is_static for r in n.results):
            host.add(id(n))
            known.update(id(r) for r in n.results)
    return host
