"""Every paged decode config compiles offline (no GPU) to an sm_90 cubin: it fits Hopper's
shared memory, does not spill, holds the CTAs per SM its split rule assumes, and takes the load
path it names (TMA bulk copies or cp.async). Run with -s to see the resource table."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import RESOURCES, run_compiled_mode

SCRIPT = RESOURCES + r"""
import json, os, re, subprocess, tempfile
import triton
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import paged_decode as pd, paged_decode_config as cfg

# (label, (n_heads, n_kv_heads, head_dim, page, dtype, mask, q_per_seq), config or None)
jobs = [(f"cand{i}", (32, 8, 128, 128, "bfloat16", "CAUSAL", 1), c)
        for i, c in enumerate(cfg.CANDIDATES)]
jobs += [("default_p16", (32, 8, 128, 16, "bfloat16", "CAUSAL", 1), None),
         ("default_p32_swc", (32, 8, 128, 32, "bfloat16", "SLIDING_WINDOW_CAUSAL", 1), None),
         ("default_g4_q8", (32, 8, 128, 256, "bfloat16", "CAUSAL", 8), None),
         ("default_g8_q8", (64, 8, 128, 128, "float16", "CAUSAL", 8), None),
         ("h4_tiles_p16", (32, 8, 128, 16, "bfloat16", "CAUSAL", 1),
          cfg.make_config(16, 1, 0, 4, 5, 3, heads=4)),
         ("h2_gather_p16", (32, 8, 128, 16, "bfloat16", "CAUSAL", 1),
          cfg.make_config(32, 0, 0, 4, 5, 3, heads=2)),
         ("h2_g8_q2", (64, 8, 128, 128, "bfloat16", "CAUSAL", 2),
          cfg.make_config(32, 1, 0, 4, 5, 2, heads=2)),
         # A merging config at tests/gpu/family.py's tiny shape (head dim 16, GQA 2): its
         # partition loop is unrolled by MERGE_UNROLL_MAX, not by 128 (a 166 s compile).
         ("merge_tiny", (4, 2, 16, 4, "bfloat16", "CAUSAL", 1),
          cfg.make_config(16, 1, 0, 4, 3, 2, merge=1))]
out = {}
for label, shape, conf in jobs:
    main, reduce = pd.aot_specs(*shape, config=conf)
    c = aot.compile_spec(main)
    allocs = re.findall(r"ttg.local_alloc\s*:\s*\(\)\s*->\s*!ttg.memdesc<(\d+)x\d+x\d+x", c.ttgir)
    out[label] = dict(config=main.extra["config"], consts=dict(main.constexprs),
                      shared=c.shared, magic=c.cubin[:4].hex(), res=resources(c.cubin),
                      gscratch=c.global_scratch_size, bulk=c.ptx.count("cp.async.bulk.tensor"),
                      cp_async=c.ptx.count("cp.async.cg") + c.ptx.count("cp.async.ca"),
                      tile_buffers=sorted({int(a) for a in allocs}),
                      occupancy=None)
r = aot.compile_spec(reduce)
out["reduce"] = dict(shared=r.shared, magic=r.cubin[:4].hex(), res=resources(r.cubin))
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_compiled_mode(SCRIPT, tmp_path_factory, timeout=900)


def test_every_config_builds_and_fits(compiled, capsys):
    from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg

    rows = []
    for label, info in compiled.items():
        assert info["magic"] == "7f454c46", label
        assert 0 < info["shared"] <= 227 * 1024, label
        if info["res"] is None:
            continue
        regs, stack, local = info["res"]
        assert local == 0 and stack == 0, f"{label} spills: {info['res']}"
        if label == "reduce":
            continue
        conf = info["config"]
        occ = cfg.occupancy(info["shared"], regs, conf["num_warps"])
        # The split rule's slots exist (head_dim 128: candidates for one token per sequence,
        # the defaults for theirs).
        assert conf["ctas_per_sm"] <= occ, (label, conf, info["shared"], regs)
        rows.append(f"{label:16s} BN{conf['BLOCK_N']:<4d}tiles={info['consts']['PAGED_TILES']} "
                    f"tma={conf['TMA']} w{conf['num_warps']} s{conf['num_stages']} "
                    f"BM{info['consts']['BLOCK_M']:<3d} regs={regs:<4d} spills=0 "
                    f"shared={info['shared']:<7d} ctas/SM={occ} assumed={conf['ctas_per_sm']}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


def test_load_paths_and_pipelining(compiled):
    for label, info in compiled.items():
        if label == "reduce":
            continue
        conf, consts = info["config"], info["consts"]
        if consts["TMA"]:
            assert info["bulk"] > 0 and info["gscratch"] > 0, label
        else:
            assert info["bulk"] == 0 and info["gscratch"] == 0 and info["cp_async"] > 0, label
        # K and V stay (num_stages - 1) // 2 tiles deep under mma.sync (query tiles of 16 and
        # 32 rows): the page lookup takes the other stages. wgmma (64 rows) pipelines deeper.
        want = max(1, (conf["num_stages"] - 1) // 2)
        if consts["BLOCK_M"] <= 32:
            assert info["tile_buffers"] == [want], (label, info)
        else:
            assert info["tile_buffers"][0] >= want, (label, info)
