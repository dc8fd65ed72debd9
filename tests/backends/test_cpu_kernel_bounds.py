"""Defence in depth: the compiled CPU kernels keep every address that depends on ragged/paged
metadata inside its buffer even when the runtime's host checks are bypassed (a bug, or a caller
of the library below the checks). Out-of-range page ids, positions past the lookup table and
the RoPE table, huge cache lengths and non-monotone offsets must neither crash the process nor
write outside the cache: the blocks array lies inside a larger one whose guard pages must come
back unchanged. Each family runs in a subprocess, so a segfault fails one test cleanly.

Valid inputs keep their results: test_cpu_attention.py and test_cpu_mla.py compare the same
kernels with the interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

ROOT = Path(__file__).resolve().parents[2]
NH, NKV, D, PS, LAYERS, PAGES, ROPE_ROWS = 4, 2, 16, 4, 2, 12, 24
GUARD = 12345.0
U32_MAX = 0xFFFFFFFF


def _attention_graph():
    from graphir import BufferType, DType, Graph, TensorType, ops
    f32, u32 = DType.float32, DType.uint32
    types = [TensorType(f32, ["t", (NH + 2 * NKV) * D]), TensorType(f32, [ROPE_ROWS, D]),
             BufferType(f32, ["pages", 2, LAYERS, PS, NKV, D]), TensorType(u32, ["batch + 1"]),
             TensorType(u32, ["batch"]), TensorType(u32, ["batch", "max_pages"])]
    with Graph("bounds_attention", input_types=types) as g:
        qkv, freqs, blocks, offs, clen, lut = g.inputs
        q = ops.rope_split_store(qkv, freqs, offs, clen, lut, blocks, n_heads=NH, n_kv_heads=NKV,
                                 head_dim=D, layer_idx=1, interleaved=False)
        q2 = ops.reshape(q, [-1, NH * D])
        r = ops.rope(q2, freqs, offs, clen, head_dim=D, interleaved=True)
        ops.kv_cache_store(q2[:, :NKV * D], blocks, offs, clen, lut, kind=0, layer_idx=0)
        outs = [ops.flash_attention_ragged(q2, blocks, offs, clen, lut, n_heads=NH,
                                           n_kv_heads=NKV, head_dim=D, layer_idx=1,
                                           mask_variant=m) for m in ("causal", "null")]
        g.output(r, *outs)
    return g


def _attention_inputs(rng):
    """Two sequences: 20 new rows (full blocks and a tail) after 3 cached, 3 after 6."""
    counts, cached = [20, 3], [3, 6]
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    lut = np.array([[0, 5, 2, 7, 9, 11], [3, 1, 4, 11, 11, 11]], np.uint32)
    t = int(offs[-1])
    from graphir.ops.rope_math import rope_freqs_cis
    return {"qkv": rng.standard_normal((t, (NH + 2 * NKV) * D)).astype(np.float32),
            "freqs": rope_freqs_cis(D, ROPE_ROWS // 2, 10000.0).astype(np.float32),
            "blocks": (PAGES, 2, LAYERS, PS, NKV, D),
            "offs": offs, "clen": np.array(cached, np.uint32), "lut": lut}


def _mla_graph():
    from graphir import BufferType, DType, Graph, TensorType, ops
    from tests.nn.harness import LAYERS as ML, PAGE as MP
    f32, u32 = DType.float32, DType.uint32
    nh, nope, rope, v, r = 3, 8, 6, 5, 16
    types = [TensorType(f32, ["t", nh * (nope + rope)]), TensorType(f32, ["t", r + rope]),
             TensorType(f32, [r]), TensorType(f32, [64, rope]), TensorType(u32, ["b + 1"]),
             TensorType(u32, ["b"]), TensorType(u32, ["b", "p"]),
             BufferType(f32, ["n", 1, ML, MP, 1, r + rope]), TensorType(f32, [nh * nope, r]),
             TensorType(f32, [nh, nope, r]), TensorType(f32, [nh, r, v])]
    with Graph("bounds_mla", input_types=types) as g:
        qv, kvv, wn, f, o, c, lt, b, wk, wuk, wuv = g.inputs
        ops.mla_cache_store(kvv, wn, f, o, c, lt, b, kv_lora_rank=r, qk_rope_head_dim=rope,
                            layer_idx=1, interleaved=True)
        dims = dict(n_heads=nh, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
                    kv_lora_rank=r, layer_idx=1, scale=0.21)
        plan = ops.mla_prefill_plan(o, c)
        g.output(ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=4, **dims),
                 ops.mla_decode(qv, b, o, c, lt, wuk, wuv, **dims),
                 ops.mla_prefill(qv, b, o, c, lt, wk, wuv, buffer_size=3, prefill_metadata=plan,
                                 **dims),
                 ops.mla_attention(qv, b, o, c, lt, wuk, wuv, buffer_size=2, absorb_max=4,
                                   prefill_metadata=plan, **dims))
    return g


def _mla_inputs(rng):
    from tests.nn.harness import mla_op_inputs
    names = ("q", "kv", "normw", "freqs", "offs", "clen", "lut", "blocks", "w_k", "w_uk", "w_uv")
    vals = dict(zip(names, mla_op_inputs(rng, 1, nh=3, nope=8, rope=6, v=5, r=16,
                                         kv_b_scale=0.3)))
    vals["blocks"] = vals["blocks"].shape
    return vals


FAMILIES = {"attention": (_attention_graph, _attention_inputs),
            "mla": (_mla_graph, _mla_inputs)}


def _bad_metadata(name: str, meta: dict, rows: int, rng) -> dict:
    """Metadata that the host checks refuse, with the shapes kept valid."""
    offs, clen, lut = (meta[k].copy() for k in ("offs", "clen", "lut"))
    pages = meta["pages"]
    if name == "page_ids_huge":
        lut[:] = U32_MAX
    elif name == "page_ids_past_pool":
        lut[0, 0], lut[-1, :] = pages, pages + 3
    elif name == "cache_lengths_huge":
        clen[:] = [U32_MAX - 7] + [1000] * (len(clen) - 1)
    elif name == "positions_past_tables":
        clen[:] = 50   # past the lookup table's pages and the RoPE table
    elif name == "offsets_not_monotone":
        offs[:] = [rows + 40, 2] + [U32_MAX] * (len(offs) - 2)
    elif name == "offsets_descending":
        offs[:] = np.arange(len(offs))[::-1] * 3
    elif name.startswith("random"):
        offs, clen, lut = (rng.integers(0, U32_MAX, a.shape, dtype=np.uint64).astype(np.uint32)
                           for a in (offs, clen, lut))
    else:
        raise ValueError(name)
    return {"offs": offs, "clen": clen, "lut": lut}


CASES = ("page_ids_huge", "page_ids_past_pool", "cache_lengths_huge", "positions_past_tables",
         "offsets_not_monotone", "offsets_descending", "random1", "random2", "random3")


class _NoCheck:
    """Stands in for the executor's DimCheck / RaggedCheck (test only): the kernels get the
    metadata unchecked, as a caller of the library below the runtime would pass it."""

    def check(self, *args):
        pass


def _child(family: str) -> None:
    """Load the family's graph, then call it with the host checks off on each bad case."""
    from graphir.runtime.session import InferenceSession
    build, make = FAMILIES[family]
    rng = np.random.default_rng(7)
    graph = build()
    vals = make(rng)
    order = list(vals)
    shape = vals["blocks"]
    big = rng.standard_normal((shape[0] + 4,) + shape[1:]).astype(np.float32)
    big[:2] = big[-2:] = GUARD
    model = InferenceSession().load(graph, weights={})

    def call(meta, checked):
        blocks = big[2:-2]   # the kernels see this view; guard pages on both sides
        args = [blocks if k == "blocks" else meta.get(k, vals[k]) for k in order]
        if not checked:
            model._checks = (_NoCheck(), _NoCheck())
        return model.execute(*args)

    base = big.copy()
    ref = call({}, True)
    written = big.copy()
    big[:] = base
    same = call({}, False)   # the bypass itself changes nothing for valid metadata
    for a, b in zip(ref, same):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(big, written)
    assert not np.array_equal(written, base)   # the stores did write the cache
    meta = {k: vals[k] for k in ("offs", "clen", "lut")}
    meta["pages"] = shape[0]
    rows = vals[order[0]].shape[0]
    report = {}
    for case in CASES:
        bad = _bad_metadata(case, meta, rows, rng)
        model._checks = None
        try:
            call(bad, True)
            refused = False
        except ValueError:
            refused = True
        big[:] = base
        call(bad, False)
        guards = bool((big[:2] == GUARD).all() and (big[-2:] == GUARD).all())
        report[case] = {"refused": refused, "guards_intact": guards}
        print(f"{case}: {report[case]}", file=sys.stderr, flush=True)
    print(json.dumps(report))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernels_stay_in_bounds_without_host_checks(family):
    code = f"from tests.backends.test_cpu_kernel_bounds import _child; _child({family!r})"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"the kernels crashed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(report) == set(CASES)
    for case, r in report.items():
        assert r["refused"], f"{case}: the host checks should refuse this metadata"
        assert r["guards_intact"], f"{case}: a kernel wrote outside the cache blocks"
