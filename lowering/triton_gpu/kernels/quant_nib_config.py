"""Launch specs, formats and row buckets of the nib kernels (quant_nib.py): which kernel and
tile a bucket of X's row count takes, measured on the H200 (tools/gpu_sweeps/quant_nib.py)."""
from __future__ import annotations

from .quant_nib import nib_dequant_kernel, nib_gemv_kernel, nib_matmul_kernel
from .quant_nib_block import nib_gemv_block_kernel
from .quant_nib_mma import nib_mma_kernel
from .quant_nib_tc import nib_tc_kernel, nib_x_planes_kernel

FMT_IDS = {"q4_0": 0, "q4_1": 1, "q4_k": 2, "gptq": 3, "gptq_sym": 4, "q6_k": 5}


def _fmt_id(fmt: str) -> int:
    if fmt not in FMT_IDS:
        raise ValueError(f"nib layout: unknown format {fmt!r}; have {sorted(FMT_IDS)}")
    return FMT_IDS[fmt]


def gemv_geometry(k: int, nj: int, split: int) -> tuple[int, int]:
    """(NJ, cols_per_split) for a GEMV over K = k: NJ shrinks to a power of two dividing the
    row's word columns, each split takes whole tiles."""
    kw = k // 8
    nj = _fitted(kw, nj)
    return nj, split_run(kw, nj, split, f"nib GEMV: K={k}")


def _fitted(kw: int, nj: int) -> int:
    while kw % nj:
        nj //= 2
    return nj


def _run(total: int, unit: int, split: int) -> int:
    return -(-(-(-total // split)) // unit) * unit


def fills(total: int, unit: int, split: int) -> bool:
    """Whether `split` runs of whole units over `total` leave none empty."""
    return (split - 1) * _run(total, unit, split) < total


def split_run(total: int, unit: int, split: int, what: str) -> int:
    """Each split's run of `total` (word columns, blocks) in whole `unit`s. A split left with
    none is refused: the nib kernels load their first step before the loop, which would then
    lie past the row."""
    run = _run(total, unit, split)
    if not fills(total, unit, split):
        raise ValueError(f"{what} in {split} splits of {run} leaves the last split empty; split "
                         f"K at most {-(-total // run)} ways")
    return run


def nib_specs(fmt: str, dtype: str, conf: dict, group: int = 32) -> list:
    """The GEMV (conf["GEMV"]) or dot kernel for a nib weight of format `fmt` and X of `dtype`
    and, when the config splits K, the reduce of its fp32 partials. conf: BG (groups of four
    rows), NJ (word columns a step), SPLIT_K, num_warps, PREFETCH (0 or 1; GEMV also 2), and
    BM / num_stages (dot); BLK 1: the one-row GEMV a block a lane (nib_gemv_block_kernel), WEV 1
    its weight loads evict-first, SPARE 0 (default 1) its q4_k terms from `supers`, not from the
    scales' spare bits (for operands nib_repack did not make)."""
    from .quant import splitk_reduce_spec
    from .spec import KernelSpec, cdiv, triton_dtype

    t = triton_dtype(dtype)
    if conf.get("TC"):
        return _tc_specs(fmt, t, conf, group)
    if conf.get("MMA"):
        return _mma_specs(fmt, t, conf, group)
    split, gemv = conf["SPLIT_K"], bool(conf.get("GEMV"))
    bm = conf.get("ROWS", 1) if gemv else conf["BM"]
    if gemv and bm not in (1, 2, 4):
        raise ValueError(f"nib GEMV: ROWS must be 1, 2 or 4, got {bm}")
    blk = gemv and bool(conf.get("BLK"))
    if blk and (bm != 1 or conf["NJ"] % 4):
        raise ValueError(f"nib block GEMV: one row and whole blocks a step (NJ % 4 == 0), got "
                         f"ROWS={bm}, NJ={conf['NJ']}")
    bn = 4 * conf["BG"]
    consts = dict(FMT=_fmt_id(fmt), GROUP=group)
    if blk:
        consts.update(DT={"fp32": 0, "bf16": 1, "fp16": 2}[t], BG=conf["BG"], NJ=conf["NJ"],
                      SPLIT_K=split)
        consts.update(WEV=bool(conf.get("WEV")), SPARE=bool(conf.get("SPARE", 1)))
    elif gemv:
        consts.update(DT={"fp32": 0, "bf16": 1, "fp16": 2}[t], BG=conf["BG"], NJ=conf["NJ"],
                      SPLIT_K=split, PREFETCH=int(conf.get("PREFETCH", 1)), ROWS=bm)
    else:
        consts.update(BM=bm, BG=conf["BG"], NJ=conf["NJ"], SPLIT_K=split,
                      PREFETCH=int(conf.get("PREFETCH", 0)))
    sig = {"x_ptr": f"*{t}", "q_ptr": "*i32", "s_ptr": "*u8", "z_ptr": "*u8", "h_ptr": "*u8",
           "c_ptr": "*fp32" if split > 1 else f"*{t}", "M": "i32", "N": "i32", "K": "i32",
           "cols_per_split": "i32", **{k: "constexpr" for k in consts}}
    tag = (f"gemvblk_g{conf['BG']}j{conf['NJ']}" + "e" * bool(conf.get("WEV"))
           + "n" * (not consts["SPARE"]) if blk else
           f"gemv_r{bm}g{conf['BG']}j{conf['NJ']}p{consts['PREFETCH']}"
           if gemv else f"matmul_m{bm}g{conf['BG']}j{conf['NJ']}p{consts['PREFETCH']}")
    main = KernelSpec(
        name=f"nib_{fmt}_{tag}_{t}_w{conf['num_warps']}" + (f"s{split}" if split > 1 else ""),
        fn=nib_gemv_block_kernel if blk else nib_gemv_kernel if gemv else nib_matmul_kernel,
        signature=sig, constexprs=consts,
        num_warps=conf["num_warps"], num_stages=conf.get("num_stages", 1),
        grid=lambda M, N: (cdiv(M, bm), cdiv(N, bn), split), grid_args=("M", "N"),
        divisible_by_16=("x_ptr", "q_ptr", "s_ptr", "z_ptr", "h_ptr", "c_ptr", "K"))
    return [main] if split == 1 else [main, splitk_reduce_spec("nib", t, split)]


def _tc_specs(fmt: str, t: str, conf: dict, group: int) -> list:
    """The tensor-core kernel (quant_nib_tc.py): conf TC=1, BN (weight rows, 64 a warpgroup),
    NW (word columns a step, >= 16), BM (rows of X, 16), SPLIT_K, num_warps, num_stages,
    PREFETCH (bits: 1 the affine terms, 2 X, a step ahead), XP (X reordered first: then the
    list starts with nib_x_planes_spec)."""
    from .quant import splitk_reduce_spec
    from .spec import KernelSpec, cdiv

    _fmt_id(fmt)
    if fmt not in TC_FORMATS or t not in ("bf16", "fp16"):
        raise ValueError(f"nib tensor-core kernel: takes {TC_FORMATS} with 16-bit X, "
                         f"got {fmt} with {t}")
    split, bm, bn = conf["SPLIT_K"], conf["BM"], conf["BN"]
    consts = dict(FMT=_fmt_id(fmt), GROUP=group, DT={"bf16": 1, "fp16": 2}[t], BN=bn,
                  NW=conf["NW"], BM=bm, SPLIT_K=split, PREFETCH=int(conf.get("PREFETCH", 0)),
                  XP=int(conf.get("XP", 0)))
    sig = {"x_ptr": f"*{t}", "q_ptr": "*i32", "s_ptr": "*u8", "z_ptr": "*u8", "h_ptr": "*u8",
           "c_ptr": "*fp32" if split > 1 else f"*{t}", "M": "i32", "N": "i32", "K": "i32",
           "cols_per_split": "i32", **{k: "constexpr" for k in consts}}
    main = KernelSpec(
        name=(f"nib_{fmt}_tc_m{bm}n{bn}j{conf['NW']}p{consts['PREFETCH']}x{consts['XP']}_{t}"
              f"_w{conf['num_warps']}"
              f"st{conf.get('num_stages', 1)}" + (f"s{split}" if split > 1 else "")),
        fn=nib_tc_kernel, signature=sig, constexprs=consts, num_warps=conf["num_warps"],
        num_stages=conf.get("num_stages", 1),
        grid=lambda M, N: (cdiv(M, bm), cdiv(N, bn), split), grid_args=("M", "N"),
        divisible_by_16=("x_ptr", "q_ptr", "s_ptr", "z_ptr", "h_ptr", "c_ptr", "K"))
    specs = [main] if split == 1 else [main, splitk_reduce_spec("nib", t, split)]
    return ([nib_x_planes_spec(t, conf["NW"])] + specs) if consts["XP"] else specs


def _mma_specs(fmt: str, t: str, conf: dict, group: int) -> list:
    """The warp-MMA kernel (quant_nib_mma.py) for up to 8 XN rows of 16-bit X and 32 weight
    rows a program: conf MMA=1, num_warps (each a share of the program's blocks of K), NB (blocks
    of K a step: 1 or 2), SPLIT_K, PREFETCH (1 or 2 steps of words, terms and X loaded ahead of
    the MMAs), SA (symmetric codes scaled after the MMA, exactly: 1, or rounded with their
    scale: 0), XN (sets of 8 rows of X a program: 1 or 2), WEV (weight loads evict-first)."""
    from .quant import splitk_reduce_spec
    from .spec import KernelSpec, cdiv

    _fmt_id(fmt)
    if fmt not in TC_FORMATS or t not in ("bf16", "fp16"):
        raise ValueError(f"nib warp-MMA kernel: takes {TC_FORMATS} with 16-bit X, "
                         f"got {fmt} with {t}")
    split, warps = conf["SPLIT_K"], conf["num_warps"]
    nb = conf.get("NB", 1)
    if nb not in (1, 2, 4):
        raise ValueError(f"nib warp-MMA kernel: NB must be 1, 2 or 4, got {nb}")
    consts = dict(FMT=_fmt_id(fmt), GROUP=group, DT={"bf16": 1, "fp16": 2}[t],
                  WARPS=warps, NB=nb, SPLIT_K=split, PREFETCH=int(conf.get("PREFETCH", 1)),
                  SA=int(conf.get("SA", 1)), XN=int(conf.get("XN", 1)),
                  WEV=bool(conf.get("WEV")))
    if consts["XN"] not in (1, 2):
        raise ValueError(f"nib warp-MMA kernel: XN must be 1 or 2, got {consts['XN']}")
    sig = {"x_ptr": f"*{t}", "q_ptr": "*i32", "s_ptr": "*u8", "z_ptr": "*u8", "h_ptr": "*u8",
           "c_ptr": "*fp32" if split > 1 else f"*{t}", "M": "i32", "N": "i32", "K": "i32",
           "blocks_per_split": "i32", **{k: "constexpr" for k in consts}}
    main = KernelSpec(
        name=f"nib_{fmt}_mma_x{consts['XN']}b{nb}p{consts['PREFETCH']}a{consts['SA']}"
             + "e" * consts["WEV"] + f"_{t}_w{warps}"
             + (f"s{split}" if split > 1 else ""),
        fn=nib_mma_kernel, signature=sig, constexprs=consts, num_warps=warps, num_stages=1,
        grid=lambda M, N: (cdiv(M, 8 * consts["XN"]), cdiv(N, 32), split), grid_args=("M", "N"),
        divisible_by_16=("x_ptr", "q_ptr", "s_ptr", "z_ptr", "h_ptr", "c_ptr", "K"),
        # GPTQ with zero points, two sets of X rows, two blocks a step: uncapped, ptxas settles
        # on 80 registers and parks three values on the stack, reloaded every step; at 96 it
        # keeps them (the other formats, and four blocks a step, are left as they compile).
        maxnreg=96 if fmt == "gptq" and consts["XN"] == 2 and nb == 2 else None)
    return [main] if split == 1 else [main, splitk_reduce_spec("nib", t, split)]


def mma_geometry(k: int, warps: int, split: int, nb: int = 1) -> int:
    """blocks_per_split of the warp-MMA kernel over K = k: whole steps of nb 32-value blocks for
    each of the warps in each split (the program's warps share its blocks evenly)."""
    per = warps * nb
    if k % (32 * per):
        raise ValueError(f"nib warp-MMA kernel: K={k} must be a multiple of 32 x {warps} warps"
                         f" x {nb} blocks a step")
    return split_run(k // 32, per, split, f"nib warp-MMA kernel: K={k}")


def nib_x_planes_spec(t: str, nw: int):
    """The reorder of X `[M, K]` (Triton dtype t) into the tensor-core kernel's contiguous planes
    of nw word columns, over grid (M, K / (8 nw))."""
    from .spec import KernelSpec

    return KernelSpec(
        name=f"nib_x_planes_j{nw}_{t}", fn=nib_x_planes_kernel,
        signature={"x_ptr": f"*{t}", "y_ptr": f"*{t}", "K": "i32", "NW": "constexpr"},
        constexprs=dict(NW=nw), num_warps=1, num_stages=1,
        grid=lambda M, K: (M, K // (8 * nw), 1), grid_args=("M", "K"),
        divisible_by_16=("x_ptr", "y_ptr", "K"))


def tc_geometry(k: int, nw: int, split: int) -> int:
    """cols_per_split of the tensor-core kernel over K = k: whole steps of nw word columns
    (nw >= 16: the MMA's K) in each split; K must be a multiple of 128."""
    kw = k // 8
    if k % 128 or kw % nw:
        raise ValueError(f"nib tensor-core kernel: K={k} must be a multiple of 128 and of "
                         f"8 NW = {8 * nw}")
    return split_run(kw, nw, split, f"nib tensor-core kernel: K={k}")


# Formats the tensor-core kernel takes.
TC_FORMATS = ("q4_0", "q4_1", "q4_k", "gptq", "gptq_sym", "q6_k")

DEQUANT_TILE = dict(BG=8, NJ=16, num_warps=4)


def nib_dequant_spec(fmt: str, dtype: str, k: int, group: int = 32):
    """The decode of a whole nib weight into a `[N, K]` buffer of `dtype` (X's dtype), over
    grid (N / (4 BG), K / (8 NJ))."""
    from .spec import KernelSpec, cdiv, triton_dtype

    t = triton_dtype(dtype)
    bg, nw = DEQUANT_TILE["BG"], DEQUANT_TILE["num_warps"]
    nj = gemv_geometry(k, DEQUANT_TILE["NJ"], 1)[0]
    consts = dict(FMT=_fmt_id(fmt), GROUP=group, BG=bg, NJ=nj)
    sig = {"q_ptr": "*i32", "s_ptr": "*u8", "z_ptr": "*u8", "h_ptr": "*u8", "w_ptr": f"*{t}",
           "N": "i32", "K": "i32", **{k_: "constexpr" for k_ in consts}}
    return KernelSpec(
        name=f"nib_{fmt}_dequant_g{bg}j{nj}_{t}_w{nw}", fn=nib_dequant_kernel, signature=sig,
        constexprs=consts, num_warps=nw, num_stages=1,
        grid=lambda N, K: (cdiv(N, 4 * bg), K // (8 * nj)), grid_args=("N", "K"),
        divisible_by_16=("q_ptr", "s_ptr", "w_ptr", "K"))


# Row buckets of X: (largest M, config), from the H200 sweeps (tools/gpu_sweeps/quant_nib.py,
# BENCHMARKS.md "nib"). The GEMV shares each decoded word among ROWS rows of X (2 rows: 1.13-1.74x
# cuBLAS, 4 rows: 0.85-1.33x over Q4_0, Q4_K and GPTQ 4-bit); past 4 rows its programs take 4 rows
# each (the weight, at most 33 MB for 14336 x 4096, stays in the H200's L2 between them), level
# with the dot tiles at 8 rows. The dot tiles (SPLIT_K 0: from the weight's rows, dot_split) take
# 9-16 rows. Past that, and for q6_k past 4 rows (its dot ran at 0.26x cuBLAS at 8 rows), the
# weight is decoded once into X's dtype (nib_dequant_kernel) for the plain matmul (its tuned tiles
# or cuBLASLt): at 64 rows the dot tiles only tied with that, at 512 they ran at 0.13-0.29x
# cuBLAS, decoding every weight tile once per row tile of X. One row: the GEMV a block a lane
# (nib round 6, run 10: 14336 x 4096 Q4_0 13.2 against the word-a-lane GEMV's 14.6 us, Q4_K 15.8
# against 20.0, GPTQ 4-bit 13.2 against 15.2; 4096 x 4096 with BLK_SMALL Q4_K 6.8 against 7.8,
# Q4_0 6.3 against 6.2). Its weight loads evict-first (WEV; nib round 8: 2-6% at every format
# and weight, e.g. 14336 x 4096 Q4_0 13.0 -> 12.7 us, Q4_K 15.5 -> 14.9).
NIB_BUCKETS = (
    (1, dict(GEMV=1, BLK=1, BG=1, NJ=128, num_warps=1, SPLIT_K=1, WEV=1)),
    (2, dict(GEMV=1, BG=1, NJ=64, num_warps=1, SPLIT_K=1, PREFETCH=1, ROWS=2)),
    (4, dict(GEMV=1, BG=1, NJ=64, num_warps=1, SPLIT_K=1, PREFETCH=1, ROWS=4)),
    (8, dict(GEMV=1, BG=1, NJ=64, num_warps=1, SPLIT_K=1, PREFETCH=1, ROWS=4)),
    (16, dict(BM=16, BG=16, NJ=16, num_warps=4, num_stages=1, SPLIT_K=0, PREFETCH=1)),
    (None, dict(DEQUANT=1)),
)
# The one-row block GEMV on weights of fewer than MMA_MIN_N_AT_2 rows: 2 warps of 64 blocks a step
# (4096 x 4096: Q4_K 6.8 against 7.3 us for the default tile, GPTQ 4-bit 6.1 against 6.6).
BLK_SMALL = dict(NJ=256, num_warps=2)
# The word-a-lane one-row GEMV (the bucket before the block GEMV).
WORD_GEMV = dict(GEMV=1, BG=1, NJ=128, num_warps=2, SPLIT_K=1, PREFETCH=1)
# Formats whose GEMV stops short of the buckets' 8 rows and that skip the dot tiles.
SHORT = {"q6_k": 4}
# 5-16 rows of 16-bit X on the formats TC_FORMATS names, K a multiple of 128 (since nib round 6,
# where the warp-MMA kernel does not take K): the tensor-core kernel (quant_nib_tc.py; SPLIT_K
# 0: tc_split), which replaces the 4-row GEMV programs and the dot tiles there. H200, bf16 X,
# with X's reorder into planes (XP) in the time (BENCHMARKS.md nib round 4): 14336 x 4096 at 8 /
# 16 rows Q4_0 25.9 / 28.3 us, Q4_K 32.1 / 33.0 us against cuBLAS bf16's 32.2 / 33.2 us (the
# GEMV at 4 rows a program took 40 us at 8 rows, the dot tiles 51 us at 16). Triton gives
# mma.sync below a warpgroup (2 warps), which beat wgmma's wait per dot; PREFETCH 1 (the affine
# terms a step ahead) gained 10% on Q4_K, cost 0-4% on Q4_0. Weights whose 64-row tiles number
# fewer than the SMs take 32-row tiles (4096 x 4096: 13.8 against 14.7 us at 16 rows).
TC_BUCKET = (16, dict(TC=1, BN=64, NW=16, BM=16, num_warps=2, num_stages=3, SPLIT_K=0,
                      PREFETCH=1, XP=1))


def tc_takes(fmt: str, dtype: str, k: int) -> bool:
    """Whether the tensor-core kernel takes a weight of format fmt over K = k with X of dtype."""
    return (fmt in TC_FORMATS and dtype in ("bfloat16", "float16")
            and k % (8 * TC_BUCKET[1]["NW"]) == 0 and k % 128 == 0)


# 3-8 rows of 16-bit X (2 rows too on weights of 8448 rows or more), the formats TC_FORMATS
# names, K a multiple of 256: the warp-MMA kernel (quant_nib_mma.py; SPLIT_K 0: mma_split).
# H200, bf16 X (BENCHMARKS.md nib round 5), 14336 x 4096 Q4_0 at 2 / 4 / 8 rows 16.0 / 16.7 /
# 19.7 us against the GEMV's 19.6 / 23.8 us (2 / 4 rows a program) and the tensor-core
# kernel's 25.9 us (8 rows); 4096 x 4096 at 4 / 8 rows 9.5 / 10.2 us against 10.0 / 13.7 us.
# At 2 rows of a 4096-row weight the GEMV stays ahead (7.4 against 9.1 us: 128 programs of 32
# rows leave the MMA kernel short of loads in flight); at one row the GEMV wins on both.
# Weight loads evict-first (WEV; nib round 8): 14336 x 4096 at 2-8 rows Q4_0 16.2 -> 14.8 us,
# GPTQ 4-bit 16.2 -> 15.3, Q4_K 21.3 -> 20.6, Q6_K 23.6 -> 23.1; 4096 x 4096 within 2%.
MMA_BUCKET = (8, dict(MMA=1, num_warps=4, NB=2, SPLIT_K=0, PREFETCH=1, SA=1, WEV=1))
MMA_MIN_N_AT_2 = 8448       # 2 x 132 programs of 32 rows
# Weights of fewer rows (fewer than two programs an SM): 8 warps a program, four blocks a step
# each, K not split, where K is a multiple of 1024 (nib round 6, run 8, 4096 x 4096: 4 rows Q4_0
# 8.6 against 9.5 us, Q4_K 9.6 against 10.7, Q6_K 10.5 against 11.3; 16 rows, two sets, Q4_0
# 10.9 against 11.9, Q4_K 12.4 against 13.1, but Q6_K 13.9 against 13.6: it keeps the default).
MMA_SMALL = dict(num_warps=8, NB=4, SPLIT_K=1)


# 9-16 rows: the same kernel with two sets of 8 rows of X a program (XN 2, each decoded pair
# feeding both), 4 warps, split K from the grid (mma_split). Since X became one 16-byte load a
# lane and block (nib round 6), it beats the tensor-core kernel on both weights: 14336 x 4096
# at 16 rows Q4_0 21.2 against 27.7 us, Q4_K 29.0 against 33.5, Q6_K 35.6 against 49.6;
# 4096 x 4096 Q4_0 11.7 us (the tensor-core kernel took 13.9 in round 5). The tensor-core
# kernel keeps the weights whose K is a multiple of 128 but not of 256.
MMA16_BUCKET = (16, dict(MMA=1, XN=2, num_warps=4, NB=2, SPLIT_K=0, PREFETCH=1, SA=1, WEV=1))


def mma_first_row(fmt: str, n: int) -> int:
    """The fewest rows of X the warp-MMA kernel takes for a weight of n rows in format fmt: 3,
    2 from MMA_MIN_N_AT_2 rows; 2 for Q6_K, whose 2-row GEMV decodes more per value (H100,
    2026-12-07, BENCHMARKS.md thirtieth session: 4096 x 4096 at 2 rows 10.2 against 10.7 us;
    14336 x 4096 at 1 row the block GEMV 21.5 against 22.9 us, at 2 rows 23.1 against 28.4)."""
    if fmt == "q6_k":
        return 2
    return 2 if n >= MMA_MIN_N_AT_2 else 3


def mma_takes(fmt: str, dtype: str, k: int, c: dict = MMA_BUCKET[1]) -> bool:
    """Whether the warp-MMA kernel (config c) takes a weight of format fmt over K = k with X
    of dtype."""
    return (fmt in TC_FORMATS and dtype in ("bfloat16", "float16")
            and k % (32 * c["num_warps"] * c["NB"]) == 0)


def nib_buckets(fmt: str = "q4_0", dtype: str = "bfloat16", k: int = 4096) -> tuple:
    """The row buckets (largest M, config) of a weight of format fmt over K = k, X of dtype:
    NIB_BUCKETS, with the warp-MMA kernel for 3-8 rows and the tensor-core kernel for 9-16
    where they take the weight (nib_config gives 2 rows of a large weight to the former, and
    9-16 rows to its two-set form MMA16_BUCKET where that takes K)."""
    mma, tc = mma_takes(fmt, dtype, k), tc_takes(fmt, dtype, k)
    if not (mma or tc):
        return NIB_BUCKETS
    head = NIB_BUCKETS[:2] + (MMA_BUCKET,) if mma else NIB_BUCKETS[:3]
    return head + ((TC_BUCKET,) if tc else (NIB_BUCKETS[4],)) + (NIB_BUCKETS[-1],)


SMS = 132   # an H100 / H200; the split only needs the order of magnitude


def dot_split(n: int, k: int, bg: int, nj: int) -> int:
    """Split K until the dot's grid holds two programs per SM (at most 8 ways, each split at
    least two steps of nj word columns): 4096 weight rows in 64-row tiles are only 64
    programs, which left half the H200 idle (29.7 us at 16 rows against 51 us for 3.5x the
    weight)."""
    tiles, kw = -(-n // (4 * bg)), k // 8
    fit = _fitted(kw, nj)
    split = 1
    while split < 8 and tiles * split < 2 * SMS and kw // (2 * split) >= 2 * nj \
            and fills(kw, fit, 2 * split):
        split *= 2
    return split


def mma_split(n: int, k: int, warps: int, nb: int, xn: int = 1) -> int:
    """Split K until the warp-MMA grid holds ~4 programs an SM (500: 14336 rows, 448 programs,
    ran best at split 2, 4096 rows at split 4), each warp of a split at least two steps. Two
    sets of X rows a program (xn 2) do twice the MMAs a loaded byte and want fewer programs
    (400: 14336 rows at split 1, 21.2 against 26.4 us at split 2; 4096 rows at split 4)."""
    tiles = -(-n // 32)
    split = 1
    while tiles * split < (500 if xn == 1 else 400) and k // 32 // (2 * split) >= 2 * warps * nb \
            and fills(k // 32, warps * nb, 2 * split):
        split *= 2
    return split


def tc_split(n: int, k: int, bn: int, nw: int) -> int:
    """Split K until the tensor-core grid holds ~4 programs per SM (500: at 14336 rows the
    896-program split beat 448 by 8%; at 4096 rows 512 beat 1024), each split at least two
    steps of nw word columns."""
    tiles = -(-n // bn)
    split = 1
    while tiles * split < 500 and k // 8 // (2 * split) >= 2 * nw and fills(k // 8, nw, 2 * split):
        split *= 2
    return split


def nib_config(m_max: int | None, k: int, n: int = 4096, fmt: str = "q4_0",
               dtype: str = "bfloat16") -> tuple[dict, int]:
    """(config, cols_per_split) of the bucket taking m_max rows (None: any) for K = k, a
    weight of n rows in format fmt and X of dtype."""
    top, conf = next((t, c) for t, c in nib_buckets(fmt, dtype, k)
                     if t is None or (m_max is not None and m_max <= t))
    if top in (1, 2) and top >= mma_first_row(fmt, n) and mma_takes(fmt, dtype, k):
        conf = MMA_BUCKET[1]
    if conf.get("BLK") and n < MMA_MIN_N_AT_2:
        conf = dict(conf, **BLK_SMALL)
    if conf.get("BLK") and _fitted(k // 8, conf["NJ"]) < conf["NJ"]:
        # K's word columns do not take the tile whole (K = 11008: 32 a step): fewer blocks
        # than lanes would repeat each block's work on several lanes; the word-a-lane GEMV
        # (measured before the block GEMV at every K) takes the row.
        conf = dict(conf, NJ=128, num_warps=1) if _fitted(k // 8, 128) == 128 \
            else dict(WORD_GEMV)
    if conf.get("TC") and mma_takes(fmt, dtype, k, MMA16_BUCKET[1]):
        conf = MMA16_BUCKET[1]
    if fmt in SHORT and (top is None or top > SHORT[fmt]) and not (conf.get("TC")
                                                                    or conf.get("MMA")):
        conf = dict(DEQUANT=1)
    if conf.get("DEQUANT"):
        return dict(conf), 0
    if conf.get("MMA"):
        small = dict(conf, **MMA_SMALL)
        if n < MMA_MIN_N_AT_2 and mma_takes(fmt, dtype, k, small) \
                and not (fmt == "q6_k" and conf.get("XN", 1) == 2):
            conf = small
        if conf["SPLIT_K"] == 0:
            conf = dict(conf, SPLIT_K=mma_split(n, k, conf["num_warps"], conf["NB"],
                                                conf.get("XN", 1)))
        return dict(conf), mma_geometry(k, conf["num_warps"], conf["SPLIT_K"], conf["NB"])
    if conf.get("TC"):
        if -(-n // conf["BN"]) < SMS:
            conf = dict(conf, BN=32)
        conf = dict(conf, SPLIT_K=tc_split(n, k, conf["BN"], conf["NW"]))
        return conf, tc_geometry(k, conf["NW"], conf["SPLIT_K"])
    nj = gemv_geometry(k, conf["NJ"], 1)[0]      # the tile fits K whatever the split
    if conf["SPLIT_K"] == 0:
        conf = dict(conf, SPLIT_K=dot_split(n, k, conf["BG"], conf["NJ"]))
    return dict(conf, NJ=nj), gemv_geometry(k, nj, conf["SPLIT_K"])[1]
