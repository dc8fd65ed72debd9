"""The qkv projection and its rope_split_store as one plan step (lowerings/qkv_rope.py): the
plan's variants, and the one-token fused kernel in a layer's steps on the Triton interpreter
against the graph interpreter."""
import dataclasses

import numpy as np
import pytest

from graphir import DType, parse
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.kernels import gemv_rope_store as grs
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc
from graphir.lowering.triton_gpu.lowerings import qkv_rope
from graphir.runtime.interpreter import run
from tests.gpu import family
from tests.lowering.triton_gpu.test_backend_interp import interp_executor

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


def rope_step(program):
    return next(s for s in program.plan.to_json()["steps"] if "rope_split_store" in s["op"])


def spec_names(program, step):
    return [[program.kernels[o["launch"]].name for o in v["ops"]] for v in step["attrs"]["variants"]]


def test_the_layer_plan_fuses_one_token_steps_only(monkeypatch):
    from graphir.examples.llama_attention import build
    from graphir.lowering.triton_gpu.backend import lower

    program = lower(build())
    step = rope_step(program)
    assert step["op"] == qkv_rope.OP
    variants, names = step["attrs"]["variants"], spec_names(program, step)
    assert variants[0]["when"] == "total_seq_len <= 1"
    assert names[0] == [f"gemv_rope_store_bf16_k256w2p1m{grs.META}"]  # the tuned gemv2x256_w2_s1's tile
    assert variants[-1]["when"] is None
    for v, n in zip(variants[1:], names[1:]):  # projection into scratch, then the rope kernel
        assert len(n) == 2 and n[1].startswith("rope_split_store") and v["scratch"][0][0] == "qkv"
    # Every other row count runs what the two steps ran apart: the same launches per range.
    monkeypatch.setattr(qkv_rope, "find_units", lambda *a, **k: [])
    apart = lower(build())
    steps = apart.plan.to_json()["steps"]
    mm = next(s for s in steps if s["op"] == "fused_qkv_matmul")
    rs = next(s for s in steps if s["op"] == "rope_split_store")
    for t in (2, 16, 17, 25, 26, 64, 65, 300, 1024, 1025, 9000):
        v = pick(variants, t)
        want = [pick(mm["attrs"]["variants"], t), pick(rs["attrs"]["variants"], t)]
        assert [o["launch"] for o in v["ops"]] == \
            [o["launch"] for w in want for o in w["ops"]], t


def pick(variants, t):
    from graphir.runtime.cuda.plan_values import evaluate

    return next(v for v in variants if v["when"] is None or evaluate(v["when"],
                                                                     {"total_seq_len": t}))


def test_no_fusion_when_switched_off_or_the_tile_straddles_heads(monkeypatch):
    from graphir.examples.llama_attention import build
    from graphir.lowering.triton_gpu.backend import lower

    monkeypatch.setattr(qkv_rope, "FUSE", False)
    program = lower(build())
    assert not any("gemv_rope" in n for ns in spec_names(program, rope_step(program))
                   for n in ns)
    monkeypatch.setattr(qkv_rope, "FUSE", True)
    force_m1(monkeypatch, "gemv32x256_w4_s1")  # 16 pairs a program, a head has 8 (D 16)
    g, _ = family.build("default", DType.bfloat16)
    program = lower(g)
    assert not any("gemv_rope" in n for ns in spec_names(program, rope_step(program))
                   for n in ns)


def force_m1(monkeypatch, name):
    """The one-row matmul choice replaced by the GEMV config `name` (any shape)."""
    orig = tuning.select

    def select(fam, facts, *a, **k):
        out = orig(fam, facts, *a, **k)
        if fam != "matmul":
            return out
        return [dataclasses.replace(c, config=mc.get(name)) if c.bucket == "m1" else c
                for c in out]
    monkeypatch.setattr(qkv_rope.tuning, "select", select)


# One-token steps of single sequences between a ragged prefill and a three-token step (the
# kernel's own test covers a token among sequences adding none).
SCHEDULE = [([0, 1, 2], family.PREFILL), ([1], [1]), ([2], [1]), ([0, 1, 2], [1, 1, 1]),
            ([0], [1])]


@pytest.mark.parametrize("case,gemv", [("default", "gemv2x256_w2_s1"),
                                       ("bias_interleaved", "gemv16x512_w4_s1")])
def test_fused_steps_match_the_interpreter(monkeypatch, case, gemv):
    from graphir.passes import run_passes

    force_m1(monkeypatch, gemv)
    g, w = family.build(case, DType.float32)
    built = parse(str(g))
    run_passes(g)
    ex, dev = interp_executor(g, w)
    want, wblocks = family.run_schedule(lambda *a: run(built, *a, weights=w)[0], DType.float32,
                                        schedule=SCHEDULE)
    got, gblocks = family.run_schedule(lambda *a: ex.execute(*a)[0], DType.float32,
                                       schedule=SCHEDULE)
    for a, b in zip(got, want):
        assert family.rel_err(a, b) < 1e-5
    np.testing.assert_allclose(gblocks, wblocks, rtol=1e-5, atol=1e-5)
    fused = [n for n in dev.launched if n.startswith("gemv_rope_store")]
    assert len(fused) == 3 and "rope_split_store_fp32_decode_heads" in dev.launched
