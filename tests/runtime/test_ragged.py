"""runtime/ragged.py: the host check of ragged / paged metadata and the facts it returns, on
the tiny Llama layer (page_size 4, RoPE table of 2 * 64 rows) and on an MLA-free op mix."""
import numpy as np
import pytest

from graphir import DType, Graph, TensorType, ops
from graphir.examples.llama_attention import build, build_tiny
from graphir.runtime.ragged import RaggedCheck

PAGE, POOL, MAX_PAGES = 4, 30, 6


@pytest.fixture(scope="module")
def check():
    return RaggedCheck(build_tiny())


def batch(rng, new, cached):
    offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
    clen = np.asarray(cached, np.uint32)
    lut = rng.permutation(POOL)[:len(new) * MAX_PAGES].reshape(len(new), MAX_PAGES)
    return {1: offs, 3: clen, 4: lut.astype(np.uint32)}


def env_of(arrays):
    return {"total_seq_len": int(arrays[1][-1]), "batch": len(arrays[3]),
            "total_num_pages": POOL, "max_num_pages": MAX_PAGES, "steps_remaining": 1}


def run_check(check, arrays):
    return check.check(lambda k: arrays[k], env_of(arrays))


def test_finds_the_metadata_inputs_of_the_ragged_ops(check):
    (g,) = check.groups                       # rope_split_store and the attention share them
    assert (g.offsets, g.cache_lengths, g.lookup) == (1, 3, 4)
    assert sorted(g.ops) == ["flash_attention_ragged", "rope_split_store"]
    assert check.inputs == {1, 3, 4}


def test_facts_are_the_longest_run_and_the_longest_cache(check):
    rng = np.random.default_rng(0)
    new = rng.integers(0, 6, 5)
    cached = rng.integers(0, 15, 5)
    f = run_check(check, batch(rng, new, cached))
    assert f.seq_max == {1: int(new.max())}
    assert f.kv_max == {(1, 3): int((new + cached).max())}


def test_int32_and_int64_metadata_are_accepted(check):
    rng = np.random.default_rng(1)
    arrays = {k: v.astype(dt) for (k, v), dt in
              zip(batch(rng, [3, 1], [2, 7]).items(), (np.int32, np.int64, np.int32))}
    assert run_check(check, arrays).kv_max == {(1, 3): 8}


BAD = [
    ("offsets[0]", lambda a: a[1].__setitem__(0, 2), r"input_row_offsets \(input 1\): "
     r"input_row_offsets must start at 0, got input_row_offsets\[0\] = 2"),
    ("decreasing", lambda a: a[1].__setitem__(2, 0), r"decrease at index 2 "
     r"\(input_row_offsets\[1\] = 1 > input_row_offsets\[2\] = 0\)"),
    ("count", lambda a: a.__setitem__(3, a[3][:-1].copy()), r"cache_lengths \(input 3\): "
     r"cache_lengths has 2 entries but input_row_offsets \(input 1\) has 4 = batch \+ 1"),
    ("page id", lambda a: a[4].__setitem__((1, 0), POOL + 3),
     rf"lookup_table \(input 4\): page id {POOL + 3} at lookup_table\[1, 0\] \(used by sequence "
     rf"1\) is outside the pool of {POOL} pages of kv_blocks \(input 2\)"),
    ("pages", lambda a: a[3].__setitem__(2, MAX_PAGES * PAGE), r"cache_lengths \(input 3\): "
     r"sequence 2 needs 26 positions \(cache length 24 \+ 2 new tokens\) but a lookup_table row "
     r".* holds 6 pages of 4 = 24"),
    ("negative", lambda a: a.__setitem__(3, a[3].astype(np.int32) - 9),
     r"cache_lengths\[0\] = -7 is negative"),
    ("float", lambda a: a.__setitem__(1, a[1].astype(np.float32)),
     r"input_row_offsets must be an integer array of rank 1, got float32"),
    ("rank", lambda a: a.__setitem__(4, a[4].reshape(-1)),
     r"lookup_table must be an integer array of rank 2"),
    ("lut rows", lambda a: a.__setitem__(4, a[4][:2].copy()),
     r"lookup_table has 2 rows for a batch of 3 sequences"),
]


@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_metadata_names_the_input_and_the_index(check, name, mutate, msg):
    arrays = batch(np.random.default_rng(2), [1, 3, 2], [2, 5, 6])
    env = env_of(arrays)
    mutate(arrays)
    with pytest.raises(ValueError, match=msg):
        check.check(lambda k: arrays[k], env)


def test_offsets_must_end_at_the_row_count(check):
    arrays = batch(np.random.default_rng(3), [2, 2], [0, 1])
    env = dict(env_of(arrays), total_seq_len=5)
    with pytest.raises(ValueError, match=r"input_row_offsets end at 4 \(index 2\) but the "
                                         r"ragged input of gir.rope_split_store has 5 rows"):
        check.check(lambda k: arrays[k], env)


def test_only_the_pages_a_sequence_uses_must_be_in_the_pool(check):
    # Padding entries past a sequence's pages may hold anything (here: past the pool).
    arrays = batch(np.random.default_rng(4), [1, 1], [4, 10])
    arrays[4][0, 2:] = POOL + 100            # sequence 0 uses pages 0 and 1 (5 positions)
    arrays[4][1, 3:] = 2 ** 32 - 1           # sequence 1 uses pages 0..2 (11 positions)
    assert run_check(check, arrays).kv_max == {(1, 3): 11}
    arrays[4][1, 2] = POOL
    with pytest.raises(ValueError, match=r"lookup_table\[1, 2\]"):
        run_check(check, arrays)


def test_positions_past_the_rope_table():
    types = [TensorType(DType.float32, ["t", 8]), TensorType(DType.float32, [10, 4]),
             TensorType(DType.uint32, ["b + 1"]), TensorType(DType.uint32, ["b"])]
    with Graph("rope", input_types=types) as g:
        x, f, offs, clen = g.inputs
        g.output(ops.rope(x, f, offs, clen, head_dim=4, interleaved=False))
    chk = RaggedCheck(g)
    arrays = {2: np.array([0, 2, 2, 5], np.uint32), 3: np.array([8, 40, 5], np.uint32)}
    env = {"t": 5, "b": 3}
    # Sequence 1 takes no new token: its cache length may pass the table.
    assert chk.check(lambda k: arrays[k], env).kv_max == {(2, 3): 40}
    arrays[3][2] = 8
    with pytest.raises(ValueError, match=r"cache_lengths \(input 3\): sequence 2 reaches "
                                         r"position 10 \(cache length 8 \+ 3 new tokens\) past "
                                         r"the RoPE table's 10 rows \(gir.rope\)"):
        chk.check(lambda k: arrays[k], env)


def test_metadata_moved_by_transfer_to_is_traced_to_its_input():
    from graphir import DeviceRef

    types = [TensorType(DType.float32, ["t", 8], DeviceRef.GPU(0)),
             TensorType(DType.float32, [10, 4], DeviceRef.GPU(0)),
             TensorType(DType.uint32, ["b + 1"]), TensorType(DType.uint32, ["b"])]
    with Graph("moved", input_types=types) as g:
        x, f, offs, clen = g.inputs
        o, c = (ops.transfer_to(v, DeviceRef.GPU(0)) for v in (offs, clen))
        g.output(ops.rope(x, f, o, c, head_dim=4, interleaved=False))
    (grp,) = RaggedCheck(g).groups
    assert (grp.offsets, grp.cache_lengths) == (2, 3)


# -- the per-signature fast check ----------------------------------------------------------
WANTED = [("seqmax", 1, 1), ("kvmax", (1, 3), 16)]


def fast_of(check, arrays, dtypes=None):
    env = env_of(arrays)
    shapes = [None] * 6
    dts = [None] * 6
    for k, a in arrays.items():
        shapes[k], dts[k] = a.shape, a.dtype
    return check.fast(check.bounds(env), shapes, dts, WANTED), env


def blobs_of(arrays):
    return [arrays[k].tobytes() if k in arrays else None for k in range(6)]


def want_of(check, arrays, env):
    from graphir.runtime.cuda.plan_values import bucketed

    f = check.check(arrays.__getitem__, env)
    return (f.seq_max[1], bucketed(f.kv_max[(1, 3)], 16))


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.int64])
def test_fast_facts_agree_with_the_full_check(check, dtype):
    rng = np.random.default_rng(6)
    for b, uniform in [(1, True), (3, True), (4, False), (5, False)]:
        fasts = {}  # one per signature: the row count is part of it
        for step in range(8):                 # a loop: the caches of the last call are used
            new = [1] * b if uniform else rng.integers(1, 3, b).tolist()
            arrays = batch(rng, new, rng.integers(0, 20, b))
            arrays = {k: v.astype(dtype) for k, v in arrays.items()}
            env = env_of(arrays)
            if env["total_seq_len"] not in fasts:
                fasts[env["total_seq_len"]] = fast_of(check, arrays)[0]
            fast = fasts[env["total_seq_len"]]
            inputs = [arrays.get(k) for k in range(6)]
            got = fast(inputs, blobs_of(arrays) if step % 2 else [None] * 6)
            assert got == want_of(check, arrays, env), (b, step)


@pytest.mark.parametrize("name,mutate,msg", BAD, ids=[b[0] for b in BAD])
def test_fast_facts_hand_every_bad_case_to_the_full_check(check, name, mutate, msg):
    rng = np.random.default_rng(7)
    arrays = batch(rng, [1, 3, 2], [2, 5, 6])
    fast, env = fast_of(check, arrays)
    good = [arrays.get(k) for k in range(6)]
    assert fast(good, blobs_of(arrays)) == want_of(check, arrays, env)  # caches filled
    bad = {k: v.copy() for k, v in arrays.items()}
    mutate(bad)
    shapes_same = all(bad[k].shape == arrays[k].shape and bad[k].dtype == arrays[k].dtype
                      for k in arrays)
    if shapes_same:  # else the input signature differs: another FastFacts, or none at all
        assert fast([bad.get(k) for k in range(6)], blobs_of(bad)) is None
    with pytest.raises(ValueError, match=msg):
        check.check(bad.__getitem__, env)
    assert fast(good, blobs_of(arrays)) == want_of(check, arrays, env)


def test_fast_facts_defer_padding_past_the_pool_and_long_caches(check):
    rng = np.random.default_rng(8)
    arrays = batch(rng, [1, 1], [4, 10])
    fast, env = fast_of(check, arrays)
    arrays[4][0, 3:] = POOL + 100          # unused padding past the pool: valid, but the
    inputs = [arrays.get(k) for k in range(6)]
    assert fast(inputs, blobs_of(arrays)) is None    # fast check defers to the full one
    assert want_of(check, arrays, env) == (1, 16)
    arrays = batch(rng, [1, 1], [4, 10])
    arrays[4][:, 3:] = POOL - 1            # the null page of a manager's padding: fine
    assert fast([arrays.get(k) for k in range(6)], blobs_of(arrays)) == (1, 16)


def test_fast_facts_need_numpy_integer_metadata_and_every_wanted_fact(check):
    arrays = batch(np.random.default_rng(9), [1, 1], [3, 3])
    env = env_of(arrays)
    shapes = [None, (3,), None, (2,), (2, MAX_PAGES), None]
    dts = [None, np.dtype(np.uint32), None, np.dtype(np.uint32), np.dtype(np.uint32), None]
    bounds = check.bounds(env)
    assert check.fast(bounds, shapes, dts, WANTED) is not None
    for k in (1, 3, 4):                    # on the device, or floats
        for dt in (None, np.dtype(np.float32)):
            assert check.fast(bounds, shapes, dts[:k] + [dt] + dts[k + 1:], WANTED) is None
    assert check.fast(bounds, shapes, dts, WANTED + [("kvmax", (1, 5), 1)]) is None


def test_fast_check_work_does_not_grow_with_the_batch():
    # What a decode step costs on the host, counted (never timed): the C functions and the
    # Python functions the fast check calls, for the 8B layer's metadata at batch 1 and 64.
    import sys

    chk = RaggedCheck(build())
    counts = {}
    for b in (1, 64):
        rng = np.random.default_rng(b)
        arrays = {1: np.arange(b + 1, dtype=np.uint32), 3: np.full(b, 4096, np.uint32),
                  4: rng.permutation(b * 33).reshape(b, 33).astype(np.uint32)}
        env = {"total_seq_len": b, "batch": b, "total_num_pages": b * 33 + 1,
               "max_num_pages": 33}
        shapes = [None] * 6
        dts = [None] * 6
        for k, a in arrays.items():
            shapes[k], dts[k] = a.shape, a.dtype
        fast = chk.fast(chk.bounds(env), shapes, dts, [("kvmax", (1, 3), 256)])
        inputs, blobs = [arrays.get(k) for k in range(6)], blobs_of(arrays)
        assert fast(inputs, blobs) == (4352,)
        arrays[3] += 1                         # the next step: only the lengths changed
        events = []
        sys.setprofile(lambda frame, event, arg: events.append(
            (event, getattr(arg, "__name__", None) if event == "c_call" else None)))
        try:
            got = fast(inputs, blobs)
        finally:
            sys.setprofile(None)
        assert got == (4352,)
        calls = [name for ev, name in events if ev == "c_call" and name != "setprofile"]
        counts[b] = (sum(ev == "call" for ev, _ in events), len(calls))
        # One C call reads the lengths (a scalar read at batch 1, a reduction above it);
        # the rest are list appends.
        assert len([c for c in calls if c != "append"]) == 1, calls
    assert counts[1] == counts[64], counts


def test_two_sequences_writing_one_page_are_refused(check):
    # Sequence 0 writes positions 5..7 (page index 1), sequence 1 writes 1..2 (page index 0):
    # both page indexes name page 7, and the slots 1..2 overlap.
    offs = np.array([0, 3, 5], np.uint32)
    clen = np.array([5, 1], np.uint32)
    lut = np.array([[3, 7, 9, 10, 11, 12], [7, 13, 14, 15, 16, 17]], np.uint32)
    with pytest.raises(ValueError, match=r"sequences \d and \d both write new tokens into page 7"):
        run_check(check, {1: offs, 3: clen, 4: lut})
    # Disjoint slots of a shared page (0 writes slots 1..3, 1 writes slot 0) do not clash.
    ok = {1: np.array([0, 3, 4], np.uint32), 3: np.array([5, 0], np.uint32), 4: lut}
    assert run_check(check, ok).kv_max == {(1, 3): 8}


def test_writes_into_the_null_page_are_let_be_by_both_checks(check):
    # Two padding sequences whose pages all name the null page (the pool's last), as a batch
    # padded to a captured size has: their writes are lost, so neither check refuses them (the
    # full check once did, where the fast check let them be: found by `fuzz --target
    # fastfacts`). Any other shared page still clashes.
    null = POOL - 1
    offs = np.array([0, 1, 2, 3], np.uint32)
    clen = np.array([5, 0, 0], np.uint32)
    lut = np.array([[3, 7, null, null, null, null], [null] * 6, [null] * 6], np.uint32)
    arrays = {1: offs, 3: clen, 4: lut}
    assert run_check(check, arrays).kv_max == {(1, 3): 6}
    fast, env = fast_of(check, arrays)
    assert fast([arrays.get(k) for k in range(6)], blobs_of(arrays)) == \
        want_of(check, arrays, env) == (1, 16)
    lut[1] = lut[2] = 7                   # 1 and 2 both write slot 0 of page 7 (0 writes slot 1)
    with pytest.raises(ValueError, match="sequences 1 and 2 both write new tokens into page 7"):
        run_check(check, arrays)
    assert fast([arrays.get(k) for k in range(6)], blobs_of(arrays)) is None


def test_a_shared_prefix_page_may_be_read(check):
    # Both sequences hold page 2 as their first page (a common prefix) and write elsewhere.
    offs = np.array([0, 1, 2], np.uint32)
    clen = np.array([6, 6], np.uint32)
    lut = np.array([[2, 5, 29, 29, 29, 29], [2, 6, 29, 29, 29, 29]], np.uint32)
    assert run_check(check, {1: offs, 3: clen, 4: lut}).kv_max == {(1, 3): 7}


def test_one_sequence_naming_a_page_twice_is_refused(check):
    # Positions 4..11 of one sequence: page indexes 1 and 2 both name page 0, slot 3 twice.
    offs = np.array([0, 5], np.uint32)
    clen = np.array([7], np.uint32)
    lut = np.array([[4, 0, 0, 8, 9, 10]], np.uint32)
    with pytest.raises(ValueError, match="sequence 0 writes twice new tokens into page 0"):
        run_check(check, {1: offs, 3: clen, 4: lut})
