"""The paged decode kernels on the CPU (Triton's interpreter, see conftest.py) against the
float64 reference of flash_attention_ragged, and their split rule in Python and as plan data."""

import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import paged_decode as pd
from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg
from graphir.ops import attention_math as am
from graphir.runtime.cuda.plan_values import evaluate

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

D, NKV, LAYERS, LAYER = 16, 2, 2, 1
MASKS = {"CAUSAL": "causal", "NULL": "null", "SLIDING_WINDOW_CAUSAL": "sliding_window_causal",
         "SLIDING_WINDOW_NONCAUSAL": "sliding_window_noncausal",
         "CHUNKED_CAUSAL": "chunked_causal"}


def paged_problem(rng, new_lens, cache_lens, page_size, nh, dtype, nkv=NKV):
    """Random q and cache; page slots no sequence owns hold NaN, so reading past a sequence's
    keys (or into another's pages) poisons the output."""
    batch = len(new_lens)
    offs = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    total = [c + n for c, n in zip(cache_lens, new_lens)]
    need = [-(-t // page_size) for t in total]
    num_pages = sum(need) + 2
    perm = rng.permutation(num_pages)
    lut = np.full((batch, max(need + [1]) + 1), perm[-1], dtype=np.int64)
    blocks = np.full((num_pages, 2, LAYERS, page_size, nkv, D), np.nan)
    used = 0
    for b, t in enumerate(total):
        lut[b, :need[b]] = perm[used:used + need[b]]
        used += need[b]
        for p in range(t):
            blocks[lut[b, p // page_size], :, :, p % page_size] = rng.standard_normal(
                (2, LAYERS, nkv, D))
    q = rng.standard_normal((int(offs[-1]), nh, D))
    u32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).view(torch.uint32)
    return dict(q=torch.from_numpy(q).to(dtype), blocks=torch.from_numpy(blocks).to(dtype),
                offs=offs, lut=lut, cache=np.asarray(cache_lens), offs_t=u32(offs),
                cache_t=u32(cache_lens), lut_t=u32(lut))


def reference(pb, mask, window):
    q = pb["q"].to(torch.float64).numpy()
    blocks = pb["blocks"].to(torch.float64).numpy()
    out = am.flash_attention_ragged(q, blocks, layer_idx=LAYER, input_row_offsets=pb["offs"],
                                    cache_lengths=pb["cache"], lookup_table=pb["lut"],
                                    mask_variant=MASKS[mask], window=window or None,
                                    scale=D ** -0.5)
    return out.reshape(q.shape[0], -1)


def rel_err(got, want):
    g = got.to(torch.float64).numpy()
    assert np.isfinite(g).all(), "NaN/inf in the output: a read outside the sequence's keys"
    return float(np.linalg.norm(g - want) / np.linalg.norm(want))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
C = cfg.make_config
# (id, group, page, q_per_seq, new tokens, cache lengths, mask, window, config, num_parts, dtype)
# [, KV heads]
CASES = [
    ("g4_p16_gather_split3", 4, 16, 1, [1, 1, 1, 0], [0, 37, 100, 5], "CAUSAL", 0,
     C(32, 0, 0, 4, 3, 2), 3, torch.float32),
    ("g8_p16_tiles_q2", 8, 16, 2, [2, 1, 2], [0, 45, 70], "CAUSAL", 0,
     C(16, 1, 0, 4, 3, 2), 1, torch.float32),
    ("g4_p64_tiles_q4_many_parts", 4, 64, 4, [4, 1, 3], [70, 200, 1], "CAUSAL", 0,
     C(16, 1, 0, 4, 3, 2), 18, torch.float32),
    ("g8_p128_tma_q4", 8, 128, 4, [3, 4, 1], [130, 0, 255], "CAUSAL", 0,
     C(32, 1, 1, 4, 3, 2), 2, torch.float32),
    ("g4_p256_tma_bf16", 4, 256, 1, [1, 1, 1], [300, 0, 77], "CAUSAL", 0,
     C(64, 1, 1, 4, 3, 2), 4, torch.bfloat16),
    ("g8_p64_swc_q2", 8, 64, 2, [2, 2, 1], [150, 10, 90], "SLIDING_WINDOW_CAUSAL", 37,
     C(16, 1, 0, 4, 3, 2), 5, torch.float32),
    ("g4_p32_swnc_order1", 4, 32, 1, [1, 1], [99, 40], "SLIDING_WINDOW_NONCAUSAL", 50,
     C(16, 1, 0, 4, 3, 2, order=1), 3, torch.float32),
    ("g4_p16_chunked_q4", 4, 16, 4, [4, 2], [61, 30], "CHUNKED_CAUSAL", 24,
     C(32, 0, 0, 4, 3, 2), 2, torch.float32),
    ("g8_p128_null_bf16", 8, 128, 1, [1, 1], [129, 260], "NULL", 0,
     C(32, 1, 0, 4, 3, 2), 1, torch.bfloat16),
    ("g8_p32_q8_tall_tile", 8, 32, 8, [8, 5, 0], [33, 0, 9], "CAUSAL", 0,
     C(32, 1, 0, 4, 3, 2), 2, torch.float32),
    ("g4_p64_rule_small_branch", 4, 64, 1, [1, 1], [200, 250], "CAUSAL", 0,
     C(16, 1, 0, 4, 3, 1, min_part=32), None, torch.float32),
    # Several KV heads per program: tile rows are (key, head) pairs, cross-head scores masked.
    ("h2_g4_p16_tiles_split3", 4, 16, 1, [1, 1, 1, 0], [0, 37, 100, 5], "CAUSAL", 0,
     C(16, 1, 0, 4, 3, 2, heads=2), 3, torch.float32),
    ("h4_g2_p16_tiles_q2_4kv", 2, 16, 2, [2, 1, 2], [3, 60, 31], "CAUSAL", 0,
     C(4, 1, 0, 4, 3, 2, heads=4), 2, torch.float32, 4),
    ("h2_g4_p16_gather_q2_order1", 4, 16, 2, [2, 1, 1], [20, 37, 100], "CAUSAL", 0,
     C(32, 0, 0, 4, 3, 2, order=1, heads=2), 2, torch.float32),
    ("h2_g1_p32_swc_q4_4kv", 1, 32, 4, [4, 1, 3], [50, 37, 100], "SLIDING_WINDOW_CAUSAL", 21,
     C(8, 1, 0, 4, 3, 2, heads=2), 1, torch.float32, 4),
    ("h4_g4_p64_chunked_bf16_4kv", 4, 64, 1, [1, 1], [130, 7], "CHUNKED_CAUSAL", 40,
     C(16, 1, 0, 4, 3, 2, heads=4), 3, torch.bfloat16, 4),
    ("h2_g8_p128_null_rule", 8, 128, 1, [1, 1, 1], [129, 260, 0], "NULL", 0,
     C(16, 1, 0, 4, 3, 1, min_part=32, heads=2), None, torch.float32),
]


@pytest.mark.parametrize("merge", [False, True], ids=["reduce_kernel", "merged"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_the_float64_reference(case, merge):
    _, g, page, qps, new, cache, mask, window, conf, nparts, dtype, *kv = case
    if merge and nparts == 1:
        pytest.skip("one partition: nothing to merge")
    conf = dict(conf, MERGE=int(merge))
    nkv = kv[0] if kv else NKV
    rng = np.random.default_rng(abs(hash(case[0])) % 2**32)
    pb = paged_problem(rng, new, cache, page, g * nkv, dtype, nkv)
    got = pd.paged_decode(pb["q"], pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"],
                          LAYER, mask=mask, window=window, q_per_seq=qps, config=conf,
                          num_parts=nparts)
    assert got.dtype == dtype and got.shape == (sum(new), g * nkv * D)
    assert rel_err(got, reference(pb, mask, window)) < TOL[dtype]


@pytest.mark.parametrize("merge", [False, True], ids=["reduce_kernel", "merged"])
def test_merge_rescales_across_chunks_of_partitions(monkeypatch, merge):
    """More partitions than the merge reads at once (the reduce kernel: 16; the in-kernel
    merge: shrunk here to one row a round, unrolled by 2), and scores growing along the
    context, so later partitions hold larger maxima and earlier sums must be rescaled; two new
    tokens per sequence give the merge several row rounds."""
    monkeypatch.setattr(cfg, "MERGE_CHUNK_ROWS", 1)
    monkeypatch.setattr(cfg, "MERGE_ELEMS", 2 * D)
    rng = np.random.default_rng(21)
    pb = paged_problem(rng, [2, 1], [409, 150], 32, 4, torch.float32)
    ramp = torch.linspace(0, 3, 32, dtype=torch.float64).view(1, 1, 32, 1, 1)
    pb["blocks"][:, 0] += (ramp * pb["q"][0, 0].sum().sign()).to(torch.float32)
    got = pd.paged_decode(pb["q"], pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"],
                          LAYER, q_per_seq=2, config=C(16, 1, 0, 4, 3, 2, merge=int(merge)),
                          num_parts=27)
    assert rel_err(got, reference(pb, "CAUSAL", 0)) < 1e-5


def test_merge_leaves_the_group_counters_zero():
    """The in-kernel merge's tickets: each group's counter counts its partitions and the last
    taker resets it, so the same (pooled) counters serve the next launch."""
    rng = np.random.default_rng(8)
    pb = paged_problem(rng, [1, 1, 1], [300, 0, 77], 16, 8, torch.float32)
    conf = cfg.resolve(C(16, 1, 0, 4, 3, 2, merge=1), 8, NKV, D, 16, 1)
    nparts, part = 5, 64
    count = torch.zeros(3 * NKV, dtype=torch.int32)
    o_part = torch.empty(3 * 8 * nparts * D)
    ml_part = torch.empty(3 * 8 * nparts * 2)
    want = reference(pb, "CAUSAL", 0)
    for _ in range(2):
        out = torch.full((3, 8 * D), float("nan"))
        pd.paged_decode_kernel[(3 * NKV * nparts,)](
            pb["q"], pb["offs_t"].view(torch.int32), pb["cache_t"].view(torch.int32),
            pb["lut_t"].view(torch.int32), pb["blocks"], out, o_part, ml_part, count,
            pb["lut"].shape[1], LAYER, LAYERS, pb["blocks"].shape[0], 1, D ** -0.5, part,
            nparts, **cfg.constexprs(conf, 8, NKV, D, 16, 1, 1), SOFTCAP=0.0, num_warps=4,
            num_stages=3)
        assert rel_err(out, want) < 1e-5
        assert count.tolist() == [0] * (3 * NKV)


def test_the_rule_case_splits():
    """The small-grid branch of the rule gives the last case above several partitions."""
    conf = CASES[10][8]
    assert cfg.split(2, NKV, 252, conf) == (8, 32)
    # Two heads per program: half the programs, the same partitions (still one wave).
    assert cfg.split(3, NKV, 260, CASES[-1][8]) == (9, 32)


def test_too_many_new_tokens_and_bad_configs_are_clear_errors():
    rng = np.random.default_rng(3)
    pb = paged_problem(rng, [3, 1], [5, 9], 16, 8, torch.float32)
    args = (pb["q"], pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], LAYER)
    with pytest.raises(ValueError, match="3 new tokens, more than q_per_seq=2"):
        pd.paged_decode(*args, q_per_seq=2)
    with pytest.raises(ValueError, match="BLOCK_N and HEADS must be powers of two"):
        pd.paged_decode(*args, q_per_seq=4, config=C(48, 1, 0, 4, 3, 2))
    with pytest.raises(ValueError, match="BLOCK_N \\* HEADS >= 16"):
        pd.paged_decode(*args, q_per_seq=4, config=C(4, 1, 0, 4, 3, 2, heads=2))
    with pytest.raises(ValueError, match="HEADS=4 does not divide n_kv_heads=2"):
        pd.paged_decode(*args, q_per_seq=4, config=C(16, 1, 0, 4, 3, 2, heads=4))
    with pytest.raises(ValueError, match="TMA=1 needs HEADS=1"):
        pd.paged_decode(*args, q_per_seq=4, config=C(16, 1, 1, 4, 3, 2, heads=2))
    with pytest.raises(ValueError, match="TMA=1 needs PAGED_TILES=1"):
        pd.paged_decode(*args, q_per_seq=4, config=C(32, 0, 1, 4, 3, 2))
    with pytest.raises(ValueError, match="lacks"):
        pd.paged_decode(*args, q_per_seq=4, config={"BLOCK_N": 32})
    with pytest.raises(ValueError, match="num_parts must be >= 1"):
        pd.paged_decode(*args, q_per_seq=4, num_parts=0)


# ------------------------------------------------------------------ split rule
def plan_split(batch, nkv, kv_len, conf):
    env = {"batch": batch, "kv_len": kv_len}
    for name, expr in cfg.split_lets("batch", nkv, "kv_len", conf):
        env[name] = evaluate(expr, env)
    return env["pd_num_parts"], env["pd_part_size"]


def test_split_rule_plan_expressions_agree_with_python():
    rng = np.random.default_rng(0)
    for conf in cfg.CANDIDATES + [C(16, 1, 0, 4, 3, 1, min_part=32)]:
        for _ in range(150):
            batch, nkv = int(rng.integers(0, 300)), int(rng.choice([1, 2, 4, 8]))
            kv = int(rng.integers(0, 40000))
            assert plan_split(batch, nkv, kv, conf) == cfg.split(batch, nkv, kv, conf), \
                (batch, nkv, kv, conf)


@pytest.mark.parametrize("batch,kv", [(1, 4096), (16, 16384), (64, 4096), (128, 1024),
                                      (256, 512), (8, 32768), (3, 1), (40, 100000)])
def test_split_rule_covers_the_context_in_block_multiples(batch, kv):
    for conf in cfg.CANDIDATES:
        n, part = cfg.split(batch, 8, kv, conf)
        assert part % conf["BLOCK_N"] == 0 and part >= conf["BLOCK_N"]
        assert n * part >= kv and (n - 1) * part < max(kv, 1)
        assert n == 1 or part >= min(conf["min_part"], kv)


def test_split_rule_branches():
    conf = C(64, 1, 0, 4, 4, 2)                      # 264 slots
    # Small grids fill the slots once, each partition >= min_part keys.
    assert cfg.split(1, 8, 32768, conf) == (32, 1024)  # 33 wanted, whole blocks of 64
    assert cfg.split(1, 8, 4096, conf) == (16, 256)   # min_part limits
    assert cfg.split(16, 8, 16384, conf) == (2, 8192)
    # Over half a wave of units, up to one: no split (H200 run 1: one wave of 256 programs beat
    # 768 in 1.9 waves by 7%).
    assert cfg.split(20, 8, 8192, conf)[0] == 1       # 160 units, 264 slots
    assert cfg.split(32, 8, 8192, C(64, 1, 0, 4, 5, 3))[0] == 1   # 256 of 396
    assert cfg.split(64, 8, 4096, C(32, 1, 0, 4, 5, 3, heads=2))[0] == 1  # 256 programs
    assert cfg.split(64, 8, 4096, C(32, 1, 0, 4, 5, 4, heads=2))[0] == 2  # 256 of 528: fill
    # Between one and two waves: the fewest partitions with near-best wave efficiency.
    assert cfg.split(64, 8, 4096, conf)[0] == 1       # 512 of 528 slots
    assert cfg.split(64, 8, 4096, C(64, 1, 0, 4, 5, 3))[0] == 3   # 1536 of 1584
    assert cfg.split(40, 8, 256, conf)[0] == 1        # one min_part of keys: no split
    # Two waves or more: no split.
    assert cfg.split(128, 8, 1024, conf)[0] == 1
    assert cfg.split(256, 8, 32768, conf)[0] == 1


def test_q_buckets_and_tile_heights():
    assert cfg.q_buckets(32, 8) == [4, 8]          # group 4: 16 and 32 rows
    assert cfg.q_buckets(64, 8) == [2, 4, 8]       # group 8: 16, 32 and 64 rows
    assert cfg.q_buckets(4, 2) == [8]
    assert cfg.q_buckets(64, 2) == [1, 2]          # group 32: one token fills 32 rows
    assert cfg.q_buckets(128, 1) == [1]            # group 128: q = 1 only
    assert [cfg.block_m(64, 8, q) for q in (1, 2, 4, 8)] == [16, 16, 32, 64]
    assert cfg.block_m(128, 1, 1) == 128
    # The plan adds a one-token tile, where several KV heads per program fit 16 rows.
    assert cfg.q_tiles(32, 8) == [1, 4, 8] and cfg.q_tiles(128, 1) == [1]
    assert cfg.block_m(32, 8, 1, heads=4) == 16 and cfg.block_m(32, 8, 1, heads=8) == 32


def test_default_config_per_page_bucket():
    for page, bn, tiles in ((256, 64, 1), (128, 64, 1), (32, 32, 1), (16, 64, 0)):
        conf = cfg.resolve(None, 32, 8, 128, page, 1)
        assert (conf["BLOCK_N"], conf["PAGED_TILES"]) == (bn, tiles), page
    # A candidate whose blocks span pages falls back to the gather path.
    assert cfg.resolve(C(64, 1, 1, 4, 4, 2), 32, 8, 128, 16, 1)["PAGED_TILES"] == 0
    assert cfg.default_config(64, 8, 128, 128, 8)["num_warps"] == 8    # 64-row query tile
    names = [c["name"] for c in cfg.CANDIDATES]
    assert len(set(names)) == len(names) and names[1] == "n64tile_w4s5c3"
    assert cfg.resolve(cfg.CANDIDATES[1], 32, 8, 128, 16, 1)["name"] == "n64gather_w4s5c3"
