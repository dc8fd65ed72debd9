"""Triton source for a fused elementwise group (graphir/passes/elementwise_fusion.py).

One kernel per group: each program handles BLOCK consecutive elements of the group's iteration
shape; an input with the same shape is read at the linear index, a broadcast input through the
coordinates and its (zero for broadcast axes) strides, a 1-element input at offset 0, a scalar
constant is inlined as a literal. Floats compute in fp32 and every member's result is rounded
to its dtype (`.to(bf16).to(fp32)`), as the reference interpreter stores each op's result.
Static sizes and strides are literals; symbolic ones are int64 kernel parameters.

The source is written to a content-addressed file and imported (Triton's JIT reads the source
of what it compiles); `aot.compile_kernel` then builds the cubin offline.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.types import ChainType
from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec

from .lowerings.base import StepBuilder, e, numel, strides, ttype

BLOCK = 1024
_TL = {DType.float32: "tl.float32", DType.float16: "tl.float16", DType.bfloat16: "tl.bfloat16",
       DType.float8_e4m3fn: "tl.float8e4nv", DType.int8: "tl.int8", DType.uint8: "tl.uint8",
       DType.int32: "tl.int32", DType.uint32: "tl.uint32", DType.int64: "tl.int64",
       DType.bool: "tl.int1"}
HELPERS = '''
@triton.jit
def _tanh(x):
    a = tl.abs(x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    small = a * (1.0 - a * a * (1.0 / 3.0 - a * a * (2.0 / 15.0)))
    t = tl.where(a < 0.0625, small, t)
    return tl.where(x < 0, -t, t)


@triton.jit
def _pow(x, y):
    r = tl.exp2(y * tl.log2(tl.abs(x)))
    odd = (tl.floor(y * 0.5) * 2.0) != y
    integral = tl.floor(y) == y
    r = tl.where(x < 0, tl.where(integral, tl.where(odd, -r, r), float("nan")), r)
    return tl.where(y == 0.0, 1.0, r)


@triton.jit
def _ifloordiv(x, y):
    q = x // y
    return tl.where((x % y != 0) & ((x < 0) != (y < 0)), q - 1, q)


@triton.jit
def _imod(x, y):
    r = x % y
    return tl.where((r != 0) & ((r < 0) != (y < 0)), r + y, r)
'''

_UNARY_F = {"exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})",
            "rsqrt": "tl.rsqrt({0})", "cos": "tl.cos({0})", "sin": "tl.sin({0})",
            "tanh": "_tanh({0})", "sigmoid": "1.0 / (1.0 + tl.exp(-{0}))",
            "silu": "{0} / (1.0 + tl.exp(-{0}))", "floor": "tl.floor({0})"}
_BINARY = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}",
           "maximum": "tl.maximum({0}, {1})", "minimum": "tl.minimum({0}, {1})",
           "greater": "{0} > {1}", "greater_equal": "{0} >= {1}", "equal": "{0} == {1}",
           "not_equal": "{0} != {1}", "logical_and": "{0} & {1}", "logical_or": "{0} | {1}"}
ELEMENTWISE_OPS = (set(_UNARY_F) | set(_BINARY)
                   | {"neg", "abs", "gelu", "div", "pow", "mod", "where", "cast", "clamp", "range"})


def _compute_type(dt: DType) -> str:
    return "tl.float32" if dt.is_float else _TL[dt]


def _lit(value, dt: DType) -> str:
    v = np.asarray(value).reshape(-1)[0]
    if dt is DType.bool:
        return "True" if bool(v) else "False"
    if dt.is_float:
        f = float(v)
        return f"float('{f}')" if not np.isfinite(f) else repr(f)
    return str(int(v))


class _Emitter:
    def __init__(self, shape, constants: dict):
        self.shape = list(shape)
        self.constants = constants
        self.params: dict[str, str] = {}     # expression text -> parameter name
        self.lines: list[str] = []
        self.coords = False

    def size(self, d) -> str:
        d = Dim(d)
        if d.is_static:
            return str(int(d))
        text = e(d)
        return self.params.setdefault(text, f"p{len(self.params)}")

    def index(self, t) -> str:
        """Element offset expression of an operand of type t in the iteration space."""
        if list(t.shape) == self.shape:
            return "offs"
        if numel(t.shape) == Dim(1):
            return "offs * 0"
        self.coords = True
        r, k = len(self.shape), t.rank
        st = strides(t.shape)
        terms = []
        for j in range(r):
            i = j - (r - k)
            if i < 0 or (t.shape[i] == Dim(1) and self.shape[j] != Dim(1)):
                continue
            terms.append(f"c{j} * {self.size(st[i])}")
        return " + ".join(terms) or "offs * 0"

    def coord_lines(self) -> list[str]:
        r = len(self.shape)
        out = ["rem = offs"]
        for j in range(r - 1, 0, -1):
            d = self.size(self.shape[j])
            out += [f"c{j} = rem % {d}", f"rem = rem // {d}"]
        if r:
            out.append("c0 = rem")
        return out


def _emit_op(n, args: list[str], out_dt: DType) -> str:
    op, a = n.op, n.attrs
    in_dt = n.operands[0].type.dtype if n.operands else out_dt
    if op in _UNARY_F:
        return _UNARY_F[op].format(*args)
    if op in _BINARY:
        return _BINARY[op].format(*args)
    if op == "neg":
        return f"-{args[0]}" if in_dt is not DType.bool else args[0]
    if op == "abs":
        return f"tl.abs({args[0]})"
    if op == "gelu":
        x = args[0]
        if a.get("approximate") == "tanh":
            return f"0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
        return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"
    if op == "div":
        return f"{args[0]} / {args[1]}" if in_dt.is_float else f"_ifloordiv({args[0]}, {args[1]})"
    if op == "mod":
        if in_dt.is_float:
            return f"{args[0]} - tl.floor({args[0]} / {args[1]}) * {args[1]}"
        return f"_imod({args[0]}, {args[1]})"
    if op == "pow":
        return f"_pow({args[0]}, {args[1]})" if in_dt.is_float else \
            f"_pow({args[0]}.to(tl.float32), {args[1]}.to(tl.float32))"
    if op == "where":
        return f"tl.where({args[0]}, {args[1]}, {args[2]})"
    if op == "clamp":
        x = args[0] if in_dt.is_float else f"{args[0]}.to(tl.float32)"
        if a.get("min") is not None:
            x = f"tl.maximum({x}, {float(a['min'])!r})"
        if a.get("max") is not None:
            x = f"tl.minimum({x}, {float(a['max'])!r})"
        return x
    if op == "cast":
        if out_dt is DType.bool:
            return f"({args[0]} != 0)"
        return f"{args[0]}.to({_compute_type(out_dt)})"
    if op == "range":
        return f"offs.to(tl.float64) * {float(a['step'])!r} + {float(a['start'])!r}"
    raise ValueError(f"gir.{op} has no elementwise codegen for cuda")


def _round(expr: str, dt: DType, from_dt: DType | None) -> str:
    """Store-then-reload rounding of a computed value to its dtype (floats below fp32, ints)."""
    if dt in (DType.bfloat16, DType.float16, DType.float8_e4m3fn):
        return f"({expr}).to({_TL[dt]}).to(tl.float32)"
    if dt.is_float:
        return f"({expr}).to(tl.float32)"
    if dt is DType.bool:
        return expr
    return f"({expr}).to({_TL[dt]})"


def generate(group, constants: dict, name_hint: str = "fused"):
    """(function name, source, signature, params: {name: expr}, input list) for a group."""
    shape = list(group.nodes[0].results[0].type.shape)
    em = _Emitter(shape, constants)
    names: dict[int, str] = {}
    loads, body = [], []
    inputs = []
    for v in group.inputs:
        if id(v) in constants and numel(v.type.shape) == Dim(1):
            names[id(v)] = _lit(constants[id(v)], v.type.dtype)
            continue
        k = len(inputs)
        inputs.append(v)
        cast = ".to(tl.float32)" if v.type.dtype.is_float else ""
        loads.append(f"x{k} = tl.load(in{k} + ({em.index(v.type)}), mask=mask, other=0){cast}")
        names[id(v)] = f"x{k}"
    for j, n in enumerate(group.nodes):
        args = [names[id(v)] for v in n.operands if not isinstance(v.type, ChainType)]
        out_dt = n.results[0].type.dtype
        expr = _emit_op(n, args, out_dt)
        in_dt = n.operands[0].type.dtype if n.operands else None
        body.append(f"v{j} = {_round(expr, out_dt, in_dt)}")
        names[id(n.results[0])] = f"v{j}"
    stores = []
    for k, r in enumerate(group.outputs):
        val = names[id(r)]
        if r.type.dtype is not DType.bool:
            val = f"{val}.to(out{k}.dtype.element_ty)"
        stores.append(f"tl.store(out{k} + offs, {val}, mask=mask)")
    n_expr = em.size(numel(shape))
    pre = em.coord_lines() if em.coords else []
    sig = {**{f"in{k}": f"*{ttype(v.type.dtype)}" for k, v in enumerate(inputs)},
           **{f"out{k}": f"*{ttype(r.type.dtype)}" for k, r in enumerate(group.outputs)},
           **{p: "i64" for p in em.params.values()}, "BLOCK": "constexpr"}
    ops = "_".join(dict.fromkeys(n.op for n in group.nodes))[:40]
    text_body = "\n    ".join(["pdl_wait()",
                               "offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
                               f"mask = offs < {n_expr}", *pre, *loads, *body, *stores])
    digest = hashlib.sha256((text_body + repr(sig)).encode()).hexdigest()[:10]
    fname = f"{name_hint}_{ops}_{digest}"
    src = ("import triton\nimport triton.language as tl\n"
           "from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait\n"
           + HELPERS + "\n\n@triton.jit\n"
           f"def {fname}({', '.join(k + (': tl.constexpr' if v == 'constexpr' else '') for k, v in sig.items())}):\n"
           f"    {text_body}\n")
    return fname, src, sig, {v: k for k, v in em.params.items()}, inputs, n_expr


def codegen_dir() -> Path:
    d = Path(os.environ.get("GRAPHIR_CODEGEN_DIR")
             or Path(tempfile.gettempdir()) / f"graphir_codegen_{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_source(fname: str, src: str):
    """Write `src` to a content-addressed file and import it; returns the jit function."""
    path = codegen_dir() / f"{fname}.py"
    if not path.exists() or path.read_text() != src:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(src)
        os.replace(tmp, path)
    modname = f"graphir_codegen.{fname}"
    mod = sys.modules.get(modname)
    if mod is None:
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
    return getattr(mod, fname)


def lower_group(sb: StepBuilder, group) -> None:
    """Record the launch of one fused elementwise group."""
    fname, src, sig, params, inputs, n_expr = generate(group, sb.constants)
    fn = load_source(fname, src)
    spec = KernelSpec(fname, fn, sig, {"BLOCK": BLOCK}, 4, 1,
                      lambda n: (-(-n // BLOCK), 1, 1), ("n",))
    key = sb.kernel(spec, src)
    n = n_expr if n_expr.isdigit() else params[n_expr]
    args = ([sb.ptr(v) for v in inputs] + [sb.ptr(r) for r in group.outputs]
            + [params[p] for p in sorted(params, key=lambda p: int(p[1:]))])
    sb.launch(key, [f"cdiv({n}, {BLOCK})"], args)


def _single(sb: StepBuilder, node) -> None:
    from graphir.passes.elementwise_fusion import FusionGroup

    ins = {id(v): v for v in node.operands if not isinstance(v.type, ChainType)}
    lower_group(sb, FusionGroup([node], list(ins.values()), [node.results[0]]))


for _op in sorted(ELEMENTWISE_OPS):
    register_lowering(_op, "cuda")(_single)
