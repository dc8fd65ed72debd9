"""The kernel emitter: what a CPU lowering sees while it writes MLIR for one graph node.

Kernel ABI (one func.func per plan step, exported as `_mlir_ciface_<name>`):
  args    = the node's non-chain operands, in order: tensors for values, memrefs for buffers
            (written in place), then `syms: tensor<S x i64>` holding the symbolic dims the
            kernel needs (sorted by name) when it needs any;
  results = the node's non-chain tensor results (turned into caller-allocated out-params).
Storage types at the boundary: bool is i8 (LLVM 22 cannot load/store memref<i1>), bf16 and
float8 are their raw bits' float types (bf16 / f8E4M3FN), unsigned ints are signless.
"""
from __future__ import annotations

from typing import Callable, Sequence

from mlir import ir
from mlir.dialects import arith, linalg, tensor

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.types import BufferType, TensorType

DYN = ir.ShapedType.get_dynamic_size()


def element_type(dt: DType, storage: bool = False) -> ir.Type:
    """MLIR element type; `storage` gives the in-memory type (bool as i8)."""
    if dt is DType.bool:
        return ir.IntegerType.get_signless(8 if storage else 1)
    return {
        DType.float32: ir.F32Type.get, DType.float16: ir.F16Type.get,
        DType.bfloat16: ir.BF16Type.get, DType.float8_e4m3fn: ir.Float8E4M3FNType.get,
    }.get(dt, lambda: ir.IntegerType.get_signless(8 * dt.size_in_bytes))()


def static_or_dyn(d: Dim) -> int:
    return int(d) if d.is_static else DYN


def tensor_type(t: TensorType) -> ir.Type:
    return ir.RankedTensorType.get([static_or_dyn(d) for d in t.shape], element_type(t.dtype, True))


def memref_type(t: TensorType) -> ir.Type:
    return ir.MemRefType.get([static_or_dyn(d) for d in t.shape], element_type(t.dtype, True))


def boundary_type(t) -> ir.Type:
    return memref_type(t) if isinstance(t, BufferType) else tensor_type(t)


def index(v: int) -> ir.Value:
    return arith.constant(ir.IndexType.get(), int(v))


def const0() -> ir.AffineExpr:
    return ir.AffineExpr.get_constant(0)


class Emitter:
    """Context for one lowering call: the node, its types, the CPU target (whose vector width
    and registers the kernels' tiles follow) and MLIR helpers."""

    def __init__(self, node, symbols: Sequence[str], syms_arg: ir.Value | None, cpu=None):
        from . import schedules
        from .cpu_target import host_target

        self.cpu = cpu or host_target()
        self.matmul = schedules.MatmulConfig.for_target(self.cpu)
        self.node = node
        self.attrs = node.attrs
        self.in_types = [v.type for v in node.operands if not _is_chain(v.type)]
        self.out_types = [r.type for r in node.results if not _is_chain(r.type)]
        self.symbols = list(symbols)
        self._syms_arg = syms_arg
        self._sym_cache: dict[str, ir.Value] = {}

    # -- dims ------------------------------------------------------------------------------
    def sym(self, name: str) -> ir.Value:
        if name not in self._sym_cache:
            if name not in self.symbols:
                raise ValueError(f"gir.{self.node.op}: symbol {name!r} not passed to the kernel")
            v = tensor.extract(self._syms_arg, [index(self.symbols.index(name))])
            self._sym_cache[name] = arith.index_cast(ir.IndexType.get(), v)
        return self._sym_cache[name]

    def dim(self, d: Dim | int) -> ir.Value:
        """An index value for a (possibly symbolic) dim."""
        d = Dim(d) if not isinstance(d, Dim) else d
        if d.is_static:
            return index(int(d))
        total = None
        for mono, coef in d._terms.items():
            term = index(coef) if coef != 1 or not mono else None
            for s in mono:
                term = self.sym(s) if term is None else arith.muli(term, self.sym(s))
            total = term if total is None else arith.addi(total, term)
        return total

    def sizes(self, t: TensorType) -> list:
        """Mixed static ints / dynamic index values for tensor.empty."""
        return [int(d) if d.is_static else self.dim(d) for d in t.shape]

    def empty(self, t: TensorType, dtype: DType | None = None) -> ir.Value:
        return tensor.EmptyOp(self.sizes(t), element_type(dtype or t.dtype, True)).result

    def filled(self, t: TensorType, value, dtype: DType | None = None) -> ir.Value:
        dt = dtype or t.dtype
        return linalg.fill(self.scalar(value, dt), outs=[self.empty(t, dt)])

    @staticmethod
    def scalar(value, dt: DType) -> ir.Value:
        el = element_type(dt, True)
        if dt.is_float:
            return arith.constant(el, float(value))
        return arith.constant(el, int(value))

    # -- linalg ----------------------------------------------------------------------------
    @staticmethod
    def generic(inputs: Sequence[ir.Value], inits: Sequence[ir.Value], maps, iterators: Sequence[str],
                body: Callable[[list], Sequence[ir.Value] | ir.Value]) -> list[ir.Value]:
        """linalg.generic; body(block_args) returns the value(s) to yield."""
        iters = ir.ArrayAttr.get([ir.Attribute.parse(f"#linalg.iterator_type<{x}>") for x in iterators])
        op = linalg.GenericOp([i.type for i in inits], list(inputs), list(inits),
                              ir.ArrayAttr.get([ir.AffineMapAttr.get(m) for m in maps]), iters)
        types = [ir.ShapedType(v.type).element_type for v in list(inputs) + list(inits)]
        block = op.regions[0].blocks.append(*types)
        with ir.InsertionPoint(block):
            out = body(list(block.arguments))
            linalg.YieldOp(list(out) if isinstance(out, (list, tuple)) else [out])
        return list(op.results)

    def broadcast_map(self, t: TensorType, out: TensorType) -> ir.AffineMap:
        """Map of an operand broadcast (numpy rules) into out's iteration space."""
        r, rank = len(t.shape), len(out.shape)
        exprs = []
        for i, d in enumerate(t.shape):
            o = rank - r + i
            if d == 1 and out.shape[o] != 1:
                exprs.append(const0())
            else:
                exprs.append(ir.AffineDimExpr.get(o))
        return ir.AffineMap.get(rank, 0, exprs)

    @staticmethod
    def identity_map(rank: int) -> ir.AffineMap:
        return ir.AffineMap.get_identity(rank)


def _is_chain(t) -> bool:
    return not isinstance(t, TensorType)


# Lowering registry signature: fn(e: Emitter, args: list[ir.Value]) -> list[ir.Value]
LoweringFn = Callable[[Emitter, list], list]
