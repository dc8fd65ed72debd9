"""A matmul operand's leading dims as rows and back: x [..., K] <-> [M, K], and an f32 [M, N]
result in the op's dtype and x's leading dims (the quantized and bf16 matmul kernels work on
2-D f32 results)."""
from __future__ import annotations

from mlir import ir
from mlir.dialects import tensor


from ..emit import DYN, Emitter, element_type, index
from .elementwise import to_storage
from .shape import expand_shape


def rows_of(e: Emitter, x: ir.Value, xt) -> tuple[ir.Value, list]:
    """x [..., K] as a 2-D [M, K] tensor, and the sizes of its leading dims."""
    lead = e.sizes(xt)[:-1]
    if xt.rank == 2:
        return x, lead
    k = int(xt.shape[-1])
    el = ir.RankedTensorType(x.type).element_type
    if xt.rank == 1:
        t2 = ir.RankedTensorType.get([1, k], el)
        return tensor.expand_shape(t2, x, [[0, 1]], [], [1, k]), lead
    static = [s if isinstance(s, int) else DYN for s in lead]
    m = 1
    for s in static:
        m = DYN if s == DYN or m == DYN else m * s
    t2 = ir.RankedTensorType.get([m, k], el)
    return tensor.collapse_shape(t2, x, [list(range(xt.rank - 1)), [xt.rank - 1]]), lead


def finish_rows(e: Emitter, y: ir.Value, lead: list, xt) -> ir.Value:
    """f32 [M, N] (or already in the result's storage type) -> the result: its dtype, x's
    leading dims."""
    out = e.out_types[0]
    if ir.RankedTensorType(y.type).element_type != element_type(out.dtype, True):
        yt = ir.RankedTensorType(y.type)
        dyn = [tensor.dim(y, index(0))] if ir.ShapedType.is_dynamic_size(yt.shape[0]) else []
        init = tensor.EmptyOp([dyn[0] if dyn else yt.shape[0], yt.shape[1]],
                              element_type(out.dtype, True)).result
        y = e.generic([y], [init], [e.identity_map(2)] * 2, ["parallel"] * 2,
                      lambda v: to_storage(v[0], out.dtype))[0]
    if xt.rank == 2:
        return y
    n = int(out.shape[-1])
    el = ir.RankedTensorType(y.type).element_type
    rt = ir.RankedTensorType.get([s if isinstance(s, int) else DYN for s in lead] + [n], el)
    if xt.rank == 1:
        return tensor.collapse_shape(rt, y, [[0, 1]])
    dyn = [s for s in lead if not isinstance(s, int)]
    static = [s if isinstance(s, int) else DYN for s in lead] + [n]
    return expand_shape(rt, y, [list(range(xt.rank - 1)), [xt.rank - 1]], dyn, static)
