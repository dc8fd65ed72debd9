"""The textual IR: parse(print(g)) prints identically for every op and feature; malformed input
gives a ParseError with the exact line and column, never a traceback from inside the parser."""
import numpy as np
import pytest

from graphir import ops
from graphir import BufferType, DeviceRef, Dim, DType, Graph, ParseError, TensorType, Weight, parse
from graphir.opdef import REGISTRY
from graphir.runtime.interpreter import run

F32, BF16, I32, I64 = DType.float32, DType.bfloat16, DType.int32, DType.int64
CPU, GPU = DeviceRef.CPU(), DeviceRef.GPU(1)


def T(shape, dtype=F32, dev=CPU):
    return TensorType(dtype, shape, dev)


def g_of(name, types, fn, **kw):
    with Graph(name, input_types=types, **kw) as g:
        out = fn(*g.inputs)
        g.output(*(out if isinstance(out, (list, tuple)) else [out]))
    return g


_UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "cos", "sin", "floor"]
_BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "mod", "greater", "greater_equal",
           "equal", "not_equal"]

GRAPHS = {
    "unary": lambda: g_of("unary", [T(["n", 4])], lambda x: [getattr(ops, u)(x) for u in _UNARY]
                          + [ops.gelu(x), ops.gelu(x, approximate="tanh")]),
    "binary": lambda: g_of("binary", [T(["n", 4]), T([4])],
                           lambda a, b: [getattr(ops, f)(a, b) for f in _BINARY]),
    "logical_where": lambda: g_of("logic", [T([3, 4], DType.bool), T([3, 4], DType.bool), T([4])],
                                  lambda p, q, x: [ops.logical_and(p, q), ops.logical_or(p, q),
                                                   ops.where(p, x, -x)]),
    "cast_clamp": lambda: g_of("cc", [T([5], BF16)], lambda x: [
        ops.cast(x, DType.float8_e4m3fn), ops.cast(x, DType.uint8), ops.clamp(x, -1.5, 2.0),
        ops.clamp(x, min=0.0), ops.clamp(x, max=1e-3)]),
    "creation": lambda: g_of("creation", [T(["seq"], I64)], lambda s: [
        ops.constant(np.array([[1.5, -2.25e-8], [np.nan, -np.inf]]), F32),
        ops.constant(np.array([-3, 0, 2 ** 40]), I64),
        ops.constant(np.array([True, False]), DType.bool),
        ops.constant(7, DType.uint32),
        ops.constant(np.array([1e30, -0.0, np.inf, 3.0e-5]), DType.float16, GPU),
        ops.constant(np.array([0.1, 1e-40, 123456.789]), BF16),
        ops.range(0, 10, 3, dtype=I32), ops.range(1.0, 2.0, 0.25),
        ops.range(0, Dim("seq"), 1, dtype=I64), ops.transfer_to(s, GPU)]),
    "matmul": lambda: g_of("mm", [T(["b", "m", 8]), T([6, 8]), T([8, 6]), T([8])], lambda a, w, v, u: [
        ops.matmul(a, w, transpose_b=True), a @ v, ops.matmul(v, v, transpose_a=True),
        ops.matmul(u, v)]),
    "shape": lambda: g_of("shape", [T(["n", 6, 4]), T(["n", 2, 4])], lambda x, y: [
        x.reshape([-1, 4]), ops.reshape(x, ["n", 24]), ops.permute(x, [2, 0, 1]),
        ops.transpose(x, 0, 1), ops.broadcast_to(y[:, :1], ["n", 5, 4]),
        ops.concat([x, y], axis=1), x[1:, ::2, -1], x[-1], x[None, ..., 0]]),
    "split": lambda: g_of("split", [T(["n", 12])],
                          lambda x: ops.split(x, [4, 4, 4], axis=1) + ops.split(x, [5, 7], axis=-1)),
    "gather_scatter": lambda: g_of("gs", [T([10, 8]), T(["k"], I64), T([10, 3]), T([10, 3], I32)],
                                   lambda x, i, u, j: [ops.gather(x, i, axis=0),
                                                       ops.scatter(x, u, j, axis=1)]),
    "reductions": lambda: g_of("red", [T(["n", 7])], lambda x: [
        ops.sum(x), ops.mean(x, axis=0), ops.max(x), ops.min(x, axis=0), ops.max(x, x),
        ops.argmax(x), ops.softmax(x), ops.softmax(x, axis=0)]),
    "norms": lambda: g_of("norms", [T(["tokens", 16], BF16), T([16], BF16), T([16], BF16)],
                          lambda x, w, b: [ops.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-5, 1.0),
                                           ops.layer_norm(x, w, b, 1e-5)]),
    "weights": lambda: g_of("weights", [T(["tokens", 32], BF16, GPU)], lambda x: ops.matmul(
        x, Weight("layers.0.qkv.weight", BF16, [48, 32], GPU), transpose_b=True)
        + Weight("layers.0.bias", BF16, [48], GPU)),
    "symbolic": lambda: g_of("sym", [T(["batch+1"], DType.uint32), T(["total_seq_len", "2*heads", 4])],
                             lambda offs, x: [x.reshape(["total_seq_len", -1]),
                                              x[:, :, 1:].reshape([-1, 3]), offs[1:] - offs[:-1]],
                             input_names=["input_row_offsets", "x"]),
    "buffers": lambda: g_of("bufs", [BufferType(F32, ["pages", 2, 4], GPU), T([3], F32, GPU)],
                            lambda kv, x: x * 2.0),
    "empty": lambda: g_of("empty_graph.v1", [T([2])], lambda x: x),
    "scalar": lambda: g_of("scalar", [T([])], lambda x: x + 1.0),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_round_trip(name):
    g = GRAPHS[name]()
    text = str(g)
    back = parse(text)
    assert str(back) == text
    assert str(parse(str(back))) == text
    assert repr(g) == text


def test_every_foundation_op_is_printed_and_parsed():
    foundation = set(_UNARY + _BINARY) | {
        "gelu", "logical_and", "logical_or", "where", "cast", "clamp", "constant", "range",
        "transfer_to", "matmul", "reshape", "permute", "broadcast_to", "concat", "split", "slice",
        "gather", "scatter", "sum", "mean", "reduce_max", "reduce_min", "argmax", "softmax",
        "rms_norm", "layer_norm", "weight"}
    assert foundation <= set(REGISTRY)
    seen = set()
    for build in GRAPHS.values():
        seen |= {n.op for n in parse(str(build())).nodes}
    assert foundation <= seen, foundation - seen


def test_printed_form_details():
    g = GRAPHS["split"]()
    text = str(g)
    assert "%0, %1, %2 = gir.split(%arg0) {axis = 1, sizes = [4, 4, 4]} : (tensor<[n, 4], f32, cpu:0>," in text
    g = GRAPHS["matmul"]()
    assert "gir.matmul(%arg0, %arg1) {transpose_b = true} : tensor<[b, m, 6], f32, cpu:0>" in str(g)
    g = GRAPHS["symbolic"]()
    assert str(g).startswith("graph @sym(%input_row_offsets: tensor<[batch+1], u32, cpu:0>, "
                             "%x: tensor<[total_seq_len, 2*heads, 4], f32, cpu:0>) {\n")
    g = GRAPHS["creation"]()
    text = str(g)
    for frag in ["dense<[2, 2] : [1.5, -2.2500000085301508e-08, nan, -inf]>",
                 "dense<[3] : [-3, 0, 1099511627776]>", "dense<[2] : [1, 0]>", "dense<[] : [7]>",
                 "dense<[4] : [inf, -0.0, inf, 2.9981136322021484e-05]>",
                 "{device = cpu:0, dtype = f32, start = 1.0, step = 0.25, stop = 2.0}",
                 "{device = cpu:0, dtype = i64, out_dim = seq, start = 0, step = 1}"]:
        assert frag in text, frag
    # attributes are printed sorted by name
    line = next(ln for ln in str(GRAPHS["norms"]()).splitlines() if "weight_offset" in ln)
    assert line.index("epsilon") < line.index("weight_offset")


def test_parsed_graph_computes_the_same():
    rng = np.random.default_rng(0)
    for name, shapes in [("shape", [(3, 6, 4), (3, 2, 4)]), ("reductions", [(4, 7)]),
                         ("binary", [(3, 4), (4,)])]:
        g = GRAPHS[name]()
        ins = [(rng.standard_normal(s) + 3.0).astype(np.float32) for s in shapes]
        for a, b in zip(run(g, *ins), run(parse(str(g)), *ins)):
            np.testing.assert_array_equal(a, b)


def test_parser_accepts_comments_and_whitespace():
    text = ("// a comment\ngraph @g(%x: tensor<[n + 1, 4], f32, cpu:0>)   {\n"
            "  %0 = gir.exp(%x)  : tensor<[n+1, 4], f32, cpu:0> // trailing\n\n  gir.output %0\n}\n")
    g = parse(text)
    assert str(g) == ("graph @g(%x: tensor<[n+1, 4], f32, cpu:0>) {\n"
                      "  %0 = gir.exp(%x) : tensor<[n+1, 4], f32, cpu:0>\n  gir.output %0\n}\n")


HEAD = "graph @g(%x: tensor<[4], f32, cpu:0>) {\n"
GOOD = "  %0 = gir.neg(%x) : tensor<[4], f32, cpu:0>\n"
TAIL = "  gir.output %0\n}\n"


@pytest.mark.parametrize("text, line, col, msg", [
    # unknown op
    (HEAD + "  %0 = gir.frobnicate(%x) : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 8, "unknown op 'gir.frobnicate'"),
    # undefined value
    (HEAD + "  %0 = gir.neg(%y) : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 16, "undefined value %y"),
    (HEAD + GOOD + "  gir.output %7\n}\n", 3, 14, "undefined value %7"),
    # bad types
    (HEAD + "  %0 = gir.neg(%x) : tensor<[4], f99, cpu:0>\n" + TAIL, 2, 34, "unknown dtype 'f99'"),
    (HEAD + "  %0 = gir.neg(%x) : tensor<[4], f32, tpu:0>\n" + TAIL, 2, 39, "expected a device"),
    (HEAD + "  %0 = gir.neg(%x) : tensor<[4] f32, cpu:0>\n" + TAIL, 2, 33, "expected ','"),
    (HEAD + "  %0 = gir.neg(%x) : tensor<[5], f32, cpu:0>\n" + TAIL, 2, 8, "do not match the op's type rule"),
    (HEAD + "  %0 = gir.neg(%x) : vector<[4], f32, cpu:0>\n" + TAIL, 2, 22, "expected a type"),
    ("graph @g(%x: tensor<[4, n+], f32, cpu:0>) {\n" + TAIL, 1, 25, "bad dimension expression"),
    # wrong result count
    (HEAD + "  %0, %1 = gir.neg(%x) : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 12, "has 2 results but 1 types"),
    (HEAD + "  %0 = gir.split(%x) {axis = 0, sizes = [2, 2]} : tensor<[2], f32, cpu:0>\n" + TAIL,
     2, 8, "do not match the op's type rule"),
    # unterminated graph
    (HEAD + GOOD, 3, 1, "unterminated graph"),
    (HEAD + GOOD + "  gir.output %0\n", 4, 1, "expected '}'"),
    ("graph @g(%x: tensor<[4], f32, cpu:0>", 1, 37, "expected ')', found 'end of input'"),
    # garbage characters
    (HEAD + "  %0 = gir.neg(%x) $ : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 20, "unexpected character '$'"),
    (HEAD + GOOD + TAIL + "junk", 5, 1, "unexpected text after the graph"),
    ("graph g(%x: tensor<[4], f32, cpu:0>) {\n" + TAIL, 1, 7, "expected the graph name"),
    # type rule and attribute problems are located too
    (HEAD + "  %0 = gir.softmax(%x) : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 8, "missing attribute 'axis'"),
    (HEAD + "  %0 = gir.softmax(%x) {axis = 3} : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 8, "axis 3 is out of range"),
    (HEAD + "  %0 = gir.permute(%x) {dims = 0} : tensor<[4], f32, cpu:0>\n" + TAIL, 2, 8, "gir.permute"),
    (HEAD + "  %0 = gir.neg(%x) {} : tensor<[4], f32, cpu:0>\n  %0 = gir.neg(%x) : tensor<[4], f32, cpu:0>\n"
     + TAIL, 3, 3, "value %0 defined twice"),
    ("graph @g(%0: tensor<[4], f32, cpu:0>) {\n" + TAIL, 1, 7, "input_names"),
    (HEAD + '  %0 = gir.constant {device = cpu:0, dtype = f32, value = dense<[2] : [1.0, "a"]>} '
     ': tensor<[2], f32, cpu:0>\n' + TAIL, 2, 71, "dense values must be a list of numbers"),
    (HEAD + '  %0 = gir.constant {device = cpu:0, dtype = f32, value = dense<[3] : [1.0, 2.0]>} '
     ': tensor<[3], f32, cpu:0>\n' + TAIL, 2, 71, "dense shape [3] needs 3 values, got 2"),
])
def test_parse_errors_are_located(text, line, col, msg):
    with pytest.raises(ParseError) as ei:
        parse(text)
    e = ei.value
    assert (e.line, e.col) == (line, col), str(e)
    assert msg in str(e)
    assert str(e).startswith(f"line {line}, column {col}: ")


def test_parse_error_shows_source_line_and_caret():
    with pytest.raises(ParseError) as ei:
        parse(HEAD + "  %0 = gir.neg(%y) : tensor<[4], f32, cpu:0>\n" + TAIL)
    lines = str(ei.value).splitlines()
    assert lines[1] == "    %0 = gir.neg(%y) : tensor<[4], f32, cpu:0>"
    assert lines[2] == "  " + " " * 15 + "^"


def test_parse_error_is_raised_from_the_parser_not_deep_inside():
    # A malformed constant must not surface as a numpy/KeyError traceback.
    for bad in [HEAD + "  %0 = gir.constant {value = 3} : tensor<[], f32, cpu:0>\n" + TAIL,
                HEAD + "  %0 = gir.weight {name = \"w\"} : tensor<[4], f32, cpu:0>\n" + TAIL,
                HEAD + "  %0 = gir.reshape(%x) {shape = [[1]]} : tensor<[4], f32, cpu:0>\n" + TAIL]:
        with pytest.raises(ParseError) as ei:
            parse(bad)
        assert ei.value.line == 2
