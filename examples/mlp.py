"""A small gated MLP block with RMSNorm: the README's first graph."""
from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType, Weight


def build(hidden: int = 64, ffn: int = 128) -> Graph:
    cpu = DeviceRef.CPU()
    w_norm = Weight("norm.weight", DType.float32, [hidden], cpu)
    w_gate = Weight("gate.weight", DType.float32, [ffn, hidden], cpu)
    w_up = Weight("up.weight", DType.float32, [ffn, hidden], cpu)
    w_down = Weight("down.weight", DType.float32, [hidden, ffn], cpu)
    with Graph("mlp", input_types=[TensorType(DType.float32, ["tokens", hidden], cpu)]) as g:
        x = g.inputs[0]
        h = ops.rms_norm(x, w_norm, 1e-6)
        y = ops.silu(ops.matmul(h, w_gate, transpose_b=True)) * ops.matmul(h, w_up, transpose_b=True)
        g.output(x + ops.matmul(y, w_down, transpose_b=True))
    return g
