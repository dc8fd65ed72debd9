"""cuBLASLt algorithms as data: the heuristic's ranked list, and records that pin one algorithm.

cuBLASLt's heuristic ranks algorithms by a model, not by measurement, and its first choice is
not always the fastest (on an H200 at M=8192 it was 5-9% slower than torch's cuBLAS for some
weights and 5% faster for others). The tuner therefore times the first `RANKS` entries of the
list and a manifest may pin the winner for its bucket of row counts. A pin is a record:

    {"index": i, "at_m": M, "align": bytes,          # rank i of the list for M rows
     "version": v, "bytes": hex,                     # the opaque struct, valid for version v
     "config": {"id": .., "tile": .., ...}}          # its config attributes, portable

NVIDIA documents `cublasLtMatmulAlgo_t` as trivially serializable for reuse with the same
library version, so `bytes` is used when the loaded library has version `version`; another
version rebuilds the algorithm from `config` (cublasLtMatmulAlgoInit + config attributes); a
record with neither takes rank `index` of the serving library's own list for `at_m`. Every
restored algorithm is validated per row count with cublasLtMatmulAlgoCheck before use.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, byref, c_float, c_int, c_size_t, c_uint16, c_uint32, c_uint64

RANKS = 8                      # heuristic ranks worth timing (the list rarely helps past this)
SUCCESS = 0


class Algo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: 8 opaque 64-bit words."""

    _fields_ = [("data", c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""

    _fields_ = [("algo", Algo), ("workspaceSize", c_size_t), ("state", c_int),
                ("wavesCount", c_float), ("reserved", c_int * 4)]


# cublasLtMatmulAlgoConfigAttributes_t: (record key, attribute id, C type). The library checks
# the size of every get/set, so the types must match the header exactly.
CONFIG_ATTRS = (("id", 0, ctypes.c_int32), ("tile", 1, c_uint32), ("splitk", 2, c_uint32),
                ("reduction", 3, c_uint32), ("swizzle", 4, c_uint32), ("custom", 5, c_uint32),
                ("stages", 6, c_uint32), ("inner_shape", 7, c_uint16),
                ("cluster_shape", 8, c_uint16))

PROTOTYPES = {
    "cublasLtMatmulAlgoCheck": (c_int, [ctypes.c_void_p] * 6 + [POINTER(Algo),
                                                                 POINTER(Heuristic)]),
    "cublasLtMatmulAlgoInit": (c_int, [ctypes.c_void_p] + [c_int] * 7 + [POINTER(Algo)]),
    "cublasLtMatmulAlgoConfigSetAttribute": (c_int, [POINTER(Algo), c_int, ctypes.c_void_p,
                                                      c_size_t]),
    "cublasLtMatmulAlgoConfigGetAttribute": (c_int, [POINTER(Algo), c_int, ctypes.c_void_p,
                                                      c_size_t, POINTER(c_size_t)]),
}


def to_hex(algo: Algo) -> str:
    return bytes(algo).hex()


def from_hex(text: str) -> Algo:
    raw = bytes.fromhex(text)
    if len(raw) != ctypes.sizeof(Algo):
        raise ValueError(f"a cuBLASLt algorithm is {ctypes.sizeof(Algo)} bytes, got {len(raw)}")
    return Algo.from_buffer_copy(raw)


def read_config(lib, algo: Algo) -> dict:
    """The algorithm's config attributes; ones this library version lacks are left out."""
    out = {}
    for key, attr, ctype in CONFIG_ATTRS:
        v, written = ctype(), c_size_t(0)
        if lib.cublasLtMatmulAlgoConfigGetAttribute(byref(algo), attr, byref(v),
                                                    ctypes.sizeof(v), byref(written)) == SUCCESS:
            out[key] = int(v.value)
    return out


def from_config(lib, handle: int, types: tuple, config: dict) -> Algo | None:
    """cublasLtMatmulAlgoInit(config["id"]) with the other attributes set; None if refused.

    types: (compute type, scale type, A, B, C, D data types), as for the matmul descriptor."""
    algo = Algo()
    if "id" not in config or lib.cublasLtMatmulAlgoInit(
            ctypes.c_void_p(handle), *types, int(config["id"]), byref(algo)) != SUCCESS:
        return None
    for key, attr, ctype in CONFIG_ATTRS[1:]:
        if key in config:
            v = ctype(int(config[key]))
            if lib.cublasLtMatmulAlgoConfigSetAttribute(byref(algo), attr, byref(v),
                                                        ctypes.sizeof(v)) != SUCCESS:
                return None
    return algo


def check(lib, handle: int, desc: int, layouts: tuple, algo: Algo, ws_size: int) -> bool:
    """Can `algo` run this problem (layouts: A, B, C, D) within the workspace?"""
    res = Heuristic()
    st = lib.cublasLtMatmulAlgoCheck(ctypes.c_void_p(handle), ctypes.c_void_p(desc),
                                     *[ctypes.c_void_p(x) for x in layouts], byref(algo),
                                     byref(res))
    return st == SUCCESS and res.state == SUCCESS and res.workspaceSize <= ws_size


def validate_record(rec) -> dict:
    """`rec` if it is a well-formed record (see the module docstring); ValueError otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"a cuBLASLt algorithm record is a mapping, got {rec!r}")
    for key in ("index", "at_m"):
        v = rec.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "index" else 1):
            raise ValueError(f"cuBLASLt algorithm record: {key!r} must be an int >= "
                             f"{0 if key == 'index' else 1}, got {v!r}")
    if "bytes" in rec:
        from_hex(rec["bytes"])
        if not isinstance(rec.get("version"), int):
            raise ValueError("cuBLASLt algorithm record: 'bytes' needs the library 'version'")
    cfg = rec.get("config", {})
    if not isinstance(cfg, dict) or not all(isinstance(v, int) for v in cfg.values()):
        raise ValueError(f"cuBLASLt algorithm record: 'config' must map names to ints, got "
                         f"{cfg!r}")
    return rec


def describe(rec: dict) -> str:
    """One line for logs and `graphir inspect`: rank, tile/stages/split/cluster ids."""
    c = rec.get("config", {})
    parts = [f"{k}={c[k]}" for k in ("id", "tile", "stages", "splitk", "cluster_shape") if k in c]
    return f"rank {rec.get('index')} at M={rec.get('at_m')}" + (f" ({', '.join(parts)})"
                                                                 if parts else "")
