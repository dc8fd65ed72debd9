"""Bad ragged/paged metadata and bad buffers, on the interpreter and the compiled CPU path: a
clean ValueError naming the input, and the KV cache exactly as it was (nothing written)."""
from __future__ import annotations

import numpy as np
import pytest

from graphir import DType, Graph, TensorType
from graphir.examples.llama_attention import build_tiny, random_weights
from tests.backends.harness import BACKENDS, execute

POOL, PAGE, MAX_PAGES = 9, 4, 4        # pool pages (+1 null page), page size, LUT width
ROPE_ROWS = 2 * 64                     # build_tiny: max_seq_len 64


@pytest.fixture(scope="module")
def layer():
    g = build_tiny()
    return g, random_weights(g, seed=3)


def good_inputs(rng, new=(3, 2), cached=(4, 0)):
    offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
    lut = np.full((len(new), MAX_PAGES), POOL, np.uint32)
    pages = rng.permutation(POOL)
    for b, (n, c) in enumerate(zip(new, cached)):
        k = -(-(n + c) // PAGE)
        lut[b, :k] = pages[:k]
        pages = pages[k:]
    blocks = rng.standard_normal((POOL + 1, 2, 2, PAGE, 2, 16)).astype(np.float32)
    x = rng.standard_normal((int(offs[-1]), 64)).astype(np.float32)
    maxl = np.array([[max(new), max(n + c for n, c in zip(new, cached))]], np.uint32)
    return [x, offs, blocks, np.asarray(cached, np.uint32), lut, maxl]


def _lut(v):
    def edit(a):
        a[4][0, 0] = v
    return edit


def _set(k, value):
    def edit(a):
        a[k] = np.asarray(value, a[k].dtype)
    return edit


CASES = {
    "page id one past the pool": (_lut(POOL + 1), "lookup_table"),
    "page id 100000": (_lut(100000), "lookup_table"),
    "page id 2**31": (_lut(2 ** 31), "lookup_table"),
    "offsets end past the rows": (_set(1, [0, 3, 6]), "input_row_offsets"),
    "offsets decrease": (_set(1, [0, 4, 3]), "input_row_offsets"),
    "offsets do not start at 0": (_set(1, [1, 3, 5]), "input_row_offsets"),
    "cache length beyond the pages": (_set(3, [40, 0]), "cache_lengths"),
    "positions past the rope table": (_set(3, [ROPE_ROWS, 0]), "cache_lengths"),
}


def _lut_row1_shares_page(a):
    a[4][1, 0] = a[4][0, 1]   # sequence 1 (2 new tokens, no cache) writes into sequence 0's page


# Refused by the compiled path's fast check too (test_bad_metadata_after_good_calls_...).
SHARED_WRITE = {"two sequences write one page": (_lut_row1_shares_page, "lookup_table")}


def bad_inputs(good, case):
    """(a copy of `good` with `case`'s fault, the input names its error must mention)."""
    a = [x.copy() for x in good]
    edit, names = {**CASES, **SHARED_WRITE}[case]
    edit(a)
    if case == "positions past the rope table":  # give the sequence enough pages
        a[4] = np.full((2, ROPE_ROWS // PAGE + 1), POOL, np.uint32)
        a[4][0, :] = 0
        a[4][1, 0] = 1
    return a, names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.replace(" ", "_"))
def test_bad_metadata_is_refused_and_nothing_is_written(layer, backend, case):
    g, w = layer
    a, names = bad_inputs(good_inputs(np.random.default_rng(11)), case)
    before = a[2].copy()
    with pytest.raises(ValueError, match=names):
        execute(backend, g, *a, weights=w)
    np.testing.assert_array_equal(a[2], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_metadata_runs(layer, backend):
    g, w = layer
    a = good_inputs(np.random.default_rng(12))
    before = a[2].copy()
    (y,) = execute(backend, g, *a, weights=w)
    assert y.shape == (5, 64) and np.isfinite(y).all()
    assert (a[2] != before).any()  # the new tokens' K/V were stored


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["flag", "frombuffer", "memmap"])
def test_read_only_kv_buffers_are_refused(layer, backend, kind, tmp_path):
    g, w = layer
    a = good_inputs(np.random.default_rng(13))
    blocks = a[2]
    if kind == "flag":
        blocks.flags.writeable = False
    elif kind == "frombuffer":
        blocks = np.frombuffer(blocks.tobytes(), np.float32).reshape(blocks.shape)
    else:
        f = tmp_path / "kv.bin"
        blocks.tofile(f)
        blocks = np.memmap(f, np.float32, "r", shape=blocks.shape)
    a[2] = blocks
    with pytest.raises(ValueError, match="read-only"):
        execute(backend, g, *a, weights=w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_past_a_symbolic_dim(backend):
    with Graph("pick", input_types=[TensorType(DType.float32, ["m", 4])]) as g:
        g.output(g.inputs[0][5])
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"gir.slice.*out of range for axis 0 of size m = 2"):
        execute(backend, g, x)
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    (y,) = execute(backend, g, x)
    np.testing.assert_array_equal(y, x[5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_symbolic_extent(backend):
    with Graph("drop", input_types=[TensorType(DType.float32, ["m", 4])]) as g:
        x = g.inputs[0]
        g.output(x[: x.shape[0] - 3])
    with pytest.raises(ValueError, match="out of range"):
        execute(backend, g, np.ones((2, 4), np.float32))


@pytest.fixture(scope="module")
def cpu_model(layer):
    pytest.importorskip("mlir.ir")
    from graphir.runtime.session import InferenceSession

    g, w = layer
    return InferenceSession().load(g, weights=w)


@pytest.mark.parametrize("case", list(CASES) + list(SHARED_WRITE),
                         ids=lambda c: c.replace(" ", "_"))
def test_bad_metadata_after_good_calls_of_its_signature(cpu_model, case):
    """The compiled CPU path checks a signature's metadata the fast way once a call of that
    signature passed (runtime/cpu_executor.py _checked_dims): a bad call of the same shapes
    is still refused, whole, and the next good one runs."""
    rng = np.random.default_rng(13)
    good = good_inputs(rng)
    for _ in range(2):
        cpu_model.execute(*[x.copy() for x in good])
    a, names = bad_inputs(good, case)
    before = a[2].copy()
    with pytest.raises(ValueError, match=names):
        cpu_model.execute(*a)
    np.testing.assert_array_equal(a[2], before)
    (y,) = cpu_model.execute(*[x.copy() for x in good])
    assert np.isfinite(y).all()



def test_good_calls_of_a_seen_signature_skip_the_full_check(cpu_model, monkeypatch):
    good = good_inputs(np.random.default_rng(14))
    cpu_model.execute(*[x.copy() for x in good])
    ragged = cpu_model._checks[1]
    calls = []
    monkeypatch.setattr(ragged, "check", lambda *a, **k: calls.append(a))
    for _ in range(3):
        cpu_model.execute(*[x.copy() for x in good])
    assert calls == []
    odd = [x.copy() for x in good]
    odd[4][0, 3] = POOL + 5   # padding past the pool (sequence 0 uses two pages): valid, but
    cpu_model.execute(*odd)   # the fast check is not sure of it and asks the full one
    assert len(calls) == 1
