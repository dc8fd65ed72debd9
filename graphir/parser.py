"""Parse the textual IR back into a Graph; errors carry a line and column."""
from __future__ import annotations

import functools
import json
import re

import numpy as np

from .device import DeviceRef
from .dim import Dim, parse_dim
from .dtype import DType
from .types import BufferType, ChainType, TensorType


# Dims are immutable and a graph repeats the same few shapes thousands of times.
_parse_dim_cached = functools.lru_cache(maxsize=4096)(parse_dim)


class ParseError(ValueError):
    def __init__(self, msg: str, line: int, col: int, source_line: str = ""):
        self.line, self.col = line, col
        caret = f"\n  {source_line}\n  {' ' * (col - 1)}^" if source_line else ""
        super().__init__(f"line {line}, column {col}: {msg}{caret}")


_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<val>%[A-Za-z0-9_.]+)
  | (?P<sym>@[A-Za-z0-9_.]+)
  | (?P<num>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf)(?![A-Za-z_]))
  | (?P<ident>[A-Za-z_!][A-Za-z0-9_.]*)
  | (?P<punct>->|[()\[\]{}<>,:=*+\-/#])
  | (?P<bad>.)
""", re.VERBOSE | re.DOTALL)


class _Lexer:
    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        for m in _TOKEN.finditer(text):
            kind = m.lastgroup
            if kind == "bad":
                self._fail(f"unexpected character {m.group()!r}", m.start())
            if kind != "ws":
                self.toks.append((kind, m.group(), m.start()))
        self.toks.append(("eof", "", len(text)))
        self.i = 0

    def _fail(self, msg: str, pos: int):
        line = self.text.count("\n", 0, pos) + 1
        start = self.text.rfind("\n", 0, pos) + 1
        end = self.text.find("\n", pos)
        src = self.text[start:end if end >= 0 else len(self.text)]
        raise ParseError(msg, line, pos - start + 1, src)

    def peek(self, k: int = 0):
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self):
        t = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return t

    def fail(self, msg: str, tok=None):
        self._fail(msg, (tok or self.peek())[2])

    def expect(self, text: str):
        t = self.next()
        if t[1] != text:
            self._fail(f"expected {text!r}, found {t[1] or 'end of input'!r}", t[2])
        return t

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text:
            self.next()
            return True
        return False


def _parse_type(lx: _Lexer):
    t = lx.next()
    if t[1] == "!chain":
        return ChainType()
    if t[1] not in ("tensor", "buffer"):
        lx.fail(f"expected a type (tensor<...>, buffer<...> or !chain), found {t[1]!r}", t)
    lx.expect("<")
    lx.expect("[")
    shape = []
    while not lx.accept("]"):
        shape.append(_parse_dim_tokens(lx))
        if not lx.accept(","):
            lx.expect("]")
            break
    lx.expect(",")
    dt = lx.next()
    try:
        dtype = DType.from_short(dt[1])
    except ValueError as e:
        lx.fail(str(e), dt)
    lx.expect(",")
    device = _parse_device(lx)
    lx.expect(">")
    return (TensorType if t[1] == "tensor" else BufferType)(dtype, shape, device)


def _parse_device(lx: _Lexer) -> DeviceRef:
    k = lx.next()
    if k[1] not in ("cpu", "gpu"):
        lx.fail(f"expected a device (cpu:N or gpu:N), found {k[1]!r}", k)
    lx.expect(":")
    n = lx.next()
    if n[0] != "num" or not n[1].isdigit():
        lx.fail("expected a device id", n)
    if len(n[1]) > 6:
        lx.fail(f"device id {n[1][:12]} is out of range", n)
    return DeviceRef(k[1], int(n[1]))


def _parse_dim_tokens(lx: _Lexer) -> Dim:
    start = lx.peek()
    parts, depth = [], 0
    while True:
        t = lx.peek()
        if t[1] in (",", "]", "}") and depth == 0 or t[0] == "eof":
            break
        if t[1] == "(":
            depth += 1
        elif t[1] == ")":
            depth -= 1
        if t[0] not in ("num", "ident", "punct") or t[1] in ("<", ">", "{", "["):
            lx.fail(f"bad dimension token {t[1]!r}", t)
        parts.append(t[1])
        lx.next()
    try:
        return _parse_dim_cached("".join(parts))
    except ValueError as e:
        lx.fail(str(e), start)


MAX_NESTING = 32  # attribute lists nest a few levels at most; deeper is damage, not data
MAX_DENSE = 1 << 26  # elements of a dense literal: a printed graph holds far fewer


def _parse_string(lx: _Lexer, t) -> str:
    try:
        return json.loads(t[1])
    except ValueError as e:  # a bad escape such as "\q"
        lx.fail(f"bad string literal: {e.args[0].split(':')[0]}", t)


def _parse_attr(lx: _Lexer, depth: int = 0):
    t = lx.peek()
    if depth > MAX_NESTING:
        lx.fail(f"attribute lists nested deeper than {MAX_NESTING}", t)
    if t[0] == "str":
        lx.next()
        return _parse_string(lx, t)
    if t[1] == "[":
        lx.next()
        items = []
        while not lx.accept("]"):
            items.append(_parse_attr(lx, depth + 1))
            if not lx.accept(","):
                lx.expect("]")
                break
        return tuple(items)
    if t[1] == "dense":
        return _parse_dense(lx)
    if t[1] in ("true", "false"):
        lx.next()
        return t[1] == "true"
    if t[1] == "none":
        lx.next()
        return None
    if t[1] in ("nan", "-inf") or (t[0] == "num" and any(c in t[1] for c in ".eEn")):
        lx.next()
        return float(t[1])
    if t[1] in ("cpu", "gpu") and lx.peek(1)[1] == ":":
        return _parse_device(lx)
    if t[0] == "ident" and t[1] in {d.value for d in DType} and lx.peek(1)[1] in (",", "}", "]"):
        lx.next()
        return DType(t[1])
    # A plain integer literal (a dense element, an int attribute) may use the whole int64 /
    # uint64 range; dimension expressions are bounded more tightly by Dim.
    if t[0] == "num" and t[1].lstrip("-").isdigit() and lx.peek(1)[1] in (",", "]", "}", ">"):
        if len(t[1]) > 21 or not -2**63 <= int(t[1]) < 2**64:
            lx.fail(f"integer literal {t[1][:24]} is out of the 64-bit range", t)
        lx.next()
        return int(t[1])
    if t[0] in ("num", "ident") or t[1] in ("(", "-"):
        d = _parse_dim_tokens(lx)
        return int(d) if d.is_static else d
    lx.fail(f"expected an attribute value, found {t[1]!r}")


def _parse_dense(lx: _Lexer) -> np.ndarray:
    start = lx.expect("dense")
    lx.expect("<")
    shape = _parse_attr(lx)
    lx.expect(":")
    vals_tok = lx.peek()
    vals = _parse_attr(lx)
    lx.expect(">")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        lx.fail(f"dense shape must be a list of static sizes, got {shape!r}", start)
    if not isinstance(vals, tuple) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in vals):
        lx.fail("dense values must be a list of numbers", vals_tok)
    count = 1
    for d in shape:  # Python ints: np.prod would wrap around past int64
        count *= d
    if count > MAX_DENSE:
        lx.fail(f"dense shape {list(shape)} has {count} elements, more than {MAX_DENSE}", start)
    if len(vals) != count:
        lx.fail(f"dense shape {list(shape)} needs {count} values, got {len(vals)}", vals_tok)
    is_float = any(isinstance(v, float) for v in vals)
    return np.array(vals, dtype=np.float64 if is_float else np.int64).reshape(shape)


def parse(text: str):
    """Parse the textual IR of one graph (as printed by `str(graph)`) into a Graph."""
    from .graph import Graph, make_node
    from .opdef import lookup

    lx = _Lexer(text)
    lx.expect("graph")
    name = lx.next()
    if name[0] != "sym":
        lx.fail("expected the graph name (@name)", name)
    lx.expect("(")
    arg_names, arg_types = [], []
    while not lx.accept(")"):
        v = lx.next()
        if v[0] != "val":
            lx.fail("expected an argument (%name)", v)
        lx.expect(":")
        arg_names.append(v[1][1:])
        arg_types.append(_parse_type(lx))
        if not lx.accept(","):
            lx.expect(")")
            break
    default_names = [f"arg{i}" for i in range(len(arg_names))]
    try:
        g = Graph(name[1][1:], input_types=arg_types,
                  input_names=None if arg_names == default_names else arg_names)
    except (ValueError, TypeError) as e:
        lx.fail(str(e), name)
    env = {"%" + n: v for n, v in zip(arg_names, g.inputs)}
    lx.expect("{")
    while True:
        t = lx.peek()
        if t[1] == "gir.output":
            lx.next()
            outs = []
            while lx.peek()[0] == "val":
                outs.append(_lookup(lx, env))
                if not lx.accept(","):
                    break
            lx.expect("}")
            g.outputs = outs
            break
        results = []
        while lx.peek()[0] == "val":
            results.append(lx.next())
            if not lx.accept(","):
                break
        if results:
            lx.expect("=")
        optok = lx.next()
        if optok[0] == "eof":
            lx.fail("unterminated graph: expected an op or 'gir.output %v' and '}'", optok)
        if not optok[1].startswith("gir."):
            lx.fail(f"expected an op (gir.NAME), found {optok[1] or 'end of input'!r}", optok)
        try:
            lookup(optok[1][4:])
        except ValueError as e:
            lx.fail(str(e), optok)
        operands = []
        if lx.accept("("):
            while not lx.accept(")"):
                operands.append(_lookup(lx, env))
                if not lx.accept(","):
                    lx.expect(")")
                    break
        attrs = {}
        if lx.accept("{"):
            while not lx.accept("}"):
                k = lx.next()
                if k[0] != "ident":
                    lx.fail("expected an attribute name", k)
                lx.expect("=")
                attrs[k[1]] = _parse_attr(lx)
                if not lx.accept(","):
                    lx.expect("}")
                    break
        types = []
        if lx.accept(":"):
            if lx.accept("("):
                while not lx.accept(")"):
                    types.append(_parse_type(lx))
                    if not lx.accept(","):
                        lx.expect(")")
                        break
            else:
                types.append(_parse_type(lx))
        loc = None
        if lx.accept("loc"):
            lx.expect("(")
            lt = lx.next()
            if lt[0] != "str":
                lx.fail("expected a source location string, loc(\"file:line\")", lt)
            loc = _parse_string(lx, lt)
            lx.expect(")")
        if len(types) != len(results):
            lx.fail(f"{optok[1]} has {len(results)} results but {len(types)} types", optok)
        try:
            node = make_node(g, optok[1][4:], operands, attrs, loc, result_types=types)
            expected = node.opdef.result_types([v.type for v in operands], node.attrs)
        except KeyError as e:
            lx.fail(f"{optok[1]}: missing attribute {e}", optok)
        except Exception as e:  # a type rule meeting odd attributes: still a located error
            lx.fail(f"{optok[1]}: {e}", optok)
        if [str(x) for x in expected] != [str(x) for x in types]:
            lx.fail(f"{optok[1]}: printed result types {list(map(str, types))} do not match "
                    f"the op's type rule {list(map(str, expected))}", optok)
        g.nodes.append(node)
        for r, v in zip(results, node.results):
            if r[1] in env:
                lx.fail(f"value {r[1]} defined twice", r)
            env[r[1]] = v
            if isinstance(v.type, ChainType):
                g._chain = v
    if lx.peek()[0] != "eof":
        lx.fail("unexpected text after the graph")
    g.verify()
    return g


def _lookup(lx: _Lexer, env):
    t = lx.next()
    if t[0] != "val":
        lx.fail(f"expected a value (%name), found {t[1]!r}", t)
    if t[1] not in env:
        lx.fail(f"use of undefined value {t[1]}", t)
    return env[t[1]]
