"""The CUDA executor on the CPU with device-tensor inputs: read where they lie once they keep
arriving at one address, copied when that is unsafe, and calls from several threads. The
device: tests/runtime/cuda/graph_device.py."""
import numpy as np

from tests.runtime.cuda.graph_device import (Cache, GraphDevice, aligned, checked,  # noqa: F401
                                             executor, program)  # program: a fixture
import torch  # noqa: E402  (after the interpreter switch)


def test_a_device_input_at_a_repeated_address_is_read_in_place(program):
    ex, dev = executor(program)
    copies = []
    dev.copy_in = lambda *a, _f=dev.copy_in: (copies.append(a[2]), _f(*a))
    cache = Cache(np.random.default_rng(17), [37, 90])
    x = None
    for i in range(6):                          # new numbers at one address
        qkv, *rest = cache.inputs([1, 1])
        if x is None:
            x = aligned(qkv)
        else:
            x.copy_(torch.from_numpy(qkv))
        checked(ex, cache, x, qkv, rest)
    # build + eager, capture, a copying hit, the direct graph captured, then replayed: only
    # the one hit copied x
    assert ex.stats["captures"] == 1 and ex.stats["fast_hits"] == 4
    assert ex.stats["direct_builds"] == 1 and ex.stats["direct_hits"] == 3
    assert len(copies) == 1 and len(dev.plan_graphs) == 1
    # The direct "graphs" (one a staging slot, led by its upload) read x's own storage,
    # never the input area.
    (entry,) = ex._sigs.values()
    (io,) = entry.plans.values()
    (d,) = io.direct.values()
    graphs = d.bound.slot_graphs.graphs
    assert len(graphs) == 3 and all(g[0][0] == "stage" for g in graphs)
    assert all(any(a[0].data_ptr() == x.data_ptr() for op in g if op[0] == "launch"
                   for a in op[3] if isinstance(a, tuple)) for g in graphs)
    # another address: copied, right numbers; back to the first: its graph again
    qkv, *rest = cache.inputs([1, 1])
    checked(ex, cache, aligned(qkv), qkv, rest)
    assert len(copies) == 2
    qkv, *rest = cache.inputs([1, 1])
    x.copy_(torch.from_numpy(qkv))
    checked(ex, cache, x, qkv, rest)
    assert len(copies) == 2 and ex.stats["direct_hits"] == 4


def test_an_input_inside_a_buffer_the_graph_writes_is_copied_first(program):
    # qkv given as a view into the KV blocks the call writes: read in place, the numbers
    # would depend on the write order; the copy takes them before anything runs.
    ex, dev = executor(program)
    cache = Cache(np.random.default_rng(18), [40, 21])
    flat = cache.dev.view(-1)
    for _ in range(4):
        qkv, *rest = cache.inputs([1, 1])
        n = qkv.size
        start = (-flat.data_ptr() % 256) // 4 + 256  # aligned, inside the pool
        x = flat[start:start + n].view(qkv.shape)
        x.copy_(torch.from_numpy(qkv))
        cache.ref.reshape(-1)[start:start + n] = qkv.reshape(-1)
        checked(ex, cache, x, qkv, rest)
    assert ex.stats["fast_hits"] == 2 and ex.stats["direct_builds"] == 0


def test_calls_from_two_threads_do_not_mix(program):
    # A call's staging, uploads and launches use the executor's one staging area and its
    # plans' fixed device areas: calls from two threads must not interleave (execute holds a
    # lock). Threads switch as often as CPython allows, so an unlocked executor mixes them.
    import threading

    from graphir.runtime.cuda.executor import PlanExecutor
    from tests.threads import run_in_threads

    class OneStream(GraphDevice):
        """Kernels one at a time, as a stream runs them (Triton's interpreter is not
        thread-safe either)."""

        def __init__(self, prog):
            super().__init__(prog)
            self._one = threading.Lock()

        def launch(self, key, grid, args):
            with self._one:
                super().launch(key, grid, args)

    g, prog = program
    # Outputs of their own (copy_outputs), kept past the next call of the other thread.
    ex = PlanExecutor(prog.plan.to_json(), g, OneStream(prog), {}, copy_outputs=True)

    def worker(seed):
        cache = Cache(np.random.default_rng(seed), [30 + seed, 90])
        for _ in range(3):
            cache.step(ex, [1, 1])

    run_in_threads(worker, (1, 2))
