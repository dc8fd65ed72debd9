"""The executor's fast path on a real GPU: a decode loop of the tiny Llama layer with torch CUDA
tensors, on the executor's own stream and on torch's stream, replayed from one CUDA graph and
equal to the eager executor; hidden states at a reused address read in place by a graph of
their own (other addresses, and the executor's own output, copied); bad metadata refused with
the cache untouched; outputs from the pool vs fresh copies; DLPack export ordered by an
event, not a device sync."""

import numpy as np
import pytest

from graphir.runtime.cuda import driver
from tests.gpu.requires import skip_unless_gpu

pytestmark = pytest.mark.gpu
skip_unless_gpu()

torch = pytest.importorskip("torch")

from graphir import DType  # noqa: E402
from graphir.examples.llama_attention import build_tiny, random_weights  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.runtime.cuda import executor  # noqa: E402

PAGE, NKV, D, LAYERS, POOL, MAX_PAGES = 4, 2, 16, 2, 40, 8


@pytest.fixture(scope="module")
def artifact():
    if driver.device_properties(0).compute_capability != (9, 0):
        pytest.skip("the cubins are built for sm_90")
    g = build_tiny(dtype=DType.bfloat16)
    return compile_graph(g, "cuda:sm_90"), random_weights(g)


def step_inputs(rng, clen, lut):
    b = len(clen)
    x = torch.randn(b, 64, device="cuda").to(torch.bfloat16)
    offs = np.arange(b + 1, dtype=np.uint32)
    return x, offs, clen.copy(), lut, np.array([[1, int(clen.max()) + 1]], np.uint32)


def decode(model, blocks, steps, seed=0, stream_ctx=None):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    clen = np.array([9, 17, 3], np.uint32)
    lut = rng.permutation(POOL)[:3 * MAX_PAGES].reshape(3, MAX_PAGES).astype(np.uint32)
    outs = []
    for _ in range(steps):
        x, offs, c, lut_, maxl = step_inputs(rng, clen, lut)
        (y,) = model.execute(x, offs, blocks, c, lut_, maxl)
        outs.append(torch.from_dlpack(y).clone())
        clen += 1
    torch.cuda.synchronize()
    return outs


def blocks_like(seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(POOL + 1, 2, LAYERS, PAGE, NKV, D, device="cuda",
                       generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("upload_kernel", ["1", "0"], ids=["upload_kernel", "copy_node"])
@pytest.mark.parametrize("on_torch_stream", [False, True], ids=["own_stream", "torch_stream"])
def test_decode_loop_replays_one_graph_and_matches_eager(artifact, on_torch_stream,
                                                         upload_kernel, monkeypatch):
    # Each step's metadata differs (cache lengths grow): a slot graph uploading stale or
    # partial bytes would differ from the eager executor's copies.
    monkeypatch.setenv("GRAPHIR_UPLOAD_KERNEL", upload_kernel)
    art, w = artifact
    kw = {"stream": torch.cuda.current_stream()} if on_torch_stream else {}
    fast = executor.load(art, w, **kw)
    eager = executor.load(art, w, use_graphs=False)
    b_fast, b_eager = blocks_like(), blocks_like()
    got = decode(fast, b_fast, 8)
    want = decode(eager, b_eager, 8)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b), i
    assert torch.equal(b_fast, b_eager)
    st = fast.executor.stats
    assert st["plans_built"] == 1 and st["captures"] == 1 and st["replays"] == 6
    assert st["fast_hits"] == 6  # every replay after the capturing call took the fast path
    # one slot graph per staging slot, each led by the kernel (or by the copy node)
    assert st["slot_captures"] >= 1
    assert fast.executor.dev._upload_kernel.launches == (st["slot_captures"]
                                                         if upload_kernel == "1" else 0)


def test_a_reused_x_address_is_read_in_place_and_matches_eager(artifact):
    # x refilled in place (a serving loop's buffer, or torch's allocator handing the address
    # back), then a fresh tensor, then the executor's own output as the next input (read in
    # place it would be overwritten by the graph reading it: copied), then x again.
    art, w = artifact
    fast = executor.load(art, w, stream=torch.cuda.current_stream())
    eager = executor.load(art, w, use_graphs=False)
    b_fast, b_eager = blocks_like(), blocks_like()
    rng = np.random.default_rng(11)
    torch.manual_seed(11)
    clen = np.array([9, 17, 3], np.uint32)
    lut = rng.permutation(POOL)[:3 * MAX_PAGES].reshape(3, MAX_PAGES).astype(np.uint32)
    x = torch.empty(3, 64, device="cuda", dtype=torch.bfloat16)
    y = None
    for i in range(10):
        fresh, offs, c, lut_, maxl = step_inputs(rng, clen, lut)
        if i == 5:
            given = fresh                       # another address: copied
        elif i in (6, 7):
            given = y                           # the pool's output: copied (overlap)
        else:
            x.copy_(fresh)
            given = x
        want_x = torch.from_dlpack(given).clone()
        (y,) = fast.execute(given, offs, b_fast, c, lut_, maxl)
        (ye,) = eager.execute(want_x, offs, b_eager, c, lut_, maxl)
        a, b = torch.from_dlpack(y).clone(), torch.from_dlpack(ye).clone()
        assert torch.isfinite(a.float()).all() and torch.equal(a, b), i
        clen += 1
    torch.cuda.synchronize()
    assert torch.equal(b_fast, b_eager)
    st = fast.executor.stats
    # x's graph captured at its second fast call (step 3), replayed at steps 4, 8 and 9
    assert st["plans_built"] == 1 and st["captures"] == 1 and st["fast_hits"] == 8
    assert st["direct_builds"] == 1 and st["direct_hits"] == 4, st


def test_bad_page_id_is_refused_and_the_cache_is_untouched(artifact):
    art, w = artifact
    model = executor.load(art, w)
    blocks = blocks_like()
    decode(model, blocks, 3)
    before = blocks.clone()
    rng = np.random.default_rng(5)
    clen = np.array([9, 17, 3], np.uint32)
    lut = rng.permutation(POOL)[:3 * MAX_PAGES].reshape(3, MAX_PAGES).astype(np.uint32)
    lut[1, 0] = POOL + 1
    x, offs, c, lut_, maxl = step_inputs(rng, clen, lut)
    with pytest.raises(ValueError, match=r"page id 41 at lookup_table\[1, 0\]"):
        model.execute(x, offs, blocks, c, lut_, maxl)
    torch.cuda.synchronize()
    assert torch.equal(blocks, before)


def test_a_step_with_no_new_tokens_runs_nothing_and_the_loop_goes_on(artifact):
    # A batch whose sequences all take no token this step: x has no rows (an empty CUDA
    # tensor, whose address may be 0), every grid is empty; the output is empty, the cache
    # untouched, and the decode loop after it still matches the eager executor.
    art, w = artifact
    model = executor.load(art, w)
    eager = executor.load(art, w, use_graphs=False)
    blocks, b_eager = blocks_like(), blocks_like()
    decode(model, blocks, 3)
    decode(eager, b_eager, 3)
    before = blocks.clone()
    clen = np.array([9, 17, 3], np.uint32)
    lut = np.random.default_rng(0).permutation(POOL)[:3 * MAX_PAGES].reshape(3, MAX_PAGES)
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):                    # the second call: the fast path's signature hit
        (y,) = model.execute(x, np.zeros(4, np.uint32), blocks, clen, lut.astype(np.uint32),
                             np.array([[1, 18]], np.uint32))
        assert tuple(torch.from_dlpack(y).shape) == (0, 64)
    torch.cuda.synchronize()
    assert torch.equal(blocks, before)
    for a, b in zip(decode(model, blocks, 3, seed=4), decode(eager, b_eager, 3, seed=4)):
        assert torch.equal(a, b)


def test_pool_outputs_are_overwritten_copies_are_not(artifact):
    art, w = artifact
    for copy in (False, True):
        model = executor.load(art, w, copy_outputs=copy)
        blocks = blocks_like()
        rng = np.random.default_rng(7)
        clen = np.array([9, 17, 3], np.uint32)
        lut = rng.permutation(POOL)[:3 * MAX_PAGES].reshape(3, MAX_PAGES).astype(np.uint32)
        x, offs, c, lut_, maxl = step_inputs(rng, clen, lut)
        (y1,) = model.execute(x, offs, blocks, c, lut_, maxl)
        first = torch.from_dlpack(y1).clone()
        (y2,) = model.execute(x * 2, offs, blocks, c, lut_, maxl)
        second = torch.from_dlpack(y2).clone()
        assert not torch.equal(first, second)
        assert torch.equal(torch.from_dlpack(y1), first) == copy


def test_enqueue_returns_before_the_gpu_is_done(artifact):
    # Many replays queued back to back: the host finishes long before the device (no
    # per-call synchronize), and the pinned ring only waits when it laps the GPU.
    art, w = artifact
    model = executor.load(art, w)
    blocks = blocks_like()
    rng = np.random.default_rng(9)
    clen = np.array([9, 17, 3], np.uint32)
    lut = rng.permutation(POOL)[:3 * MAX_PAGES].reshape(3, MAX_PAGES).astype(np.uint32)
    x, offs, c, lut_, maxl = step_inputs(rng, clen, lut)
    for _ in range(3):
        model.execute(x, offs, blocks, c, lut_, maxl)
    torch.cuda.synchronize()
    spin = getattr(torch.cuda, "_sleep", None)
    if spin is None:
        pytest.skip("torch.cuda._sleep unavailable")
    from graphir.runtime.cuda import Event

    spin(int(2e8))  # ~0.1 s of GPU work on torch's stream; ours waits for it (DLPack handshake)
    model.execute(x, offs, blocks, c, lut_, maxl)
    done = Event(timing=False).record(model.executor.dev.stream)
    assert not done.query()  # the call returned with its work still queued behind the sleep
    torch.cuda.synchronize()
    done.synchronize()
