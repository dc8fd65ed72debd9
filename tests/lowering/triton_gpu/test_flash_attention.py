"""The prefill attention kernel on the CPU (Triton interpreter, see conftest.py) vs float64 numpy:
every mask, GQA, cached prefix, ragged batches with empty sequences, each K/V addressing mode
(per-row page gather, dense page tiles, TMA descriptor), head dims 16/64/128; plus its configs."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
from graphir.lowering.triton_gpu.kernels.paged import tile_order

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


def f64(x):
    return x.detach().to(torch.float64).numpy()


def allowed(mask, qp, kp, w):
    """[Q, K] boolean mask of the MHAMaskVariant semantics (positions, float64 reference)."""
    q, k = qp[:, None], kp[None, :]
    return {"NULL": np.ones_like(q - k, dtype=bool), "CAUSAL": k <= q,
            "SLIDING_WINDOW_CAUSAL": (k <= q) & (q - k < w),
            "SLIDING_WINDOW_NONCAUSAL": q - k < w,
            "CHUNKED_CAUSAL": (k <= q) & (k // max(w, 1) == q // max(w, 1))}[mask]


def attention_ref(q, blocks, lut, offs, cache_lens, layer, mask, window, scale):
    """q [T, NH, D] float64 attending over keys/values gathered from paged float64 blocks."""
    T, NH, D = q.shape
    NKV, PS = blocks.shape[4], blocks.shape[3]
    out = np.zeros((T, NH, D))
    for b in range(len(offs) - 1):
        n = offs[b + 1] - offs[b]
        kp = np.arange(cache_lens[b] + n)
        pages = lut[b, kp // PS]
        k, v = blocks[pages, 0, layer, kp % PS], blocks[pages, 1, layer, kp % PS]
        ok = allowed(mask, cache_lens[b] + np.arange(n), kp, window)
        for h in range(NH):
            g = h // (NH // NKV)
            s = np.where(ok, q[offs[b]:offs[b + 1], h] @ k[:, g].T * scale, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            out[offs[b]:offs[b + 1], h] = (p / p.sum(1, keepdims=True)) @ v[:, g]
    return out.reshape(T, NH * D)


def paged_problem(rng, new_lens, cache_lens, NKV, D, page_size, num_layers, dtype):
    """Random cache in shuffled pages (plus a spare page and a null page) and its metadata."""
    batch = len(new_lens)
    offs = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    total = [c + n for c, n in zip(cache_lens, new_lens)]
    max_pages = max(-(-t // page_size) for t in total) + 1
    num_pages = sum(-(-t // page_size) for t in total) + 2
    perm = rng.permutation(num_pages - 1)
    lut = np.full((batch, max_pages), num_pages - 1, dtype=np.int64)
    used = 0
    for b, t in enumerate(total):
        n = -(-t // page_size)
        lut[b, :n] = perm[used:used + n]
        used += n
    blocks = torch.from_numpy(rng.standard_normal(
        (num_pages, 2, num_layers, page_size, NKV, D))).to(dtype)
    u32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).view(torch.uint32)
    return dict(offs=offs, lut=lut, blocks=blocks, offs_t=u32(offs), cache_t=u32(cache_lens),
                lut_t=u32(lut), T=int(offs[-1]))

REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# mask, window, NH, NKV, new_lens, cache_lens. Lengths cross several 16-row blocks so that
# both the mask-free loop and the edge loop run; windows are not multiples of the blocks.
CASES = [
    ("CAUSAL", 0, 4, 2, [37, 0, 21], [19, 5, 0]),
    ("NULL", 0, 2, 1, [0, 20, 33], [3, 0, 17]),
    ("SLIDING_WINDOW_CAUSAL", 45, 4, 1, [50, 9], [13, 40]),
    ("SLIDING_WINDOW_NONCAUSAL", 37, 2, 2, [41], [30]),
    ("CHUNKED_CAUSAL", 32, 4, 2, [45, 12], [20, 50]),
]
# page size, USE_TMA with 16x16 tiles: gather (page < BLOCK_N), dense page tiles, TMA.
MODES = {"gather": (8, 0), "dense": (32, 0), "tma": (32, 1)}


def rel_err(got, want):
    return float(np.linalg.norm(f64(got) - want) / np.linalg.norm(want))


def run_case(case, page, dtype, config, D=16, layer=1, seed=0, scale=None, **kw):
    mask, window, NH, NKV, new_lens, cache_lens = case
    rng = np.random.default_rng(seed)
    pb = paged_problem(rng, new_lens, cache_lens, NKV, D, page, 2, dtype)
    # NaN in every slot past a sequence's cached length: a kernel reading them unmasked fails.
    for b, (c, n) in enumerate(zip(cache_lens, new_lens)):
        total = c + n
        for p in range(total, -(-total // page) * page):
            pb["blocks"][pb["lut"][b, p // page], :, :, p % page] = float("nan")
    q = torch.from_numpy(rng.standard_normal((pb["T"], NH, D))).to(dtype)
    scale = 0.7 / D ** 0.5 if scale is None else scale
    got = fa.flash_attention(q, pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], layer,
                             mask=mask, window=window, scale=scale, config=config, **kw)
    want = attention_ref(f64(q), f64(pb["blocks"]), pb["lut"], pb["offs"], cache_lens, layer,
                         mask, window, scale)
    return got, want


def small_config(tma, bm=16, bn=16):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_masks_and_addressing(case, mode):
    page, tma = MODES[mode]
    dtype = torch.bfloat16 if mode == "tma" else torch.float32
    got, want = run_case(case, page, dtype, small_config(tma), seed=len(case[0]) + page)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) < REL_TOL[dtype]


@pytest.mark.parametrize("D,page,mask", [(64, 64, "SLIDING_WINDOW_CAUSAL"), (128, 16, "CAUSAL"),
                                         (128, 128, "CAUSAL")])
def test_head_dims_with_default_tiles(D, page, mask):
    # The shipped tiles (128-row query blocks) on a batch whose cached prefixes are not
    # multiples of a block, one long enough for a mask-free key block.
    case = (mask, 100, 4, 2, [150, 7], [70, 129])
    cfg = fa.default_config(D, page, mask)
    got, want = run_case(case, page, torch.bfloat16, cfg, D=D, seed=D + page)
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("D,mask", [(128, "CAUSAL"), (128, "NULL"), (64, "CAUSAL")])
def test_default_config_over_many_key_blocks_and_pages(D, mask):
    # The shipped config (128-row query tiles, 64-key blocks, TMA, 128-token pages) on
    # sequences of several pages: a 333-token prompt (3 query tiles over 6 key blocks, so the
    # mask-free loop runs up to 4 blocks and the edge loop 2), a 40-token chunk after a
    # 300-token cached prefix, and an empty sequence. The GPU once got exactly this wrong while
    # tests with one key block passed.
    case = (mask, 0, 4, 2, [333, 40, 0], [0, 300, 17])
    cfg = fa.default_config(D, 128, mask)
    assert fa.config_tag(cfg) == "m128n64w8s3tmar128"
    got, want = run_case(case, 128, torch.bfloat16, cfg, D=D, seed=D + len(mask))
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]
    # Row by row too: one wrong tile among many must not hide in the overall norm.
    g, w = f64(got).reshape(len(want), -1), want
    per_row = np.linalg.norm(g - w, axis=1) / np.linalg.norm(w, axis=1)
    assert per_row.max() < 5e-2, int(per_row.argmax())


@pytest.mark.parametrize("mode", ["gather", "tma"])
def test_single_key_blocks_and_tile_sized_lengths(mode):
    # A tile whose keys fit one block runs the prologue and epilogue only (the block's V read
    # under the guard: NaN lies past the cached keys); lengths equal to whole tiles leave no
    # partial block.
    page, tma = MODES[mode]
    case = ("NULL", 0, 2, 1, [16, 5, 32, 9], [0, 0, 0, 7])
    got, want = run_case(case, page, torch.bfloat16, small_config(tma), seed=11)
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_longest_first_order(case):
    # The programs renumbered longest-first (LPT, paged.tile_order) compute the same thing.
    got, want = run_case(case, 32, torch.bfloat16, {**small_config(1), "LPT": 1}, seed=7)
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]


def test_ws_config_on_the_cpu_runs_its_triton_twin():
    # Gluon has no interpreter: a WS config (here with the longest-first order) on CPU tensors
    # runs the Triton kernel at the same tiles and order, and must still be right.
    cfg = fa.WS_CANDIDATES[64][1]
    assert cfg["WS"] and cfg["LPT"]
    case = ("CAUSAL", 0, 4, 2, [150, 7], [70, 129])
    got, want = run_case(case, 128, torch.bfloat16, cfg, D=64, seed=3)
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_persistent_programs_walk_many_tiles(case, mode):
    # The persistent form (flash_attention_persistent.py): 3 programs stride over every
    # (query tile, head, sequence) of the longest-first order, tiles past a short sequence's
    # rows included; each must land where the one-tile grid would have put it.
    page, tma = MODES[mode]
    cfg = {**small_config(tma), "PERSISTENT": 1}
    got, want = run_case(case, page, torch.bfloat16, cfg, seed=13, num_programs=3)
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_persistent_tiles_handed_out_at_run_time(case, mode):
    # DYN (flash_attention_persistent.py): 3 programs take their first tile by number and
    # every later one from the counter; each tile must be done once, and the last program out
    # leaves the counter at zero, so a second launch over the same counter is right too.
    page, tma = MODES[mode]
    cfg = {**small_config(tma), "PERSISTENT": 1, "DYN": 1}
    for seed in (17, 18):
        got, want = run_case(case, page, torch.bfloat16, cfg, seed=seed, num_programs=3)
        assert rel_err(got, want) < REL_TOL[torch.bfloat16]
        assert fa.zeroed_counter(got.device).tolist() == [0, 0]


def test_a_dirty_counter_would_show():
    # The test above can fail: a counter not at zero when a launch starts skips the tiles it
    # counts past (here the first wave's programs take their own tile, then find none left;
    # the rest of the output is whatever its fresh memory held. A seed no other test uses: a
    # buffer freed by an identical earlier run could hold the right answer).
    case = CASES[0]
    cfg = {**small_config(0), "PERSISTENT": 1, "DYN": 1}
    counter = fa.zeroed_counter(torch.device("cpu"))
    counter[0] = 1 << 20
    try:
        got, want = run_case(case, 32, torch.bfloat16, cfg, seed=4242, num_programs=3)
    finally:
        counter.zero_()
    assert not rel_err(got, want) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("name", ["m128n128w4s3tmawspersist",
                                  "m128n128w4s3tmawspersistdeepdynqtma",
                                  "m128n128w4s3tmawspersistdynqtmachain"])
def test_persistent_ws_config_on_the_cpu_runs_the_persistent_twin(name):
    # A persistent WS config on CPU tensors runs the persistent Triton kernel at its tiles
    # (and, for DYN, its tiles from the counter), at the plan's program count (NUM_SMS: here
    # more programs than tiles, so some have none).
    cfg = {k: v for k, v in fc.get(name).items() if k != "name"}
    assert cfg["WS"] and cfg["PERSISTENT"] and cfg in fa.WS_CANDIDATES[64]
    case = ("SLIDING_WINDOW_CAUSAL", 90, 4, 2, [150, 7, 300], [70, 129, 0])
    got, want = run_case(case, 128, torch.bfloat16, cfg, D=64, seed=5)
    assert rel_err(got, want) < REL_TOL[torch.bfloat16]


@triton.jit
def _tile_order_probe(out_ptr, NH: tl.constexpr, NKV: tl.constexpr, BLOCK_M: tl.constexpr,
                      GROUP_BYTES: tl.constexpr):
    pid_m, h, b = tile_order(NH, NKV, 16, BLOCK_M, 1, GROUP_BYTES)
    lin = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + NH * tl.program_id(2))
    tl.store(out_ptr + 3 * lin, pid_m)
    tl.store(out_ptr + 3 * lin + 1, h)
    tl.store(out_ptr + 3 * lin + 2, b)


@pytest.mark.parametrize("n_m,NH,NKV,batch,kv_heads", [(5, 6, 3, 2, 2), (3, 8, 8, 1, 3),
                                                       (4, 4, 1, 3, 1), (2, 6, 3, 2, 9)])
def test_longest_first_order_is_a_permutation_in_that_order(n_m, NH, NKV, batch, kv_heads):
    # Groups of `kv_heads` KV heads (GROUP_BYTES for exactly that many), a short last group
    # where they do not divide NKV, and more than NKV (one group).
    out = torch.full((n_m * NH * batch, 3), -1, dtype=torch.int32)
    _tile_order_probe[(n_m, NH, batch)](out, NH, NKV, 16, kv_heads * n_m * 16 * 16 * 4)
    tiles = [tuple(r) for r in out.tolist()]
    assert sorted(tiles) == [(m, h, b) for m in range(n_m) for h in range(NH)
                             for b in range(batch)]
    heads = min(kv_heads, NKV) * (NH // NKV)
    key = [(b, h // heads, n_m - 1 - m) for m, h, b in tiles]
    assert key == sorted(key)  # sequence, head group, then the longest tile first
    for i in range(len(tiles) - 1):  # heads fastest within a tile
        (m0, h0, b0), (m1, h1, b1) = tiles[i], tiles[i + 1]
        if (b0, h0 // heads, m0) == (b1, h1 // heads, m1):
            assert h1 == h0 + 1


def test_zero_scale_averages_the_allowed_values():
    # scale 0 is allowed: every allowed key weighs the same, masked ones still weigh nothing.
    case = ("SLIDING_WINDOW_CAUSAL", 21, 2, 1, [40, 3], [5, 30])
    got, want = run_case(case, 32, torch.float32, small_config(1), seed=5, scale=0.0)
    assert rel_err(got, want) < REL_TOL[torch.float32]


def test_block_overrides_and_half_precision():
    case = ("CAUSAL", 0, 2, 2, [18, 25], [9, 0])
    got, want = run_case(case, 16, torch.float16, small_config(1, bm=32, bn=16), seed=3)
    assert rel_err(got, want) < REL_TOL[torch.float16]


def test_empty_batch_and_all_empty_sequences():
    rng = np.random.default_rng(1)
    pb = paged_problem(rng, [0, 0], [4, 9], 1, 16, 8, 1, torch.float32)
    q = torch.randn(0, 2, 16)
    out = fa.flash_attention(q, pb["offs_t"], pb["cache_t"], pb["lut_t"], pb["blocks"], 0)
    assert out.shape == (0, 32)


def test_every_candidate_is_a_valid_config():
    for d in (16, 64, 128, 256):
        cands = fa.candidates(d, 128)
        for c in cands:
            fa.check_config(c, d)
        # The shipped default is one of the configs the tuner times (so CI compiles it).
        assert fa.default_config(d, 128, "CAUSAL") in cands, d
    # A page smaller than the key block cannot use TMA; the duplicates collapse.
    small = fa.candidates(128, 16)
    assert all(c["USE_TMA"] == 0 for c in small)
    assert len({tuple(sorted(c.items())) for c in small}) == len(small)
    assert fa.default_config(128, 16, "CAUSAL")["USE_TMA"] == 0
    assert fa.default_config(128, 128, "CAUSAL", "float32")["BLOCK_M"] == 64


def test_bad_arguments_are_clear_errors():
    u = torch.zeros(2, dtype=torch.int32)
    blocks = torch.randn(2, 2, 1, 4, 2, 16)
    with pytest.raises(ValueError, match="needs window > 0"):
        fa.flash_attention(torch.randn(1, 2, 16), u, u[:1], u[None], blocks, 0,
                           mask="SLIDING_WINDOW_CAUSAL")
    with pytest.raises(ValueError, match="lacks"):
        fa.flash_attention(torch.randn(1, 2, 16), u, u[:1], u[None], blocks, 0,
                           config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        fa.check_config(small_config(0, bn=24), 16)
    with pytest.raises(ValueError, match="scale >= 0"):
        fa.flash_attention(torch.randn(1, 2, 16), u, u[:1], u[None], blocks, 0, scale=-0.5)
    with pytest.raises(ValueError, match="unknown mask"):
        fa.default_config(128, 128, "DIAGONAL")
