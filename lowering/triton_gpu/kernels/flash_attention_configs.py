"""Tile and pipeline configurations of the prefill attention kernel, as data.

A config is a dict of the kernel's tuning constexprs (BLOCK_M, BLOCK_N, USE_TMA) plus
num_warps, num_stages and optionally maxnreg (a register cap per thread); its name is its
`config_tag` (m128n64w8s3tmar128, ...). `CANDIDATES[head_dim]` lists the ones worth timing on
the GPU (the compile-time tuner, flash_attention_tuning.py, picks among them per shape bucket);
`default_config` is the built-in choice. Shared memory on sm_90 (227 KiB per block) bounds the
tiles: Q [BLOCK_M, D] stays resident and each pipeline stage holds one K and one V tile
[BLOCK_N, D].

`WS_CANDIDATES` are configs of the warp-specialized Gluon kernel (flash_attention_wgmma.py),
offered first where it can serve a call; the shipped table (tools/gpu_sweeps/attention.py run
10, an H100, 2026-12-05) picks its persistent forms with the tiles handed out from a counter
(`..dyn`), at head dim 128 causal also with the query rows brought by the loader warp
(`..dynqtma`), and at head dim 64 without a mask with the consumers' deeper pipeline too
(`..deepdynqtma`, flash_attention_deep.py): 0.91-1.08x SDPA at the sweep's shapes (the window
0.76-0.79x of SDPA's causal rate). `default_config` (no table entry) is still the Triton
kernel's.

Why these defaults (bf16/fp16, H100/H200 class). Measured on an H200 (tools/gpu_sweeps/
attention.py, run 4, 2026-12-02; TFLOP/s of unmasked work, torch SDPA in brackets):
m128n64w8s3tmar128 was the fastest config at every shape, m128n128w8s2tma next:

    head dim 128  B4x4096 causal 445 [534], no mask 497 [603], B1x16384 causal 490 [579],
                  B4x2048 causal 355 [521], B1x1024 causal 200 [270],
                  sliding window 1024: 335 [SDPA causal 532]
    head dim 64   B4x4096 causal 330 [423]

The cap of 128 registers lets two 8-warp CTAs share an SM, so one CTA's softmax overlaps the
other's wgmma; uncapped (about 170 registers at head dim 128, one CTA per SM) the same tiles
ran 0.80-0.86x as fast (run 3). At head dim 128 the cap leaves a few loop-invariant scalars
on the stack (16 bytes, none touched in the mask-free loop; the binary measured in run 4 kept
68); head dim 64 fits in 124-128 registers. Registers (cuobjdump, sm_90): head dim 128
m128n128w8s2tma 255, m64n64w4s3tma 195; head dim 64 m128n64w4s3tma 241, m64n128w4s2tma 249.
TMA loads K/V with one thread and no address registers; its descriptor lives in Triton's global
scratch, which the CUDA runtime allocates when it packs a launch, before any graph capture
(runtime/cuda/kernel.py). Pages that do not hold whole key blocks fall back to a per-row gather
(still capped: 128 registers, no spills).
Head dim 256 and fp32 inputs (tf32 wgmma, twice the registers and shared memory per element)
use smaller tiles; those are not measured yet. At head dim 256 four warps spill (the fp32
accumulator alone is 128 registers a thread), so its configs use eight.
"""

from __future__ import annotations

import re

from graphir.lowering.triton_gpu.kernels.paged import mask_id


def _cfg(bm: int, bn: int, warps: int, stages: int, tma: bool, maxnreg: int | None = None
         ) -> dict:
    c = {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": int(tma), "num_warps": warps,
         "num_stages": stages}
    return c if maxnreg is None else {**c, "maxnreg": maxnreg}


def _ws(bn: int, stages: int, lpt: bool = False, persistent: bool = False,
        deep: bool = False, dyn: bool = False, qtma: bool = False, chain: bool = False) -> dict:
    """A config of the warp-specialized Gluon kernel (flash_attention_wgmma.py): 128 query rows
    as two consumer warpgroups plus a TMA loader warp (num_warps counts the first warpgroup,
    the launch has 12 warps), `stages` K/V slots in shared memory. TMA only. `lpt` takes the
    programs longest first (paged.tile_order); `persistent` is the form with one program per
    SM walking the tiles longest first (flash_attention_persistent.py), `deep` its consumers'
    deeper pipeline (flash_attention_deep.py), `dyn` its tiles handed out at run time and
    `qtma` its query rows loaded by the loader warp (flash_attention_persistent.py), `chain`
    its consumers' key blocks pipelined across tiles (flash_attention_chain.py)."""
    c = {"BLOCK_M": 128, "BLOCK_N": bn, "USE_TMA": 1, "num_warps": 4, "num_stages": stages,
         "WS": 1}
    if persistent:
        return {**c, "PERSISTENT": 1, **({"DEEP": 1} if deep else {}),
                **({"DYN": 1} if dyn else {}), **({"QTMA": 1} if qtma else {}),
                **({"CHAIN": 1} if chain else {})}
    return {**c, "LPT": 1} if lpt else c


def is_ws(cfg: dict) -> bool:
    """Whether `cfg` names the warp-specialized Gluon kernel."""
    return bool(cfg.get("WS"))


# Ordered best first (measured at head dims 64 and 128); every entry compiles for sm_90 within
# shared memory, uncapped entries do not spill and capped ones keep at most a few scalars on the
# stack, never in the mask-free loop (CI checks, tests/lowering/triton_gpu/
# test_flash_attention_aot.py, along with the wgmma register hazard that the kernel's docstring
# describes).
CANDIDATES: dict[int, list[dict]] = {
    64: [_cfg(128, 64, 8, 3, True, 128), _cfg(128, 64, 8, 3, False, 128),
         _cfg(128, 64, 4, 3, True), _cfg(64, 128, 4, 2, True), _cfg(128, 128, 8, 2, True)],
    128: [_cfg(128, 64, 8, 3, True, 128), _cfg(128, 128, 8, 2, True),
          _cfg(128, 64, 8, 3, False, 128), _cfg(64, 64, 4, 3, True), _cfg(128, 128, 8, 2, False),
          _cfg(64, 64, 4, 3, False)],
    256: [_cfg(64, 32, 8, 2, False), _cfg(64, 32, 8, 2, True), _cfg(64, 64, 8, 2, False)],
}
# fp32 inputs (tf32 wgmma) take twice the registers and shared memory per element.
FP32_CANDIDATES = [_cfg(64, 32, 4, 2, False), _cfg(64, 32, 4, 2, True), _cfg(32, 32, 4, 2, False)]
# The warp-specialized kernel: 16-bit inputs, head dims 64 and 128, pages holding whole key
# blocks (TMA); offered first (where it serves the call). Measured on the H200
# (tools/gpu_sweeps/attention_wgmma.py runs 1-2): 128-key blocks in two stages 1.11-1.20x the
# then-shipped Triton config at B4 x 4096 (causal 499-509 against 438-449 TFLOP/s), 64-key blocks
# and the ping-pong option slower; the longest-first order won where the grid is a few waves
# (B1 x 1024 causal 285 against 229) and lost where all heads' K/V at once overflowed L2
# (now grouped: paged.tile_order), so the tuner measures both per bucket.
# The persistent form (sweep 4 of attention_wgmma.py): B4 x 4096 causal 555 against 507 for the
# one-tile longest-first kernel, B1 x 16384 662 against 604, B4 x 2048 441 against 417, the
# sliding window 405 against 349; two and three ring stages within noise of each other.
_WS = [_ws(128, 2), _ws(128, 2, True), _ws(128, 2, persistent=True),
       _ws(128, 3, persistent=True)]
# At head dim 64 the deeper consumer pipeline (S_{j+1} in flight during block j's softmax) in
# three stages: B4 x 4096 no mask 445 against 405 TFLOP/s (SDPA 443), B1 x 16384 causal 440
# against 411 (SDPA 431), B4 x 4096 causal 373 against 372 (BENCHMARKS.md, 2026-12-05).
# Each persistent form also with its tiles handed out at run time (DYN: the busiest program's
# key blocks 3-15% over the mean with the grid's stride under a causal mask at the target
# shapes, 0.4-1.6% served from a counter; flash_attention_persistent.py, tools/tile_balance.py),
# and that with the query rows brought by the loader warp (QTMA: the consumers' per-tile query
# load, a dependent global load, off their path; two query slots, so not with three stages at
# head dim 128). Measured on an H100 (BENCHMARKS.md, 2026-12-05): the counter +2-7% where the
# stride's shares were uneven, the query loads 0-5% more at head dim 128 causal.
_DYN = [_ws(128, 2, persistent=True, dyn=True), _ws(128, 3, persistent=True, dyn=True),
        _ws(128, 2, persistent=True, dyn=True, qtma=True)]
_DEEP = _ws(128, 3, persistent=True, deep=True)
# The DYN + QTMA forms with the consumers' key blocks pipelined across tiles (CHAIN: a tile's
# first score product is issued while the previous tile's last P V runs;
# flash_attention_chain.py). Measured on an H100 (BENCHMARKS.md, 2026-12-05, sweep runs 13-14):
# at head dim 64 +2-4% over the shipped DYN form under the causal mask (B4 x 4096 415-418
# against 399-409 TFLOP/s, B1 x 16384 453-462 against 444-450), so a candidate there; at head
# dim 128 6-9% slower at B4 x 2048, B1 x 1024 and the window (its two ring stages leave the
# next tile's first key block little room), so only timed by the sweep (CHAIN_CONFIGS).
_CHAIN64 = _ws(128, 3, persistent=True, dyn=True, qtma=True, chain=True)
WS_CANDIDATES: dict[int, list[dict]] = {
    64: _WS + [_DEEP] + _DYN + [_ws(128, 3, persistent=True, dyn=True, qtma=True),
                                {**_DEEP, "DYN": 1}, {**_DEEP, "DYN": 1, "QTMA": 1}, _CHAIN64],
    128: _WS + _DYN}
CHAIN_CONFIGS = {64: [], 128: [_ws(128, 2, persistent=True, dyn=True, qtma=True, chain=True)]}
REQUIRED_KEYS = ("BLOCK_M", "BLOCK_N", "USE_TMA", "num_warps", "num_stages")


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def candidates(head_dim: int, page_size: int | None = None, dtype: str = "bfloat16",
               include_ws: bool = True) -> list[dict]:
    """Candidate configs for a head dim and dtype; with a page size, duplicates that the page
    size makes equal (TMA needs pages holding whole key blocks) are dropped. include_ws puts
    the warp-specialized Gluon kernel's configs first (where it serves the call)."""
    if dtype in ("float32", "fp32"):
        pool = FP32_CANDIDATES
    else:
        ws = WS_CANDIDATES.get(_bucket(head_dim), []) if include_ws else []
        pool = ws + CANDIDATES[_bucket(head_dim)]
    out, seen = [], set()
    for c in pool:
        c = dict(c)
        if page_size is not None:
            if is_ws(c) and not uses_tma(c, page_size):
                continue  # the Gluon kernel has no pointer-tile path
            c["USE_TMA"] = int(uses_tma(c, page_size))
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def default_config(head_dim: int, page_size: int, mask="CAUSAL", dtype: str = "bfloat16"
                   ) -> dict:
    """The config used without GPU tuning, for a head dim, page size, mask and dtype.

    Example:
        >>> config_tag(default_config(128, 128, "CAUSAL"))
        'm128n64w8s3tmar128'
    """
    mask_id(mask)  # validates the name
    if dtype in ("float32", "fp32"):
        return _cfg(64, 32, 4, 2, False)
    if head_dim > 128:
        return _cfg(64, 32, 8, 2, False)
    # Measured best at head dims 64 and 128 (H200 sweep run 4); the cap of 128 registers
    # keeps two 8-warp CTAs per SM. Pages that cannot hold a 64-key block gather rows.
    return _cfg(128, 64, 8, 3, page_size % 64 == 0, 128)


# The flags a name spells after its tiles, in this order: (suffix, config key).
_FLAGS = (("ws", "WS"), ("pp", "PINGPONG"), ("lpt", "LPT"), ("persist", "PERSISTENT"),
          ("deep", "DEEP"), ("dyn", "DYN"), ("qtma", "QTMA"), ("chain", "CHAIN"))
# The forms only the persistent kernels have (the one-tile form drops them), and of those the
# ones only the Gluon kernel has (its Triton twin drops them with WS and PINGPONG).
PERSISTENT_FLAGS = ("DEEP", "DYN", "QTMA", "CHAIN")
GLUON_FLAGS = ("WS", "PINGPONG", "DEEP", "QTMA", "CHAIN")
_NAME = re.compile(r"m(\d+)n(\d+)w(\d+)s(\d+)(tma)?(?:r(\d+))?"
                   + "".join(f"({suffix})?" for suffix, _ in _FLAGS))


def get(config) -> dict:
    """A config from its name (its config_tag) or dict, validated, with its "name".

    Example:
        >>> get("m128n64w8s3tmar128")["maxnreg"]
        128
    """
    if isinstance(config, str):
        m = _NAME.fullmatch(config)
        if m is None:
            raise ValueError(f"not a flash attention config name: {config!r} "
                             f"(expected e.g. m128n128w8s2tma or m128n64w8s3r128)")
        bm, bn, w, st = (int(x) for x in m.group(1, 2, 3, 4))
        config = _cfg(bm, bn, w, st, bool(m.group(5)), int(m.group(6)) if m.group(6) else None)
        config.update({key: 1 for (_, key), got in zip(_FLAGS, m.groups()[6:]) if got})
    if not isinstance(config, dict):
        raise ValueError(f"a flash attention config is a name or a dict, got {config!r}")
    check_config(config, 16)
    return {**config, "name": config_tag(config)}


def uses_tma(cfg: dict, page_size: int) -> bool:
    """Whether `cfg` reads K/V through a tensor descriptor at this page size."""
    return bool(cfg.get("USE_TMA")) and page_size % cfg["BLOCK_N"] == 0


def check_config(cfg: dict, head_dim: int) -> None:
    """ValueError naming what is wrong with a config dict."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"flash attention config {cfg} lacks {missing}")
    for k in ("BLOCK_M", "BLOCK_N"):
        v = cfg[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"flash attention config: {k} must be a power of two >= 16, got {v}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16) or not 1 <= cfg["num_stages"] <= 8:
        raise ValueError(f"flash attention config: num_warps {cfg['num_warps']} / num_stages "
                         f"{cfg['num_stages']} out of range")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"flash attention: head_dim must be a power of two >= 16, got {head_dim}")
    reg = cfg.get("maxnreg")
    if reg is not None and not (isinstance(reg, int) and 16 <= reg <= 255):
        raise ValueError(f"flash attention config: maxnreg must be None or an int in [16, 255], "
                         f"got {reg!r}")
    if cfg.get("PINGPONG") and not is_ws(cfg):
        raise ValueError(f"flash attention config: PINGPONG needs the warp-specialized kernel "
                         f"(WS), got {cfg}")
    if cfg.get("PERSISTENT") and (cfg.get("LPT") or cfg.get("PINGPONG")):
        raise ValueError(f"flash attention config: the persistent kernels always take the "
                         f"tiles longest first and do not take turns (no LPT / PINGPONG), got "
                         f"{cfg}")
    if cfg.get("DEEP") and not (cfg.get("PERSISTENT") and is_ws(cfg) and head_dim <= 64):
        raise ValueError(f"flash attention config: DEEP is a form of the persistent "
                         f"warp-specialized kernel at head_dim <= 64 (a second score tile "
                         f"in registers), got {cfg} at head_dim {head_dim}")
    if cfg.get("DYN") and not cfg.get("PERSISTENT"):
        raise ValueError(f"flash attention config: DYN hands a persistent kernel's tiles out "
                         f"at run time; it needs PERSISTENT, got {cfg}")
    if cfg.get("QTMA") and not (cfg.get("PERSISTENT") and is_ws(cfg)):
        raise ValueError(f"flash attention config: QTMA (the loader warp loads the query rows) "
                         f"is a form of the persistent warp-specialized kernel, got {cfg}")
    if cfg.get("CHAIN") and not (cfg.get("QTMA") and not cfg.get("DEEP")):
        raise ValueError(f"flash attention config: CHAIN (key blocks pipelined across tiles) "
                         f"takes the query rows from the loader warp (QTMA) and the plain "
                         f"consumer loop (no DEEP), got {cfg}")
    # Two query slots and the K/V ring, 2-byte elements, in sm_90's 227 KiB a block.
    if cfg.get("QTMA") and (2 * cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) \
            * head_dim * 2 > 227 * 1024 - 1024:
        raise ValueError(f"flash attention config: QTMA's two query slots and "
                         f"{cfg['num_stages']} K/V stages do not fit sm_90's shared memory at "
                         f"head_dim {head_dim}: {cfg}")
    if is_ws(cfg) and (cfg["BLOCK_M"] != 128 or cfg["num_warps"] != 4 or not cfg["USE_TMA"]
                       or reg is not None or head_dim > 128):
        raise ValueError(f"flash attention config: the warp-specialized kernel takes BLOCK_M "
                         f"128, num_warps 4, TMA, no register cap and head_dim <= 128, got "
                         f"{cfg} at head_dim {head_dim}")


def config_tag(cfg: dict) -> str:
    """Short name of a config: m128n64w8s3tma, plus r128 for a register cap of 128, ws for the
    warp-specialized Gluon kernel, pp for its consumers taking turns, lpt for the programs
    taken longest first, persist for one program per SM walking the tiles longest first, deep
    for the consumers' deeper pipeline (flash_attention_deep.py), dyn for a persistent kernel's
    tiles handed out at run time and qtma for its query rows loaded by the loader warp
    (flash_attention_persistent.py), chain for its key blocks pipelined across tiles
    (flash_attention_chain.py)."""
    return (f"m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"
            + ("tma" if cfg.get("USE_TMA") else "")
            + (f"r{cfg['maxnreg']}" if cfg.get("maxnreg") else "")
            + "".join(suffix for suffix, key in _FLAGS if cfg.get(key)))
