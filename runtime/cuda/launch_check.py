"""Check a cuda artifact's launch data before any of it runs.

lowering/plan_check.py checks the plan's values and steps against graph.gir; this checks what
only the cuda executor reads: each step's variants, launch rules, kernel arguments and copies
(lowering/triton_gpu/lowerings/base.py documents the form). Every launch must name a kernel of
the artifact with as many arguments as it takes, point only into the step's own values or its
scratch, and use launch rules the whitelisted evaluator accepts; a host step must name a graph
node of its op. Anything else is an ArtifactError before a kernel is loaded.
"""
from __future__ import annotations

from graphir.lowering.artifact import ArtifactError

from .module import SCRATCH_NAMES, LaunchSpec
from .plan_values import _compile
from .upload_kernel import PARAMS, UPLOAD_KEY

_SCRATCH_DTYPES = {"float32", "float16", "bfloat16", "int32", "int64", "uint8", "uint32"}
_KERNELS_WITHOUT_LAUNCHES = {"host", "view", "host_runtime", "collective"}


def _fail(path, i: int, s: dict, msg: str):
    raise ArtifactError(f"{path}: plan step {i} (gir.{s.get('op')}) {msg}; recompile the "
                        f"artifact")


def _rule(path, i, s, text, what: str) -> None:
    if not isinstance(text, str):
        _fail(path, i, s, f"has a {what} that is not a launch rule: {text!r:.40}")
    try:
        _compile(text)
    except (ValueError, SyntaxError) as e:
        _fail(path, i, s, f"has a bad {what}: {e}")


def check_launch_data(manifest: dict, graph, path="artifact") -> None:
    """Raise ArtifactError unless every step's launch data is well formed (see module doc)."""
    kernels = manifest["kernels"]
    _check_upload(manifest, path)
    for i, s in enumerate(manifest["plan"]["steps"]):
        kind, attrs = s["kernel"], s["attrs"]
        if kind in ("host", "host_runtime"):
            node = attrs.get("node")
            if type(node) is not int or not 0 <= node < len(graph.nodes) \
                    or graph.nodes[node].op != s["op"]:
                _fail(path, i, s, f"names graph node {node!r}, which is not a gir.{s['op']}")
            continue
        if kind in _KERNELS_WITHOUT_LAUNCHES:
            continue
        own = set(s["inputs"]) | set(s["outputs"])
        lets = attrs.get("lets", [])
        if not isinstance(lets, list) or not all(isinstance(x, list) and len(x) == 2
                                                 and isinstance(x[0], str) for x in lets):
            _fail(path, i, s, "has malformed lets")
        for name, expr in lets:
            _rule(path, i, s, expr, f"let {name!r}")
        variants = attrs.get("variants")
        if not isinstance(variants, list) or not variants:
            _fail(path, i, s, "has no variants")
        for var in variants:
            if not isinstance(var, dict) or set(var) != {"when", "ops", "scratch"}:
                _fail(path, i, s, "has a malformed variant")
            if var["when"] is not None:
                _rule(path, i, s, var["when"], "variant condition")
            names = set()
            for sc in var["scratch"]:
                if not (isinstance(sc, list) and len(sc) == 3 and isinstance(sc[0], str)
                        and sc[1] in _SCRATCH_DTYPES):
                    _fail(path, i, s, f"has a malformed scratch entry {sc!r:.60}")
                _rule(path, i, s, sc[2], f"scratch size of {sc[0]!r}")
                names.add(sc[0])
            for op in var["ops"]:
                _check_op(path, i, s, op, kernels, own, names)


def _check_upload(manifest: dict, path) -> None:
    """The upload kernel (no plan step launches it: runtime/cuda/upload_kernel.py) must take
    the parameters its launcher passes and state its block of words."""
    k = manifest["kernels"].get(UPLOAD_KEY)
    if k is None:
        return  # built before artifacts had one: the slot graphs copy instead
    try:
        params = [(p["name"], p["type"]) for p in k["params"]]
        words = k["constexprs"]["WORDS"]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: kernel {UPLOAD_KEY} has a malformed entry ({e!r:.60}); "
                            f"recompile the artifact") from None
    scratch = [n for n, _ in params[len(PARAMS):]]
    if params[:len(PARAMS)] != list(PARAMS) or scratch not in ([], list(SCRATCH_NAMES)) \
            or type(words) is not int or not 1 <= words <= 1 << 16:
        raise ArtifactError(f"{path}: kernel {UPLOAD_KEY} takes {params!r:.80} with WORDS "
                            f"{words!r:.20}, not the upload kernel's {list(PARAMS)}; recompile "
                            f"the artifact")


def _check_arg(path, i, s, a, own, scratch) -> None:
    if not isinstance(a, list) or not a:
        _fail(path, i, s, f"has a malformed argument {a!r:.40}")
    tag = a[0]
    if tag == "v" and len(a) == 3:
        if a[1] not in own:
            _fail(path, i, s, f"passes value {a[1]!r}, which is not one of its own inputs or "
                              f"outputs")
        _rule(path, i, s, a[2], "pointer offset")
    elif tag == "s" and len(a) == 2:
        if a[1] not in scratch:
            _fail(path, i, s, f"passes scratch {a[1]!r}, which its variant does not allocate")
    elif tag == "i" and len(a) == 2:
        _rule(path, i, s, a[1], "integer argument")
    elif tag == "f" and len(a) == 2 and isinstance(a[1], (int, float)) \
            and not isinstance(a[1], bool):
        pass
    elif tag == "n" and len(a) == 1:
        pass
    else:
        _fail(path, i, s, f"has a malformed argument {a!r:.40}")


def _check_op(path, i, s, op, kernels, own, scratch) -> None:
    if not isinstance(op, dict):
        _fail(path, i, s, "has a malformed launch")
    if set(op) == {"copy", "bytes"}:
        if not isinstance(op["copy"], list) or len(op["copy"]) != 2:
            _fail(path, i, s, "has a malformed copy")
        for a in op["copy"]:
            if not (isinstance(a, list) and a and a[0] in ("v", "s")):
                _fail(path, i, s, "copies from or to something not a value or scratch")
            _check_arg(path, i, s, a, own, scratch)
        _rule(path, i, s, op["bytes"], "copy size")
        return
    if set(op) != {"launch", "grid", "args"}:
        _fail(path, i, s, f"has a launch with keys {sorted(op)}")
    k = kernels.get(op["launch"]) if isinstance(op["launch"], str) else None
    if k is None:
        _fail(path, i, s, f"launches {op['launch']!r:.60}, which is not a kernel of the artifact")
    if not isinstance(op["grid"], list) or len(op["grid"]) != 3:
        _fail(path, i, s, "has a grid that is not three launch rules")
    for g in op["grid"]:
        _rule(path, i, s, g, "grid size")
    if not isinstance(op["args"], list):
        _fail(path, i, s, "has malformed arguments")
    want = None
    if k.get("kind") != "cublaslt":
        try:  # the user parameters, Triton's scratch pair removed, as the launcher counts them
            want = len(LaunchSpec.from_metadata(k).params)
        except (KeyError, TypeError, ValueError) as e:
            _fail(path, i, s, f"launches {op['launch']}, whose kernel entry is malformed ({e})")
    if want is not None and len(op["args"]) != want:
        _fail(path, i, s, f"passes {len(op['args'])} arguments to {op['launch']}, which takes "
                          f"{want}")
    for a in op["args"]:
        _check_arg(path, i, s, a, own, scratch)
