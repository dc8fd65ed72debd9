"""Every AttentionWithRope-family layer compiled for the GPU (Triton cubins, runtime.cuda)
matches the reference interpreter in bf16 (norm-relative error <= 2e-2) through a ragged
prefill, decode steps and a chunked prefill over the paged KV cache; device tensors in and out,
the KV blocks updated in place, and CUDA-graph replays of repeated decode steps."""

import numpy as np
import pytest

from tests.gpu.requires import skip_unless_gpu, sm90  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("sm90")]
skip_unless_gpu()

from graphir import DType  # noqa: E402
from graphir.passes import run_passes  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.runtime.cuda import executor  # noqa: E402
from graphir.runtime.interpreter import run  # noqa: E402
from tests.gpu import family  # noqa: E402

TOL = 2e-2


def compiled(case, fuse=True, use_graphs=True):
    g, w = family.build(case, DType.bfloat16, fuse)
    art = compile_graph(g, "cuda:sm_90")
    ref = family.build(case, DType.bfloat16, fuse)[0]
    run_passes(ref)
    return executor.load(art, w, use_graphs=use_graphs), ref, w


@pytest.mark.parametrize("case", sorted(family.CASES))
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_layer_matches_the_interpreter(case, fuse):
    if not fuse and case in ("no_opaque",):
        pytest.skip("NoOpaque has one form")
    model, ref, w = compiled(case, fuse)
    want, wblocks = family.run_schedule(lambda *a: run(ref, *a, weights=w)[0], DType.bfloat16)
    got, gblocks = family.run_schedule(lambda *a: model.execute(*a)[0], DType.bfloat16)
    for step, (a, b) in enumerate(zip(got, want)):
        assert np.isfinite(a).all(), step
        assert family.rel_err(a, b) <= TOL, (step, family.rel_err(a, b))
    assert family.rel_err(gblocks, wblocks) <= TOL
    # Layer 0 of the cache is never written by this layer (it is layer 1).
    np.testing.assert_array_equal(gblocks[:, :, 0], wblocks[:, :, 0])


def test_device_tensors_in_place_blocks_and_graph_replay():
    torch = pytest.importorskip("torch")
    model, ref, w = compiled("default")
    eager, _, _ = compiled("default", use_graphs=False)
    m = family.manager(DType.bfloat16)
    blocks_t = torch.from_numpy(m.blocks).to("cuda", torch.bfloat16)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((sum(family.PREFILL), family.HIDDEN)).astype(np.float32)
    st = m.prepare_step([0, 1, 2], family.PREFILL)
    (want,) = run(ref, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                  st.max_lengths, weights=w)
    (y,) = model.execute(torch.from_numpy(x).to("cuda", torch.bfloat16), st.input_row_offsets,
                         blocks_t, st.cache_lengths, st.lookup_table, st.max_lengths)
    got = torch.from_dlpack(y).float().cpu().numpy()
    assert family.rel_err(got, want) <= TOL
    assert family.rel_err(blocks_t.float().cpu().numpy(), m.blocks) <= TOL  # written in place
    m.commit_step(st)
    blocks_e = blocks_t.clone()
    for i in range(6):  # decode steps: the 2nd identical launch list is captured, then replayed
        st = m.prepare_step([0, 1, 2], [1, 1, 1])
        xd = torch.randn(3, family.HIDDEN, device="cuda").to(torch.bfloat16)
        args = (st.input_row_offsets, None, st.cache_lengths, st.lookup_table, st.max_lengths)
        (a,) = model.execute(xd, args[0], blocks_t, *args[2:])
        (b,) = eager.execute(xd, args[0], blocks_e, *args[2:])
        ta, tb = torch.from_dlpack(a).float(), torch.from_dlpack(b).float()
        assert torch.equal(ta, tb), i
        assert torch.equal(blocks_t, blocks_e), i
        m.commit_step(st)
    assert len(model.executor._graphs) >= 1


def test_session_runs_the_cuda_artifact():
    from graphir import DeviceRef
    from graphir.runtime.session import InferenceSession

    g, w = family.build("default", DType.bfloat16)
    model = InferenceSession(devices=[DeviceRef.GPU()]).load(g, weights=w)
    ref = family.build("default", DType.bfloat16)[0]
    run_passes(ref)
    want, _ = family.run_schedule(lambda *a: run(ref, *a, weights=w)[0], DType.bfloat16,
                                  schedule=family.SCHEDULE[:2])
    got, _ = family.run_schedule(lambda *a: model.execute(*a)[0], DType.bfloat16,
                                 schedule=family.SCHEDULE[:2])
    for a, b in zip(got, want):
        assert family.rel_err(a, b) <= TOL
