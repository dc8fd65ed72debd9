"""The attention kernel ops compiled for the CPU match the interpreter: rope (both pairings),
kv_cache_store, rope_split_store (with and without q/k norm), flash_attention_ragged with every
mask over ragged batches with cached prefixes, an empty sequence and GQA (both kernel paths,
for AVX2 and AVX-512 register blocks); and the tiny Llama
layer running prefill, decode and chunked-prefill steps through the paged cache."""
import copy

import numpy as np
import pytest

from graphir import ops
from graphir import BufferType, DType, Graph, TensorType
from graphir.ops.attention_math import MASK_VARIANTS
from graphir.ops.rope_math import rope_freqs_cis
from graphir.runtime.interpreter import run

from .harness import assert_matches_interpreter, cpu_runs as _cpu_runs

pytest.importorskip("mlir.ir")

NH, NKV, D, PS, LAYERS, PAGES = 4, 2, 16, 4, 2, 24
WINDOWED = ("sliding_window_causal", "sliding_window_noncausal", "chunked_causal")


def _meta_types(dt=DType.float32, nkv=NKV, d=D):
    return [BufferType(dt, ["pages", 2, LAYERS, PS, nkv, d]), TensorType(DType.uint32, ["batch + 1"]),
            TensorType(DType.uint32, ["batch"]), TensorType(DType.uint32, ["batch", "max_pages"])]


def _ragged(rng, counts, cached, dt=np.float32, nkv=NKV, d=D):
    """Blocks (random everywhere, so stale pages are visible), offsets, cache lengths and a
    shuffled page table whose unused entries point at the last page."""
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    need = [-(-(c + n) // PS) for c, n in zip(cached, counts)]
    lut = np.full((len(counts), max(need)), PAGES - 1, np.uint32)
    perm, k = rng.permutation(PAGES - 1), 0
    for b, n in enumerate(need):
        lut[b, :n] = perm[k:k + n]
        k += n
    blocks = rng.standard_normal((PAGES, 2, LAYERS, PS, nkv, d)).astype(dt)
    return blocks, offs, np.array(cached, np.uint32), lut


@pytest.mark.parametrize("interleaved,qk_norm", [(False, False), (True, True)])
def test_rope_store_ops(interleaved, qk_norm):
    rng = np.random.default_rng(int(interleaved))
    f32 = DType.float32
    types = [TensorType(f32, ["t", (NH + 2 * NKV) * D]), TensorType(f32, [64, D])] + _meta_types()
    if qk_norm:
        types += [TensorType(f32, [D]), TensorType(f32, [D])]
    with Graph("rope_store", input_types=types) as g:
        qkv, freqs, blocks, offs, clen, lut = g.inputs[:6]
        norm = dict(q_norm_weight=g.inputs[6], k_norm_weight=g.inputs[7], qk_norm_eps=1e-5) \
            if qk_norm else {}
        q = ops.rope_split_store(qkv, freqs, offs, clen, lut, blocks, n_heads=NH, n_kv_heads=NKV,
                                 head_dim=D, layer_idx=1, interleaved=interleaved, **norm)
        k = ops.rope(q, freqs, offs, clen, head_dim=D, interleaved=not interleaved)
        ops.kv_cache_store(ops.reshape(k, [-1, NH * D])[:, :NKV * D], blocks, offs, clen, lut,
                           kind=0, layer_idx=0)
        ops.kv_cache_store(ops.reshape(q, [-1, NH * D])[:, NKV * D:], blocks, offs, clen, lut,
                           kind=1, layer_idx=0)
        g.output(q, k)
    blocks, offs, clen, lut = _ragged(rng, [3, 1, 0, 6], [5, 0, 2, 9])
    extra = [rng.standard_normal(D).astype(np.float32) for _ in range(2)] if qk_norm else []
    assert_matches_interpreter(g, rng.standard_normal((10, (NH + 2 * NKV) * D)).astype(np.float32),
                               rope_freqs_cis(D, 32, 10000.0), blocks, offs, clen, lut, *extra,
                               rtol=1e-4, atol=1e-4)


def _every_mask_matches(seed, n_heads, n_kv_heads, d, counts, cached, window, layer):
    """All masks in one graph, compiled for this CPU, against the interpreter."""
    rng = np.random.default_rng(seed)
    types = [TensorType(DType.float32, ["t", n_heads * d])] + _meta_types(nkv=n_kv_heads, d=d)
    with Graph("fa", input_types=types) as g:
        q, blocks, offs, clen, lut = g.inputs
        g.output(*[ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=n_heads,
                                              n_kv_heads=n_kv_heads, head_dim=d, layer_idx=layer,
                                              mask_variant=m,
                                              window=window if m in WINDOWED else None)
                   for m in MASK_VARIANTS])
    blocks, offs, clen, lut = _ragged(rng, counts, cached, nkv=n_kv_heads, d=d)
    q = rng.standard_normal((sum(counts), n_heads * d)).astype(np.float32)
    assert_matches_interpreter(g, q, blocks, offs, clen, lut, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_heads,n_kv_heads,d", [(NH, NKV, D), (2, 2, D), (3, 1, 12),
                                                  (8, 2, D), (8, 8, D), (16, 2, D), (16, 1, D)])
def test_flash_attention_every_mask(n_heads, n_kv_heads, d):
    """All masks in one graph; rows of a sequence span several query blocks and key tiles;
    GQA groups of 2, 3, 4 and 8, MHA, and a head_dim that is not a multiple of 8 (the tail
    rows go slot by slot where 8 query vectors make whole KV heads, 8/2, 8/8, 16/2, or a
    head's 16 make two passes, 16/1)."""
    _every_mask_matches(n_heads, n_heads, n_kv_heads, d, [9, 1, 0, 2], [3, 37, 4, 0], 3, 1)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 2), (4, 2)])
def test_flash_attention_decode_key_splits(n_heads, n_kv_heads):
    """Decode rows alone (a handful of rows: each row's keys split over up to 16 tasks, some
    splits left empty, then merged), every mask, cached lengths over several key tiles; the
    slot-by-slot tile (8/2) and the head-by-head one (4/2)."""
    _every_mask_matches(n_heads * 10 + n_kv_heads, n_heads, n_kv_heads, D, [1, 1, 0, 1],
                        [40, 25, 4, 2], 5, 0)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 2), (4, 2)])
def test_flash_attention_scratch_outside_loops(n_heads, n_kv_heads):
    """Every scratch buffer of the attention kernel is allocated outside its scf.for loops: an
    alloca in a loop body takes stack on each iteration, which a long context (one tile an
    iteration) would run out of. Both tile walks (slot by slot 8/2, head by head 4/2)."""
    from graphir.lowering.mlir_cpu.backend import emit_module
    from graphir.lowering.mlir_cpu.cpu_target import host_target

    types = [TensorType(DType.float32, ["t", n_heads * D])] + _meta_types(nkv=n_kv_heads)
    with Graph("fa_scratch", input_types=types) as g:
        q, blocks, offs, clen, lut = g.inputs
        g.output(ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=n_heads,
                                            n_kv_heads=n_kv_heads, head_dim=D, layer_idx=0))
    ctx, module, _ = emit_module(g, host_target())
    with ctx:
        text = str(module)
    open_ops, allocas = [], 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("}"):
            open_ops.pop()
        if "memref.alloca" in s:
            allocas += 1
            assert "scf.for" not in open_ops, f"alloca inside a loop: {s}"
        if s.endswith("{"):
            open_ops.append("scf.for" if "scf.for " in s else "region")   # not scf.forall
    assert allocas >= 5


AMX = "cpu:x86-64:avx512+amx+bf16"


@pytest.mark.parametrize("target,n_heads,n_kv_heads,d,dt", [
    ("cpu:x86-64:avx2", 4, 1, 16, DType.float32), ("cpu:x86-64:avx512", 4, 1, 16, DType.float32),
    ("cpu:x86-64:avx512", 3, 1, 16, DType.float32), ("cpu:x86-64:avx2", 2, 2, 32, DType.bfloat16),
    ("cpu:x86-64:avx512", 8, 2, 16, DType.bfloat16), ("cpu:x86-64:avx2", 8, 2, 16, DType.float32),
    # AMX tiles for both matmuls (flash_attention_amx.py): G = 4, 2, 8 (32 query vectors a
    # block), head dims 32, 128, 64; G = 3 keeps the vector path.
    (AMX, 8, 2, 32, DType.bfloat16), (AMX, 4, 2, 128, DType.bfloat16),
    (AMX, 16, 2, 64, DType.bfloat16), (AMX, 6, 2, 32, DType.bfloat16)])
def test_flash_attention_full_blocks(target, n_heads, n_kv_heads, d, dt):
    """Sequences long enough for the queries-along-lanes path (blocks of R = 2 * lanes / G
    rows: 8 or 16 with G = 4, 10 or 5 with G = 3 (padded lanes), 16 or 8 with MHA) next to
    tails and decode rows, every mask, cached prefixes, keys spanning several tiles."""
    if target == AMX:
        from graphir.lowering.driver import Target
        from graphir.lowering.mlir_cpu.backend import mlir_text

        types = [TensorType(dt, ["t", n_heads * d])] + _meta_types(dt, nkv=n_kv_heads, d=d)
        with Graph("fa_text", input_types=types) as g:
            g.output(ops.flash_attention_ragged(*g.inputs, n_heads=n_heads,
                                                n_kv_heads=n_kv_heads, head_dim=d, layer_idx=1))
        tiles = "amx.tile_mulf" in mlir_text(g, "mlir", Target.parse(AMX))
        assert tiles == (n_heads // n_kv_heads != 3)
    if not _cpu_runs(target):
        pytest.skip(f"this CPU cannot run {target}")
    from graphir.runtime.session import InferenceSession

    rng = np.random.default_rng(n_heads + d)
    types = [TensorType(dt, ["t", n_heads * d])] + _meta_types(dt, nkv=n_kv_heads, d=d)
    with Graph("fa_full", input_types=types) as g:
        q, blocks, offs, clen, lut = g.inputs
        g.output(*[ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=n_heads,
                                              n_kv_heads=n_kv_heads, head_dim=d, layer_idx=1,
                                              mask_variant=m, window=7 if m in WINDOWED else None)
                   for m in MASK_VARIANTS])
    # 61 rows over 6 cached keys: blocks with whole key tiles before their first query as
    # well as tiles on the diagonal.
    counts, cached = [61, 1, 9], [6, 10, 0]
    blocks, offs, clen, lut = _ragged(rng, counts, cached, nkv=n_kv_heads, d=d)
    q = rng.standard_normal((sum(counts), n_heads * d)).astype(np.float32)
    if dt is DType.bfloat16:
        from graphir.dtype import round_to_bf16

        q, blocks = round_to_bf16(q), round_to_bf16(blocks)
    want = run(g, q, blocks.copy(), offs, clen, lut)
    got = InferenceSession().load(g, target=target).execute(q, blocks, offs, clen, lut)
    tol = 3e-2 if dt is DType.bfloat16 else 1e-5
    for m, a, b in zip(MASK_VARIANTS, got, want):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol,
                                   atol=tol, err_msg=str(m))


def test_amx_attention_with_scale_and_softcap():
    """The AMX full blocks scale S in f32 before the cap (Q is not pre-scaled there), and a
    window's keys are gathered from its start."""
    if not _cpu_runs(AMX):
        pytest.skip(f"this CPU cannot run {AMX}")
    from graphir.dtype import round_to_bf16
    from graphir.runtime.session import InferenceSession

    rng = np.random.default_rng(11)
    nh, nkv, d = 8, 2, 64
    types = [TensorType(DType.bfloat16, ["t", nh * d])] + _meta_types(DType.bfloat16, nkv=nkv,
                                                                      d=d)
    with Graph("fa_amx_cap", input_types=types) as g:
        g.output(*[ops.flash_attention_ragged(*g.inputs, n_heads=nh, n_kv_heads=nkv, head_dim=d,
                                              layer_idx=1, mask_variant=m, window=w, scale=0.7,
                                              softcap=2.0)
                   for m, w in (("causal", None), ("sliding_window_causal", 5))])
    # The third sequence's window starts past key 32: its gathered keys start there.
    counts, cached = [17, 1, 17], [6, 2, 40]
    blocks, offs, clen, lut = _ragged(rng, counts, cached, nkv=nkv, d=d)
    q = round_to_bf16(rng.standard_normal((sum(counts), nh * d)).astype(np.float32))
    blocks = round_to_bf16(blocks)
    want = run(g, q, blocks.copy(), offs, clen, lut)
    got = InferenceSession().load(g, target=AMX).execute(q, blocks, offs, clen, lut)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2e-2,
                                   atol=2e-2)


@pytest.mark.parametrize("target,dt", [("cpu:x86-64:avx512", DType.float32),
                                       ("cpu:x86-64:avx2", DType.float32), (AMX, DType.bfloat16)])
def test_flash_attention_non_finite_inputs_propagate(target, dt):
    """A NaN or inf in Q or the cache reaches exactly the outputs it reaches in the reference
    (the kernels' max and exp clamps are compares and selects that let NaN through), and no
    other: causal rows before a poisoned key stay finite and match."""
    if not _cpu_runs(target):
        pytest.skip(f"this CPU cannot run {target}")
    from graphir.runtime.session import InferenceSession

    rng = np.random.default_rng(3)
    nh, nkv, d = 8, 2, 32
    types = [TensorType(dt, ["t", nh * d])] + _meta_types(dt, nkv=nkv, d=d)
    with Graph("fa_nan", input_types=types) as g:
        g.output(ops.flash_attention_ragged(*g.inputs, n_heads=nh, n_kv_heads=nkv, head_dim=d,
                                            layer_idx=1))
    counts, cached = [40, 37], [3, 0]
    blocks, offs, clen, lut = _ragged(rng, counts, cached, nkv=nkv, d=d)
    q = rng.standard_normal((sum(counts), nh * d)).astype(np.float32)
    q[5, 3] = np.nan                      # one query row of sequence 0, head 0
    q[50, d + 1] = np.inf                 # sequence 1, head 1: inf * K is +-inf, then NaN
    # Sequence 1's key 20 (a page of its own table), layer 1, KV head 0: NaN in K.
    page, slot = lut[1, 20 // PS], 20 % PS
    blocks[page, 0, 1, slot, 0, 7] = np.nan
    if dt is DType.bfloat16:
        from graphir.dtype import round_to_bf16

        q, blocks = round_to_bf16(q), round_to_bf16(blocks)
    (want,) = run(g, q, blocks.copy(), offs, clen, lut)
    (got,) = InferenceSession().load(g, target=target).execute(q, blocks, offs, clen, lut)
    bad = ~np.isfinite(want)
    assert bad.any() and (~bad).any()
    np.testing.assert_array_equal(~np.isfinite(got), bad)
    tol = 3e-2 if dt is DType.bfloat16 else 1e-5
    np.testing.assert_allclose(got[~bad].astype(np.float64), want[~bad].astype(np.float64),
                               rtol=tol, atol=tol)


def test_flash_attention_bf16_scale():
    rng = np.random.default_rng(7)
    types = [TensorType(DType.bfloat16, ["t", NH * D])] + _meta_types(DType.bfloat16)
    with Graph("fa_bf16", input_types=types) as g:
        q, blocks, offs, clen, lut = g.inputs
        g.output(ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=NH, n_kv_heads=NKV,
                                            head_dim=D, layer_idx=0, scale=0.3))
    blocks, offs, clen, lut = _ragged(rng, [5, 2], [2, 6])
    assert_matches_interpreter(g, rng.standard_normal((7, NH * D)).astype(np.float32),
                               blocks.astype(np.float32), offs, clen, lut, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_tiny_llama_layer_through_paged_cache(fused):
    """Prefill of two sequences, two decode steps, then a chunked-prefill step, each compared
    with the interpreter (outputs and the whole cache)."""
    from graphir.examples.llama_attention import build_tiny, random_weights
    from graphir.runtime.kv_cache import PagedKVCacheManager
    from graphir.runtime.session import InferenceSession

    g = build_tiny(fuse_rope_and_store=fused)
    weights = random_weights(g, seed=3)
    model = InferenceSession().load(g, weights=weights)
    blocks_t = g.inputs[2].type
    mgr = PagedKVCacheManager(num_layers=int(blocks_t.shape[2]), n_kv_heads=int(blocks_t.shape[4]),
                              head_dim=int(blocks_t.shape[5]), page_size=int(blocks_t.shape[3]),
                              total_num_pages=16)
    mgr.blocks[...] = np.random.default_rng(0).standard_normal(mgr.blocks.shape)
    ref_blocks = mgr.blocks.copy()
    seqs = [mgr.claim(), mgr.claim()]
    rng = np.random.default_rng(4)
    hidden = int(g.inputs[0].type.shape[1])
    for counts in ([5, 3], [1, 1], [1, 1], [2, 6]):
        step = mgr.prepare_step(seqs, counts)
        x = rng.standard_normal((sum(counts), hidden)).astype(np.float32)
        inputs = [x, step.input_row_offsets, None, step.cache_lengths, step.lookup_table,
                  step.max_lengths]
        ref_in = copy.deepcopy(inputs)
        ref_in[2] = ref_blocks
        inputs[2] = mgr.blocks
        (want,) = run(g, *ref_in, weights=weights)
        (got,) = model.execute(*inputs)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"step {counts}")
        np.testing.assert_allclose(mgr.blocks, ref_blocks, rtol=1e-5, atol=1e-5)
        mgr.commit_step(step)
