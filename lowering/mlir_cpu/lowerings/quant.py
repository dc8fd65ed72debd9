"""CPU lowerings of the quantized-weight ops: `dequantize` (GGUF) and `qmatmul` (GGUF, GPTQ).

qmatmul never materializes the float weight: the kernels of quant_kernels.py decode it tile by
tile inside the matmul loop (in registers for a few rows of x, into an L1/L2 tile shared by all
rows otherwise), with one decoder per GGUF encoding (quant_decoders.py) and GPTQ's codes, group
scales and zero points decoded along the output columns. The activations are made f32 [M, K]
first (cast; GPTQ desc_act gathers them by the permutation there). Decoding follows the bit
layouts of ops/quant/gguf_blocks.py and ops/quant/gptq_layout.py with the same float32
operations in the same order, so `dequantize` is bit-identical to the interpreter.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, linalg, tensor

from graphir.dtype import DType
from graphir.ops.quant.gguf_blocks import gguf_block_geometry
from graphir.ops.quant.gptq import resolve_group_size

from ...registry import register_lowering
from .. import schedules
from ..emit import Emitter, index
from .. import pack_gptq
from ..pack_layout import KQUANT_LAYOUTS
from .elementwise import to_compute
from .linalg import inline_mlir
from .quant_decoders import decoder_for
from .quant_gguf import gguf_dequantize_text, gguf_matmul_text
from .quant_gptq import Gptq, column_width, gptq_matmul_text
from .quant_kernels import QuantTiles
from .quant_k_lanes import REPACKED as _K_REPACKED
from .quant_q6_lanes import REPACKED_Q6
from .rows import finish_rows, rows_of

REPACKED = {**_K_REPACKED, **REPACKED_Q6}   # layout -> its decoder and row path


def _idx(i: int) -> ir.Value:
    return linalg.IndexOp(i).result


def _activations(e: Emitter, x2: ir.Value, dt: DType, perm: ir.Value | None, perm_dt) -> ir.Value:
    """x as f32 [M, K], its columns gathered by perm (GPTQ desc_act)."""
    xt = ir.RankedTensorType(x2.type)
    f32 = ir.F32Type.get()
    if perm is None and dt is DType.float32:
        return x2
    m = xt.shape[0]
    dyn = [tensor.dim(x2, index(0))] if ir.ShapedType.is_dynamic_size(m) else []
    init = tensor.EmptyOp([dyn[0] if dyn else m, xt.shape[1]], f32).result
    if perm is None:
        maps = [e.identity_map(2)] * 2
        return e.generic([x2], [init], maps, ["parallel"] * 2,
                         lambda v: to_compute(v[0], dt))[0]

    def body(_):
        p = tensor.extract(perm, [_idx(1)])
        cast = arith.index_castui if perm_dt is DType.uint32 else arith.index_cast
        # The permutation is checked at load; the clamp keeps a bad one inside x (defence in
        # depth: unsigned, so a negative column clamps too).
        col = arith.minui(cast(ir.IndexType.get(), p), index(xt.shape[1] - 1))
        return to_compute(tensor.extract(x2, [_idx(0), col]), dt)
    return e.generic([], [init], [e.identity_map(2)], ["parallel"] * 2, body)[0]


def _tiles(e: Emitter) -> QuantTiles:
    return QuantTiles.pick(e.cpu.f32_lanes, e.cpu.vector_registers)


@register_lowering("dequantize", "cpu")
def _dequantize(e: Emitter, args):
    out = e.out_types[0]
    rows, cols = int(out.shape[0]), int(out.shape[1])
    dec = decoder_for(e.attrs["encoding"], cols)
    out_t = f"tensor<{rows}x{cols}xf32>"
    return inline_mlir(args, gguf_dequantize_text(args[0].type, out_t, dec, rows, cols))


@register_lowering("qmatmul", "cpu")
def _qmatmul(e: Emitter, args):
    enc = e.attrs["encoding"]
    xt = e.in_types[0]
    n_in, n_out = int(xt.shape[-1]), int(e.out_types[0].shape[-1])
    x2, lead = rows_of(e, args[0], xt)
    perm = perm_dt = None
    if enc == "GPTQ" and e.attrs["desc_act"]:
        perm, perm_dt = args[-1], e.in_types[-1].dtype
    a = _activations(e, x2, xt.dtype, perm, perm_dt)
    out_t = f"tensor<?x{n_out}xf32>"
    if enc == "GPTQ":
        at = e.attrs
        asym = not at["sym"]
        panel = pack_gptq.parse(getattr(e, "prepack", {}).get(1))
        q = Gptq(n_in, n_out, resolve_group_size(at["group_size"], n_in), asym,
                 at["checkpoint_format"] == "gptq", at.get("bits", 4),
                 panel[1] if panel else None)
        ins = [a, args[1]] + ([args[2]] if asym else [])
        text = gptq_matmul_text(a.type, args[1].type, args[2].type if asym else None, out_t, q,
                                _tiles(e))
    else:
        gguf_block_geometry(enc)  # validates the name
        ins = [a, args[1]]
        rp = REPACKED.get(getattr(e, "prepack", {}).get(1))
        dec = rp.decoder if rp else decoder_for(enc, n_in)
        text = gguf_matmul_text(a.type, args[1].type, out_t, dec, n_in, n_out, _tiles(e), rp)
    (y,) = inline_mlir(ins, text)
    m = ir.RankedTensorType(a.type).shape[0]
    if not ir.ShapedType.is_dynamic_size(m):
        y = tensor.cast(ir.RankedTensorType.get([m, n_out], ir.F32Type.get()), y)
    return [finish_rows(e, y, lead, xt)]


@schedules.register_prepack("qmatmul")
def _qmatmul_prepack(node, load_time, cfg):
    """8-lane targets (AVX2) take a Q4_K / Q5_K / Q6_K weight fixed at load repacked: the row
    path reads code words in place (quant_k_lanes.py, quant_q6_lanes.py). With 16 lanes the
    byte-to-lane path stays (no faster on Zen 4: BENCHMARKS.md). A GPTQ weight fixed at load
    comes in column panels on every target (pack_gptq.py)."""
    enc = node.attrs.get("encoding")
    if enc == "GPTQ":
        if not load_time[1]:
            return {}
        k, n = int(node.operands[0].type.shape[-1]), int(node.operands[1].type.shape[-1])
        panel = pack_gptq.pick_panel(n, column_width(n))
        return {1: pack_gptq.layout_name(node.attrs.get("bits", 4), panel, k)} if panel else {}
    for layout, (name, _, _) in KQUANT_LAYOUTS.items():
        if enc == name and load_time[1] and cfg.lanes == 8:
            return {1: layout}
    return {}
