"""The matmul's candidate configurations per shape bucket, as data, and how each one launches.

A config is a flat dict: `kind` ("tile", "gemv", "tma" or "cublaslt"), its tile sizes and
pipeline settings, and a `name` that identifies it in tuning tables and manifests. `CANDIDATES`
lists, per bucket of the row count M (`BUCKETS`), what the compile-time tuner times; the first
candidate of a bucket is the built-in default (the shipped table in ../tuning_defaults.json, when
it names one, wins). `launches()` turns a config into kernel launches whose grids are integers
or launch-rule text over a symbolic M, so the CUDA plan, the tuner and the torch helper below
share one description.

Why these candidates (H200: 132 SMs, ~4.3 TB/s, 227 KiB shared memory per block):
- M <= 64 streams the weight once; programs must be many and even (several per SM) while A,
  re-read once per N tile from L2, stays small: narrow N tiles for tiny M, wider N tiles plus
  split-K as M grows; a GEMV without tensor cores for M = 1.
- M >= 256 is compute-bound: wgmma-sized tiles (128x128/128x256/256x128, BLOCK_K 64, 8 warps,
  3-4 stages), grouped order for L2 reuse, pointer loads or TMA, the latter also persistent.
  Measured on an H200 (run 1), persistent TMA 128x256 reached 0.85-0.90x cuBLAS at M=8192;
  the round-2 candidates add what Hopper GEMMs use for the rest: warp specialization ("_ws",
  a TMA producer and two wgmma consumer warp groups) and a subtiled epilogue that frees
  shared memory for a 4th stage ("_e"). The tuner keeps whichever measures faster.
- cuBLASLt is a candidate everywhere, as the first `LT_RANKS` algorithms of its heuristic's
  list ("cublaslt" = rank 0, re-chosen per M at run time; "cublaslt_hI" = rank I at the tuned
  M, pinned for the bucket): the heuristic's first choice is a model's guess, and at M=8192 it
  was up to 9% slower than torch's cuBLAS on an H200. Where it wins, the plan keeps a Triton
  fallback.
"""
from __future__ import annotations

from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, KernelSpec, cdiv, triton_dtype

# (bucket name, largest M it covers; None = no bound)
BUCKETS = (("m1", 1), ("m16", 16), ("m64", 64), ("m256", 256), ("m1024", 1024), ("large", None))
# The row count each bucket is timed at.
TUNE_M = {"m1": 1, "m16": 16, "m64": 64, "m256": 256, "m1024": 1024, "large": 4096}
REDUCE_BLOCK = 1024
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
KINDS = ("tile", "gemv", "tma", "cublaslt")


def tile(bm, bn, bk, gm, w, s, split_k=1, name=None) -> dict:
    cfg = {"kind": "tile", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
           "SPLIT_K": split_k, "num_warps": w, "num_stages": s}
    cfg["name"] = name or (f"t{bm}x{bn}x{bk}_g{gm}_w{w}_s{s}"
                           + (f"_k{split_k}" if split_k > 1 else ""))
    return cfg


def gemv(bn, bk, w, s=1, split_k=1, prefetch=False) -> dict:
    """A GEMV config; `prefetch`: the next K block's loads issued before this block's FMAs
    (matmul_skinny.gemv_kernel's PREFETCH; launches whose K splits are not whole blocks run
    the plain loop)."""
    return {"kind": "gemv", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "num_warps": w,
            "num_stages": s, "PREFETCH": prefetch,
            "name": f"gemv{bn}x{bk}_w{w}_s{s}" + (f"_k{split_k}" if split_k > 1 else "")
            + ("_pf" if prefetch else "")}


def tma(bm, bn, bk, gm, w, s, persistent=False, subtile=False, ws=False) -> dict:
    """A TMA config; `subtile`: store the epilogue in two halves, `ws`: warp-specialize the K
    loop (see matmul_tma.py; num_warps then counts one consumer warp group of two)."""
    if subtile and ws:
        raise ValueError("Triton 3.6 cannot warp-specialize a subtiled epilogue")
    return {"kind": "tma", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm,
            "PERSISTENT": persistent, "SUBTILE": subtile, "WS": ws, "num_warps": w,
            "num_stages": s,
            "name": f"tma{bm}x{bn}x{bk}_g{gm}_w{w}_s{s}" + ("_p" if persistent else "")
            + ("_e" if subtile else "") + ("_ws" if ws else "")}


def cublaslt(rank: int = 0) -> dict:
    return {"kind": "cublaslt", "ALGO_INDEX": rank,
            "name": "cublaslt" if rank == 0 else f"cublaslt_h{rank}"}


LT_RANKS = 8   # = runtime/cuda/cublaslt_algo.RANKS (the runtime is not imported here)
CUBLASLT = cublaslt(0)
LT = [cublaslt(r) for r in range(LT_RANKS)]
DECODE = tile(16, 32, 256, 1, 4, 4, name="decode")      # the two configs of the first version
PREFILL = tile(128, 128, 64, 8, 8, 3, name="prefill")

# 16-bit inputs (bf16, fp16). The first entry of each bucket is the built-in default.
CANDIDATES = {
    # Two weight rows a program (one or two warps): the 4096- and 6144-row projections at one
    # row, 10.0 / 13.9 us against 10.6 / 14.4 for the wider tiles (BENCHMARKS.md, matmul at one
    # row, 2026-12-04; 105 tiles of 2-16 rows x 256-1024 columns x 1-4 warps timed).
    "m1": [gemv(16, 512, 4), gemv(8, 1024, 4), gemv(32, 256, 4), gemv(16, 512, 4, split_k=2),
           gemv(2, 1024, 1), gemv(2, 256, 2), gemv(2, 1024, 1, prefetch=True),
           gemv(2, 256, 2, prefetch=True),
           DECODE, tile(16, 16, 256, 1, 4, 6), tile(16, 32, 256, 1, 4, 4, split_k=4), *LT],
    "m16": [tile(16, 16, 256, 1, 4, 6), DECODE, tile(16, 32, 512, 1, 4, 3),
            tile(16, 64, 256, 1, 4, 4, split_k=2), tile(16, 32, 256, 1, 4, 4, split_k=4),
            *LT],
    "m64": [tile(64, 64, 128, 1, 4, 4, split_k=2), tile(64, 32, 128, 1, 4, 5),
            tile(64, 64, 64, 1, 4, 6), tile(64, 64, 64, 1, 4, 4, split_k=4),
            tile(64, 128, 64, 1, 4, 4, split_k=4), tile(64, 16, 256, 1, 4, 5), *LT],
    "m256": [tile(128, 64, 64, 8, 4, 4), tile(64, 128, 64, 8, 4, 4), tile(128, 128, 64, 8, 8, 4),
             tile(64, 64, 128, 8, 4, 4), tile(128, 128, 64, 8, 8, 4, split_k=2),
             tma(128, 128, 64, 8, 8, 4), tma(128, 128, 64, 8, 4, 4, ws=True), *LT],
    "m1024": [tile(128, 128, 64, 8, 8, 4), tile(128, 256, 64, 8, 8, 3), PREFILL,
              tma(128, 128, 64, 8, 8, 4), tma(128, 256, 64, 8, 8, 3),
              tma(128, 128, 64, 8, 8, 4, persistent=True),
              tma(128, 256, 64, 8, 4, 3, persistent=True, ws=True),
              tma(128, 128, 64, 8, 4, 4, persistent=True, ws=True), *LT],
    "large": [tile(128, 256, 64, 8, 8, 3), tile(256, 128, 64, 8, 8, 3),
              tile(128, 128, 64, 8, 8, 4), PREFILL, tma(128, 256, 64, 8, 8, 3),
              tma(128, 256, 64, 8, 8, 3, persistent=True), tma(256, 128, 64, 8, 8, 3),
              tma(128, 256, 64, 8, 4, 3, persistent=True, ws=True),
              tma(128, 256, 64, 8, 4, 3, ws=True),
              tma(128, 256, 64, 8, 8, 4, persistent=True, subtile=True), *LT],
}
# fp32 (tf32 tensor cores): twice the bytes per element, so half the K depth.
FP32_CANDIDATES = {
    "m1": [DECODE, gemv(16, 256, 4), *LT],
    "m16": [DECODE, tile(16, 32, 128, 1, 4, 4, split_k=2), *LT],
    "m64": [DECODE, tile(64, 32, 64, 1, 4, 4), *LT],
    "m256": [PREFILL, tile(64, 128, 32, 8, 4, 4), *LT],
    "m1024": [PREFILL, tile(128, 128, 32, 8, 8, 4), *LT],
    "large": [PREFILL, tile(128, 128, 32, 8, 8, 4), tma(128, 128, 32, 8, 8, 3), *LT],
}


def _all_configs() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for table in (CANDIDATES, FP32_CANDIDATES):
        for cfgs in table.values():
            for c in cfgs:
                out.setdefault(c["name"], c)
    return out


BY_NAME = _all_configs()


def bucket_of(M: int) -> str:
    """The bucket of a row count."""
    for name, top in BUCKETS:
        if top is None or M <= top:
            return name
    raise AssertionError("unreachable: the last bucket has no bound")


def get(config) -> dict:
    """A config from its name or dict (validated); ValueError naming what is wrong."""
    if isinstance(config, str):
        if config not in BY_NAME:
            raise ValueError(f"unknown matmul config {config!r}; known: {sorted(BY_NAME)}")
        return BY_NAME[config]
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        raise ValueError(f"a matmul config is a name or a dict with kind in {KINDS}, got "
                         f"{config!r}")
    need = {"tile": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps",
                     "num_stages"),
            "gemv": ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"),
            "tma": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT", "num_warps",
                    "num_stages"),
            "cublaslt": ("ALGO_INDEX",)}[config["kind"]]
    missing = [k for k in need + ("name",) if k not in config]
    if missing:
        raise ValueError(f"matmul config {config.get('name', config)!r} lacks {missing}")
    return config


def _short(dtype: str) -> str:
    t = triton_dtype(dtype)
    if t not in ELEM_BYTES:
        raise ValueError(f"the matmul takes bfloat16, float16 or float32, got {dtype!r}")
    return t


def candidates(bucket: str, dtype: str, N: int, K: int) -> list[dict]:
    """The configs worth timing for one bucket and weight shape (ineligible ones dropped)."""
    t = _short(dtype)
    table = FP32_CANDIDATES if t == "fp32" else CANDIDATES
    if bucket not in table:
        raise ValueError(f"unknown matmul bucket {bucket!r}; buckets: {[b for b, _ in BUCKETS]}")
    return [c for c in table[bucket] if ineligible(c, t, N, K) is None]


def default_config(bucket: str, dtype: str = "bfloat16", N: int = 4096, K: int = 4096) -> dict:
    """The built-in choice for a bucket: its first eligible Triton candidate."""
    return next(c for c in candidates(bucket, dtype, N, K) if c["kind"] != "cublaslt")


def ineligible(cfg: dict, dtype: str, N: int, K: int) -> str | None:
    """Why `cfg` cannot run this shape, or None when it can."""
    t = _short(dtype)
    if cfg["kind"] == "tma":
        # TMA rows must start on 16-byte boundaries.
        per16 = 16 // ELEM_BYTES[t]
        if K % per16 or N % per16:
            return f"TMA needs K and N multiples of {per16} for {t}"
    if cfg["kind"] == "gemv" and cdiv(N, cfg["BLOCK_N"]) > 65535:
        return "too many N tiles for grid axis 1"
    return None


# -- expressions that are ints for int M and launch-rule text for a symbolic M ---------------
def _cd(x, b):
    return cdiv(x, b) if isinstance(x, int) else f"cdiv({x}, {b})"


def _mul(x, y):
    return x * y if isinstance(x, int) and isinstance(y, int) else f"({x}) * ({y})"


def _min(x, y):
    return min(x, y) if isinstance(x, int) and isinstance(y, int) else f"min({x}, {y})"


def main_grid(cfg: dict, M, N: int) -> tuple:
    """Grid of a config's main kernel for M rows (an int, or expression text)."""
    kind = cfg["kind"]
    if kind == "gemv":
        return (M, cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    tiles = _mul(_cd(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    if kind == "tma":
        return (_min(tiles, NUM_SMS) if cfg["PERSISTENT"] else tiles, 1, 1)
    if kind == "tile":
        return (tiles, cfg["SPLIT_K"], 1)
    raise ValueError(f"config {cfg['name']!r} ({kind}) has no Triton grid")


def reduce_grid(M, N: int) -> tuple:
    return (_cd(_mul(M, N), REDUCE_BLOCK), 1, 1)


def _split(cfg: dict) -> int:
    return cfg.get("SPLIT_K", 1) if cfg["kind"] in ("tile", "gemv") else 1


def specs(cfg: dict, dtype: str, has_bias: bool, K: int | None = None,
          N: int | None = None, early: bool = False) -> list[KernelSpec]:
    """KernelSpecs of a Triton config: [main] or, split along K, [partial, reduce].

    `early`: no kernel ahead of this matmul in its plan writes A, B or the bias (A a graph
    input, B and the bias weights), so an unsplit GEMV may read them all before its PDL wait
    (matmul_skinny's LATE_WAIT); other configs ignore it."""
    from graphir.lowering.triton_gpu.kernels import matmul as mm
    from graphir.lowering.triton_gpu.kernels import matmul_skinny as sk
    from graphir.lowering.triton_gpu.kernels import matmul_tma as mt

    cfg, t = get(cfg), _short(dtype)
    kind, split = cfg["kind"], _split(cfg)
    if kind == "cublaslt":
        raise ValueError("cublaslt is a library call, not a Triton kernel: no KernelSpec")
    out_t = "fp32" if split > 1 else t
    sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "bias_ptr": f"*{t}", "c_ptr": f"*{out_t}",
           "M": "i32", "N": "i32", "K": "i32", "HAS_BIAS": "constexpr"}
    div = ["a_ptr", "b_ptr", "c_ptr"] + (["K"] if K is None or K % 16 == 0 else []) \
        + (["N"] if N is not None and N % 16 == 0 else [])
    even_k = K is not None and K % (cfg["BLOCK_K"] * split) == 0
    ce = {"HAS_BIAS": has_bias and split == 1}
    late = early and kind == "gemv" and split == 1
    if kind == "tile":
        fn = mm.matmul_kernel
        ce.update({k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K")},
                  EVEN_K=even_k)
    elif kind == "gemv":
        fn = sk.gemv_kernel
        ce.update({k: cfg[k] for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K")}, EVEN_K=even_k,
                  PREFETCH=bool(cfg.get("PREFETCH")), LATE_WAIT=late)
    else:
        fn = mt.matmul_tma_kernel
        ws = bool(cfg.get("WS"))
        ce.update({k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                  FLATTEN=bool(cfg["PERSISTENT"]) and not ws,
                  EPILOGUE_SUBTILE=bool(cfg.get("SUBTILE")), WARP_SPECIALIZE=ws)
    sig.update({k: "constexpr" for k in ce if k != "HAS_BIAS"})
    main = KernelSpec(
        name=f"matmul_{t}_{cfg['name']}{'_bias' if has_bias else ''}{'_late' if late else ''}",
        fn=fn, signature=sig,
        constexprs=ce, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        grid=lambda M, N, _c=cfg: main_grid(_c, M, N), grid_args=("M", "N"),
        divisible_by_16=tuple(div), notes=f"matmul config {cfg['name']}",
        extra={"config": cfg["name"]},
        pdl_early_reads=("a_ptr", "b_ptr", "bias_ptr") if late else ())
    if split == 1:
        return [main]
    red_sig = {"part_ptr": "*fp32", "bias_ptr": f"*{t}", "c_ptr": f"*{t}", "M": "i32",
               "N": "i32", "HAS_BIAS": "constexpr", "SPLIT_K": "constexpr",
               "BLOCK": "constexpr"}
    reduce = KernelSpec(
        name=f"matmul_splitk_reduce_{t}_k{split}{'_bias' if has_bias else ''}",
        fn=sk.splitk_reduce_kernel, signature=red_sig,
        constexprs={"HAS_BIAS": has_bias, "SPLIT_K": split, "BLOCK": REDUCE_BLOCK},
        num_warps=4, num_stages=1, grid=reduce_grid, grid_args=("M", "N"),
        divisible_by_16=("part_ptr", "c_ptr"), notes="sums split-K partials")
    return [main, reduce]


def launches(cfg: dict, dtype: str, has_bias: bool, N: int, K: int, M,
             early: bool = False) -> dict:
    """How a Triton config runs for M rows: {"specs", "scratch", "ops"}.

    `scratch` is [(name, dtype, element count)], `ops` is [(spec index, grid, args)], where an
    arg is one of the tokens "a", "b", "bias", "c", "M", "N", "K" or a scratch name; counts and
    grids are ints for an int M and launch-rule text for a symbolic one. `early` as for
    `specs`.
    """
    cfg = get(cfg)
    sp = specs(cfg, dtype, has_bias, K, N, early)
    bias = "bias" if has_bias else "a"
    if len(sp) == 1:
        return {"specs": sp, "scratch": [],
                "ops": [(0, main_grid(cfg, M, N), ["a", "b", bias, "c", "M", "N", "K"])]}
    count = _mul(_mul(M, N), _split(cfg))
    return {"specs": sp, "scratch": [("part", "float32", count)],
            "ops": [(0, main_grid(cfg, M, N), ["a", "b", "a", "part", "M", "N", "K"]),
                    (1, reduce_grid(M, N), ["part", bias, "c", "M", "N"])]}


def run_torch(a, b, bias=None, out=None, config=None, early=False):
    """Run a Triton config on torch tensors through Triton's launcher (tests, interpreter);
    `early` as for `specs`."""
    import torch

    from graphir.lowering.triton_gpu.kernels.matmul import check_operands

    M, N, K = check_operands(a, b, bias)
    a, b = a.contiguous(), b.contiguous()
    dtype = str(a.dtype).removeprefix("torch.")
    cfg = get(config) if config is not None else default_config(bucket_of(M), dtype, N, K)
    out = a.new_empty((M, N)) if out is None else out
    plan = launches(cfg, dtype, bias is not None, N, K, M, early)
    bufs = {"a": a, "b": b, "bias": bias, "c": out, "M": M, "N": N, "K": K}
    for name, dt, count in plan["scratch"]:
        bufs[name] = torch.empty(count, dtype=getattr(torch, dt), device=a.device)
    for idx, grid, args in plan["ops"]:
        spec = plan["specs"][idx]
        if grid[0] * grid[1] * grid[2] == 0:
            continue
        spec.fn[grid](*[bufs[x] for x in args], **spec.constexprs,
                      num_warps=spec.num_warps, num_stages=spec.num_stages)
    return out


# -- the tuner's view (lowering/triton_gpu/tuning.py) ---------------------------------------
def tuning_launches(cfg: dict, facts, M: int) -> dict:
    """launches() for the tuner: Triton configs as specs + ops, cuBLASLt as a library call
    (`algo`: which rank of the heuristic's list for M rows; rank 0 is its per-M choice)."""
    cfg = get(cfg)
    bias = bool(facts.get("bias"))
    if cfg["kind"] == "cublaslt":
        return {"library": "cublaslt", "dtype": facts["dtype"], "N": facts["N"],
                "K": facts["K"], "has_bias": bias,
                "algo": {"index": cfg["ALGO_INDEX"], "at_m": M},
                "args": ["a", "b", "bias" if bias else "a", "c", "M", "N", "K"]}
    return launches(cfg, facts["dtype"], bias, facts["N"], facts["K"], M)


# float64 reference rows of the last few bench inputs: every candidate of a bucket is checked
# against the same data.
_REFERENCES: dict = {}


def bench(facts, M: int, seed: int = 0) -> dict:
    """Random inputs (made on demand, cached by key), the output, and a float64 check.

    The check compares up to 16 sampled rows against float64 and requires every element of C
    to be finite (the measurer poisons C with NaN first, so unwritten tiles show).
    """
    import numpy as np

    from graphir.dtype import DType, from_bits, to_bits

    t, N, K = facts["dtype"], facts["N"], facts["K"]
    dt = {"bf16": DType.bfloat16, "fp16": DType.float16, "fp32": DType.float32}[t]
    name = dt.name  # buffers take full dtype names

    def make(shape, salt):
        return lambda: to_bits(np.random.default_rng([seed, salt, *shape]).standard_normal(
            shape, dtype=np.float32), dt)

    inputs = {"a": {"key": ("a", M, K, t, seed), "make": make((M, K), 1), "dtype": name},
              "b": {"key": ("b", N, K, t, seed), "make": make((N, K), 2), "dtype": name,
                    "rotate": True}}
    if facts.get("bias"):
        inputs["bias"] = {"key": ("bias", N, t, seed), "make": make((N,), 3), "dtype": name}

    def check(outputs, host) -> float:
        raw = outputs["c"]
        exp = {"bf16": (np.uint16, 0x7F80), "fp16": (np.uint16, 0x7C00)}.get(t)
        if exp is not None:
            bits = raw.view(exp[0])
            if np.any((bits & exp[1]) == exp[1]):
                return float("inf")
        elif not np.all(np.isfinite(raw.view(np.float32))):
            return float("inf")
        ref_key = tuple(spec["key"] for spec in inputs.values())
        if ref_key not in _REFERENCES:
            rows = np.random.default_rng(seed).choice(M, size=min(M, 16), replace=False)
            a = from_bits(host["a"], dt).reshape(M, K)[rows].astype(np.float64)
            b = from_bits(host["b"], dt).reshape(N, K).astype(np.float64)
            want = a @ b.T
            if "bias" in host:
                want += from_bits(host["bias"], dt).astype(np.float64)
            if len(_REFERENCES) >= 4:
                _REFERENCES.pop(next(iter(_REFERENCES)))
            _REFERENCES[ref_key] = rows, want
        rows, want = _REFERENCES[ref_key]
        got = from_bits(raw, dt).reshape(M, N)[rows].astype(np.float64)
        return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))

    return {"inputs": inputs, "outputs": {"c": {"shape": (M, N), "dtype": name}},
            "ints": {"M": M, "N": N, "K": K}, "check": check}
