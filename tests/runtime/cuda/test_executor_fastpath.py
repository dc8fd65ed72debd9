"""The CUDA executor's per-call fast path on the CPU: call keys, CUDA-graph capture and replay,
one staged upload per call (the hits' graphs led by their staging slot's upload), the output
pool, and the host check of the ragged metadata. The device: tests/runtime/cuda/graph_device.py.
"""
import numpy as np
import pytest

from tests.runtime.cuda.graph_device import (PAGE, POOL, ROPE_ROWS, Cache,  # noqa: F401
                                             executor, program)  # program: a fixture
import torch  # noqa: E402  (after the interpreter switch)
from graphir.runtime.interpreter import run  # noqa: E402  (after the interpreter switch)


def test_decode_loop_captures_once_then_replays(program):
    ex, dev = executor(program)
    dev.syncs = 0                               # loading synchronized once
    cache = Cache(np.random.default_rng(1), [37, 90])
    cache.step(ex, [5, 3])                      # prefill: a key of its own, run eagerly
    for _ in range(8):
        cache.step(ex, [1, 1])
    assert ex.stats == {"plans_built": 2, "captures": 1, "replays": 6, "eager": 2,
                        "fast_hits": 6,          # every replay after the capturing call
                        "direct_hits": 0, "direct_builds": 0,  # qkv at a new address each call
                        "slot_captures": 3}      # the hits' graphs: one a staging slot
    assert len(dev.captured) == 4 and dev.replays == 7
    # The hits' graphs begin with the upload of their own slot, then the plan's launches.
    first = dev.captured[0]
    slots = [g[0][2] for g in dev.captured[1:]]
    assert all(g[0][0] == "stage" and g[1:] == first for g in dev.captured[1:])
    assert len({id(a) for a in slots}) == 3 and all(a is b for a, b in zip(slots, dev._imgs))
    # One staged upload per call, nothing synchronized, device inputs held until the stream
    # passes the call.
    assert dev.staged == 9 and dev.syncs == 0
    assert len(dev.kept) == 9
    assert all(sum(isinstance(x, torch.Tensor) for x in k) == 2 for k in dev.kept)


def test_keys_tell_apart_launch_lists_of_the_same_length(program):
    # Two batch sizes alternate; their launch lists have as many launches (the graph cache
    # once keyed on that count alone) but other grids and sizes.
    ex, dev = executor(program)
    b = Cache(np.random.default_rng(3), [11, 64, 7])
    a = Cache(np.random.default_rng(2), [20, 33])
    a.ref, a.dev = b.ref, b.dev                 # one cache: the KV address is no help here
    for _ in range(3):
        b.step(ex, [1, 1, 1])                   # the larger first: no pool growth later
        a.step(ex, [1, 1])
    assert ex.stats["plans_built"] == 2 and ex.stats["captures"] == 2
    assert ex.stats["replays"] == 2
    g1, g2 = dev.plan_graphs
    assert len(g1) == len(g2) and [op[2] for op in g1] != [op[2] for op in g2]


def test_a_new_kv_bucket_is_a_new_key(program):
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(4), [253, 40])
    seen = set()
    for _ in range(5):                          # longest cache + new: 254 ... 258
        cache.step(ex, [1, 1])
        # Collected each step: a pooled buffer that grows for the second key (more decode
        # partitions at 512 keys) drops the plans built before it.
        seen |= {k[1] for k in ex._plans}
    facts = sorted(seen)
    assert [f[ex._fact_names.index("rt_kvmax_1_3_b256")] for f in facts] == [256, 512]
    assert ex.stats == {"plans_built": 2, "captures": 2, "replays": 1, "eager": 2,
                        "fast_hits": 1, "direct_hits": 0, "direct_builds": 0,
                        "slot_captures": 1}


def test_an_unused_input_shape_does_not_change_the_key(program):
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(5), [12, 30])
    for steps in (4, 3, 2, 1):                  # max_lengths shrinks every step (MAX does)
        cache.step(ex, [1, 1], steps=steps)
    assert ex.stats["plans_built"] == 1 and ex.stats["replays"] == 2


def test_the_address_of_a_device_buffer_input_is_part_of_the_key(program):
    ex, _ = executor(program)
    a = Cache(np.random.default_rng(6), [9, 17])
    b = Cache(np.random.default_rng(7), [9, 17])
    for _ in range(3):
        a.step(ex, [1, 1])
        b.step(ex, [1, 1])
    assert ex.stats["plans_built"] == 2 and ex.stats["captures"] == 2


BAD = {
    "offsets start past 0": (lambda i: i[1].__setitem__(0, 1), "must start at 0"),
    "offsets decrease": (lambda i: i[1].__setitem__(1, 3), r"decrease at index 2"),
    "offsets end short": (lambda i: i[1].__setitem__(2, 1),
                          r"end at 1 \(index 2\) but the ragged input .* has 2 rows"),
    "page past the pool": (lambda i: i[3].__setitem__((1, 1), POOL),
                           rf"page id {POOL} at lookup_table\[1, 1\] .*pool of {POOL} pages"),
    "cache beyond its pages": (lambda i: i[2].__setitem__(0, 20 * PAGE),
                               r"sequence 0 needs 321 positions .* holds 20 pages of 16"),
    "position past the rope table": (lambda i: i[2].__setitem__(1, ROPE_ROWS),
                                     rf"sequence 1 reaches position {ROPE_ROWS} .* RoPE table's "
                                     rf"{ROPE_ROWS} rows"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metadata_is_refused_before_anything_is_written(program, case):
    ex, dev = executor(program)
    cache = Cache(np.random.default_rng(8), [40, 13], pages_per_seq=20)
    for _ in range(3):
        cache.step(ex, [1, 1])                  # a captured graph exists
    mutate, msg = BAD[case]
    qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])
    lut = lut.copy()
    mutate([qkv, offs, clen, lut])
    before, stats = cache.dev.clone(), dict(ex.stats)
    launched, replays = len(dev.launched), dev.replays
    with pytest.raises(ValueError, match=msg):
        ex.execute(torch.from_numpy(qkv), offs, cache.dev, clen, lut, freqs, maxl)
    assert torch.equal(cache.dev, before) and ex.stats == stats
    assert len(dev.launched) == launched and dev.replays == replays
    cache.step(ex, [1, 1])                      # the next good call replays as before
    assert ex.stats["replays"] == stats["replays"] + 1


def test_outputs_stay_valid_until_the_next_call_unless_copied(program):
    for copy in (False, True):
        ex, _ = executor(program, copy_outputs=copy)
        cache = Cache(np.random.default_rng(9), [5, 8])
        qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])
        (y1,) = ex.execute(torch.from_numpy(qkv), offs, cache.dev, clen, lut, freqs, maxl)
        first = y1.clone()
        (y2,) = ex.execute(torch.from_numpy(qkv * 0.5), offs, cache.dev, clen, lut, freqs, maxl)
        assert not torch.equal(first, y2)
        assert torch.equal(y1, first) == copy    # the pool's view was overwritten


def test_numpy_inputs_run_synchronously_and_copy_the_cache_back(program):
    ex, dev = executor(program)
    dev.syncs = 0
    cache = Cache(np.random.default_rng(10), [7, 21])
    for new in ([2, 3], [1, 1], [1, 1]):
        qkv, offs, clen, lut, freqs, maxl = cache.inputs(new)
        blocks = cache.dev.numpy().copy()
        (y,) = ex.execute(qkv, offs, blocks, clen, lut, freqs, maxl)
        (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
        assert isinstance(y, np.ndarray)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(blocks, cache.ref, rtol=1e-6, atol=1e-6)
        cache.dev = torch.from_numpy(blocks)
        cache.clen = cache.clen + np.asarray(new, np.uint32)
    assert dev.syncs == 3


# -- the fast path (a hit: known signature and facts) -----------------------------------------
def test_int64_metadata_is_converted_on_the_fast_path(program):
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(11), [14, 3])
    for _ in range(4):
        qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])
        args = (qkv, offs.astype(np.int64), cache.dev, clen.astype(np.int64),
                lut.astype(np.int64), freqs, maxl)
        (y,) = ex.execute(torch.from_numpy(args[0]), *args[1:])
        (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache.dev.numpy(), cache.ref, rtol=1e-6, atol=1e-6)
        cache.clen = cache.clen + 1
    assert ex.stats["fast_hits"] == 2


def test_evicted_and_dropped_plans_never_serve_a_hit(program, monkeypatch):
    from graphir.runtime.cuda import executor as mod

    monkeypatch.setattr(mod, "MAX_PLANS", 2)
    ex, _ = executor(program)
    small = Cache(np.random.default_rng(12), [10, 20])
    big = Cache(np.random.default_rng(13), [30, 5, 8, 9], pages_per_seq=10)
    big.ref, big.dev = small.ref, small.dev
    other = Cache(np.random.default_rng(14), [3, 4, 5], pages_per_seq=10)
    other.ref, other.dev = small.ref, small.dev
    for _ in range(3):
        small.step(ex, [1, 1])                  # captured, then a hit
    for _ in range(3):
        big.step(ex, [1, 1, 1, 1])              # larger: the pools grow, every plan dropped
    for _ in range(3):
        other.step(ex, [1, 1, 1])               # a third key: the least recently used goes
    for _ in range(3):
        small.step(ex, [1, 1])                  # rebuilt: numbers checked every step
    assert len(ex._plans) == 2
    plans = set(map(id, ex._plans.values()))
    assert all(id(io.cp) in plans for e in ex._sigs.values() for io in e.plans.values())
    assert ex.stats["plans_built"] == 4 and ex.stats["fast_hits"] == 4


def test_a_staging_slot_regrown_for_a_larger_call_gets_its_graphs_recaptured(program):
    # The hits' graphs copy from one staging slot each; a call with more metadata (a wider
    # lookup table) regrows the slots (new memory), after which the first plan's graphs must
    # read the new slots, not the old ones (holding an earlier step's metadata: wrong
    # numbers, caught by the reference).
    ex, dev = executor(program)
    narrow = Cache(np.random.default_rng(21), [30, 12])
    wide = Cache(np.random.default_rng(22), [28, 14], pages_per_seq=60, pool=2 * POOL)
    for _ in range(5):
        narrow.step(ex, [1, 1])
    assert ex.stats["slot_captures"] == 3
    before = list(dev._imgs)
    for _ in range(5):
        wide.step(ex, [1, 1])
    assert all(a is not b for a, b in zip(before, dev._imgs))  # every slot regrown
    n = ex.stats["slot_captures"]
    for _ in range(4):
        narrow.step(ex, [1, 1])                 # numbers checked against the interpreter
    assert ex.stats["plans_built"] == 2         # the same plan, its slots' graphs anew
    assert ex.stats["slot_captures"] == n + 3


def test_without_graphs_a_hit_runs_the_prepared_launches(program):
    ex, dev = executor(program, use_graphs=False)
    cache = Cache(np.random.default_rng(15), [6, 11])
    for _ in range(4):
        cache.step(ex, [1, 1])                  # numbers checked against the interpreter
    assert ex.stats == {"plans_built": 1, "captures": 0, "replays": 0, "eager": 4,
                        "fast_hits": 3, "direct_hits": 0, "direct_builds": 0,
                        "slot_captures": 0}
    assert dev.captured == [] and dev.replays == 0


def test_host_inputs_too_large_for_bytes_are_staged_from_views(program, monkeypatch):
    from graphir.runtime.cuda import fast_path

    monkeypatch.setattr(fast_path, "BLOB_MAX", 8)  # every metadata input counts as large
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(16), [21, 2])
    for _ in range(3):
        cache.step(ex, [1, 1])
    for _ in range(2):                          # a lookup table large and of another dtype:
        qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])  # a new signature, a hit
        (y,) = ex.execute(torch.from_numpy(qkv), offs, cache.dev, clen, lut.astype(np.int64),
                          freqs, maxl)
        (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
        cache.clen = cache.clen + 1
    assert ex.stats["fast_hits"] == 2


# -- device tensors read in place (a graph per repeated address) ------------------------------
