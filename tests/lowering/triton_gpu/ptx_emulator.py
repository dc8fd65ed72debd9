"""A numpy emulator of the few PTX instructions graphir's inline-asm decoders use (mov, prmt,
shl / shr, lop3, and packed bf16x2 / f16x2 sub, mul, fma with round-to-nearest-even), so the
asm strings are checked on the CPU, where Triton's interpreter runs a plain-op stand-in instead.

Each register is a numpy uint32 array (one lane per element); `run(asm, args)` executes the
asm's instructions in order, with `$i` naming args[i] (outputs among them, written in place).
"""
from __future__ import annotations

import re

import numpy as np

U32 = np.uint32


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bits, rounding once to nearest even (finite values)."""
    m, e = np.frexp(x)                                   # x = m 2**e, 0.5 <= |m| < 1
    q = np.round(m * 256.0) / 256.0                       # 8 significant bits, ties to even
    f = np.ldexp(q, e).astype(np.float32)                 # exact in float32
    return (f.view(U32) >> U32(16)).astype(U32)


def _f16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint16).astype(U32)   # numpy rounds to nearest even


def _halves(v: np.ndarray, ty: str) -> list[np.ndarray]:
    out = []
    for h in (v & U32(0xFFFF), v >> U32(16)):
        if ty == "bf16x2":
            out.append((h << U32(16)).view(np.float32).astype(np.float64))
        else:
            out.append(h.astype(np.uint16).view(np.float16).astype(np.float64))
    return out


def _pack(lo: np.ndarray, hi: np.ndarray, ty: str) -> np.ndarray:
    r = _bf16_round if ty == "bf16x2" else _f16_round
    return r(lo) | (r(hi) << U32(16))


def _lop3(a, b, c, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for bit in range(8):
        if lut >> bit & 1:
            ta = a if bit & 4 else ~a
            tb = b if bit & 2 else ~b
            tc = c if bit & 1 else ~c
            out |= ta & tb & tc
    return out


def _prmt(a, b, sel: int) -> np.ndarray:
    src = [(a >> U32(8 * i)) & U32(0xFF) for i in range(4)] + \
          [(b >> U32(8 * i)) & U32(0xFF) for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        n = sel >> (4 * i) & 0x7                       # the sign-replicate mode is not used
        out |= src[n] << U32(8 * i)
    return out


def run(asm: str, args: list) -> list:
    """Execute `asm` over the uint32 lanes of args ($0.. in order); returns args."""
    regs: dict[str, np.ndarray] = {}
    shape = np.broadcast(*[a for a in args if a is not None]).shape
    args = [np.broadcast_to(a, shape).astype(U32) if a is not None else np.zeros(shape, U32)
            for a in args]

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok.startswith("$"):
            return args[int(tok[1:])]
        if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", tok):
            return np.full(shape, int(tok, 0) & 0xFFFFFFFF, U32)
        return regs[tok]

    def put(tok: str, v: np.ndarray) -> None:
        tok = tok.strip()
        if tok.startswith("$"):
            args[int(tok[1:])] = v.astype(U32)
        else:
            regs[tok] = v.astype(U32)

    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        ops = [t.strip() for t in rest.split(",")]
        name = op.split(".")[0]
        if name == "mov":
            put(ops[0], val(ops[1]))
        elif name in ("shl", "shr"):
            n = int(ops[2], 0)
            put(ops[0], val(ops[1]) << U32(n) if name == "shl" else val(ops[1]) >> U32(n))
        elif name == "lop3":
            put(ops[0], _lop3(val(ops[1]), val(ops[2]), val(ops[3]), int(ops[4], 0)))
        elif name == "prmt":
            put(ops[0], _prmt(val(ops[1]), val(ops[2]), int(ops[3], 0)))
        elif name in ("sub", "mul", "fma"):
            ty = op.split(".")[-1]
            xs = [_halves(val(t), ty) for t in ops[1:]]
            res = []
            for h in range(2):
                a = [x[h] for x in xs]
                res.append(a[0] - a[1] if name == "sub" else a[0] * a[1] if name == "mul"
                           else a[0] * a[1] + a[2])
            put(ops[0], _pack(res[0], res[1], ty))
        else:
            raise NotImplementedError(f"ptx emulator: {op}")
    return args
