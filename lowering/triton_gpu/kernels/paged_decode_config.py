"""Configs of the paged decode kernel (paged_decode.py) and its split rule, as data.

A config is a dict: the tile and load-path constexprs (BLOCK_N keys per block, HEADS KV heads
per program, PAGED_TILES, TMA, ORDER; MERGE: a split launch merges its own partitions, its last
program per group, instead of a reduce kernel after it), the launch shape (num_warps, num_stages) and the two
numbers the split rule uses (ctas_per_sm: the CTAs of this config one SM is assumed to hold;
min_part: the fewest keys worth a partition). `CANDIDATES` lists the configs the compile-time
tuner times (paged_decode_tuning.py); `default_config` picks one when nothing was tuned.

The split rule picks num_parts for `units` = batch x (NKV / HEADS) programs over
slots = NUM_SMS * ctas_per_sm:
  * small grids (2 * units <= slots): as many partitions as fill the slots once, each of at
    least min_part keys;
  * more than half a wave and at most one: no split. (The first H200 sweep: one wave of 256
    programs beat the 768 of three partitions, 1.9 waves, by 7%.)
  * between one and two waves, among 1..8 partitions, the fewest whose wave efficiency
    (grid / slots rounded up to whole waves) is within 10% of the best, so the last wave is
    not a thin tail;
  * two waves of units or more: no split (the tail is at most a third of the run, and
    splitting would add the reduce).
It is written twice: `split` in Python and `split_lets` as launch-rule expressions for the plan
(the test suite checks they agree). Its runtime inputs are the batch and the bucketed context
length, so decode steps within one bucket launch the same grid and replay one CUDA graph.
"""

from __future__ import annotations

import re

from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, cdiv, next_pow2

MAX_SCAN = 8           # partitions the wave-efficiency scan considers for large grids
NEAR_BEST = 90         # percent of the best wave efficiency that is good enough
MAX_BLOCK_M = 64       # rows of the query tile (HEADS * q_per_seq * GQA group) the kernel takes
Q_PER_SEQ_MAX = 8      # more new tokens per sequence than this go to the prefill kernel
SMEM_BUDGET = 200 * 1024  # K/V buffers a config may ask for (sm_90: 227 KiB per CTA)
# MERGE=1 configs: partial accumulator values the merging program has in flight (rows x head
# dim x unrolled partitions, fp32): 32 registers a thread at 4 warps, 8 partitions of a 4-row
# group at once.
MERGE_ELEMS = 4096
MERGE_CHUNK_ROWS = 16  # rows merged at once (taller speculative tiles take several rounds)
# Partitions unrolled at most: a small head dim would otherwise ask for 128 (D = 16, two rows),
# and compiling that unrolled online-softmax chain took 166 s (8: 1.4 s).
MERGE_UNROLL_MAX = 8

_KEYS = ("BLOCK_N", "HEADS", "PAGED_TILES", "TMA", "ORDER", "MERGE", "num_warps", "num_stages",
         "ctas_per_sm", "min_part")
# The keys that change the compiled kernel (the others are launch-rule numbers).
KERNEL_KEYS = ("BLOCK_N", "HEADS", "PAGED_TILES", "TMA", "ORDER", "MERGE", "num_warps",
               "num_stages")
# Keys older tables and callers may leave out, and their values then.
_OPTIONAL = {"HEADS": 1, "MERGE": 0}


def make_config(bn: int, tiles: int, tma: int, warps: int, stages: int, ctas: int,
                min_part: int = 256, order: int = 0, heads: int = 1, merge: int = 0) -> dict:
    """A config dict from positional values (BLOCK_N, PAGED_TILES, TMA, num_warps, num_stages,
    ctas_per_sm), as the tables here write them; `name` identifies it in tuning tables."""
    conf = {"BLOCK_N": bn, "HEADS": heads, "PAGED_TILES": tiles, "TMA": tma, "ORDER": order,
            "MERGE": merge, "num_warps": warps, "num_stages": stages, "ctas_per_sm": ctas,
            "min_part": min_part}
    return dict(conf, name=config_name(conf))


def config_name(conf: dict) -> str:
    """A short unique name: 'n16tileh4_w4s5c3' (load path gather / tile / tma; h<HEADS>, o1,
    p<min_part> and m (MERGE: the kernel merges its partitions) only when they differ from the
    usual 1, 0, 256 and 0). `parse_name` inverts it."""
    path = "tma" if conf["TMA"] else ("tile" if conf["PAGED_TILES"] else "gather")
    heads = f"h{conf['HEADS']}" if conf.get("HEADS", 1) != 1 else ""
    extra = (f"_o{conf['ORDER']}" if conf["ORDER"] else "") + (
        f"_p{conf['min_part']}" if conf["min_part"] != 256 else "") + (
        "_m" if conf.get("MERGE") else "")
    return (f"n{conf['BLOCK_N']}{path}{heads}_w{conf['num_warps']}s{conf['num_stages']}"
            f"c{conf['ctas_per_sm']}{extra}")


_NAME = re.compile(r"n(\d+)(gather|tile|tma)(?:h(\d+))?_w(\d+)s(\d+)c(\d+)(?:_o(\d+))?"
                   r"(?:_p(\d+))?(_m)?")


def parse_name(name: str) -> dict:
    """The config a name describes (validated); ValueError for anything else."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown decode config {name!r}; names look like 'n64tile_w4s5c3'")
    bn, path, heads, w, s, c, order, mp, merge = m.groups()
    conf = make_config(int(bn), int(path != "gather"), int(path == "tma"), int(w), int(s),
                       int(c), int(mp or 256), int(order or 0), int(heads or 1), int(bool(merge)))
    validate(conf)
    if conf["name"] != name:
        raise ValueError(f"decode config name {name!r} is not canonical ({conf['name']!r})")
    return conf


def get(config) -> dict:
    """A config from its name or dict, validated (the tuner's lookup)."""
    if isinstance(config, str):
        return parse_name(config)
    if not isinstance(config, dict):
        raise ValueError(f"a decode config is a name or a dict, got {config!r}")
    conf = validate(dict(_OPTIONAL, **config))
    return dict(conf, name=config_name(conf))


def kernel_key(conf: dict) -> tuple:
    """What identifies the compiled kernel of a config (configs equal here share a cubin)."""
    return tuple(int(conf.get(k, _OPTIONAL.get(k, 0))) for k in KERNEL_KEYS)


# The space the tuner times. For head_dim 128 in bf16 and a 16-row query tile each holds
# ctas_per_sm CTAs per SM (tests/lowering/triton_gpu/test_paged_decode_aot.py checks the
# compiled registers and shared memory). The pipeliner gives the K and V tiles (num_stages - 1)
# // 2 buffers each: the page lookup that addresses a tile takes the other stages (with a
# 64-row query tile the dots become wgmma and the pipeliner double-buffers from 3 stages on).
# HEADS > 1 reads that many neighbouring KV heads of each key row in one tile (HEADS * 256
# contiguous bytes per row instead of 256) and cuts the programs by HEADS: big batches then fit
# one wave without splitting. The K tile stays BLOCK_N * HEADS rows, as large as the HEADS = 1
# config beside it, so registers and shared memory match.
CANDIDATES: list[dict] = [
    make_config(64, 1, 0, 4, 3, 3),             # 1 buffer (best of run 1 at 4 of 9 shapes)
    make_config(64, 1, 0, 4, 5, 3),             # 2 buffers (the default, best at 1 shape)
    make_config(64, 1, 0, 4, 7, 2),             # 3 buffers
    make_config(32, 1, 0, 4, 8, 4),             # 3 buffers of 32-key tiles
    make_config(32, 1, 1, 4, 6, 4),             # TMA, 2 buffers (best of run 1 at 2 shapes)
    make_config(64, 1, 0, 4, 3, 4),             # the first, split for the 4 CTAs/SM it holds
    make_config(32, 1, 0, 4, 3, 4, heads=2),    # 2 heads x 32 keys, 1 buffer
    make_config(32, 1, 0, 4, 5, 3, heads=2),    # 2 heads x 32 keys, 2 buffers
    make_config(16, 1, 0, 4, 8, 4, heads=2),    # 2 heads x 16 keys, 3 buffers
    make_config(16, 1, 0, 4, 3, 4, heads=4),    # 4 heads x 16 keys: page tiles at pages of 16
    make_config(16, 1, 0, 4, 5, 3, heads=4),
    make_config(8, 1, 0, 4, 5, 2, heads=8),     # 8 heads x 8 keys (a 32-row query tile at G=4)
    make_config(64, 0, 0, 4, 5, 3),             # gather, 2 buffers (the default for pages of 16)
    # The default split into partitions of 128 keys, twice as many: at B1 x 1024 (8 programs)
    # 8 partitions reached 0.99x SDPA against 0.81x for the rule's 4 (PDL on, 2026-12-04), but
    # 32 lost at B1 x 4096 (0.91x): a candidate the tuner picks per bucket, not a rule change.
    make_config(64, 1, 0, 4, 5, 3, min_part=128),
    # The same kernels split as if an SM held one CTA: partitions only until the grid covers
    # the SMs once. Where batch x KV heads / HEADS is already ~NUM_SMS the rule's split to three
    # CTAs an SM lost to no split (H100, 2026-12-05: B16 x 16384 0.977x SDPA at 3 partitions,
    # 1.003x at 1; 2 heads at B32 x 2048 0.917x against 1.006x): the partials and the reduce
    # launch cost more than the extra CTAs hide.
    make_config(64, 1, 0, 4, 5, 1),
    make_config(32, 1, 0, 4, 5, 1, heads=2),
    make_config(16, 1, 0, 4, 5, 1, heads=4),
    # Split launches that merge their own partitions (no reduce kernel). H100, 2026-12-06: at
    # B8 x 1024 two merged partitions ran 16.8 us against 18.5 with the reduce (1.09x SDPA);
    # at B1 the merge's serial tail (ticket, then the partials from L2) lost to the reduce,
    # which PDL launches early (B1 x 4096, 16 partitions: 14.2 against 11.8 us).
    make_config(64, 1, 0, 4, 5, 1, merge=1),
    make_config(64, 1, 0, 4, 5, 3, merge=1),
    make_config(32, 1, 0, 4, 5, 3, heads=2, merge=1),
    # Merged with partitions of 128 keys: at one sequence more, shorter partitions hide the
    # latency of each program's first pages (H100, 2026-12-06: B1 x 1024 at 8 partitions
    # 1.021x SDPA, 0.83x at the rule's 4, 0.994x at 8 with the reduce). c1 stops at one wave
    # (16 partitions at B1 x 4096: 1.16-1.20x), c3 goes on to 32 (0.96x there).
    make_config(64, 1, 0, 4, 5, 1, min_part=128, merge=1),
    make_config(64, 1, 0, 4, 5, 3, min_part=128, merge=1),
]


def validate(conf: dict) -> dict:
    """A complete config or a ValueError naming what is wrong."""
    missing = [k for k in _KEYS if k not in conf]
    if missing:
        raise ValueError(f"paged_decode config {conf} lacks {missing}")
    bn, heads = conf["BLOCK_N"], conf["HEADS"]
    if bn < 1 or bn & (bn - 1) or heads < 1 or heads & (heads - 1) or bn * heads < 16:
        raise ValueError(f"paged_decode config: BLOCK_N and HEADS must be powers of two with "
                         f"BLOCK_N * HEADS >= 16, got BLOCK_N={bn}, HEADS={heads}")
    if conf["TMA"] and not conf["PAGED_TILES"]:
        raise ValueError("paged_decode config: TMA=1 needs PAGED_TILES=1")
    if conf["TMA"] and heads != 1:
        raise ValueError("paged_decode config: TMA=1 needs HEADS=1")
    if conf["ORDER"] not in (0, 1):
        raise ValueError(f"paged_decode config: ORDER must be 0 or 1, got {conf['ORDER']}")
    if conf["MERGE"] not in (0, 1):
        raise ValueError(f"paged_decode config: MERGE must be 0 or 1, got {conf['MERGE']}")
    if conf["num_warps"] not in (1, 2, 4, 8, 16) or conf["num_stages"] < 1:
        raise ValueError(f"paged_decode config: bad num_warps/num_stages in {conf}")
    if conf["ctas_per_sm"] < 1 or conf["min_part"] < 1:
        raise ValueError(f"paged_decode config: ctas_per_sm and min_part must be >= 1: {conf}")
    return conf


def occupancy(shared: int, n_regs: int, num_warps: int) -> int:
    """CTAs of a kernel one sm_90 SM holds: 64 warps, 64K registers (whole warps, 8 per thread
    at a time), 228 KiB of shared memory with 1 KiB reserved per CTA."""
    by_warps = 64 // num_warps
    by_regs = 65536 // (cdiv(max(n_regs, 1), 8) * 8 * 32 * num_warps)
    by_smem = (228 * 1024) // (shared + 1024)
    return max(0, min(by_warps, by_regs, by_smem, 32))


def block_m(n_heads: int, n_kv_heads: int, q_per_seq: int, heads: int = 1) -> int:
    """Rows of the query tile: heads x q_per_seq tokens x the GQA group (tl.dot needs >= 16)."""
    return next_pow2(max(16, heads * q_per_seq * (n_heads // n_kv_heads)))


def q_buckets(n_heads: int, n_kv_heads: int) -> list[int]:
    """The q_per_seq values of the one-head (HEADS = 1) query tiles: the most new tokens each
    tile height (16, 32, 64 rows) holds, up to Q_PER_SEQ_MAX; [1] when even one token needs
    more than 64 rows."""
    g = n_heads // n_kv_heads
    out = []
    for bm in (16, 32, MAX_BLOCK_M):
        q = min(Q_PER_SEQ_MAX, bm // g)
        if q >= 1 and (not out or q > out[-1]):
            out.append(q)
    return out or [1]


def q_tiles(n_heads: int, n_kv_heads: int) -> list[int]:
    """The q_per_seq values the plan builds decode kernels for: 1 (plain decode, where HEADS > 1
    configs fit a 16-row tile) and the q_buckets (speculative / few-token decode)."""
    return sorted({1, *q_buckets(n_heads, n_kv_heads)})


def unfit_reason(conf: dict, n_heads: int, n_kv_heads: int, head_dim: int, q_per_seq: int,
                 elem_bytes: int = 2) -> str | None:
    """Why `conf` cannot build for this shape (None when it can)."""
    heads = conf.get("HEADS", 1)
    if n_kv_heads % heads:
        return f"HEADS={heads} does not divide {n_kv_heads} KV heads"
    bm = block_m(n_heads, n_kv_heads, q_per_seq, heads)
    if bm > MAX_BLOCK_M and heads > 1:
        return f"a {bm}-row query tile (over {MAX_BLOCK_M})"
    if bm >= 64 and conf["num_warps"] < 8:
        return f"a {bm}-row query tile needs 8 warps"
    bufs = max(1, (conf["num_stages"] - 1) // 2 + (bm >= 64))
    smem = 2 * bufs * conf["BLOCK_N"] * heads * head_dim * elem_bytes
    if smem > SMEM_BUDGET:
        return f"{smem} bytes of K/V buffers"
    return None


def resolve(config: dict | None, n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
            q_per_seq: int) -> dict:
    """The config to build: `config` (or the default), on the gather path when the page is not
    a whole number of key blocks; ValueError when it cannot build for this shape."""
    conf = dict(get(config) if config is not None
                else default_config(n_heads, n_kv_heads, head_dim, page_size, q_per_seq))
    if page_size % conf["BLOCK_N"]:
        conf["PAGED_TILES"] = conf["TMA"] = 0
    if conf["HEADS"] > 1 and n_kv_heads % conf["HEADS"]:
        raise ValueError(f"paged_decode config {conf['name']}: HEADS={conf['HEADS']} does not "
                         f"divide n_kv_heads={n_kv_heads}")
    if block_m(n_heads, n_kv_heads, q_per_seq, conf["HEADS"]) > max(
            MAX_BLOCK_M, block_m(n_heads, n_kv_heads, q_per_seq)):
        raise ValueError(f"paged_decode config {conf['name']}: HEADS={conf['HEADS']} needs a "
                         f"query tile over {MAX_BLOCK_M} rows for q_per_seq={q_per_seq}")
    conf["name"] = config_name(conf)
    return conf


def default_config(n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
                   q_per_seq: int = 1) -> dict:
    """The untuned choice for a shape: page tiles two buffers deep when a page holds whole 64-
    or 32-key blocks, the gather path otherwise; 8 warps (wgmma, two buffers from 3 stages) for
    a 64-row query tile."""
    bm = block_m(n_heads, n_kv_heads, q_per_seq)
    if bm > 32:
        return make_config(64 if page_size % 64 == 0 else 32, int(page_size % 32 == 0), 0, 8, 3, 2)
    if page_size % 64 == 0:
        return make_config(64, 1, 0, 4, 5, 3 if bm == 16 else 2)
    if page_size % 32 == 0:
        return make_config(32, 1, 0, 4, 6, 5 if bm == 16 else 3)
    return make_config(64, 0, 0, 4, 5, 3 if bm == 16 else 2)


def constexprs(conf: dict, n_heads: int, n_kv_heads: int, head_dim: int, page_size: int,
               mask: int, q_per_seq: int) -> dict:
    """The decode kernel's constexpr values for a resolved config."""
    rows = next_pow2(conf["HEADS"] * q_per_seq * (n_heads // n_kv_heads))
    chunk = min(rows, MERGE_CHUNK_ROWS)
    return {"NH": n_heads, "NKV": n_kv_heads, "D": head_dim, "PAGE_SIZE": page_size,
            "MASK": mask, "Q_PER_SEQ": q_per_seq,
            "BLOCK_M": block_m(n_heads, n_kv_heads, q_per_seq, conf["HEADS"]),
            "BLOCK_N": conf["BLOCK_N"], "HEADS": conf["HEADS"],
            "PAGED_TILES": conf["PAGED_TILES"], "TMA": conf["TMA"], "ORDER": conf["ORDER"],
            "MERGE": conf["MERGE"], "MERGE_ROWS": rows, "MERGE_CHUNK": chunk,
            "MERGE_UNROLL": max(1, min(MERGE_UNROLL_MAX,
                                       MERGE_ELEMS // (chunk * next_pow2(head_dim))))}


def public(conf: dict) -> dict:
    """The config as plain JSON data (for manifests and sweep reports)."""
    return dict({k: int(conf[k]) for k in _KEYS}, name=config_name(conf))


def split(batch: int, n_kv_heads: int, max_kv_len: int, conf: dict) -> tuple[int, int]:
    """(num_parts, part_size) of the split rule; part_size is a multiple of BLOCK_N."""
    kv = max(max_kv_len, 1)
    units = max(batch * (n_kv_heads // conf["HEADS"]), 1)
    cap = NUM_SMS * conf["ctas_per_sm"]
    maxn = max(1, cdiv(kv, conf["min_part"]))
    if 2 * units <= cap:
        want = min(maxn, cap // units)
    elif units <= cap or units >= 2 * cap:
        want = 1
    else:
        eff = [(n <= maxn) * (units * n * 1000 // (cdiv(units * n, cap) * cap))
               for n in range(1, MAX_SCAN + 1)]
        want = min(n for n, x in enumerate(eff, 1) if x * 100 >= max(eff) * NEAR_BEST)
    bn = conf["BLOCK_N"]
    part = cdiv(cdiv(kv, want), bn) * bn
    return cdiv(kv, part), part


def split_key(conf: dict) -> tuple:
    """What `split` reads of a config (configs equal here share the plan's split lets)."""
    return conf["BLOCK_N"], conf["HEADS"], conf["ctas_per_sm"], conf["min_part"]


def split_lets(batch: str, n_kv_heads: int, kv_len: str, conf: dict,
               prefix: str = "pd_") -> list[tuple[str, str]]:
    """`split` as plan lets over the expressions `batch` and `kv_len`; the last two are
    (prefix + 'part_size', ...) and (prefix + 'num_parts', ...)."""
    p = prefix
    cap = NUM_SMS * conf["ctas_per_sm"]
    bn = conf["BLOCK_N"]
    lets = [(f"{p}kv", f"max({kv_len}, 1)"),
            (f"{p}units", f"max(({batch}) * {n_kv_heads // conf['HEADS']}, 1)"),
            (f"{p}maxn", f"max(1, cdiv({p}kv, {conf['min_part']}))")]
    for n in range(1, MAX_SCAN + 1):
        lets.append((f"{p}eff{n}", f"({n} <= {p}maxn) * ({p}units * {n} * 1000 // "
                                   f"(cdiv({p}units * {n}, {cap}) * {cap}))"))
    effs = ", ".join(f"{p}eff{n}" for n in range(1, MAX_SCAN + 1))
    lets.append((f"{p}best", f"max({effs})"))
    near = ", ".join(f"({p}eff{n} * 100 >= {p}best * {NEAR_BEST}) * {MAX_SCAN + 1 - n}"
                     for n in range(1, MAX_SCAN + 1))
    lets += [(f"{p}big", f"{MAX_SCAN + 1} - max({near})"),
             (f"{p}small", f"min({p}maxn, {cap} // {p}units)"),
             (f"{p}want", f"(2 * {p}units <= {cap}) * {p}small + ({p}units > {cap}) * "
                          f"({p}units < {2 * cap}) * {p}big + (2 * {p}units > {cap}) * "
                          f"(({p}units <= {cap}) + ({p}units >= {2 * cap}))"),
             (f"{p}part_size", f"cdiv(cdiv({p}kv, {p}want), {bn}) * {bn}"),
             (f"{p}num_parts", f"cdiv({p}kv, {p}part_size)")]
    return lets
