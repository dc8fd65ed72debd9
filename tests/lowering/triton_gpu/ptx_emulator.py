"""A numpy emulator of the few PTX instructions graphir's inline-asm decoders use (mov, prmt,
shl / shr, lop3, packed bf16x2 / f16x2 sub, mul, fma with round-to-nearest-even, cvt of two
float32 into a packed pair, and the warp-wide mma.sync m16n8k16 with float32 accumulators), so
the asm strings are checked on the CPU, where Triton's interpreter runs a plain-op stand-in.

Each register is a numpy uint32 array (one lane per element; float32 values as their bits);
`run(asm, args)` executes the asm's instructions in order, with `$i` naming args[i] (outputs
among them, written in place). For mma.sync the last axis is the warp's 32 lanes, whose
fragments follow the PTX ISA's layout for m16n8k16 (row-major A, column-major B).
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


def _mma(ops: list, val, ty: str) -> list:
    """D = A B + C for m16n8k16 over the last axis's 32 lanes: lane l (group g = l // 4, t =
    l % 4) holds A[g, 2t..2t+1], A[g+8, 2t..], A[g, 2t+8..], A[g+8, 2t+8..] (a0..a3, low half
    first), B[2t..2t+1, g], B[2t+8.., g] (b0, b1) and C / D [g, 2t..2t+1], [g+8, 2t..]."""
    a = [_halves(val(t), ty) for t in ops[4:8]]
    b = [_halves(val(t), ty) for t in ops[8:10]]
    c = [val(t).view(np.float32).astype(np.float64) for t in ops[10:14]]
    lead = a[0][0].shape[:-1]
    A = np.zeros(lead + (16, 16))
    B = np.zeros(lead + (16, 8))
    C = np.zeros(lead + (16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for h in range(2):
            A[..., g, 2 * t + h] = a[0][h][..., lane]
            A[..., g + 8, 2 * t + h] = a[1][h][..., lane]
            A[..., g, 2 * t + 8 + h] = a[2][h][..., lane]
            A[..., g + 8, 2 * t + 8 + h] = a[3][h][..., lane]
            B[..., 2 * t + h, g] = b[0][h][..., lane]
            B[..., 2 * t + 8 + h, g] = b[1][h][..., lane]
            C[..., g, 2 * t + h] = c[h][..., lane]
            C[..., g + 8, 2 * t + h] = c[2 + h][..., lane]
    D = (A @ B + C).astype(np.float32)
    out = [np.zeros(lead + (32,), np.float32) for _ in range(4)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for h in range(2):
            out[h][..., lane] = D[..., g, 2 * t + h]
            out[2 + h][..., lane] = D[..., g + 8, 2 * t + h]
    return [o.view(U32) for o in out]


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
        elif name == "cvt":
            # cvt.rn.{bf16x2,f16x2}.f32 d, a, b: a to the high half, b to the low one.
            ty = op.split(".")[2]
            hi, lo = (val(t).view(np.float32).astype(np.float64) for t in ops[1:3])
            put(ops[0], _pack(lo, hi, ty))
        elif name == "mma":
            assert op.startswith("mma.sync.aligned.m16n8k16.row.col.f32.") and op.endswith(".f32")
            ty = {"bf16": "bf16x2", "f16": "f16x2"}[op.split(".")[-2]]
            for tok, v in zip(ops[:4], _mma(ops, val, ty)):
                put(tok, v)
        elif op == "fma.rn.f32":
            a, b, c = (val(t).view(np.float32).astype(np.float64) for t in ops[1:4])
            put(ops[0], (a * b + c).astype(np.float32).view(U32))
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
