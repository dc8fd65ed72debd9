"""tools/tile_balance.py: the persistent prefill kernels' share of work per program, modeled
with the kernels' own tile order."""
import numpy as np

from graphir.tools import tile_balance as tb


def test_the_order_covers_every_tile_once_longest_first_within_a_group():
    order = tb.tile_order(n_m=16, n_b=4, nh=32, nkv=8, d=128, block_m=128)
    assert len({tuple(r) for r in order}) == len(order) == 16 * 32 * 4
    # The first tiles are the longest (the last query tile), the last ones the shortest.
    assert (order[:32, 0] == 15).all() and (order[-32:, 0] == 0).all()


def test_busiest_program_by_hand():
    # Two programs, tiles of 4, 3, 2, 1 blocks. Stride: 4 + 2 and 3 + 1. Counter: each takes
    # its next tile as it starts the current one (ties to the lower number), so program 0
    # takes the 2 at time 0 and program 1 the 1: also 6 and 4. Busiest 6 of a mean of 5.
    assert tb.busiest_over_mean(np.array([4, 3, 2, 1]), 2) == (6 / 5, 6 / 5)
    # Tiles of 4, 1, 1, 1, 1, 1, 1: the stride gives program 0 4 + 1 + 1 + 1; from the
    # counter program 0 takes one 1 (at time 0) and program 1 the other four: 5 and 5.
    assert tb.busiest_over_mean(np.array([4, 1, 1, 1, 1, 1, 1]), 2) == (7 / 5, 1.0)


def test_the_counter_evens_out_causal_prefill():
    # What the DYN configs are for (flash_attention_persistent.py): at B4 x 2048 causal the
    # stride leaves the busiest of 132 programs 15% over the mean, the counter within 2%.
    order = tb.tile_order(16, 4, 32, 8, 128, 128)
    stride, greedy = tb.busiest_over_mean(tb.key_blocks(order, 2048, "causal", 128, 128), 132)
    assert stride > 1.1 and greedy < 1.02
    # Without a mask every tile is the same work: nothing to even out.
    stride, greedy = tb.busiest_over_mean(tb.key_blocks(order, 2048, "none", 128, 128), 132)
    assert stride == greedy


def test_key_blocks_by_hand():
    # 300 tokens in 128-row tiles and 128-key blocks: tiles 0..2 see keys up to rows 127,
    # 255 and 299; a window of 100 keys starts tile 2 (rows 256..299) at key 157, block 1.
    order = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]])
    assert tb.key_blocks(order, 300, "causal", 128, 128).tolist() == [1, 2, 3]
    assert tb.key_blocks(order, 300, "none", 128, 128).tolist() == [3, 3, 3]
    assert tb.key_blocks(order, 300, 100, 128, 128).tolist() == [1, 2, 2]
