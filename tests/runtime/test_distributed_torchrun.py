"""One process per device under torchrun (CPU, gloo): TensorParallel and DataParallel
AttentionWithRope compiled once into `.gdist` bundles, each rank loading its part (its steps, its
weight shard read from a safetensors file, its shard of the paged KV cache) and running a ragged
prefill, decode steps and a mixed chunk; the outputs and each rank's cache equal the
one-process interpreter's run of the whole multi-device graph (float32, 1e-5). In the same job:
a rank refusing its inputs (or failing to load) fails every rank with its message and loses no
state, and the NCCL unique-id bootstrap runs over the real store against a fake libnccl.
A second job kills one rank: the survivor exits non-zero with the error within the timeout.

This file is also the worker: `python test_distributed_torchrun.py --worker CASE OUT`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the worker runs as a script
from tests.runtime.fake_nccl import FakeNccl  # noqa: E402

PAGES, TIMEOUT_S, HIDDEN = 24, 30, 64
TP_SCHED = [([0, 1, 2], [5, 9, 3]), ([0, 1, 2], [1, 1, 1]), ([0, 1, 2], [1, 1, 1]),
            ([2, 0], [4, 1])]
DP_SCHED = TP_SCHED + [([0, 1], [1, 2])]   # the last step leaves rank 1 without rows
DP_OWNER = {0: 0, 1: 0, 2: 1}
KILL_AT = 2
TORCHRUN_UID = bytes(range(7, 12)) + b"\0" + bytes(range(13, 135))  # all 128 bytes must travel


def tokens(step: int, n: int) -> np.ndarray:
    return np.random.default_rng(1000 + step).standard_normal((n, HIDDEN)).astype(np.float32)


def dp_rows(step: int, seq: int, n: int) -> np.ndarray:
    return np.random.default_rng(2000 + 10 * step + seq).standard_normal((n, HIDDEN)) \
        .astype(np.float32)


def fill(manager, rank: int) -> None:
    manager.blocks[...] = np.random.default_rng(500 + rank).standard_normal(manager.blocks_shape)


def dp_step(manager, owner_ids, rank, step, seqs, counts):
    """(this rank's inputs, the prepared step or None) of one DP step."""
    mine = [(s, n) for s, n in zip(seqs, counts) if DP_OWNER[s] == rank]
    if not mine:
        z = np.zeros
        return [z((0, HIDDEN), np.float32), z(1, np.uint32), manager.blocks, z(0, np.uint32),
                z((0, 1), np.uint32), z((1, 2), np.uint32)], None
    st = manager.prepare_step([owner_ids[s] for s, _ in mine], [n for _, n in mine])
    x = np.concatenate([dp_rows(step, s, n) for s, n in mine])
    return [x, st.input_row_offsets, manager.blocks, st.cache_lengths, st.lookup_table,
            st.max_lengths], st


# ---- workers (run by torchrun) -----------------------------------------------------------------
def _worker_layers(out: Path, bundles: dict) -> None:
    from safetensors.numpy import load_file

    from graphir.runtime import InferenceSession
    from graphir.runtime.distributed import DistributedConfig, DistributedError, init
    from graphir.runtime.distributed_cuda import make_communicator

    ctx = init(DistributedConfig.from_env(timeout_s=TIMEOUT_S))
    r, res, notes = ctx.rank, {}, {}
    session = InferenceSession(distributed=ctx)
    # A rank that cannot load (a missing weight) fails every rank, naming itself.
    partial = load_file(bundles["tp_weights"])
    if r == 1:
        partial.pop("o_proj.weight[1]")
    try:
        session.load(bundles["tp"], weights=partial)
    except (ValueError, DistributedError) as e:
        notes["load_error"] = f"{type(e).__name__}: {e}"
    tp = session.load(bundles["tp"], weights=bundles["tp_weights"])
    notes["tp_weights"] = tp.weight_names
    kv = tp.kv_cache_manager(total_num_pages=PAGES)
    fill(kv, r)
    for _ in range(3):
        kv.claim()
    for k, (seqs, counts) in enumerate(TP_SCHED):
        st = kv.prepare_step(seqs, counts)
        full = [tokens(k, sum(counts)), st.input_row_offsets] + [None] * 8
        full[2 + 4 * r: 6 + 4 * r] = [kv.blocks, st.cache_lengths, st.lookup_table, st.max_lengths]
        if k == 1:  # rank 1 sends a page id outside its pool: refused everywhere, nothing runs
            bad = list(full)
            if r == 1:
                bad[2 + 4 * r + 2] = np.full_like(st.lookup_table, PAGES + 7)
            before = kv.blocks.copy()
            try:
                tp.execute(*tp.select_inputs(bad))
            except (ValueError, DistributedError) as e:
                notes["call_error"] = f"{type(e).__name__}: {e}"
            notes["unchanged_after_refusal"] = bool(np.array_equal(before, kv.blocks))
        (res[f"tp_y{k}"],) = tp.execute(*tp.select_inputs(full))
        kv.commit_step(st)
    res["tp_blocks"] = kv.blocks
    try:  # ranks at different steps: both told so, nothing runs, the job stays usable
        if r == 0:
            ctx.barrier("a barrier")
        else:
            tp.execute(*tp.select_inputs(full))
    except DistributedError as e:
        notes["mismatch"] = str(e)
    dp = session.load(bundles["dp"], weights=bundles["dp_weights"])
    kv = dp.kv_cache_manager(total_num_pages=PAGES)
    fill(kv, r)
    ids = {s: kv.claim() for s, o in DP_OWNER.items() if o == r}
    for k, (seqs, counts) in enumerate(DP_SCHED):
        mine, st = dp_step(kv, ids, r, k, seqs, counts)
        full = [None] * 12
        full[6 * r: 6 * r + 6] = mine
        (res[f"dp_y{k}"],) = dp.execute(*dp.select_inputs(full))
        if st is not None:
            kv.commit_step(st)
    res["dp_blocks"] = kv.blocks
    lib = FakeNccl(uid=TORCHRUN_UID)   # the NCCL bootstrap over the job's real store
    comm = make_communicator(ctx, None, key="nccl/test", lib=lib)
    notes["nccl"] = [lib.names(), lib.init[0].hex(), lib.init[1], lib.init[2], comm._comm.value]
    ctx.close()
    np.savez(out / f"rank{r}.npz", **res)
    (out / f"rank{r}.json").write_text(json.dumps(notes))


def _worker_kill(out: Path, bundles: dict) -> None:
    from graphir.runtime import InferenceSession
    from graphir.runtime.distributed import DistributedConfig

    session = InferenceSession(distributed=DistributedConfig.from_env())
    model = session.load(bundles["tp"], weights=bundles["tp_weights"])
    kv = model.kv_cache_manager(total_num_pages=PAGES)
    fill(kv, model.rank)
    kv.claim()
    for k in range(2 * KILL_AT):
        if model.rank == 1 and k == KILL_AT:
            (out / "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        st = kv.prepare_step([0], [1])
        full = [tokens(k, 1), st.input_row_offsets] + [None] * 8
        full[2 + 4 * model.rank: 5 + 4 * model.rank] = [kv.blocks, st.cache_lengths,
                                                        st.lookup_table]
        model.execute(*model.select_inputs(full))
        kv.commit_step(st)
    (out / f"finished{model.rank}").write_text("the survivor ran past the kill")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _case, _out = sys.argv[2], Path(sys.argv[3])
    _bundles = json.loads((_out / "bundles.json").read_text())
    {"layers": _worker_layers, "kill": _worker_kill}[_case](_out, _bundles)
    sys.exit(0)


# ---- the tests ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    return env


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, __file__, "--worker"]


def _need_two_gpus():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: run the GPU tests in their own pytest process")
    from graphir.runtime.cuda import driver, nccl

    if not driver.is_available() or driver.device_count() < 2:
        pytest.skip("needs 2 NVIDIA GPUs")
    if not nccl.is_available():
        pytest.skip("needs libnccl")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda:sm_90", marks=pytest.mark.gpu)])
def bundles(request, tmp_path_factory):
    """The TP and DP layers compiled once for the target (the cuda run is for a machine with
    two GPUs: one process per GPU, NCCL between them)."""
    target = request.param
    pytest.importorskip("mlir.ir" if target == "cpu" else "triton")
    pytest.importorskip("torch.distributed")
    if target != "cpu":
        _need_two_gpus()
    from safetensors.numpy import save_file

    from graphir.nn import DataParallelAttentionWithRope, TensorParallelAttentionWithRope
    from graphir.runtime.distributed_artifact import compile_distributed
    from tests.nn.test_parallel import cpus, dp_graph, make, random_state, tp_graph

    d = tmp_path_factory.mktemp("dist")
    devs = cpus(2)
    rope, kvp, tp = make(TensorParallelAttentionWithRope, 2, devs, has_bias=True,
                         use_qk_norm=True)
    tp.load_state_dict({k: v for k, v in random_state(tp, 7).items() if "[" not in k})
    rope_dp, kvp_dp, dp = make(DataParallelAttentionWithRope, 2, devs, has_bias=True,
                               _fuse_rope_and_store=False)
    dp.load_state_dict({k: v for k, v in random_state(dp, 8).items() if "[" not in k})
    out = {"graphs": {"tp": tp_graph(tp, rope, kvp, devs), "dp": dp_graph(dp, rope_dp, kvp_dp, devs)},
           "weights": {"tp": tp.state_dict(), "dp": dp.state_dict()}, "dir": d, "paths": {}}
    out["target"] = target
    for name in ("tp", "dp"):
        compile_distributed(out["graphs"][name], target, out=d / f"{name}.gdist")
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out["weights"][name].items()},
                  str(d / f"{name}.safetensors"))
        out["paths"][name] = str(d / f"{name}.gdist")
        out["paths"][f"{name}_weights"] = str(d / f"{name}.safetensors")
    return out


def _job_dir(bundles, name) -> Path:
    job = bundles["dir"] / name
    job.mkdir()
    (job / "bundles.json").write_text(json.dumps(bundles["paths"]))
    return job


def _reference(bundles):
    """The interpreter's run of the whole multi-device graphs in one process."""
    from graphir.runtime.interpreter import run
    from tests.nn.harness import manager

    want = {}
    ms = [manager(n_kv_heads=1, pages=PAGES), manager(n_kv_heads=1, pages=PAGES)]
    for r, m in enumerate(ms):
        fill(m, r)
        for _ in range(3):
            m.claim()
    for k, (seqs, counts) in enumerate(TP_SCHED):
        sts = [m.prepare_step(seqs, counts) for m in ms]
        args = [tokens(k, sum(counts)), sts[0].input_row_offsets]
        for m, st in zip(ms, sts):
            args += [m.blocks, st.cache_lengths, st.lookup_table, st.max_lengths]
        want[f"tp_y{k}"] = run(bundles["graphs"]["tp"], *args, weights=bundles["weights"]["tp"])
        for m, st in zip(ms, sts):
            m.commit_step(st)
    want["tp_blocks"] = [m.blocks for m in ms]
    ms = [manager(n_kv_heads=2, pages=PAGES), manager(n_kv_heads=2, pages=PAGES)]
    ids = []
    for r, m in enumerate(ms):
        fill(m, r)
        ids.append({s: m.claim() for s, o in DP_OWNER.items() if o == r})
    for k, (seqs, counts) in enumerate(DP_SCHED):
        per = [dp_step(m, ids[r], r, k, seqs, counts) for r, m in enumerate(ms)]
        want[f"dp_y{k}"] = run(bundles["graphs"]["dp"], *[a for p in per for a in p[0]],
                               weights=bundles["weights"]["dp"])
        for m, (_, st) in zip(ms, per):
            if st is not None:
                m.commit_step(st)
    want["dp_blocks"] = [m.blocks for m in ms]
    return want


def test_tp_and_dp_under_torchrun_match_one_process(bundles):
    job = _job_dir(bundles, "layers")
    p = subprocess.run(torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
                       + ["layers", str(job)], env=launch_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    want = _reference(bundles)
    for r in range(2):
        got, notes = np.load(job / f"rank{r}.npz"), json.loads((job / f"rank{r}.json").read_text())
        for key in want:
            if bundles["target"] == "cpu":
                np.testing.assert_allclose(got[key], want[key][r], rtol=1e-5, atol=1e-5,
                                           err_msg=f"rank {r} {key}")
            else:  # float32 dots on the GPU may round their inputs to tf32
                err = np.linalg.norm(got[key] - want[key][r]) / max(np.linalg.norm(want[key][r]),
                                                                    1e-30)
                assert err <= 1e-2, f"rank {r} {key}: norm-relative error {err:.2e}"
        shard = sorted(k for k in bundles["weights"]["tp"] if k.endswith(f"[{r}]"))
        assert notes["tp_weights"] == shard and len(shard) == 9
        assert notes["unchanged_after_refusal"] is True
        calls, uid, nranks, rank, handle = notes["nccl"]
        assert (nranks, rank, handle) == (2, r, 0x100 + r)
        assert uid == TORCHRUN_UID.hex()
        assert calls == (["ncclGetUniqueId"] if r == 0 else []) + ["ncclCommInitRank"]
    one = json.loads((job / "rank1.json").read_text())
    zero = json.loads((job / "rank0.json").read_text())
    assert one["load_error"].startswith("ValueError: weight 'o_proj.weight[1]'")
    assert "loading was refused by rank(s) [1]" in zero["load_error"]
    assert "o_proj.weight[1]" in zero["load_error"]
    assert one["call_error"].startswith("ValueError:") and "lookup" in one["call_error"]
    assert zero["call_error"].startswith("DistributedError:")
    assert "rank 0 is at 'a barrier' (barrier) but rank(s) [1] are at another step" \
        in zero["mismatch"]
    assert "rank 1 is at \"call of 'tp.rank1'\" (call) but rank(s) [0]" in one["mismatch"]
    assert "refused by rank(s) [1]" in zero["call_error"] and "no rank ran it" in zero["call_error"]


def test_a_killed_rank_fails_the_survivor_within_the_timeout(bundles):
    """Two torchrun agents (one per 'node', as on two hosts): the agent of the killed rank does
    not stop the survivor, which must fail by itself."""
    job = _job_dir(bundles, "kill")
    port, timeout = str(free_port()), 20
    env = launch_env(GRAPHIR_DIST_TIMEOUT=str(timeout))
    procs = [subprocess.Popen(torchrun("--nnodes", "2", "--node_rank", str(n), "--nproc_per_node",
                                       "1", "--master_addr", "127.0.0.1", "--master_port", port)
                              + ["kill", str(job)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ended = time.time()
    assert (job / "killed_at").exists(), outs[1][1][-3000:]
    assert procs[1].returncode != 0
    assert procs[0].returncode != 0, outs[0][1][-3000:]
    assert not (job / "finished0").exists()
    err = outs[0][1]
    assert "graphir.distributed:" in err and "failed on rank 0 of 2: a peer process died" in err, \
        err[-3000:]
    assert ended - float((job / "killed_at").read_text()) < timeout


def test_bundle_manifest_tampering_and_ranks_are_refused(bundles, tmp_path):
    import shutil

    from graphir.lowering.artifact import ArtifactError
    from graphir.runtime.distributed_artifact import load_bundle

    b = load_bundle(bundles["paths"]["tp"])
    assert b.world_size == 2 and b.manifest["devices"] == ["cpu:0", "cpu:1"]
    assert b.rank_info(1)["inputs"] == [0, 1, 6, 7, 8]
    assert b.artifact(1).graph().name == "tp.rank1"
    with pytest.raises(ValueError, match="compiled for 2 ranks, there is no rank 2"):
        b.rank_info(2)
    copy = tmp_path / "tp.gdist"
    shutil.copytree(bundles["paths"]["tp"], copy)
    m = json.loads((copy / "distributed.json").read_text())
    m["ranks"][1]["inputs"] = [0, 1, 2, 3, 4]
    (copy / "distributed.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="was changed after it was written"):
        load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(bundles["paths"]["tp"], copy)
    shutil.rmtree(copy / "rank1.gart")
    shutil.copytree(copy / "rank0.gart", copy / "rank1.gart")
    with pytest.raises(ArtifactError, match="rank1.gart is not the artifact distributed.json names"):
        load_bundle(copy).artifact(1)
