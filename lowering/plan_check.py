"""Check an artifact's plan against its graph.gir before any of it runs.

The manifest's plan drives the executors: value ids index buffers, shapes size them, slots
share memory between values. The root digest detects damage but not a consistent edit, so the
loaders also check that the plan is the one the graph implies: every value has the id, kind,
dtype and shape `value_table(graph)` gives it; the inputs and outputs are the graph's; every
step reads and writes existing values in an order where each value is written before it is
read; and re-running the slot assignment over the plan's own steps gives the plan's slots
(so no two live values were edited into one slot). Errors are ArtifactErrors naming the part.
"""
from __future__ import annotations

from .artifact import ArtifactError
from .plan import Step, ValueInfo, assign_slots, value_table

_VALUE_KEYS = {"id", "kind", "dtype", "shape", "slot", "view_of", "name"}
_STEP_KEYS = {"kernel", "op", "inputs", "outputs", "attrs"}


def _fail(path, msg: str):
    raise ArtifactError(f"{path}: the manifest's plan {msg}; recompile the artifact")


def _ints(x) -> bool:
    return isinstance(x, list) and all(type(i) is int for i in x)


def check_plan(plan, graph, path="artifact", backend: str = "") -> None:
    """Raise ArtifactError unless `plan` (manifest JSON) fits `graph` (parsed graph.gir);
    for the cpu backend its steps must also be exactly the ones the backend derives."""
    if not isinstance(plan, dict) or set(plan) != {"values", "steps", "inputs", "outputs",
                                                   "n_slots"}:
        _fail(path, f"has keys {sorted(plan) if isinstance(plan, dict) else type(plan).__name__}, "
                    f"expected values, steps, inputs, outputs, n_slots")
    vid, want = value_table(graph)
    values = plan["values"]
    if not isinstance(values, list) or len(values) != len(want):
        _fail(path, f"lists {len(values) if isinstance(values, list) else '?'} values, the graph "
                    f"has {len(want)}")
    for i, (v, w) in enumerate(zip(values, want)):
        if not isinstance(v, dict) or set(v) != _VALUE_KEYS:
            _fail(path, f"value {i} is malformed")
        # The cuda backend computes weight-only values once at load: kind "host".
        kind_ok = v["kind"] == w.kind or (v["kind"] == "host" and w.kind == "intermediate")
        if not kind_ok or (v["id"], v["dtype"], v["shape"], v["name"]) != \
                (w.id, w.dtype, w.shape, w.name):
            _fail(path, f"value {i} ({v['kind']} {v['dtype']} {v['shape']}) is not the graph's "
                        f"({w.kind} {w.dtype} {w.shape})")
        for k in ("slot", "view_of"):
            if v[k] is not None and (type(v[k]) is not int or v[k] < 0):
                _fail(path, f"value {i} has {k} {v[k]!r}")
        if v["view_of"] is not None and v["view_of"] >= len(values):
            _fail(path, f"value {i} is a view of a value that does not exist")
    n = len(values)
    for i in range(n):   # a cycle of views would send every walk to a view's base round forever
        v, hops = i, 0
        while values[v]["view_of"] is not None:
            v, hops = values[v]["view_of"], hops + 1
            if hops > n:
                _fail(path, f"value {i} is a view of itself through a cycle of views")
    ins = [vid[id(v)] for v in graph.inputs if id(v) in vid]
    outs = [vid[id(v)] for v in graph.outputs]
    if plan["inputs"] != ins or plan["outputs"] != outs:
        _fail(path, "inputs or outputs are not the graph's")
    steps = plan["steps"]
    if not isinstance(steps, list):
        _fail(path, "has no list of steps")
    ready = {w.id for w in want if w.kind in ("input", "buffer", "weight", "constant")}
    for i, s in enumerate(steps):
        if not isinstance(s, dict) or set(s) != _STEP_KEYS or not isinstance(s["attrs"], dict) \
                or not _ints(s["inputs"]) or not _ints(s["outputs"]) \
                or not isinstance(s["kernel"], str) or not isinstance(s["op"], str):
            _fail(path, f"step {i} is malformed")
        bad = [v for v in s["inputs"] + s["outputs"] if not 0 <= v < n]
        if bad:
            _fail(path, f"step {i} (gir.{s['op']}) names values {bad} that do not exist")
        unready = [v for v in s["inputs"] if v not in ready]
        if unready:
            _fail(path, f"step {i} (gir.{s['op']}) reads values {unready} before any step "
                        f"writes them")
        if any(values[v]["kind"] == "host" for v in s["outputs"]) and s["kernel"] != "host":
            _fail(path, f"step {i} (gir.{s['op']}) writes a load-time value at run time")
        ready.update(s["outputs"])
    missing = [o for o in outs if o not in ready]
    if missing:
        _fail(path, f"never writes the outputs {missing}")
    # The slots must be what the slot assignment gives for these steps and views.
    infos = [ValueInfo(w.id, v["kind"], w.dtype, w.shape, view_of=v["view_of"], name=w.name)
             for w, v in zip(want, values)]
    n_slots = assign_slots(infos, [Step(s["kernel"], s["op"], s["inputs"], s["outputs"])
                                   for s in steps])
    if n_slots != plan["n_slots"] or [v.slot for v in infos] != [v["slot"] for v in values]:
        _fail(path, "assigns memory slots that its steps do not imply (two live values "
                    "would share memory)")
    if backend == "cpu":
        _check_cpu_steps(plan, graph, path)


def _check_cpu_steps(plan, graph, path) -> None:
    """The cpu plan is one step per node, named and parameterized by mlir_cpu/plan_rules.py:
    compare every step with what the graph gives (a step that lost an input would call its
    kernel with too few arguments)."""
    from .mlir_cpu.plan_rules import kernel_name, symbols
    from .plan import build_plan

    want = build_plan(graph, kernel_name).steps
    steps = plan["steps"]
    if len(steps) != len(want):
        _fail(path, f"has {len(steps)} steps, the graph gives {len(want)}")
    at_load = {v["id"] for v in plan["values"] if v["kind"] in ("weight", "constant")}
    for i, (s, w) in enumerate(zip(steps, want)):
        if (s["kernel"], s["op"], s["inputs"], s["outputs"]) != \
                (w.kernel, w.op, w.inputs, w.outputs):
            _fail(path, f"step {i} ({s['kernel']}) is not the graph's {w.kernel}")
        a = s["attrs"]
        if w.kernel.startswith("k"):
            node = graph.nodes[int(w.kernel[1:].split("_", 1)[0])]
            if a.get("symbols", []) != symbols(node):
                _fail(path, f"step {i} ({s['kernel']}) passes dims {a.get('symbols')}, its node "
                            f"needs {symbols(node)}")
        if s["kernel"] == "view" and all(v in at_load for v in s["inputs"]):
            at_load.update(s["outputs"])  # a view of a load-time value is one too
        if a.get("at_load"):
            if any(v not in at_load for v in s["inputs"]):
                _fail(path, f"step {i} ({s['kernel']}) runs at load but reads per-call values")
            at_load.update(s["outputs"])
        for pair in a.get("prepack", []):
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                    and 0 <= pair[0] < len(s["inputs"]) and s["inputs"][pair[0]] in at_load
                    and isinstance(pair[1], str)):
                _fail(path, f"step {i} ({s['kernel']}) pre-packs {pair!r:.40}, which is not a "
                            f"load-time operand")
