"""runtime.kv_cache.PagedKVCacheManager: growth, reuse, out-of-pages atomicity, store + gather."""

import math

import numpy as np
import pytest

from graphir.ops.attention_math import flash_attention_ragged, kv_cache_store
from graphir.runtime.kv_cache import OutOfPagesError, PagedKVCacheManager, StepInputs


def make(**kw):
    args = dict(num_layers=2, n_kv_heads=2, head_dim=4, page_size=4, total_num_pages=6)
    args.update(kw)
    return PagedKVCacheManager(**args)


def test_growth_across_page_boundaries():
    m = make(lut_bucket=1)  # exact widths here; the padding has its own test
    assert m.blocks.shape == (7, 2, 2, 4, 2, 4) and m.null_page_id == 6
    a, b = m.claim(), m.claim()
    assert (a, b) == (0, 1)
    step = m.prepare_step([b, a], [6, 3])
    assert isinstance(step, StepInputs)
    assert step.lookup_table.dtype == np.uint32 and step.lookup_table.shape == (2, 2)
    assert step.lookup_table[0].tolist() == list(m.pages(b))
    assert step.lookup_table[1].tolist() == [m.pages(a)[0], 6]  # padded with the null page
    assert step.cache_lengths.tolist() == [0, 0] and step.cache_lengths.dtype == np.uint32
    assert step.input_row_offsets.tolist() == [0, 6, 9] and step.input_row_offsets.dtype == np.uint32
    assert step.max_lengths.tolist() == [[6, 6]] and step.max_lengths.dtype == np.uint32
    assert (m.used_pages, m.free_pages) == (3, 3)
    assert m.cache_length(a) == 0  # nothing advances before commit
    m.commit_step(step)
    assert (m.cache_length(a), m.cache_length(b)) == (3, 6)
    # Tokens 3 -> 4 fill a's first page exactly; 4 -> 5 crosses into a second page.
    for n, pages in [(1, 1), (1, 2), (3, 2), (1, 3)]:
        s = m.prepare_step([a], [n])
        assert len(m.pages(a)) == pages == s.lookup_table.shape[1]
        assert s.max_lengths.tolist() == [[n, m.cache_length(a) + n]]
        m.commit_step(s)
    assert m.cache_length(a) == 9 and len(set(m.pages(a)) | set(m.pages(b))) == 5


def test_page_count_follows_length_for_random_steps():
    rng = np.random.default_rng(0)
    m = make(total_num_pages=64, page_size=3)
    seqs = [m.claim() for _ in range(3)]
    for _ in range(10):
        batch = [s for s in seqs if rng.random() < 0.7] or seqs[:1]
        counts = rng.integers(1, 5, size=len(batch)).tolist()
        before = [m.cache_length(s) for s in batch]
        step = m.prepare_step(batch, counts)
        assert step.cache_lengths.tolist() == before
        assert step.input_row_offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
        m.commit_step(step)
        for s in seqs:
            assert len(m.pages(s)) == math.ceil(m.cache_length(s) / 3)
    all_pages = [p for s in seqs for p in m.pages(s)]
    assert len(all_pages) == len(set(all_pages)) == m.used_pages


def test_release_returns_pages_and_they_are_reused():
    m = make()
    a, b = m.claim(), m.claim()
    m.commit_step(m.prepare_step([a, b], [8, 4]))
    a_pages = m.pages(a)
    assert m.free_pages == 3
    m.release(a)
    assert m.free_pages == 5 and m.seq_ids == (b,)
    with pytest.raises(ValueError, match="unknown sequence id 0"):
        m.cache_length(a)
    c = m.claim()
    assert c == 0  # the smallest free id
    m.prepare_step([c], [8])
    assert set(m.pages(c)) == set(a_pages)  # lowest page ids come back first


def test_out_of_pages_changes_nothing():
    rng = np.random.default_rng(1)
    m = make(total_num_pages=5)
    a, b = m.claim(), m.claim()
    step = m.prepare_step([a, b], [5, 3])
    m.blocks = rng.standard_normal(m.blocks.shape).astype(np.float32)
    m.commit_step(step)
    blocks = m.blocks.copy()
    lut = m.prepare_step([a, b], [1, 1]).lookup_table.copy()  # needs no new page
    state = (m.free_pages, m.pages(a), m.pages(b), m.cache_length(a), m.cache_length(b))
    # a fits (1 page of the 2 free), then b needs 3 more: the error must undo nothing-yet-taken.
    with pytest.raises(OutOfPagesError, match=r"sequence 1 needs 3 more page\(s\) but only 1 are free"):
        m.prepare_step([a, b], [4, 12])
    assert (m.free_pages, m.pages(a), m.pages(b), m.cache_length(a), m.cache_length(b)) == state
    np.testing.assert_array_equal(m.blocks, blocks)
    np.testing.assert_array_equal(m.prepare_step([a, b], [1, 1]).lookup_table, lut)
    with pytest.raises(OutOfPagesError, match="sequence 0 needs 3 more"):
        m.prepare_step([a], [13])
    assert m.free_pages == state[0]


def test_store_then_gather_returns_the_data():
    rng = np.random.default_rng(2)
    m = make(total_num_pages=8, page_size=3)
    m.blocks = rng.standard_normal(m.blocks.shape).astype(np.float32)  # stale garbage everywhere
    a, b = m.claim(), m.claim(5)
    written = {(s, l, kv): [] for s in (a, b) for l in range(2) for kv in range(2)}
    for batch, counts in [([a, b], [4, 2]), ([b, a], [3, 1]), ([a], [2])]:
        step = m.prepare_step(batch, counts)
        for layer in range(2):
            for kv in range(2):
                vals = rng.standard_normal((sum(counts), 2, 4)).astype(np.float32)
                m.blocks = kv_cache_store(m.blocks, vals, kv, layer, step.input_row_offsets,
                                          step.cache_lengths, step.lookup_table)
                for s, lo, hi in zip(batch, step.input_row_offsets[:-1], step.input_row_offsets[1:]):
                    written[(s, layer, kv)].append(vals[lo:hi])
        m.commit_step(step)
    for s in (a, b):
        for layer in range(2):
            k, v = m.gather_kv(s, layer)
            assert k.shape == (m.cache_length(s), 2, 4)
            np.testing.assert_array_equal(k, np.concatenate(written[(s, layer, 0)]))
            np.testing.assert_array_equal(v, np.concatenate(written[(s, layer, 1)]))
    # Attention over the paged cache equals attention over the gathered contiguous K/V.
    step = m.prepare_step([a, b], [1, 1])
    q = rng.standard_normal((2, 4, 4))
    for layer in range(2):
        vals = rng.standard_normal((2, 2, 4)).astype(np.float32)
        for kv in range(2):
            m.blocks = kv_cache_store(m.blocks, vals, kv, layer, step.input_row_offsets,
                                      step.cache_lengths, step.lookup_table)
    out = flash_attention_ragged(q, m.blocks, layer_idx=1, input_row_offsets=step.input_row_offsets,
                                 cache_lengths=step.cache_lengths, lookup_table=step.lookup_table,
                                 mask_variant="causal", scale=0.5)
    for row, s in enumerate((a, b)):
        k, v = m.gather_kv(s, 1, length=m.cache_length(s) + 1)
        kk = np.repeat(k.astype(np.float64), 2, axis=1)  # GQA: head h reads kv head h // 2
        vv = np.repeat(v.astype(np.float64), 2, axis=1)
        sc = np.einsum("hd,lhd->hl", q[row], kk) * 0.5
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[row], np.einsum("hl,lhd->hd", p, vv), rtol=1e-10)


def test_bad_input_errors():
    m = make(max_batch_size=2, max_seq_len=10)
    a = m.claim(3)
    with pytest.raises(ValueError, match="sequence 3 is already claimed"):
        m.claim(3)
    with pytest.raises(ValueError, match="seq_id must be a non-negative int"):
        m.claim(-1)
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        m.prepare_step([7], [1])
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        m.release(7)
    with pytest.raises(ValueError, match="new token count must be a positive int, got 0"):
        m.prepare_step([a], [0])
    with pytest.raises(ValueError, match="new token count must be a positive int, got -2"):
        m.prepare_step([a], [-2])
    with pytest.raises(ValueError, match="11 tokens exceeds max_seq_len 10"):
        m.prepare_step([a], [11])
    with pytest.raises(ValueError, match="duplicate sequence ids"):
        m.prepare_step([a, a], [1, 1])
    with pytest.raises(ValueError, match="1 seq_ids but 2 new_token_counts"):
        m.prepare_step([a], [1, 1])
    with pytest.raises(ValueError, match="empty batch"):
        m.prepare_step([], [])
    m.claim()
    with pytest.raises(ValueError, match=r"max_batch_size 2"):
        m.claim()
    step = m.prepare_step([a], [2])
    m.commit_step(step)
    with pytest.raises(ValueError, match="committed twice"):
        m.commit_step(step)
    with pytest.raises(ValueError, match="not prepared by this manager"):
        make().commit_step(step)
    with pytest.raises(ValueError, match=r"blocks must have shape \(7, 2, 2, 4, 2, 4\)"):
        m.blocks = np.zeros((6, 2, 2, 4, 2, 4))
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        m.gather_kv(a, 2)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        make(page_size=0)


def test_stale_step_cannot_commit_into_a_reclaimed_sequence():
    m = make()
    a = m.claim(0)
    m.commit_step(m.prepare_step([a], [3]))
    stale = m.prepare_step([a], [2])
    m.release(a)
    b = m.claim(0)  # the same id, a new sequence
    assert b == a and m.cache_length(b) == 0
    with pytest.raises(ValueError, match="sequence 0 was released .* the step is stale"):
        m.commit_step(stale)
    assert m.cache_length(b) == 0 and m.pages(b) == ()


def test_blocks_setter_checks_dtype_and_writability():
    m = make()
    with pytest.raises(ValueError, match="blocks must be float32 .* got float16"):
        m.blocks = np.zeros(m.blocks_shape, np.float16)
    ro = np.random.default_rng(0).standard_normal(m.blocks_shape).astype(np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="blocks must be writable"):
        m.blocks = ro
    before = m.blocks
    assert m.blocks is before  # a refused assignment keeps the old blocks


def test_lookup_table_width_is_padded_to_the_bucket_with_the_null_page():
    # Page size 128: the bucket is 2 pages (256 tokens), so the width (part of a compiled
    # call's key) changes when the longest sequence crosses 256 tokens, with the decode
    # launches' KV-length bucket, not at every page.
    rng = np.random.default_rng(11)
    m = PagedKVCacheManager(num_layers=1, n_kv_heads=1, head_dim=2, page_size=128,
                            total_num_pages=40, max_seq_len=1000)
    assert m.lut_bucket == 2 and m.max_pages_per_seq == 8
    a, b = m.claim(), m.claim()
    start = [int(x) for x in rng.integers(1, 120, 2)]
    m.commit_step(m.prepare_step([a, b], start))
    widths = {}
    while m.cache_length(a) < 990:
        step = m.prepare_step([a, b], [1, 1]) if m.cache_length(b) < 990 else \
            m.prepare_step([a], [1])
        longest = max(m.cache_length(s) for s in step.seq_ids) + 1
        lut = step.lookup_table
        assert lut.shape[1] == min(2 * -(-longest // 256), 8)
        for row, s in zip(lut, step.seq_ids):
            pages = m.pages(s)
            assert row[:len(pages)].tolist() == list(pages)
            assert (row[len(pages):] == m.null_page_id).all()
        widths[lut.shape[1]] = widths.get(lut.shape[1], 0) + 1
        m.commit_step(step)
    assert sorted(widths) == [2, 4, 6, 8]


def test_padded_lookup_table_passes_the_ragged_check_and_matches_the_reference():
    from graphir.examples.llama_attention import build_tiny, random_weights
    from graphir.runtime.interpreter import run
    from graphir.runtime.ragged import RaggedCheck

    g = build_tiny()  # page_size 4, 2 cache layers, max_seq_len 64
    rng = np.random.default_rng(12)
    weights = random_weights(g, seed=3)
    lens = [5, 9]
    exact = make(n_kv_heads=2, head_dim=16, page_size=4, total_num_pages=20, lut_bucket=1)
    padded = make(n_kv_heads=2, head_dim=16, page_size=4, total_num_pages=20, lut_bucket=4)
    blocks = rng.standard_normal(exact.blocks_shape).astype(np.float32)
    exact.blocks, padded.blocks = blocks.copy(), blocks.copy()
    x = rng.standard_normal((sum(lens), 64)).astype(np.float32)
    outs = []
    for m in (exact, padded):
        seqs = [m.claim() for _ in lens]
        step = m.prepare_step(seqs, lens)
        arrays = {1: step.input_row_offsets, 3: step.cache_lengths, 4: step.lookup_table}
        env = {"total_seq_len": sum(lens), "batch": len(lens), "max_num_pages":
               step.lookup_table.shape[1], "total_num_pages": m.total_num_pages + 1}
        facts = RaggedCheck(g).check(arrays.__getitem__, env)
        assert facts.kv_max == {(1, 3): max(lens)}
        (y,) = run(g, x, step.input_row_offsets, m.blocks, step.cache_lengths,
                   step.lookup_table, step.max_lengths, weights=weights)
        outs.append((y, step.lookup_table.shape[1]))
    assert outs[0][1] == 3 and outs[1][1] == 4        # 9 tokens: 3 pages, padded to 4
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(padded.blocks, exact.blocks)


def test_claims_and_steps_from_many_threads_keep_the_pool_consistent():
    # The manager's updates are check-then-act (the smallest free id, the pages a batch needs
    # against those free): from several threads at once they hold a lock, or two sequences
    # get one id or one page. Threads switch as often as CPython allows.
    from tests.threads import run_in_threads

    m = make(total_num_pages=4000, page_size=2, lut_bucket=1)
    per, n_threads = 40, 6
    got: dict[int, list] = {}

    def worker(t):
        mine = got[t] = []
        for _ in range(per):
            s = m.claim()
            step = m.prepare_step([s], [3])
            m.commit_step(step)
            mine.append((s, m.pages(s)))

    run_in_threads(worker, range(n_threads))
    ids = [s for mine in got.values() for s, _ in mine]
    pages = [p for mine in got.values() for _, ps in mine for p in ps]
    assert len(set(ids)) == len(ids) == per * n_threads == len(m.seq_ids)
    assert len(set(pages)) == len(pages) == 2 * per * n_threads == m.used_pages
    assert all(m.cache_length(s) == 3 for s in ids)
