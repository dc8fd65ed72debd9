"""The prefill attention kernel as a family of the compile-time tuner (../tuning.py).

Buckets are regions of one call's work per head: `tiles` = batch x cdiv(seqmax, 128), the
128-row query tiles of the longest sequence times the sequences (what fills 132 SMs):

    t8 (<= 8 tiles: one 1k prompt)  /  t64 (<= 64: four 2k prompts)  /  large

each timed at a point inside it (TUNE_SIZE, (batch, new tokens), no cached prefix). The static
parts of a call (dtype, heads, head dim, page size, mask, window) are the facts; a shipped
table keys its choices by the facts that matter (shape_key, then "D=..,mask=..", then "D=..",
then "*"). Timing runs the kernel the plan launches on a random cache in shuffled pages,
checked against a float64 reference on sampled query rows (one sequence, a few heads).
"""
from __future__ import annotations

from typing import Mapping

from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
from graphir.lowering.triton_gpu.kernels.spec import cdiv

TILE = 128                                   # rows of the bucket unit, whatever BLOCK_M is
BUCKETS: tuple = (("t8", 8), ("t64", 64), ("large", None))
TUNE_SIZE = {"t8": (1, 1024), "t64": (4, 2048), "large": (4, 4096)}   # (batch, new tokens)
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def make_facts(dtype: str, nh: int, nkv: int, d: int, page: int, mask: str,
               window: int = 1) -> dict:
    """The facts of one prefill step (dtype as the tables write it: bf16, fp16, fp32)."""
    return {"dtype": dtype, "nh": nh, "nkv": nkv, "d": d, "page": page, "mask": mask,
            "window": max(int(window), 1)}


def candidates(bucket: str, facts: Mapping) -> list[dict]:
    """The configs timed for a bucket: the built-in default first, then the candidates of the
    head dim and dtype at this page size (duplicates once)."""
    pool = [default(bucket, facts)] + fc.candidates(facts["d"], facts["page"],
                                                    DTYPE_NAMES[facts["dtype"]])
    out, seen = [], set()
    for c in pool:
        c = fc.get(c)
        if c["name"] not in seen:
            seen.add(c["name"])
            out.append(c)
    return out


def default(bucket: str, facts: Mapping) -> dict:
    return fc.get(fc.default_config(facts["d"], facts["page"], facts["mask"],
                                    DTYPE_NAMES[facts["dtype"]]))


def eligible(conf: dict, facts: Mapping) -> bool:
    """A table's choice runs these facts when it is one of their candidates (head dim, page:
    a TMA name on a page that cannot hold its key block is not)."""
    return conf["name"] in {c["name"] for c in candidates("", facts)}


def shape_key(facts: Mapping) -> str:
    key = (f"NH={facts['nh']},NKV={facts['nkv']},D={facts['d']},page={facts['page']},"
           f"mask={facts['mask']}")
    return key + (f",window={facts['window']}" if facts.get("window", 1) > 1 else "")


def near_keys(facts: Mapping) -> list[str]:
    return [f"D={facts['d']},mask={facts['mask']}", f"D={facts['d']}"]


def tiles_expr(batch: str, seqmax: str) -> str:
    return f"({batch}) * cdiv({seqmax}, {TILE})"


def plan_variants(choices, batch: str, seqmax: str) -> list[tuple[str | None, object]]:
    """(condition, choice) per plan variant in test order; a bucket choosing the same config
    as the next one falls through to it; the last variant is unconditional."""
    out: list = []
    for ch in reversed(list(choices)):
        if out and out[0].config["name"] == ch.config["name"]:
            continue
        out.insert(0, ch)
    tops = dict(BUCKETS)
    t = tiles_expr(batch, seqmax)
    return [(None if i == len(out) - 1 else f"{t} <= {tops[ch.bucket]}", ch)
            for i, ch in enumerate(out)]


# -- the measurer's view (../tuning_gpu.py) -------------------------------------------------
def _problem(facts: Mapping, size) -> dict:
    batch, seq = size
    npg = cdiv(seq, facts["page"])
    return {"batch": batch, "seq": seq, "npg": npg, "num_pages": batch * npg + 1,
            "max_pages": npg + 1, "T": batch * seq}


def tuning_launches(conf: dict, facts: Mapping, size) -> dict:
    """The plan's launch of a config at a tuning point; arguments named as `bench` names
    its buffers and ints."""
    conf = fc.get(conf)
    pb = _problem(facts, size)
    (spec,) = fa.aot_specs(facts["nh"], facts["nkv"], facts["d"], facts["page"],
                           DTYPE_NAMES[facts["dtype"]], facts["mask"], config=conf)
    grid = spec.grid_for(batch=pb["batch"], max_seq_len=pb["seq"])
    args = ["q", "offs", "clen", "lut", "blocks", "out", "max_pages", "layer", "num_layers",
            "num_pages", "window", "scale", "T"]
    if "n_m" not in spec.signature:
        return {"specs": [spec], "ops": [(0, grid, args)], "scratch": []}
    # A persistent config also takes the longest sequence's query blocks and the sequences.
    # (n_m as the torch launcher counts it: the one-tile grid's query blocks.)
    ints = {"n_m": fa.grid_rule(spec.constexprs["BLOCK_M"], 1)(pb["batch"], pb["seq"])[0],
            "n_b": pb["batch"]}
    if spec.signature["sched_ptr"] == "constexpr":
        return {"specs": [spec], "ops": [(0, grid, args + ["n_m", "n_b"])], "scratch": [],
                "ints": ints}
    # A DYN config also takes its tile counter (zeroed scratch; the kernel leaves it zero).
    return {"specs": [spec], "ops": [(0, grid, args + ["n_m", "n_b", "tile_counter"])],
            "scratch": [("tile_counter", "int32", 2)], "ints": ints}


_REFERENCES: dict = {}


def bench(facts: Mapping, size, seed: int = 0) -> dict:
    """Random inputs (made on demand, cached by key): `batch` sequences of `seq` new tokens in
    shuffled pages; the check compares 64 sampled query rows of 2 heads of the last sequence
    with float64 and requires every output element to be finite."""
    import numpy as np

    from graphir.dtype import DType, from_bits, to_bits
    from graphir.ops import attention_math as am

    nh, nkv, d, page = facts["nh"], facts["nkv"], facts["d"], facts["page"]
    pb = _problem(facts, size)
    B, S, npg = pb["batch"], pb["seq"], pb["npg"]
    t = facts["dtype"]
    dt = {"bf16": DType.bfloat16, "fp16": DType.float16, "fp32": DType.float32}[t]
    rng = lambda salt: np.random.default_rng([seed, salt, B, S, page, nkv, d])  # noqa: E731
    shape = (pb["num_pages"], 2, 1, page, nkv, d)
    window = facts["window"] if facts["mask"] not in ("CAUSAL", "NULL") else None

    def values(shape_, salt):
        x = rng(salt).standard_normal(shape_, dtype=np.float32)
        return x if t == "fp32" else to_bits(x, dt)

    def lut():
        perm = rng(3).permutation(pb["num_pages"] - 1).astype(np.int32)
        table = np.full((B, pb["max_pages"]), pb["num_pages"] - 1, np.int32)
        table[:, :npg] = perm[:B * npg].reshape(B, npg)
        return table

    name = DTYPE_NAMES[t]
    inputs = {
        "q": {"key": ("pq", B, S, nh, d, t, seed), "make": lambda: values((pb["T"], nh, d), 1),
              "dtype": name},
        "blocks": {"key": ("pblocks", shape, t, seed), "make": lambda: values(shape, 2),
                   "dtype": name},
        "lut": {"key": ("plut", B, S, page, seed), "make": lut, "dtype": "int32"},
        "offs": {"key": ("poffs", B, S), "make": lambda: np.arange(B + 1, dtype=np.int32) * S,
                 "dtype": "int32"},
        "clen": {"key": ("pclen", B), "make": lambda: np.zeros(B, np.int32), "dtype": "int32"},
    }
    scale = d ** -0.5
    as64 = (lambda x: x.astype(np.float64)) if t == "fp32" else \
        (lambda x: from_bits(x, dt).astype(np.float64))

    def check(outputs, host) -> float:
        raw = outputs["out"]
        got_all = raw.view(np.float32) if t == "fp32" else from_bits(raw.reshape(-1), dt)
        if not np.all(np.isfinite(got_all)):
            return float("inf")
        got_all = np.asarray(got_all, np.float64).reshape(pb["T"], nh, d)
        b, heads = B - 1, (0, nh - 1)
        rows = np.unique(np.concatenate([rng(5).choice(S, size=min(S, 62), replace=False),
                                         [0, S - 1]]))
        key = (inputs["q"]["key"], inputs["blocks"]["key"], facts["mask"], facts["window"])
        if key not in _REFERENCES:
            pages = host["lut"][b, :npg]
            kv = as64(host["blocks"][pages])                       # [npg, 2, 1, page, nkv, d]
            k = kv[:, 0, 0].reshape(npg * page, nkv, d)[:S]
            v = kv[:, 1, 0].reshape(npg * page, nkv, d)[:S]
            q = as64(host["q"][b * S + rows])                     # [rows, nh, d]
            ok = am.attention_mask(am._mask_variant(facts["mask"].lower()), rows, np.arange(S),
                                   window)
            want = []
            for h in heads:
                g = h // (nh // nkv)
                p = am._masked_softmax(q[:, h] @ k[:, g].T * scale, ok)
                want.append(p @ v[:, g])
            if len(_REFERENCES) >= 4:
                _REFERENCES.pop(next(iter(_REFERENCES)))
            _REFERENCES[key] = np.stack(want, 1)
        want = _REFERENCES[key]
        got = got_all[b * S + rows][:, list(heads)]
        return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))

    ints = {"max_pages": pb["max_pages"], "layer": 0, "num_layers": 1,
            "num_pages": pb["num_pages"], "window": facts["window"], "scale": scale,
            "T": pb["T"]}
    return {"inputs": inputs, "outputs": {"out": {"shape": (pb["T"], nh * d), "dtype": name}},
            "ints": ints, "check": check}
