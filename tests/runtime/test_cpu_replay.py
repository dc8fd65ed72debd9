"""The compiled CPU model's replayed calls (runtime/cpu_replay.py): after the first call of an
input signature the kernels run from descriptors built once, with only the caller's arrays'
and the new outputs' pointers written in. Checked bit for bit against the general path (the
same kernels, descriptors rebuilt every call) over a decode loop on new arrays each step, and
the fallbacks: a non-contiguous input, another signature that regrows the slot memory,
outputs that alias an input or a weight."""
from __future__ import annotations

import numpy as np
import pytest

from graphir import DType, Graph, TensorType, Weight, ops
from graphir.examples.llama_attention import build_tiny, random_weights
from tests.runtime.test_bad_metadata import good_inputs

pytest.importorskip("mlir.ir")


def _load(g, weights, replay: bool):
    from graphir.runtime.session import InferenceSession

    m = InferenceSession().load(g, weights=weights)
    if not replay:   # the general path every call: no signature ever gets a replay
        m._replays = _NoReplays()
    return m


class _NoReplays(dict):
    def __setitem__(self, key, value):
        super().__setitem__(key, None)


@pytest.fixture(scope="module")
def layer():
    g = build_tiny()
    w = random_weights(g, seed=5)
    return g, w, _load(g, w, True), _load(g, w, False)


def test_a_decode_loop_replays_bit_for_bit(layer):
    from graphir.runtime.cpu_replay import Replay

    g, w, fast, slow = layer
    blocks = good_inputs(np.random.default_rng(0))[2]
    blocks_f, blocks_s = blocks.copy(), blocks.copy()
    for step in range(6):
        # new arrays for every input each step, as a serving loop hands over, the cache
        # carried across steps; steps 1.. share one signature
        new, cached = ((3, 2), (4, 0)) if step == 0 else ((1, 1), (7 + step % 2, 2 + step))
        ins = good_inputs(np.random.default_rng(10 + step), new=new, cached=cached)
        rest = [ins[0], ins[1], None, ins[3], ins[4], ins[5]]
        got = fast.execute(*[blocks_f if a is None else a.copy() for a in rest])
        want = slow.execute(*[blocks_s if a is None else a for a in rest])
        for u, v in zip(got, want):
            np.testing.assert_array_equal(u, v, err_msg=f"step {step}")
        np.testing.assert_array_equal(blocks_f, blocks_s, err_msg=f"cache after step {step}")
    assert sum(isinstance(r, Replay) for r in fast._replays.values()) >= 2
    assert all(r is None for r in slow._replays.values())


def test_replayed_calls_skip_the_general_path_and_return_new_arrays(layer, monkeypatch):
    g, w, fast, _ = layer
    ins = good_inputs(np.random.default_rng(1), new=(1, 1), cached=(5, 3))
    first = fast.execute(*[a.copy() for a in ins])
    monkeypatch.setattr(type(fast), "_run", lambda *a, **k: pytest.fail("general path ran"))
    second = fast.execute(*[a.copy() for a in ins])
    ins2 = [a.copy() for a in ins]
    ins2[0] = ins2[0] * 2
    third = fast.execute(*ins2)
    for a, b, c in zip(first, second, third):
        np.testing.assert_array_equal(a, b)
        assert not np.shares_memory(a, b) and not np.shares_memory(b, c)
        assert not np.array_equal(b, c)     # x doubled: the third call read its own x
    np.testing.assert_array_equal(first[0], second[0])   # the earlier result untouched


def test_fallbacks_stay_right(layer):
    """A non-contiguous x (the general path copies it), then a bigger signature that regrows
    the slot memory, then the first signature again: the same numbers as the general path."""
    g, w, fast, slow = layer
    rng = np.random.default_rng(2)
    small = good_inputs(rng, new=(1, 1), cached=(3, 6))
    big = good_inputs(rng, new=(5, 6), cached=(3, 2))
    wide = np.zeros((2, 128), np.float32)
    wide[:, ::2] = small[0]
    for ins in (small, [wide[:, ::2]] + small[1:], big, small, small):
        b_f, b_s = ins[2].copy(), ins[2].copy()
        got = fast.execute(ins[0], ins[1], b_f, *ins[3:])
        want = slow.execute(ins[0], ins[1], b_s, *ins[3:])
        for u, v in zip(got, want):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(b_f, b_s)


def test_outputs_that_alias_an_input_or_a_weight_are_copies():
    with Graph("alias", input_types=[TensorType(DType.float32, [4, 8])]) as g:
        x = g.inputs[0]
        wv = Weight("w", DType.float32, [4, 8])
        g.output(x, wv, ops.add(x, wv), ops.reshape(ops.mul(x, x), [8, 4]))
    w = {"w": np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)}
    m = _load(g, w, True)
    outs = []
    for k in range(4):
        x = np.full((4, 8), float(k + 1), np.float32)
        if k == 0:   # the signature's first call on a strided x: no replay is built from it
            x = np.repeat(x, 2, axis=1)[:, ::2]
        o = m.execute(x)
        x[...] = -7.0     # the caller's array changes after the call
        outs.append(o)
        np.testing.assert_array_equal(o[0], k + 1)
        np.testing.assert_array_equal(o[1], w["w"])
        np.testing.assert_array_equal(o[2], (k + 1) + w["w"])
        np.testing.assert_array_equal(o[3], np.full((8, 4), (k + 1.0) ** 2))
        o[1][...] = 0.0   # a caller writing into its outputs touches nothing of the model's
    np.testing.assert_array_equal(outs[0][2], 1 + w["w"])


def test_a_signature_traced_before_the_slots_grew_is_traced_again(layer, monkeypatch):
    """A prefill bigger than any before regrows the slot memory: the decode signature's replay
    then points at the old slots, so its next call traces it again and later calls replay."""
    g, w, _, slow = layer
    fast = _load(g, w, True)
    rng = np.random.default_rng(4)
    small = good_inputs(rng, new=(1, 1), cached=(3, 6))
    big = good_inputs(rng, new=(6, 7), cached=(2, 1))
    sig = tuple((a.shape, a.dtype) for a in small)
    fast.execute(*[a.copy() for a in small])
    before = fast._slot_version
    fast.execute(*[a.copy() for a in big])
    assert fast._slot_version > before and fast._replays[sig].slot_version == before
    want = slow.execute(*[a.copy() for a in small])
    got = fast.execute(*[a.copy() for a in small])    # traced again
    assert fast._replays[sig].slot_version == fast._slot_version
    monkeypatch.setattr(type(fast), "_run", lambda *a, **k: pytest.fail("general path ran"))
    again = fast.execute(*[a.copy() for a in small])
    for u, v, z in zip(got, want, again):
        np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(z, v)
