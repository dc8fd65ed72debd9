"""parallel_runtime.c's teams, driven by team_harness.c as MLIR's OpenMP lowering calls them
(one dynamic loop and a barrier a region): every iteration runs exactly once whoever joins,
a num_threads cap holds, and a region finishes with its workers unable to run (held in a
signal handler, as a busy core would keep them): before, the caller waited for every worker,
so such a region hung, and on a loaded machine each region waited ~16 ms for a time slice. A
process forked after its pool started (multiprocessing's fork, a preforking server) hung on its
first region the same way; it now starts a pool of its own."""
import os
import subprocess
from pathlib import Path

import pytest

from graphir.lowering.mlir_cpu import toolchain

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("team") / "team_harness"
    subprocess.run([toolchain._cc(), "-O2", "-o", str(exe), str(HERE / "team_harness.c"),
                    str(toolchain._RUNTIME_C), "-lpthread"], check=True, capture_output=True)
    return exe


def _run(exe, threads: int, *args, one_cpu: bool = False) -> str:
    env = dict(os.environ, GRAPHIR_NUM_THREADS=str(threads))
    pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_cpu else None
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                         timeout=120, env=env, preexec_fn=pin)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout


@pytest.mark.parametrize("threads,seed", [(2, 1), (4, 2), (3, 3)])
def test_every_iteration_runs_once_whoever_joins(harness, threads, seed):
    # Random loop sizes, 1-3 loops a region, members that start late, idle gaps that put
    # the workers to sleep, num_threads caps below the pool.
    assert _run(harness, threads, "stress", 1500, seed).startswith("ok 1500 regions")


@pytest.mark.parametrize("threads", [2, 4])
def test_more_threads_than_cores(harness, threads):
    # All on one CPU: a member waiting for another gives the core away (wait_a_bit), which
    # is the only way the other gets to run; the results stay exact.
    out = _run(harness, threads, "stress", 400, 7 + threads, one_cpu=True)
    assert out.startswith("ok 400 regions"), out


@pytest.mark.parametrize("threads", [2, 4])
def test_a_region_does_not_wait_for_workers_that_cannot_run(harness, threads):
    out = _run(harness, threads, "absent", 200)
    assert out.startswith(f"ok 200 regions with {threads - 1} workers held"), out


@pytest.mark.parametrize("threads", [2, 3])
def test_a_forked_child_runs_regions_on_a_pool_of_its_own(harness, threads):
    out = _run(harness, threads, "fork", 300)
    assert out.startswith(f"ok 300 regions in a forked child with a pool of {threads}"), out
