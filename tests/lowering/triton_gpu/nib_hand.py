"""Q4_K nib operands as a hand packer would leave them (no copy of d / dmin in the scales' spare
bits), and a graph that writes nib_matmul over them directly, with no nib_repack: shared by the
interpreter test (test_quant_nib_q4k_spare.py) and the GPU one (tests/gpu/test_quant_gpu.py),
which has no gguf package."""
import numpy as np


def bare(scales):
    """q4_k scales bytes with the spare bits cleared."""
    return (np.ascontiguousarray(scales).view(np.uint16) & 0x3F3F).view(np.uint8)


def hand_graph(n, k, ops):
    """(graph, weights): y = nib_matmul(x bf16 [T, k], codes, scales, supers), the nib operands
    `ops` bound as weights."""
    from graphir import Graph, TensorType, Weight
    from graphir.dtype import DType
    from graphir.ops._build import apply, tensors

    with Graph("hand", input_types=[TensorType(DType.bfloat16, ["T", k])]) as g:
        ws = [Weight(f"w{i}", DType.int32 if i == 0 else DType.uint8, list(a.shape))
              for i, a in enumerate(ops)]
        g.output(apply("nib_matmul", tensors(g.inputs[0], *ws), fmt="q4_k", out=n, group=32))
    return g, {f"w{i}": a for i, a in enumerate(ops)}


def bare_q4_k(rng, n, k):
    """(graph, weights) of hand_graph over a random Q4_K weight's nib operands, scales bare."""
    from graphir.ops.quant.gguf_quantize import quantize_gguf
    from graphir.ops.quant_nib import _repack_ref

    raw = quantize_gguf((rng.standard_normal((n, k)) * 0.1).astype(np.float32), "Q4_K")
    ops = _repack_ref([raw], dict(fmt="q4_k", k=k, encoding="Q4_K"))
    return hand_graph(n, k, [ops[0], bare(ops[1]), ops[2]])
