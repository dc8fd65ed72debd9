"""Q4_K / Q5_K / Q6_K weights fixed at load on 8-lane (AVX2) targets: repacked once (Q4_K /
Q5_K with their scales unpacked, "q4k_r", "q5k_r"; Q6_K with each 32-byte group of codes
transposed, "q6k_r"), read by the row path as code words in place (lowerings/quant_k_lanes.py,
quant_q6_lanes.py) and by the tile path through the repacked block's decoder. Checked against
the interpreter (float64 of the dequantized weight) on GGML-quantized rows and on random bytes
(every code, high-bit and scale pattern), for the row counts that take the row path (one and
two rows a block), the tile path and both; the repacks against the reference's unpacking of
the six-bit scales and the layout's stated byte order."""
import numpy as np
import pytest

from graphir import DType, Graph, TensorType, Weight, ops
from graphir.ops.quant.gguf_blocks import dequantize_gguf
from graphir.ops.quant.gguf_kquants import (f16_field, kquant_scale_fields, q4_k_codes,
                                            six_bit_pairs)
from graphir.ops.quant.gguf_quantize import quantize_gguf
from graphir.runtime.interpreter import run

from .harness import cpu_runs

pytest.importorskip("mlir.ir")

AVX2 = "cpu:x86-64:avx2"
K = 512
BLOCK = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
LAYOUT = {"Q4_K": "q4k_r", "Q5_K": "q5k_r", "Q6_K": "q6k_r"}


def _rows(rng, n: int, enc: str) -> np.ndarray:
    w = (rng.standard_normal((n, K)) * rng.uniform(0.05, 3, (n, 1))).astype(np.float32)
    return quantize_gguf(w, enc)


def _random_rows(rng, n: int, enc: str) -> np.ndarray:
    """Random bytes in the codes, high bits and (packed) scales; finite float16 d (and dmin)."""
    blocks = rng.integers(0, 256, (n, K // 256, BLOCK[enc]), dtype=np.uint8)
    for off in kquant_scale_fields(enc).values():
        blocks[..., off:off + 2] = rng.uniform(-0.1, 0.1, blocks.shape[:2]).astype(
            np.float16)[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("enc", ["Q4_K", "Q5_K"])
def test_repack_unpacks_the_six_bit_scales(enc):
    from graphir.lowering.mlir_cpu.pack_layout import pack_numpy, packed_shape, repack_kquant

    rows, lay, nb = _random_rows(np.random.default_rng(0), 5, enc), LAYOUT[enc], BLOCK[enc]
    out = repack_kquant(rows, lay)
    assert out.shape == tuple(packed_shape(rows.shape, lay)) == (5, 2 * (nb + 4))
    src, dst = rows.reshape(5, 2, nb), out.reshape(5, 2, nb + 4)
    sc, mn = six_bit_pairs(src[..., 4:16])
    np.testing.assert_array_equal(dst[..., 4:12], sc)
    np.testing.assert_array_equal(dst[..., 12:20], mn)
    np.testing.assert_array_equal(f16_field(dst, 0), f16_field(src, 0))
    np.testing.assert_array_equal(f16_field(dst, 2), f16_field(src, 2))
    # the rest (Q5_K's high bits, the codes) as stored, four bytes on
    np.testing.assert_array_equal(dst[..., 20:], src[..., 16:])
    if enc == "Q4_K":
        np.testing.assert_array_equal(
            q4_k_codes(np.concatenate([src[..., :16], dst[..., 20:]], -1)), q4_k_codes(src))
    np.testing.assert_array_equal(pack_numpy(rows, lay), out)
    with pytest.raises(ValueError, match=f"blocks x {nb}"):
        repack_kquant(rows[:, :200], lay)
    with pytest.raises(ValueError, match="uint8"):
        repack_kquant(rows.astype(np.int16), lay)


def _graph(n_rows: list[int], enc: str = "Q4_K"):
    with Graph("kq", input_types=[TensorType(DType.float32, ["m", K])]) as g:
        g.output(*[ops.qmatmul(enc, None, g.inputs[0],
                               Weight(f"w{i}", DType.uint8, [n, K // 256 * BLOCK[enc]]))
                   for i, n in enumerate(n_rows)])
    return g


def test_q6k_repack_transposes_each_group_of_codes():
    """"q6k_r": d, two zero bytes, the int8 scales, then ql's four and qh's two 32-byte groups,
    byte 4 j + b of a group holding its byte 8 b + j; undone here from that statement."""
    from graphir.lowering.mlir_cpu.pack_layout import pack_numpy, packed_shape, repack_kquant

    rows = _random_rows(np.random.default_rng(2), 3, "Q6_K")
    out = repack_kquant(rows, "q6k_r")
    assert out.shape == tuple(packed_shape(rows.shape, "q6k_r")) == (3, 2 * 212)
    dst = out.reshape(3, 2, 212)
    back = np.empty((3, 2, 210), np.uint8)
    for src_off, dst_off, groups in ((0, 20, 4), (128, 148, 2)):
        for g in range(groups):
            grp = dst[..., dst_off + 32 * g:dst_off + 32 * g + 32]
            for j in range(8):
                for b in range(4):
                    back[..., src_off + 32 * g + 8 * b + j] = grp[..., 4 * j + b]
    back[..., 192:208] = dst[..., 4:20]
    back[..., 208:210] = dst[..., 0:2]
    np.testing.assert_array_equal(dst[..., 2:4], 0)
    np.testing.assert_array_equal(back.reshape(rows.shape), rows)
    np.testing.assert_array_equal(dequantize_gguf(back.reshape(rows.shape), "Q6_K", K),
                                  dequantize_gguf(rows, "Q6_K", K))
    np.testing.assert_array_equal(pack_numpy(rows, "q6k_r"), out)
    with pytest.raises(ValueError, match="blocks x 210"):
        repack_kquant(rows[:, :200], "q6k_r")


@pytest.mark.parametrize("enc", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_weights_fixed_at_load_take_the_lane_path_on_avx2(enc):
    if not cpu_runs(AVX2):
        pytest.skip(f"this CPU cannot run {AVX2}")
    from graphir.runtime.session import InferenceSession

    rng = np.random.default_rng(1)
    # 72 rows: 64 in tile-path panels and 8 the row path takes; 24: no whole panel; random bytes
    weights = {"w0": _rows(rng, 72, enc), "w1": _rows(rng, 24, enc),
               "w2": _random_rows(rng, 40, enc)}
    g = _graph([72, 24, 40], enc)
    model = InferenceSession().load(g, weights=weights, target=AVX2)
    steps = [s for s in model.plan.steps if s.op == "qmatmul"]
    assert [s.attrs.get("prepack") for s in steps] == [[[1, LAYOUT[enc]]]] * 3
    mr = model.artifact.manifest["cpu"]["matmul_block"][0]
    # the row path (blocks of two rows, then one), tiles, both
    for m in (1, 2, 3, 4, 5, mr, 2 * mr + 5):
        x = (rng.standard_normal((m, K)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
        for i, (a, b) in enumerate(zip(model.execute(x), run(g, x, weights=weights))):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()),
                                       err_msg=f"rows {m}, weight {i}")


def test_kquant_layouts_only_for_weights_on_eight_lane_targets():
    """An activation-like Q4_K operand (a graph input), 16-lane targets and the other
    encodings (Q3_K here) keep the stored blocks: the repack runs once at load, and only the
    8-lane row path reads it."""
    from graphir.lowering.driver import Target
    from graphir.lowering.mlir_cpu.backend import emit_module
    from graphir.lowering.mlir_cpu.cpu_target import CpuTarget

    def prepacks(graph, target):
        cpu = CpuTarget.parse(Target.parse(target).cpu)
        _, _, plan = emit_module(graph, cpu)
        return [s.attrs.get("prepack") for s in plan.steps if s.op == "qmatmul"]

    assert prepacks(_graph([24]), AVX2) == [[[1, "q4k_r"]]]
    assert prepacks(_graph([24], "Q5_K"), AVX2) == [[[1, "q5k_r"]]]
    assert prepacks(_graph([24], "Q6_K"), AVX2) == [[[1, "q6k_r"]]]
    with Graph("q3k", input_types=[TensorType(DType.float32, ["m", K])]) as g:
        g.output(ops.qmatmul("Q3_K", None, g.inputs[0], Weight("w", DType.uint8, [24, 220])))
    assert prepacks(g, AVX2) == [None]
    assert prepacks(_graph([24]), "cpu:x86-64:avx512") == [None]
    with Graph("q4k_in", input_types=[TensorType(DType.float32, ["m", K]),
                                      TensorType(DType.uint8, [24, K // 256 * 144])]) as g:
        g.output(ops.qmatmul("Q4_K", None, *g.inputs))
    assert prepacks(g, AVX2) == [None]
