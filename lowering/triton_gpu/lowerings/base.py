"""What a CUDA lowering writes into: one plan step of kernel launches, described as data.

A lowering gets a `StepBuilder` and the node (or fused group) and records launches. Everything
that depends on the call's sizes is an integer *expression* over the graph's symbolic dims
(`total_seq_len`, `batch`, ...) and a few runtime facts the executor derives from the ragged
metadata on the host (`sb.seq_max(offs)` -> `rt_seqmax_<vid>`: the most new tokens of any
sequence; `sb.kv_max(offs, clen)` -> `rt_kvmax_<o>_<c>`: the longest cache + new tokens).
Expressions are Python-syntax text over ints with + - * // %, comparisons, and/or, and the
functions min, max, cdiv; the executor evaluates them with a small AST walker, so the manifest
stays plain JSON (no pickles, no code).

Facts are declared with a bucket (`sb.kv_max(o, c, bucket=256)` -> `rt_kvmax_<o>_<c>_b256`):
the executor hands the rules the value rounded up to a multiple of the bucket (0 and 1 stay
exact, so `seqmax <= 1` still tells decode from prefill). A call's whole launch list is then a
function of its input shapes and bucketed facts only, which is what lets the CUDA executor
resolve it once, pack the kernel parameters once and replay one CUDA graph for every decode
step inside a bucket. A rule that reads a fact must give the same launches for any value in
the bucket (kernels read the exact lengths from the metadata on the device).

Manifest form of a step (Step.attrs):
  lets:     [[name, expr], ...]            evaluated in order, visible to later expressions
  variants: [{"when": expr | None, "ops": [op, ...], "scratch": [[name, dtype, numel_expr]]}]
            the first variant whose `when` holds runs; scratch is its temporary device memory
  op:       {"launch": kernel, "grid": [e, e, e], "args": [arg, ...]}
          | {"copy": [dst_arg, src_arg], "bytes": expr}
  arg:      ["v", vid, elem_offset_expr] (pointer into a value) | ["s", name] (scratch)
          | ["i", expr] (integer) | ["f", float] | ["n"] (null pointer)
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.lowering.plan import Step

TRITON_TYPES = {DType.float32: "fp32", DType.float16: "fp16", DType.bfloat16: "bf16",
                DType.float8_e4m3fn: "fp8e4nv", DType.int8: "i8", DType.uint8: "u8",
                DType.int32: "i32", DType.uint32: "u32", DType.int64: "i64", DType.bool: "i1"}


def e(d) -> str:
    """Expression text of a Dim, int or expression string."""
    if isinstance(d, str):
        return d
    if isinstance(d, bool):
        raise TypeError("a bool is not a size")
    return str(Dim(d)) if not isinstance(d, Dim) else str(d)


def numel(shape) -> Dim:
    p = Dim(1)
    for d in shape:
        p = p * d
    return p


def strides(shape) -> list[Dim]:
    """Row-major element strides of a (possibly symbolic) shape."""
    out, acc = [], Dim(1)
    for d in reversed(list(shape)):
        out.append(acc)
        acc = acc * d
    return out[::-1]


def ttype(dtype: DType) -> str:
    """Triton element type of a graphir dtype."""
    return TRITON_TYPES[dtype]


def static_int(d, what: str) -> int:
    if not Dim(d).is_static:
        raise ValueError(f"{what} must be static for the cuda backend, got {d}")
    return int(Dim(d))


@dataclass
class Program:
    """The lowered graph: the plan (steps with launch data) and the kernels to compile."""

    plan: Any
    kernels: dict = field(default_factory=dict)      # key -> KernelSpec
    sources: dict = field(default_factory=dict)      # key -> Triton source text
    infos: list = field(default_factory=list)        # lowering.plan.ValueInfo per value id


def spec_key(spec) -> str:
    """A stable unique name for one specialization (dedupes equal specs across steps)."""
    fn = spec.fn
    ident = json.dumps({"fn": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}",
                        "src": getattr(fn, "src", ""), "sig": dict(spec.signature),
                        "c": {k: repr(v) for k, v in spec.constexprs.items()},
                        "w": spec.num_warps, "s": spec.num_stages,
                        "d": list(spec.divisible_by_16),
                        # only when set, so uncapped kernels keep their keys
                        **({"r": spec.maxnreg} if getattr(spec, "maxnreg", None) else {}),
                        **({"e": list(spec.pdl_early_reads)}
                           if getattr(spec, "pdl_early_reads", ()) else {})},
                       sort_keys=True)
    return f"{spec.name}_{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def _bucket_suffix(bucket: int) -> str:
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"a runtime fact's bucket must be an int >= 1, got {bucket!r}")
    return f"_b{bucket}" if bucket > 1 else ""


class StepBuilder:
    """Collects the launches of one plan step; `vid(value)` numbers values as the plan does."""

    def __init__(self, program: Program, vids: dict[int, int], op: str, inputs, outputs,
                 constants: dict[int, Any] | None = None):
        self.program = program
        self._vids = vids
        self.op = op
        self.inputs = [vids[id(v)] for v in inputs]
        self.outputs = [vids[id(v)] for v in outputs]
        self.constants = constants or {}
        self.lets: list[list] = []
        self.variants: list[dict] = []
        self.kernel_names: list[str] = []

    # -- values ----------------------------------------------------------------------------
    def vid(self, value) -> int:
        return self._vids[id(value)]

    def unwritten(self, value) -> bool:
        """Whether no kernel of the plan writes `value` (or what it views): a graph input
        other than a buffer, a weight, a constant, a host step's result. A kernel may read
        such a value before its PDL wait (kernels/pdl.py); the runtime still checks where the
        call put it (a host input arrives through the upload kernel)."""
        infos, v = self.program.infos, self.vid(value)
        if not infos:
            return False
        while infos[v].view_of is not None:
            v = infos[v].view_of
        return infos[v].kind in ("input", "weight", "constant", "host")

    def ptr(self, value, offset="0") -> list:
        return ["v", self.vid(value), e(offset)]

    # -- kernels and ops ---------------------------------------------------------------------
    def kernel(self, spec, source: str | None = None, *, drop_divisibility: tuple = ()) -> str:
        if drop_divisibility:
            spec = replace(spec, divisible_by_16=tuple(a for a in spec.divisible_by_16
                                                       if a not in drop_divisibility))
        key = spec_key(spec)
        self.program.kernels.setdefault(key, spec)
        if source is not None:
            self.program.sources.setdefault(key, source)
        if key not in self.kernel_names:
            self.kernel_names.append(key)
        return key

    @contextmanager
    def when(self, cond: str | None):
        """Ops recorded inside run when `cond` holds (None: always; first match wins)."""
        self.variants.append({"when": cond, "ops": [], "scratch": []})
        yield
        if self.variants[-1]["ops"] == [] and cond is not None:
            raise ValueError(f"{self.op}: empty variant for {cond!r}")

    def _ops(self) -> list:
        if not self.variants:
            self.variants.append({"when": None, "ops": [], "scratch": []})
        return self.variants[-1]["ops"]

    def launch(self, key: str, grid, args: list) -> None:
        spec = self.program.kernels[key]
        params = spec.runtime_params()
        if len(args) != len(params):
            raise ValueError(f"{self.op}: kernel {key} takes {len(params)} arguments "
                             f"{[p for p, _ in params]}, the lowering passed {len(args)}")
        norm = []
        for (pname, ptype), a in zip(params, args):
            if not isinstance(a, list):
                a = ["f", float(a)] if ptype.startswith("fp") else ["i", e(a)]
            if ptype.startswith("*") != (a[0] in ("v", "s", "n")):
                raise ValueError(f"{self.op}: argument {pname} of {key} is {ptype}, got {a}")
            norm.append(a)
        g = [e(x) for x in grid] + ["1"] * (3 - len(grid))
        self._ops().append({"launch": key, "grid": g, "args": norm})

    def copy(self, dst: list, src: list, nbytes) -> None:
        self._ops().append({"copy": [dst, src], "bytes": e(nbytes)})

    def let(self, name: str, expr) -> str:
        self.lets.append([name, e(expr)])
        return name

    def scratch(self, name: str, dtype: str, count) -> list:
        """Temporary memory of the current variant (allocated only when it runs)."""
        self._ops()
        self.variants[-1]["scratch"].append([name, dtype, e(count)])
        return ["s", name]

    @staticmethod
    def seq_max(offs_vid: int, bucket: int = 1) -> str:
        """The runtime fact "most new tokens of any sequence", rounded up to `bucket`."""
        return f"rt_seqmax_{offs_vid}" + _bucket_suffix(bucket)

    @staticmethod
    def kv_max(offs_vid: int, clen_vid: int, bucket: int = 1) -> str:
        """The runtime fact "longest cache + new tokens", rounded up to `bucket`."""
        return f"rt_kvmax_{offs_vid}_{clen_vid}" + _bucket_suffix(bucket)

    def step(self) -> Step:
        name = "+".join(self.kernel_names) or "copy"
        attrs = {"lets": self.lets, "variants": self.variants}
        return Step(name, self.op, self.inputs, self.outputs, attrs)
