"""Symbolic dimensions: integer polynomials over named symbols (`batch + 1`, `2*n`)."""
from __future__ import annotations

import re
from typing import Union

DimLike = Union["Dim", int, str]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Words the textual IR reads as something else inside attributes.
_RESERVED = {"inf", "nan", "true", "false", "none", "dense", "f32", "f16", "bf16", "f8e4m3fn",
             "i8", "u8", "i32", "u32", "i64", "bool"}


# Bounds that keep every dimension cheap to build, print and evaluate, whatever the input:
# products of sums expand term by term, so without a cap 40 factors of (a+b) would need 2**40
# terms; sizes past int64 cannot reach a kernel anyway.
MAX_TERMS = 64
MAX_DEGREE = 16
MAX_COEFF = 2 ** 62
MAX_DEPTH = 64


class Dim:
    """A tensor dimension: static (`Dim(4096)`), symbolic (`Dim("total_seq_len")`) or an
    expression of those (`Dim("batch") + 1`).

    Stored canonically as {monomial: coefficient}, a monomial being a sorted tuple of symbol
    names, so equal expressions compare and hash equal whatever order they were built in.

    Example:
        >>> Dim("batch") + 1
        Dim('batch+1')
    """

    __slots__ = ("_terms",)

    def __init__(self, value: DimLike | dict = 0):
        if isinstance(value, Dim):
            terms = dict(value._terms)
        elif isinstance(value, dict):
            terms = {k: v for k, v in value.items() if v != 0}
            _check_size(terms)
        elif isinstance(value, bool):
            raise TypeError("a dimension cannot be a bool")
        elif isinstance(value, int):
            if value < 0:
                raise ValueError(f"a static dimension must be >= 0, got {value}")
            if value > MAX_COEFF:
                raise ValueError(f"a static dimension must be at most 2**62, got {value}")
            terms = {(): value} if value else {}
        elif isinstance(value, str):
            if value in _RESERVED:
                raise ValueError(f"{value!r} cannot name a dimension: the textual IR reads it "
                                 f"as a literal or a dtype")
            if _NAME.match(value):
                terms = {(value,): 1}
            else:
                terms = dict(parse_dim(value)._terms)
        elif hasattr(value, "__index__"):
            return self.__init__(int(value))
        else:
            raise TypeError(f"cannot make a Dim from {value!r} ({type(value).__name__})")
        self._terms = terms

    # -- queries -------------------------------------------------------------------------
    @property
    def is_static(self) -> bool:
        return all(m == () for m in self._terms)

    @property
    def symbols(self) -> set[str]:
        return {s for m in self._terms for s in m}

    def __int__(self) -> int:
        if not self.is_static:
            raise TypeError(f"dimension {self} is symbolic; it has no static value")
        return self._terms.get((), 0)

    __index__ = __int__

    def evaluate(self, env: dict[str, int]) -> int:
        total = 0
        for mono, coef in self._terms.items():
            v = coef
            for s in mono:
                if s not in env:
                    raise KeyError(s)
                v *= env[s]
            total += v
        return total

    # -- algebra -------------------------------------------------------------------------
    def __add__(self, other: DimLike) -> "Dim":
        other = _as_dim(other)  # n + (-1) is n-1, not an invalid Dim(-1)
        t = dict(self._terms)
        for m, c in other._terms.items():
            t[m] = t.get(m, 0) + c
        return Dim(t)

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return Dim({m: -c for m, c in self._terms.items()})

    def __sub__(self, other: DimLike) -> "Dim":
        return self + (-_as_dim(other))

    def __rsub__(self, other: DimLike) -> "Dim":
        return _as_dim(other) - self

    def __mul__(self, other: DimLike) -> "Dim":
        other = _as_dim(other)
        t: dict[tuple, int] = {}
        for m1, c1 in self._terms.items():
            for m2, c2 in other._terms.items():
                m = tuple(sorted(m1 + m2))
                t[m] = t.get(m, 0) + c1 * c2
        return Dim(t)

    __rmul__ = __mul__

    def __floordiv__(self, other: int) -> "Dim":
        d = int(other)
        if d <= 0:
            raise ValueError(f"cannot divide dimension {self} by {other}")
        if any(c % d for c in self._terms.values()):
            if self.is_static:
                return Dim(int(self) // d)
            raise ValueError(f"dimension {self} is not divisible by {d}")
        return Dim({m: c // d for m, c in self._terms.items()})

    def divides_by(self, d: int) -> bool:
        return all(c % d == 0 for c in self._terms.values())

    def exact_div(self, other: DimLike) -> "Dim | None":
        """self / other when it is exact for every value of the symbols (other a monomial
        times a constant, e.g. `4*n*m / n == 4*m`); None when it is not."""
        other = _as_dim(other)
        if len(other._terms) != 1:
            return None
        ((mono, coef),) = other._terms.items()
        out: dict[tuple, int] = {}
        for m, c in self._terms.items():
            rest = list(m)
            for s in mono:
                if s not in rest:
                    return None
                rest.remove(s)
            if c % coef:
                return None
            out[tuple(rest)] = out.get(tuple(rest), 0) + c // coef
        q = Dim(out)
        return q if q * other == self else None

    # -- comparison ----------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        if isinstance(other, (int, str, Dim)) and not isinstance(other, bool):
            try:
                return self._terms == _as_dim(other)._terms
            except (ValueError, TypeError):
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._terms.items()))

    # -- printing ------------------------------------------------------------------------
    def __str__(self) -> str:
        if not self._terms:
            return "0"
        parts = []
        # Symbolic terms by degree then name; the constant last.
        for mono in sorted(self._terms, key=lambda m: (m == (), len(m), m)):
            coef = self._terms[mono]
            if mono == ():
                body = str(abs(coef))
            else:
                body = "*".join(mono)
                if abs(coef) != 1:
                    body = f"{abs(coef)}*{body}"
            sign = "-" if coef < 0 else "+"
            parts.append((sign, body))
        out = ("-" if parts[0][0] == "-" else "") + parts[0][1]
        for sign, body in parts[1:]:
            out += sign + body
        return out

    def __repr__(self) -> str:
        return f"Dim({int(self)})" if self.is_static else f"Dim({str(self)!r})"


def _check_size(terms: dict) -> None:
    if len(terms) > MAX_TERMS:
        raise ValueError(f"dimension expression too large: more than {MAX_TERMS} terms")
    for m, c in terms.items():
        if len(m) > MAX_DEGREE:
            raise ValueError(f"dimension expression too large: a product of more than "
                             f"{MAX_DEGREE} symbols")
        if abs(c) > MAX_COEFF:
            raise ValueError(f"dimension expression too large: coefficient {c} exceeds 2**62")


def _as_dim(v: DimLike) -> Dim:
    if isinstance(v, Dim):
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        return -Dim(-v)
    return Dim(v)


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(.))")


def parse_dim(text: str) -> Dim:
    """Parse `batch+1`, `2*n`, `n*m-3`, `(a+1)*2` into a Dim."""
    if len(text) > 4096:
        raise ValueError(f"dimension expression too long ({len(text)} characters)")
    toks = []
    for num, name, op in _TOKEN.findall(text):
        if num:
            if len(num) > 19:
                raise ValueError(f"dimension literal {num[:24]}... is too large")
            toks.append(("num", int(num)))
        elif name:
            toks.append(("name", name))
        elif op.strip():
            toks.append(("op", op))
    pos = 0
    depth = 0

    def peek():
        return toks[pos] if pos < len(toks) else ("end", None)

    def nested(parse) -> Dim:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"dimension expression nested deeper than {MAX_DEPTH}")
        d = parse()
        depth -= 1
        return d

    def atom() -> Dim:
        nonlocal pos
        kind, val = peek()
        pos += 1
        if kind == "num":
            return Dim(val)
        if kind == "name":
            return Dim(val)
        if (kind, val) == ("op", "("):
            d = nested(expr)
            if peek() != ("op", ")"):
                raise ValueError(f"unbalanced parenthesis in dimension {text!r}")
            pos += 1
            return d
        if (kind, val) == ("op", "-"):
            return -nested(atom)
        raise ValueError(f"bad dimension expression {text!r}")

    def term() -> Dim:
        nonlocal pos
        d = atom()
        while peek() in (("op", "*"), ("op", "/")):
            op = peek()[1]
            pos += 1
            rhs = atom()
            if op == "/" and not rhs.is_static:
                raise ValueError(f"dimension {text!r} divides by the symbolic {rhs}")
            d = d * rhs if op == "*" else d // int(rhs)
        return d

    def expr() -> Dim:
        nonlocal pos
        d = term()
        while peek() in (("op", "+"), ("op", "-")):
            op = peek()[1]
            pos += 1
            rhs = term()
            d = d + rhs if op == "+" else d - rhs
        return d

    if not toks:
        raise ValueError("empty dimension expression")
    d = expr()
    if pos != len(toks):
        raise ValueError(f"bad dimension expression {text!r}")
    return d
