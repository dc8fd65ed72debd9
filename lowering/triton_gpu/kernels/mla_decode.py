"""MLA attention in latent space (absorbed weights): the decode path, split-K over the context.

Three steps:
  1. `mla_q_absorb_kernel`: q_lat `[T*NH, W]` = [q_nope @ w_uk[h] | q_rope] per (token, head), in
     q's dtype (grid: token blocks x heads x blocks of R);
  2. `mla_absorbed_kernel`: each program owns BLOCK_M (token, head) rows of one sequence (heads
     fastest: a decode token's heads share one tile, and the tiles of a sequence and partition
     are adjacent in launch order, so they read the same cache rows from L2) and one partition
     of its context; the keys are the W-wide latent cache rows (scores = q_lat[:R] . c +
     q_lat[R:] . k_pe, two dots since W is no power of two) and the values their first R
     columns, so every K tile is also the V tile. Online softmax in fp32 with exp2; the
     unnormalized partial `o_part [T*NH, parts, RP]` and `ml [T*NH, parts, 2]` (running max in
     log2 units, sum) go to fp32 scratch. New token i of sequence b sits at position
     cache_len + i and sees keys up to itself;
  3. the merge: the partitions combined and the latent output multiplied by w_uv[h] `[R, V]`,
     writing `[T, NH*V]`: by default in two launches (mla_merge.py: the combine into o_lat,
     then the product), or in one, `mla_absorbed_out_kernel` per (token block, head) (specs'
     `merge`).
The partitions are `part_size` keys (a multiple of BLOCK_N) chosen by the lowering from the
batch and the bucketed context length (split_lets), so all SMs stream the cache at batch 64 as
at batch 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.mla import (latent_block_row, latent_rows, pad,
                                                     tile_key_range)
from graphir.lowering.triton_gpu.kernels import mla_merge
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, cdiv, triton_dtype
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

SM_COUNT = 132
MIN_PART = 256        # keys per partition at least (partials cost a write and a read)
# Tokens a program of the q absorption and of the merge (each reads its head's [128, 512] weight
# once per token block: at batch 64 a 16-token block reads it four times). The plan's grids and
# the launch helpers take the value from the specs' constexprs; tools/gpu_sweeps/mla.py --aux
# times other values. H200, 2026-12-05 (mla.py --aux 16,64 --merge fused,split): 64 tokens a
# program halved the absorption at 64-128 heads (B64 x 64 heads 8.9 -> 5.0 us, B128 x 128 heads
# 31.3 -> 15.2) and cost at most 0.4 us elsewhere.
AUX_BLOCK_T = 64
# How the split-K partials meet w_uv (specs' `merge`): one fused launch, or mla_merge's combine
# then product (more programs, w_uv read once per token block). Same run, merge at 16 tokens
# fused -> at 64 split: B64 x 16 heads 13.4 -> 7.0 us, B64 x 64 heads 13.0 -> 8.6, B8 x 128 heads
# 32.4 -> 10.9, B128 x 128 heads 36.0 -> 23.1.
MERGES = ("fused", "split")
MERGE = "split"


@triton.jit
def mla_q_absorb_kernel(q_ptr, wuk_ptr, qlat_ptr, T, NH: tl.constexpr, NOPE: tl.constexpr,
                        ROPE: tl.constexpr, R: tl.constexpr, NOPEP: tl.constexpr,
                        EP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                        PRECISION: tl.constexpr):
    pdl_wait()
    W: tl.constexpr = R + ROPE
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    rb = tl.program_id(2)
    tm = t < T
    d = tl.arange(0, NOPEP)
    qrow = q_ptr + t.to(tl.int64)[:, None] * (NH * (NOPE + ROPE)) + h * (NOPE + ROPE)
    qn = tl.load(qrow + d[None, :], mask=tm[:, None] & (d < NOPE)[None, :], other=0.0)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    wk = tl.load(wuk_ptr + h * (NOPE * R) + d[:, None] * R + r[None, :],
                 mask=(d < NOPE)[:, None] & (r < R)[None, :], other=0.0)
    lat = tl.dot(qn, wk.to(qn.dtype), input_precision=PRECISION)
    dst = qlat_ptr + (t.to(tl.int64) * NH + h)[:, None] * W
    tl.store(dst + r[None, :], lat.to(qlat_ptr.dtype.element_ty),
             mask=tm[:, None] & (r < R)[None, :])
    if rb == 0:
        e = tl.arange(0, EP)
        em = tm[:, None] & (e < ROPE)[None, :]
        tl.store(dst + R + e[None, :], tl.load(qrow + NOPE + e[None, :], mask=em), mask=em)


@triton.jit
def mla_absorbed_kernel(qlat_ptr, offs_ptr, clen_ptr, lut_ptr, blocks_ptr, o_part_ptr, ml_ptr,
                        max_pages, layer_idx, num_layers, num_pages, scale, part_size,
                        num_parts, NH: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr,
                        RP: tl.constexpr, EP: tl.constexpr, KINDS: tl.constexpr,
                        PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        VSPLIT: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    W: tl.constexpr = R + ROPE
    RV: tl.constexpr = RP // VSPLIT        # value columns this program accumulates
    if VSPLIT == 1:
        tile = tl.program_id(0)
        vs = 0
    else:
        # VSPLIT == 2: the two programs of a tile are adjacent in launch order; each computes
        # all scores (its own value half first, then the other) and accumulates its half.
        tile = tl.program_id(0) // 2
        vs = tl.program_id(0) % 2
    part = tl.program_id(1)
    b = tl.program_id(2)
    seq_start = tl.load(offs_ptr + b)
    n_new = tl.load(offs_ptr + b + 1) - seq_start
    if tile * BLOCK_M < n_new * NH:
        cache_len, end, lo, hi = tile_key_range(clen_ptr, b, tile, part, part_size, n_new,
                                                max_pages, NH, BLOCK_M, PAGE_SIZE)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)      # (token, head) pairs, heads fastest
        rmask = rows < n_new * NH
        grow = seq_start.to(tl.int64) * NH + rows
        if VSPLIT == 1:
            r = tl.arange(0, RP)
        else:
            r = vs * RV + tl.arange(0, RV)
            ro = (1 - vs) * RV + tl.arange(0, RV)
            q_o = tl.load(qlat_ptr + grow[:, None] * W + ro[None, :],
                          mask=rmask[:, None] & (ro < R)[None, :], other=0.0)
        e = tl.arange(0, EP)
        q_c = tl.load(qlat_ptr + grow[:, None] * W + r[None, :],
                      mask=rmask[:, None] & (r < R)[None, :], other=0.0)
        q_pe = tl.load(qlat_ptr + grow[:, None] * W + R + e[None, :],
                       mask=rmask[:, None] & (e < ROPE)[None, :], other=0.0)
        qp = cache_len + rows // NH
        qk_scale = scale * 1.4426950408889634
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, RV), tl.float32)
        dt = q_c.dtype
        j = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            kp = n0 + j
            km = kp < hi
            if PAGE_SIZE % BLOCK_N == 0:
                # The block lies in one page (lo is a multiple of BLOCK_N): one lookup and
                # dense rows, which the pipeliner turns into asynchronous copies.
                krow = latent_block_row(lut_ptr, b, n0, max_pages, layer_idx, num_layers,
                                        num_pages, KINDS, PAGE_SIZE) + j
            else:
                krow = latent_rows(lut_ptr, b, kp, km, max_pages, layer_idx, num_layers,
                                   num_pages, KINDS, PAGE_SIZE)
            base = blocks_ptr + krow[:, None] * W
            # Rows past the sequence may hold anything (NaN too): masked loads read zeros.
            if R == RP:
                c = tl.load(base + r[None, :], mask=km[:, None], other=0.0).to(dt)
            else:
                c = tl.load(base + r[None, :], mask=km[:, None] & (r < R)[None, :],
                            other=0.0).to(dt)
            if ROPE == EP:
                pe = tl.load(base + R + e[None, :], mask=km[:, None], other=0.0).to(dt)
            else:
                pe = tl.load(base + R + e[None, :], mask=km[:, None] & (e < ROPE)[None, :],
                             other=0.0).to(dt)
            s = tl.dot(q_c, tl.trans(c), input_precision=PRECISION)
            if VSPLIT != 1:
                if R == RP:
                    co = tl.load(base + ro[None, :], mask=km[:, None], other=0.0).to(dt)
                else:
                    co = tl.load(base + ro[None, :], mask=km[:, None] & (ro < R)[None, :],
                                 other=0.0).to(dt)
                s = tl.dot(q_o, tl.trans(co), s, input_precision=PRECISION)
            s = tl.dot(q_pe, tl.trans(pe), s, input_precision=PRECISION)
            # Blocks start at multiples of BLOCK_N inside the partition, so a key at or before
            # the query's position is also before the partition's end.
            s = tl.where(kp[None, :] <= qp[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(dt), c, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        # The partial's addresses are worked out again from scalars: kept from the q loads
        # they would live across the loop (and spill).
        left = n_new * NH - tile * BLOCK_M
        slot = ((seq_start * NH + tile * BLOCK_M).to(tl.int64) + tl.arange(0, BLOCK_M)) \
            * num_parts + part
        keep = tl.arange(0, BLOCK_M) < left
        tl.store(o_part_ptr + slot[:, None] * RP + vs * RV + tl.arange(0, RV)[None, :], acc,
                 mask=keep[:, None])
        # With VSPLIT 2 the halves' running max and sum agree up to the order of the score
        # sums (fp32 rounding); the first half's are kept, so the merge reads one pair.
        keep = keep & (vs == 0)
        tl.store(ml_ptr + slot * 2, m_i, mask=keep)
        tl.store(ml_ptr + slot * 2 + 1, l_i, mask=keep)


@triton.jit
def mla_absorbed_out_kernel(o_part_ptr, ml_ptr, wuv_ptr, out_ptr, T, num_parts,
                            NH: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
                            RP: tl.constexpr, VP: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    pdl_wait()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    tm = t < T
    slot0 = (t.to(tl.int64) * NH + h) * num_parts
    m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    for p in range(num_parts):
        m = tl.maximum(m, tl.load(ml_ptr + (slot0 + p) * 2, mask=tm, other=-1.0e30))
    den = tl.zeros((BLOCK_T,), tl.float32)
    for p in range(num_parts):
        mp = tl.load(ml_ptr + (slot0 + p) * 2, mask=tm, other=-1.0e30)
        den += tl.load(ml_ptr + (slot0 + p) * 2 + 1, mask=tm, other=0.0) * tl.exp2(mp - m)
    inv = 1.0 / tl.where(den == 0.0, 1.0, den)
    v = tl.arange(0, VP)
    dt = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, VP), tl.float32)
    for r0 in tl.static_range(0, RP, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        o = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
        for p in range(num_parts):
            wgt = tl.exp2(tl.load(ml_ptr + (slot0 + p) * 2, mask=tm, other=-1.0e30) - m) * inv
            o += tl.load(o_part_ptr + (slot0 + p)[:, None] * RP + r[None, :],
                         mask=tm[:, None], other=0.0) * wgt[:, None]
        wv = tl.load(wuv_ptr + h * (R * V) + r[:, None] * V + v[None, :],
                     mask=(r < R)[:, None] & (v < V)[None, :], other=0.0)
        acc = tl.dot(o.to(dt), wv.to(dt), acc, input_precision=PRECISION)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * (NH * V) + h * V + v[None, :],
             acc.to(dt), mask=tm[:, None] & (v < V)[None, :])


# -- configs, split rule and specs ----------------------------------------------------------------
def _conf(bm: int, bn: int, warps: int, stages: int, vsplit: int = 1, waves: int = 2,
          ws: bool = False, seesaw: bool = False) -> dict:
    conf = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, VSPLIT=vsplit,
                WAVES=waves)
    if seesaw:
        return {**conf, "WS": 1, "SEESAW": 1}
    return {**conf, "WS": 1} if ws else conf


def conf_name(conf: dict) -> str:
    """m{BLOCK_M}n{BLOCK_N}w{warps}s{stages}[v{VSPLIT}][x{WAVES}][ws|ss]: the config's name."""
    name = f"m{conf['BLOCK_M']}n{conf['BLOCK_N']}w{conf['num_warps']}s{conf['num_stages']}"
    if conf.get("VSPLIT", 1) != 1:
        name += f"v{conf['VSPLIT']}"
    if conf.get("WAVES", 2) != 2:
        name += f"x{conf['WAVES']}"
    if conf.get("SEESAW"):
        return name + "ss"
    return name + ("ws" if conf.get("WS") else "")


# Attention-kernel configs by name: BLOCK_M (token, head) rows, BLOCK_N keys per step, warps,
# stages, VSPLIT (1, or 2: two adjacent programs per row tile, each accumulating half of the R
# value columns and computing every score: half the fp32 accumulator for ~1.5x the dot work)
# and WAVES (the split rule fills the SMs WAVES times). All compile offline for sm_90 with R =
# 512 without spills, within shared memory (tests/lowering/triton_gpu/test_mla_aot.py; spilling
# ones left out: m64n32w8s3, m64n64w8s1, m64n64w4s2v2, m16n32w2s3). 64 and 128 rows run on
# wgmma (8 warps: two warpgroups split the fp32 accumulator by columns, or by rows at 128);
# 16 and 32 on mma.sync. A key tile of 64 keys x 576 bf16 is 72 KiB per stage.
CANDIDATES = {conf_name(c): c for c in (
    _conf(16, 32, 4, 3), _conf(16, 32, 4, 3, waves=4), _conf(16, 64, 4, 2),
    _conf(16, 64, 4, 3), _conf(16, 16, 4, 4), _conf(16, 64, 4, 2, waves=4),
    _conf(32, 16, 4, 4),
    _conf(64, 16, 8, 4), _conf(64, 32, 8, 2), _conf(64, 64, 8, 2),
    _conf(64, 32, 4, 2, vsplit=2), _conf(64, 32, 8, 2, vsplit=2), _conf(64, 32, 8, 3, vsplit=2),
    _conf(64, 64, 8, 2, vsplit=2),
    _conf(128, 16, 8, 3, vsplit=2), _conf(128, 32, 8, 2, vsplit=2), _conf(128, 64, 8, 1, vsplit=2),
    # The warp-specialized Gluon kernel (mla_decode_ws.py): 64 rows, two consumer warpgroups
    # of 4 warps and a loader warp; 64-key blocks in 2 stages or 32-key blocks in 3 or 4.
    _conf(64, 64, 4, 2, ws=True), _conf(64, 32, 4, 4, ws=True), _conf(64, 32, 4, 3, ws=True),
    _conf(64, 32, 4, 4, waves=1, ws=True),
    # The same launch with the score work split between the two warpgroups
    # (mla_decode_seesaw.py): blocks in pairs, each warpgroup scoring one of each pair.
    _conf(64, 32, 4, 4, waves=1, seesaw=True), _conf(64, 32, 4, 4, seesaw=True),
)}
# The shipped config per head-count bucket (heads padded to a power of two, at most 128): the
# one line to change after a GPU sweep (tools/gpu_sweeps/mla.py) names a better candidate.
# H200, B64 / B128 x ctx 4096, attention launch: h16 m16n64w4s2 85-92 / 156-170 us = 78-84 /
# 85-92% of copy (was m16n32w4s3, 75 / 80%); h64 and h128 the warp-specialized Gluon kernel
# with 32-key blocks in 4 stages, the context split to fill the SMs once (one program an SM
# fits: its ring takes the shared memory), 2026-12-04: h64 B64 94.5 us = 76% of copy
# (m64n64w8s2 161 us; two waves 105 us), h128 B64 166 us (290; two waves 177), B128 335-369 us
# (554), 396-440 TFLOP/s. 2026-12-05: the seesaw form of the same tiles (mla_decode_seesaw.py,
# the score work split between the warpgroups) at h64 B64 93.6 us = 76% of copy against 97.0,
# h128 B8 / B64 / B128 32.3 / 168.2 / 346.5 us against 33.7 / 167.0 / 358.7 (mla.py, one run).
# A layer the Gluon kernels do not take (fp32, R != 512, small pages) runs their Triton twin
# (ws_fits).
DEFAULTS = {16: "m16n64w4s2", 32: "m32n16w4s4", 64: "m64n32w4s4x1ss", 128: "m64n32w4s4x1ss"}


def head_bucket(nh: int) -> int:
    return min(128, pad(nh))


def candidates(nh: int) -> list[str]:
    """The candidate names that fit `nh` heads, the shipped default first: tiles of the padded
    heads up to 64 rows (one decode token's heads per tile), or taller ones within them."""
    bm = min(64, pad(nh))
    default = DEFAULTS[head_bucket(nh)]
    return [default] + [k for k, c in CANDIDATES.items() if k != default and (
        c["BLOCK_M"] == bm or 64 < c["BLOCK_M"] <= pad(nh))]


def tile_config(nh: int, r: int, config: str | dict | None = None) -> dict:
    """BLOCK_M (token, head) rows, BLOCK_N keys, warps, stages, VSPLIT and WAVES of the
    attention kernel: the shipped default of the head bucket (a decode token's heads in one
    tile up to 64; more heads take several tiles, whose programs are adjacent and share the
    cache rows through L2), or the candidate `config` (a name of CANDIDATES or a dict)."""
    if config is None:
        config = DEFAULTS[head_bucket(nh)]
    conf = dict(CANDIDATES[config]) if isinstance(config, str) else dict(config)
    conf.setdefault("VSPLIT", 1)
    conf.setdefault("WAVES", 2)
    if conf.get("WS") and (conf["BLOCK_M"] != 64 or conf["VSPLIT"] != 1):
        raise ValueError(f"mla decode config {conf_name(conf)}: the warp-specialized kernel "
                         f"takes 64 rows and VSPLIT 1")
    if conf["VSPLIT"] not in (1, 2) or pad(r) // conf["VSPLIT"] < 16:
        raise ValueError(f"mla decode config {conf_name(conf)}: VSPLIT must be 1 or 2 and "
                         f"leave at least 16 value columns (R = {r})")
    return conf


# The tile a float32 layer (q or cache) takes in place of a 64-row default once R > 128: the
# 64-row tiles' float32 operands need 270-705 KB of shared memory at R 256-512 (sm_90 has 227).
WIDE_FP32 = "m16n32w4s3"


def layer_config(nh: int, r: int, dtype: str, cache_dtype: str, rope: int, page_size: int,
                 config: str | dict | None = None) -> dict:
    """The attention kernel's config for a layer: tile_config's, with a WS config the Gluon
    kernel does not take replaced by its Triton twin, and (shipped defaults only) a 64-row tile
    of float32 operands over R > 128 by WIDE_FP32, which fits sm_90's shared memory. The plan,
    the launch helpers and specs() all resolve the config here, so their splits agree."""
    conf = tile_config(nh, r, config)
    if conf.get("WS") and not ws_fits(dtype, cache_dtype, r, rope, page_size, conf):
        conf = twin_config(conf)
    if (config is None and conf["BLOCK_M"] >= 64 and pad(r) > 128
            and "float32" in (dtype, cache_dtype)):
        conf = tile_config(nh, r, WIDE_FP32)
    return conf


def ws_fits(dtype: str, cache_dtype: str, r: int, rope: int, page_size: int, conf: dict) -> bool:
    """Whether the warp-specialized kernel takes this layer: 16-bit q and cache of one dtype
    (the tensor cores' operands), R = 512 (four 64-column value tiles a warpgroup), 64-column
    key tiles, pages of whole key blocks."""
    return (dtype == cache_dtype and dtype in ("bfloat16", "float16") and r == 512
            and (r + rope) % 64 == 0 and page_size % conf["BLOCK_N"] == 0)


def twin_config(conf: dict) -> dict:
    """The Triton kernel's config at a WS config's tiles (what Triton's interpreter runs in the
    Gluon kernel's place, and what a layer the Gluon kernel does not take runs)."""
    return {**{k: v for k, v in conf.items() if k not in ("WS", "SEESAW")}, "num_warps": 8,
            "num_stages": 2}


def _ws_spec(twin: KernelSpec, conf: dict) -> KernelSpec:
    """The Gluon kernel's spec for WS config `conf`: the arguments and grid of `twin` (the
    Triton spec at twin_config(conf), which it carries for the interpreter), its own stages and
    registers."""
    if conf.get("SEESAW"):
        from graphir.lowering.triton_gpu.kernels import mla_decode_seesaw as ws
        fn = ws.mla_absorbed_seesaw_kernel
    else:
        from graphir.lowering.triton_gpu.kernels import mla_decode_ws as ws
        fn = ws.mla_absorbed_ws_kernel

    cx = {**twin.constexprs, "STAGES": conf["num_stages"], "CONSUMER_REGS": ws.CONSUMER_REGS}
    sig = {**twin.signature, **{k: "constexpr" for k in ("STAGES", "CONSUMER_REGS")}}
    tc = twin.signature["blocks_ptr"][1:]
    return KernelSpec(name=f"mla_absorbed_{tc}_{conf_name(conf)}", fn=fn,
                      signature=sig, constexprs=cx, num_warps=4, num_stages=1, grid=twin.grid,
                      grid_args=twin.grid_args, divisible_by_16=twin.divisible_by_16,
                      notes="makes a TMA descriptor in global scratch; launches 9 warps (two "
                            "consumer warpgroups and a loader warp)",
                      extra={"config": conf, "twin": twin})


def split_lets(batch: str, tiles: str, kv_len: str, conf: dict, prefix: str = "mla_"):
    """[(name, expr)]: num_parts / part_size of the context for `batch` sequences of `tiles`
    row tiles each (VSPLIT programs per tile): enough partitions to fill the SMs WAVES times,
    at least MIN_PART keys each."""
    bn, vs, waves = conf["BLOCK_N"], conf.get("VSPLIT", 1), conf.get("WAVES", 2)
    want = f"max(1, min({waves * SM_COUNT} // max(1, ({batch}) * ({tiles}) * {vs}), " \
           f"cdiv({kv_len}, {MIN_PART})))"
    return [(f"{prefix}want", want),
            (f"{prefix}part_size", f"cdiv(cdiv({kv_len}, {prefix}want), {bn}) * {bn}"),
            (f"{prefix}num_parts", f"cdiv({kv_len}, {prefix}part_size)")]


def split(batch: int, tiles: int, kv_len: int, conf: dict) -> tuple[int, int]:
    """(num_parts, part_size): split_lets evaluated in Python."""
    bn, vs, waves = conf["BLOCK_N"], conf.get("VSPLIT", 1), conf.get("WAVES", 2)
    want = max(1, min(waves * SM_COUNT // max(1, batch * tiles * vs), cdiv(kv_len, MIN_PART)))
    size = cdiv(cdiv(kv_len, want), bn) * bn
    return cdiv(kv_len, size), size


def specs(dtype: str, cache_dtype: str, nh: int, nope: int, rope: int, v: int, r: int,
          kinds: int, page_size: int, conf: str | dict | None = None,
          aux_block_t: int = AUX_BLOCK_T, merge: str | None = None) -> list[KernelSpec]:
    """[q absorb, attention, *merge] for q/weights of `dtype` over a `cache_dtype` cache;
    `conf` picks the attention kernel's config (resolved by layer_config: the shipped default
    when None), `aux_block_t` the tokens a program of the absorption and of the w_uv product
    (16, 32 or 64), `merge` how the partials meet w_uv: "fused" (one launch,
    mla_absorbed_out_kernel) or "split" (mla_merge's combine, then the w_uv product); None:
    MERGE."""
    merge = MERGE if merge is None else merge
    if aux_block_t not in (16, 32, 64):
        raise ValueError(f"mla decode: aux_block_t must be 16, 32 or 64, got {aux_block_t}")
    if merge not in MERGES:
        raise ValueError(f"mla decode: merge must be one of {MERGES}, got {merge!r}")
    bt = aux_block_t
    t, tc = triton_dtype(dtype), triton_dtype(cache_dtype)
    conf = layer_config(nh, r, dtype, cache_dtype, rope, page_size, conf)
    prec = "tf32x3" if dtype == "float32" else "tf32"
    rp, ep, nopep, vp = pad(r), pad(rope), pad(nope), pad(v)
    br = min(rp, 128)
    qc = dict(NH=nh, NOPE=nope, ROPE=rope, R=r, NOPEP=nopep, EP=ep, BLOCK_T=bt, BLOCK_R=br,
              PRECISION=prec)
    qsig = {"q_ptr": f"*{t}", "wuk_ptr": f"*{t}", "qlat_ptr": f"*{t}", "T": "i32",
            **{k: "constexpr" for k in qc}}
    sfx = "" if bt == 16 else f"_t{bt}"
    absorb = KernelSpec(name=f"mla_q_absorb_{t}{sfx}", fn=mla_q_absorb_kernel, signature=qsig,
                        constexprs=qc, num_warps=4, num_stages=1,
                        grid=lambda T: (cdiv(T, bt), nh, cdiv(r, br)), grid_args=("T",),
                        divisible_by_16=("q_ptr", "wuk_ptr", "qlat_ptr"))
    ac = dict(NH=nh, R=r, ROPE=rope, RP=rp, EP=ep, KINDS=kinds, PAGE_SIZE=page_size,
              BLOCK_M=conf["BLOCK_M"], BLOCK_N=conf["BLOCK_N"], VSPLIT=conf["VSPLIT"],
              PRECISION=prec)
    asig = {"qlat_ptr": f"*{t}", "offs_ptr": "*i32", "clen_ptr": "*i32", "lut_ptr": "*i32",
            "blocks_ptr": f"*{tc}", "o_part_ptr": "*fp32", "ml_ptr": "*fp32", "max_pages": "i32",
            "layer_idx": "i32", "num_layers": "i32", "num_pages": "i32", "scale": "fp32",
            "part_size": "i32", "num_parts": "i32", **{k: "constexpr" for k in ac}}
    bm, vs = conf["BLOCK_M"], conf["VSPLIT"]
    tconf = twin_config(conf) if conf.get("WS") else conf   # the Triton kernel's warps, stages
    attn = KernelSpec(name=f"mla_absorbed_{tc}_{conf_name(tconf)}", fn=mla_absorbed_kernel,
                      signature=asig, constexprs=ac, num_warps=tconf["num_warps"],
                      num_stages=tconf["num_stages"],
                      grid=lambda batch, seqmax, num_parts: (cdiv(seqmax * nh, bm) * vs,
                                                             num_parts, batch),
                      grid_args=("batch", "seqmax", "num_parts"),
                      divisible_by_16=("qlat_ptr", "blocks_ptr", "o_part_ptr", "ml_ptr"))
    if conf.get("WS"):
        attn = _ws_spec(attn, conf)
    if merge == "split":
        return [absorb, attn] + mla_merge.specs(t, nh, r, v, rp, vp, bt, prec, sfx)
    oc = dict(NH=nh, R=r, V=v, RP=rp, VP=vp, BLOCK_T=bt, BLOCK_R=min(rp, 64),
              PRECISION=prec)
    osig = {"o_part_ptr": "*fp32", "ml_ptr": "*fp32", "wuv_ptr": f"*{t}", "out_ptr": f"*{t}",
            "T": "i32", "num_parts": "i32", **{k: "constexpr" for k in oc}}
    out = KernelSpec(name=f"mla_absorbed_out_{t}{sfx}", fn=mla_absorbed_out_kernel,
                     signature=osig, constexprs=oc, num_warps=4, num_stages=1,
                     grid=lambda T: (cdiv(T, bt), nh, 1), grid_args=("T",),
                     divisible_by_16=("o_part_ptr", "ml_ptr", "wuv_ptr", "out_ptr"))
    return [absorb, attn, out]
