"""The paged decode kernel as a family of the compile-time tuner (../tuning.py).

Buckets are regions of the call: `units` = batch x KV heads (how many programs a one-head config
launches, against 132 SMs) and the bucketed context length (which bounds the partitions), each
with a tuning point inside it:

    u16 / u64 / u256 / u1024 (units <= 16 ...)  x  k2048 (<= 2048 keys) / klong;   ularge

A plan tests them in that order (`conditions`), so a bucket's condition needs only its upper
bounds. The static parts of a call (dtype, heads, head dim, page size, the query tile's tokens
q, mask) are the facts; the tuner times each q tile of a layer as its own step. One-token tiles
(q = 1) try every candidate; the taller tiles of speculative decode try the built-in default and
a few neighbours only, so a shipped table's q = 1 choices ("*") never reach them untimed.

Timing runs the plan's own launches (split rule included) on a random cache of the tuning point's
shape with shuffled pages, checked against the float64 reference on a few sampled sequences.
"""
from __future__ import annotations

from typing import Mapping

from graphir.lowering.triton_gpu.kernels import paged_decode as pd
from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg
from graphir.lowering.triton_gpu.kernels.spec import cdiv

UNIT_TOPS = (16, 64, 256, 1024)      # then "ularge"
KV_TOPS = (2048, None)
KV_BUCKET = 256                      # the plan's context bucket (lowerings/attention.py)
TARGET_BYTES = 1 << 29               # K/V bytes a tuning point reads, at most (where it can)
_UNIT_POINT = {16: 8, 64: 64, 256: 256, 1024: 512, None: 2048}
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _bucket_name(u, k) -> str:
    return "ularge" if u is None else f"u{u}_" + (f"k{k}" if k else "klong")


# (name, [most units, most keys] with None for no bound; None for the last bucket)
BUCKETS: tuple = tuple((_bucket_name(u, k), [u, k]) for u in UNIT_TOPS for k in KV_TOPS) + (
    ("ularge", None),)


def tune_point(bucket: str, head_dim: int = 128, elem: int = 2) -> tuple[int, int]:
    """(units, context length) a bucket is timed at, inside it: half the bound for short
    contexts; for long ones about TARGET_BYTES of K/V, 4096 to 16384 keys."""
    top = dict(BUCKETS)[bucket]
    u, k = (None, 512) if top is None else top
    units = _UNIT_POINT[u]
    if k is None:
        per_key = units * head_dim * 2 * elem
        k = min(16384, max(4096, TARGET_BYTES // per_key // 1024 * 1024))
    elif top is not None:
        k = k // 2
    return units, k


TUNE_SIZE = {b: tune_point(b) for b, _ in BUCKETS}


def conditions(units: str, kv_len: str) -> list[tuple[str, str | None]]:
    """(bucket, plan condition) in test order; the last bucket's condition is None."""
    out = []
    for name, top in BUCKETS:
        conds = [] if top is None else (
            [f"{units} <= {top[0]}"] + ([f"{kv_len} <= {top[1]}"] if top[1] else []))
        out.append((name, " and ".join(conds) or None))
    return out


def bucket_of(units: int, kv_len: int) -> str:
    """The bucket a call falls in (the conditions above, evaluated in Python)."""
    for name, top in BUCKETS:
        if top is None or (units <= top[0] and (top[1] is None or kv_len <= top[1])):
            return name
    raise AssertionError("unreachable: the last bucket has no bound")


# -- candidates -----------------------------------------------------------------------------
def _shape(facts: Mapping) -> tuple:
    return facts["nh"], facts["nkv"], facts["d"], facts["page"], facts["q"]


def _fits(conf: dict, facts: Mapping) -> dict | None:
    """conf resolved for the facts, or None when it cannot build for them."""
    nh, nkv, d, page, q = _shape(facts)
    try:
        r = cfg.resolve(conf, nh, nkv, d, page, q)
    except ValueError:
        return None
    if cfg.unfit_reason(r, nh, nkv, d, q, ELEM_BYTES.get(facts["dtype"], 2)):
        return None
    return r


def default(bucket: str, facts: Mapping) -> dict:
    nh, nkv, d, page, q = _shape(facts)
    return cfg.resolve(None, nh, nkv, d, page, q)


def _tall(facts: Mapping) -> list[dict]:
    """Candidates of a tile for several new tokens: the default and one-head neighbours."""
    near = [cfg.make_config(64, 1, 0, 4, 3, 2), cfg.make_config(64, 1, 0, 4, 7, 2),
            cfg.make_config(32, 1, 0, 4, 8, 3), cfg.make_config(64, 1, 0, 8, 5, 2),
            cfg.make_config(32, 1, 0, 8, 3, 2)]
    return [default("", facts)] + near


def candidates(bucket: str, facts: Mapping) -> list[dict]:
    """The configs timed for one bucket: resolved for the facts, unbuildable ones dropped,
    duplicates (after resolving) once, the built-in default first."""
    pool = [default(bucket, facts)] + (cfg.CANDIDATES if facts["q"] == 1 else _tall(facts))
    out, seen = [], set()
    for c in pool:
        r = _fits(c, facts)
        if r is not None and r["name"] not in seen:
            seen.add(r["name"])
            out.append(r)
    return out


def eligible(conf: dict, facts: Mapping) -> bool:
    """Can a table's choice run these facts (one-token tiles: any config that builds; taller
    tiles: only their own candidates)."""
    r = _fits(conf, facts)
    if r is None:
        return False
    return facts["q"] == 1 or r["name"] in {c["name"] for c in candidates("", facts)}


def shape_key(facts: Mapping) -> str:
    key = (f"NH={facts['nh']},NKV={facts['nkv']},D={facts['d']},page={facts['page']},"
           f"q={facts['q']},mask={facts['mask']}")
    return key + (f",window={facts['window']}" if facts.get("window", 1) > 1 else "")


def make_facts(dtype: str, nh: int, nkv: int, d: int, page: int, q: int, mask: str,
               window: int = 1) -> dict:
    """The facts of one decode tile (dtype as the tables write it: bf16, fp16, fp32)."""
    return {"dtype": dtype, "nh": nh, "nkv": nkv, "d": d, "page": page, "q": q,
            "mask": mask, "window": max(int(window), 1)}


# -- the measurer's view (../tuning_gpu.py) -------------------------------------------------
def _problem(facts: Mapping, size) -> dict:
    units, kv = size
    batch = max(1, units // facts["nkv"])
    kvb = cdiv(max(kv, 1), KV_BUCKET) * KV_BUCKET
    npg = cdiv(kv, facts["page"])
    return {"batch": batch, "kv": kv, "kvb": kvb, "npg": npg, "T": batch * facts["q"],
            "num_pages": batch * npg + 1, "max_pages": npg + 1}


def tuning_launches(conf: dict, facts: Mapping, size) -> dict:
    """The plan's launches for a config at a tuning point: decode kernel, then (unless it merges
    them itself) the reduce when the split rule splits; arguments named as `bench` names its
    buffers and ints."""
    nh, nkv, d, page, q = _shape(facts)
    conf = cfg.resolve(conf, nh, nkv, d, page, q)
    pb = _problem(facts, size)
    main, reduce = pd.aot_specs(nh, nkv, d, page, DTYPE_NAMES[facts["dtype"]], facts["mask"],
                                q, config=conf)
    nparts, part = cfg.split(pb["batch"], nkv, pb["kvb"], conf)
    grid = (pb["batch"] * (nkv // conf["HEADS"]) * nparts, 1, 1)
    args = ["q", "offs", "clen", "lut", "blocks", "out", "o_part", "ml_part", "part_count",
            "max_pages", "layer", "num_layers", "num_pages", "window", "scale", "part_size",
            "num_parts"]
    ops = [(0, grid, args)]
    rows = pb["T"] * nh
    scratch = [("o_part", "float32", 1), ("ml_part", "float32", 1), ("part_count", "int32", 1)]
    if nparts > 1:
        scratch = [("o_part", "float32", rows * nparts * d),
                   ("ml_part", "float32", rows * nparts * 2),
                   # As the plan: the group counters for a MERGE config only.
                   ("part_count", "int32", pb["batch"] * nkv if conf["MERGE"] else 1)]
        if not conf["MERGE"]:
            ops.append((1, (rows, 1, 1), ["o_part", "ml_part", "out", "num_parts"]))
    return {"specs": [main, reduce], "ops": ops, "scratch": scratch,
            "ints": {"part_size": part, "num_parts": nparts}}


_REFERENCES: dict = {}


def bench(facts: Mapping, size, seed: int = 0) -> dict:
    """Random inputs (made on demand, cached by key): every sequence holds `kv` keys, the last
    `q` of them new this step, in shuffled pages; the check compares up to 4 sampled sequences
    with the float64 reference and requires every output element to be finite."""
    import numpy as np

    from graphir.dtype import DType, from_bits
    from graphir.ops import attention_math as am

    nh, nkv, d, page, q = _shape(facts)
    pb = _problem(facts, size)
    B, kv, npg = pb["batch"], pb["kv"], pb["npg"]
    t = facts["dtype"]
    dt = {"bf16": DType.bfloat16, "fp16": DType.float16, "fp32": DType.float32}[t]
    name = DTYPE_NAMES[t]
    rng = lambda salt: np.random.default_rng([seed, salt, B, kv, page, nkv, d])  # noqa: E731
    shape = (pb["num_pages"], 2, 1, page, nkv, d)

    def values(n, salt):
        # 16-bit values straight from random bits (fast for a GiB): sign, exponent of [0.5, 1),
        # random mantissa; fp32 through the normal distribution.
        if t == "fp32":
            return rng(salt).standard_normal(n, dtype=np.float32)
        bits = rng(salt).integers(0, 1 << 16, size=n, dtype=np.uint16)
        sign, mant, half = (0x8000, 0x007F, 0x3F00) if t == "bf16" else (0x8000, 0x03FF, 0x3800)
        return (bits & (sign | mant)) | half

    def lut():
        perm = rng(3).permutation(pb["num_pages"] - 1).astype(np.int32)
        table = np.full((B, pb["max_pages"]), pb["num_pages"] - 1, np.int32)
        table[:, :npg] = perm[:B * npg].reshape(B, npg)
        return table

    inputs = {
        "q": {"key": ("q", B, q, nh, d, t, seed),
              "make": lambda: values(pb["T"] * nh * d, 1).reshape(pb["T"], nh, d),
              "dtype": name},
        "blocks": {"key": ("blocks", shape, t, seed), "make": lambda: values(
            int(np.prod(shape)), 2).reshape(shape), "dtype": name, "rotate": True},
        "lut": {"key": ("lut", B, kv, page, seed), "make": lut, "dtype": "int32"},
        "offs": {"key": ("offs", B, q), "make": lambda: np.arange(B + 1, dtype=np.int32) * q,
                 "dtype": "int32"},
        "clen": {"key": ("clen", B, kv, q), "make": lambda: np.full(B, kv - q, np.int32),
                 "dtype": "int32"},
    }
    scale = d ** -0.5

    def check(outputs, host) -> float:
        raw = outputs["out"]
        if t == "fp32":
            got_all = raw.view(np.float32)
        else:
            got_all = from_bits(raw.reshape(-1), dt).astype(np.float64)
        if not np.all(np.isfinite(got_all)):
            return float("inf")
        got_all = got_all.reshape(pb["T"], nh, d)
        ref_key = (inputs["q"]["key"], inputs["blocks"]["key"], facts["mask"], facts["window"])
        if ref_key not in _REFERENCES:
            seqs = sorted({0, B - 1} | set(rng(4).choice(B, size=min(B, 2), replace=False)))
            qs = from_bits(host["q"].reshape(-1), dt).reshape(pb["T"], nh, d) if t != "fp32" \
                else host["q"]
            want = []
            for b in seqs:
                pages = host["lut"][b, :npg]
                blk = host["blocks"][pages]
                blk = (from_bits(blk.reshape(-1), dt).reshape(blk.shape) if t != "fp32"
                       else blk).astype(np.float64)
                want.append(am.flash_attention_ragged(
                    qs[b * q:(b + 1) * q].astype(np.float64), blk, layer_idx=0,
                    input_row_offsets=np.array([0, q]), cache_lengths=np.array([kv - q]),
                    lookup_table=np.arange(npg)[None], mask_variant=facts["mask"].lower(),
                    window=facts["window"] if facts["mask"] not in ("CAUSAL", "NULL") else None,
                    scale=scale))
            if len(_REFERENCES) >= 4:
                _REFERENCES.pop(next(iter(_REFERENCES)))
            _REFERENCES[ref_key] = seqs, np.concatenate(want)
        seqs, want = _REFERENCES[ref_key]
        got = np.concatenate([got_all[b * q:(b + 1) * q] for b in seqs])
        return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))

    ints = {"max_pages": pb["max_pages"], "layer": 0, "num_layers": 1,
            "num_pages": pb["num_pages"], "window": facts["window"], "scale": scale}
    return {"inputs": inputs, "outputs": {"out": {"shape": (pb["T"], nh * d), "dtype": name}},
            "ints": ints, "check": check}


# -- the plan's view (lowerings/attention.py) -----------------------------------------------
def _bounds(bucket: str) -> tuple[float, float]:
    top = dict(BUCKETS)[bucket]
    inf = float("inf")
    return (inf, inf) if top is None else (top[0], inf if top[1] is None else top[1])


def plan_variants(choices, units: str, kv_len: str) -> list[tuple[str | None, object]]:
    """(condition, choice) per plan variant, in test order: a bucket whose config is the same
    as the next variant's and whose region that variant's condition covers is folded into it
    (first match wins, so the region falls through to it)."""
    cond = dict(conditions(units, kv_len))
    out: list[tuple[str, object]] = []
    for ch in reversed(list(choices)):
        if out:
            nb, nch = out[0]
            (u0, k0), (u1, k1) = _bounds(ch.bucket), _bounds(nb)
            if nch.config["name"] == ch.config["name"] and u0 <= u1 and k0 <= k1:
                continue
        out.insert(0, (ch.bucket, ch))
    return [(cond[b], ch) for b, ch in out]


def limit_kernels(choices, budget: int, facts: Mapping) -> None:
    """Keep at most `budget` distinct decode kernels among one tile's choices (configs that
    differ only in launch numbers share a kernel), in place: drop the kernel whose buckets lose
    least by moving to their next-best timed candidate among the kept kernels (untimed: to the
    kept config most buckets use). A moved choice's source says so (the manifest shows it)."""
    resolve = lambda c: _fits(c, facts) or cfg.get(c)  # noqa: E731
    for ch in choices:
        ch.config = resolve(ch.config)
    while True:
        keys = list(dict.fromkeys(cfg.kernel_key(ch.config) for ch in choices))
        if len(keys) <= max(budget, 1):
            return
        plans = []
        for drop in keys:
            kept = [k for k in keys if k != drop]
            moves, cost = [], 0.0
            for ch in choices:
                if cfg.kernel_key(ch.config) == drop:
                    alt, pen = _alternative(ch, kept, choices, resolve)
                    moves.append((ch, alt))
                    cost += pen
            plans.append((cost, len(moves), keys.index(drop), moves))
        _, _, _, moves = min(plans, key=lambda p: p[:3])
        for ch, alt in moves:
            ch.source = f"{ch.source}; {ch.config['name']} dropped (kernel limit)"
            ch.config = alt


def _alternative(ch, kept: list, choices, resolve) -> tuple[dict, float]:
    timed = {c["config"]: c["ms"] for c in ch.candidates
             if "ms" in c and "error" not in c and c["ms"] > 0}
    own = timed.get(ch.config["name"])
    best = None
    for name, ms in timed.items():
        try:
            alt = resolve(name)
        except ValueError:
            continue
        if own and cfg.kernel_key(alt) in kept and (best is None or ms < best[1]):
            best = (alt, ms)
    if best is not None:
        return best[0], best[1] / own - 1.0
    users = [c.config for c in choices if cfg.kernel_key(c.config) in kept]
    counts = {}
    for c in users:
        counts[c["name"]] = counts.get(c["name"], 0) + 1
    name = max(counts, key=lambda n: (counts[n], -list(counts).index(n)))
    return next(c for c in users if c["name"] == name), 1.0
