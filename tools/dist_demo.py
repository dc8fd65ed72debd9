"""Tensor-parallel attention as one process per device, end to end on the CPU:

    torchrun --nproc_per_node 2 -m graphir.tools.dist_demo [--dir DIR] [--target cpu]

Rank 0 builds TensorParallelAttentionWithRope over one device per process, compiles it into a
`.gdist` bundle (every rank's graph and the collective schedule) and writes the weights to a
safetensors file; after a barrier every rank loads its part (its steps, its weight shard, read
alone from the file) and runs a ragged prefill and decode steps on its own shard of the paged KV
cache (its KV heads). The all-reduce leaves every rank the same output; the demo checks that
and prints one line per step. `--target cuda:sm_90` runs it on GPUs (one per process, NCCL).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, PAGE = 64, 4, 2, 16, 4


def build(world: int, gpu: bool):
    """(graph, weights) of the TP layer over `world` devices; each rank gets its own x."""
    from graphir import DeviceRef, DType, Graph, TensorType
    from graphir.nn import (KVCacheParams, PagedCacheValues, RotaryEmbedding,
                            TensorParallelAttentionWithRope, distribute_value)

    devs = [DeviceRef.GPU(i) if gpu else DeviceRef.CPU(i) for i in range(world)]
    rope = RotaryEmbedding(HIDDEN, HEADS, 10000.0, 256, head_dim=HEAD_DIM, interleaved=False,
                           device=devs[0])
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                        num_layers=1, page_size=PAGE, devices=tuple(devs))
    tp = TensorParallelAttentionWithRope(rope=rope, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, hidden_size=HIDDEN,
                                         kv_params=kvp, devices=devs)
    rng = np.random.default_rng(0)
    tp.load_state_dict({k: (rng.standard_normal([int(s) for s in w.shape]) * 0.1)
                        .astype(np.float32) for k, w in tp.raw_state_dict().items() if "[" not in k})
    types = []
    for i, d in enumerate(devs):
        types += [TensorType(DType.float32, ["total_seq_len", HIDDEN], d),
                  TensorType(DType.uint32, ["batch + 1"], d)]
        types += kvp.input_types(d, suffix=f"_{i}", n_kv_heads=kvp.n_kv_heads_per_device)
    with Graph("tp_demo", input_types=types) as g:
        per = [g.inputs[6 * i: 6 * i + 6] for i in range(world)]
        g.output(*tp(0, [p[0] for p in per], [PagedCacheValues(*p[2:]) for p in per],
                     distribute_value(rope.freqs_cis, devs), [p[1] for p in per]))
    return g, tp.state_dict()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where the bundle and weights go (default: a temp dir)")
    p.add_argument("--target", default="cpu", help="cpu, or cuda:sm_90 (one GPU per process)")
    a = p.parse_args(argv)
    from graphir.runtime import InferenceSession
    from graphir.runtime.distributed import DistributedConfig

    session = InferenceSession(distributed=DistributedConfig.from_env())
    ctx = session.distributed
    work = Path(a.dir or os.path.join(tempfile.gettempdir(), f"graphir-dist-demo-{os.getuid()}"))
    bundle, weights = work / "tp.gdist", work / "tp.safetensors"
    if ctx.rank == 0:   # compile once; the other ranks wait at the barrier
        from safetensors.numpy import save_file

        from graphir.runtime.distributed_artifact import compile_distributed

        g, w = build(ctx.world_size, not a.target.startswith("cpu"))
        compile_distributed(g, a.target, out=bundle)
        save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(weights))
    ctx.barrier("bundle written")
    model = session.load(bundle, weights=weights)
    kv = model.kv_cache_manager(total_num_pages=32)   # this rank's KV heads only
    kv.blocks[...] = 0.0
    seqs = [kv.claim(), kv.claim()]
    rng = np.random.default_rng(1)                    # the same tokens on every rank
    for step, counts in enumerate([[5, 3], [1, 1], [1, 1], [1, 1]]):
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        st = kv.prepare_step(seqs, counts)
        full = [None] * (6 * ctx.world_size)
        full[6 * ctx.rank: 6 * ctx.rank + 6] = [x, st.input_row_offsets, kv.blocks,
                                                 st.cache_lengths, st.lookup_table,
                                                 st.max_lengths]
        (y,) = model.execute(*model.select_inputs(full))
        kv.commit_step(st)
        same = np.abs(ctx.all_gather(y[None]) - y[None]).max()
        if ctx.rank == 0:
            print(f"step {step}: tokens {counts}, output {tuple(y.shape)}, |y| {np.linalg.norm(y):.4f}, "
                  f"max difference between ranks {same:.1e}")
        if same > 1e-6:
            raise SystemExit(f"rank {ctx.rank}: the ranks' outputs differ by {same}")
    ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
