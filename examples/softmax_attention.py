"""Plain (non-paged) causal self-attention over one sequence, built from primitive ops."""
import numpy as np

from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType


def build(seq: int = 16, heads: int = 4, head_dim: int = 8) -> Graph:
    cpu = DeviceRef.CPU()
    t = TensorType(DType.float32, [heads, seq, head_dim], cpu)
    with Graph("causal_attention", input_types=[t, t, t]) as g:
        q, k, v = g.inputs
        scores = ops.matmul(q, k, transpose_b=True) * (1.0 / np.sqrt(head_dim))
        mask = ops.constant(np.triu(np.full((seq, seq), -1e30), 1), DType.float32, cpu)
        g.output(ops.matmul(ops.softmax(scores + mask), v))
    return g
