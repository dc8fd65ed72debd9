"""Tensor-parallel decode step of a Llama-3-70B-shaped attention layer (hidden 8192, 64 heads,
8 KV heads, head_dim 128, bf16, paged cache of 128-token pages), one GPU per process.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 8 tools/bench_tp.py         # TP = 1, 2, 4, 8
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 tools/bench_tp.py --tp 1,2
    torchrun --nproc_per_node 2 tools/bench_tp.py --dry-run    # CPU + gloo, tiny shapes

TP = 1 is the plain one-GPU layer (AttentionWithRope, rank 0 alone); TP = n > 1 is
TensorParallelAttentionWithRope over ranks 0..n-1, each process running its rank graph
(graphir.runtime.distributed: its heads, its weight shard, its KV heads; KV heads replicated
where n > 8), the all-reduce through graphir's NCCL communicator (ncclCommInitRank from a unique
id shared through torchrun's store). A step is one decode of `--batch` sequences at `--context`
cached tokens (the cache slot written is the same every step), on torch's current stream with
CUDA graphs on; the time is the mean of `--iters` back-to-back steps between CUDA events, the
slowest rank's. Per-call rank agreement (DistributedConfig.check_calls) is off unless
--check-calls.

The all-reduce rows time graphir's RankCommunicator.all_reduce against torch.distributed's NCCL
all_reduce of the same bf16 buffer in the same run (the decode output's size and larger ones);
bus bandwidth = bytes * 2 (n - 1) / n / time. Targets: TP=2 step <= 0.6x the one-GPU step;
graphir's all-reduce >= 0.95x torch's bandwidth.

--dry-run runs the same code on the CPU (gloo, float32, tiny shapes, CPU artifacts) so the script
is checked where no GPU is; its numbers mean nothing. With --json PATH rank 0 writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before anything loads NCCL
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, page_size=4, batch=2, context=8,
            iters=3, warmup=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_tp.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", default=None, help="TP degrees, comma-separated (default 1,2,4,8; "
                   "--dry-run: 1,2); those above the world size are skipped")
    p.add_argument("--batch", type=int, default=8, help="sequences per decode step")
    p.add_argument("--context", type=int, default=2048, help="cached tokens per sequence")
    p.add_argument("--iters", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (plan, capture)")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=128)
    p.add_argument("--allreduce-mib", default="1,16,64",
                   help="all-reduce sizes (MiB) besides the decode output's")
    p.add_argument("--check-calls", action="store_true",
                   help="agree on every call's inputs across ranks (one gloo all-gather)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + gloo with tiny shapes: checks the script, measures nothing")
    p.add_argument("--json", help="rank 0 writes the results here")
    a = p.parse_args(argv)
    if a.dry_run:
        for k, v in TINY.items():
            setattr(a, k, v)
        a.allreduce_mib = "0.01"
    a.tp = a.tp or ("1,2" if a.dry_run else "1,2,4,8")
    try:
        a.tp = sorted({int(t) for t in a.tp.split(",") if t.strip()})
        a.allreduce_mib = [float(m) for m in a.allreduce_mib.split(",") if m.strip()]
    except ValueError:
        p.error("--tp and --allreduce-mib take comma-separated numbers")
    for t in a.tp:
        if t < 1 or a.heads % t or not (t % a.kv_heads == 0 or a.kv_heads % t == 0):
            p.error(f"TP {t}: needs heads ({a.heads}) divisible by it and it dividing or being "
                    f"a multiple of the KV heads ({a.kv_heads})")
    if min(a.batch, a.context, a.iters, a.page_size) < 1 or a.warmup < 0:
        p.error("--batch, --context, --iters and --page-size must be >= 1")
    return a


# ---- the layer --------------------------------------------------------------------------------
def layer_graph(a, devices, dtype):
    """The one-device layer (one device) or the TP layer with each rank's own inputs."""
    from graphir import DType, Graph, TensorType
    from graphir.nn import (AttentionWithRope, KVCacheParams, PagedCacheValues, RotaryEmbedding,
                            TensorParallelAttentionWithRope, distribute_value)

    n = len(devices)
    rope = RotaryEmbedding(a.hidden, a.heads, 500000.0, a.context + 64, head_dim=a.head_dim,
                           interleaved=False, device=devices[0])
    kvp = KVCacheParams(dtype=dtype, n_kv_heads=a.kv_heads, head_dim=a.head_dim, num_layers=1,
                        page_size=a.page_size, devices=tuple(devices))
    cls = AttentionWithRope if n == 1 else TensorParallelAttentionWithRope
    layer = cls(rope=rope, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                hidden_size=a.hidden, kv_params=kvp, devices=list(devices), dtype=dtype)
    nkv = kvp.n_kv_heads_per_device if n > 1 else a.kv_heads
    types = []
    for i, d in enumerate(devices):
        types += [TensorType(dtype, ["total_seq_len", a.hidden], d),
                  TensorType(DType.uint32, ["batch + 1"], d)]
        types += kvp.input_types(d, suffix=f"_{i}", n_kv_heads=nkv)
    with Graph(f"tp{n}_decode", input_types=types) as g:
        per = [g.inputs[6 * i: 6 * i + 6] for i in range(n)]
        kvs = [PagedCacheValues(*p[2:]) for p in per]
        if n == 1:
            x, offs = per[0][:2]
            g.output(layer(0, x, kvs[0], rope.freqs_cis, offs))
        else:
            g.output(*layer(0, [p[0] for p in per], kvs, distribute_value(rope.freqs_cis, devices),
                            [p[1] for p in per]))
    return g, nkv


def random_weights(graph, gpu: bool, seed: int) -> dict:
    """Random weights of the shapes `graph` binds (a rank graph: only its shard)."""
    import numpy as np

    out = {}
    rng = np.random.default_rng(seed)
    for node in graph.nodes:
        if node.op != "weight":
            continue
        shape = tuple(int(s) for s in node.attrs["shape"])
        if gpu:
            import torch

            g = torch.Generator(device="cuda").manual_seed(seed + len(out))
            out[node.attrs["name"]] = (torch.randn(shape, generator=g, device="cuda") * 0.02) \
                .to(torch.bfloat16)
        else:
            out[node.attrs["name"]] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return out


def decode_inputs(a, nkv: int, gpu: bool, seed: int) -> list:
    """x, offsets, blocks, cache_lengths, lookup_table, max_lengths of one decode step."""
    import numpy as np

    pps = -(-(a.context + 1) // a.page_size)
    lut = np.arange(a.batch * pps, dtype=np.uint32).reshape(a.batch, pps)
    shape = (a.batch * pps + 1, 2, 1, a.page_size, nkv, a.head_dim)
    meta = [np.arange(a.batch + 1, dtype=np.uint32), None,
            np.full(a.batch, a.context, np.uint32), lut,
            np.array([[1, a.context + 1]], np.uint32)]
    if gpu:
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn((a.batch, a.hidden), generator=g, device="cuda").to(torch.bfloat16)
        meta[1] = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    else:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((a.batch, a.hidden)).astype(np.float32)
        meta[1] = rng.standard_normal(shape).astype(np.float32)
    return [x] + meta


# ---- timing -----------------------------------------------------------------------------------
def time_steps(fn, a, gpu: bool) -> float:
    """Mean ms per call of `iters` back-to-back calls (CUDA events on GPU, wall on CPU)."""
    for _ in range(a.warmup):
        fn()
    if gpu:
        from graphir.tools.gpu_timing import event_ms

        return event_ms(fn, calls=a.iters, batches=5, warmup=0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(a.iters):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / a.iters)
    return statistics.median(times)


def one_device_step(a, gpu: bool, local_rank: int) -> float:
    from graphir import DeviceRef, DType
    from graphir.lowering.driver import compile_graph

    dev = DeviceRef.GPU(0) if gpu else DeviceRef.CPU(0)
    g, nkv = layer_graph(a, [dev], DType.bfloat16 if gpu else DType.float32)
    w = random_weights(g, gpu, seed=1)
    if gpu:
        import torch

        from graphir.runtime.cuda.device_model import load

        model = load(compile_graph(g, "cuda:sm_90"), w, [DeviceRef.GPU(local_rank)],
                     stream=torch.cuda.current_stream())
    else:
        from graphir.runtime import InferenceSession

        model = InferenceSession().load(g, weights=w)
    ins = decode_inputs(a, nkv, gpu, seed=2)
    return time_steps(lambda: model.execute(*ins), a, gpu)


def tp_step(a, sub, gpu: bool) -> float:
    from graphir import DeviceRef, DType
    from graphir.runtime.distributed_model import load_rank_model
    from graphir.runtime.distributed_split import split_rank

    n = sub.world_size
    devs = [DeviceRef.GPU(i) if gpu else DeviceRef.CPU(i) for i in range(n)]
    g, nkv = layer_graph(a, devs, DType.bfloat16 if gpu else DType.float32)
    w = random_weights(split_rank(g, sub.rank).graph, gpu, seed=10 + sub.rank)
    opts = {}
    if gpu:
        import torch

        opts = {"stream": torch.cuda.current_stream()}
    model = load_rank_model(g, w, sub, target="cuda:sm_90" if gpu else "cpu", cuda_options=opts)
    full = [None] * (6 * n)
    full[6 * sub.rank: 6 * sub.rank + 6] = decode_inputs(a, nkv, gpu, seed=20 + sub.rank)
    ins = model.select_inputs(full)
    return time_steps(lambda: model.execute(*ins), a, gpu)


def allreduce_rows(a, sub, tgroup, gpu: bool, local_rank: int) -> list[dict]:
    """graphir's all-reduce vs torch.distributed's of the same buffer, per size."""
    import numpy as np
    import torch
    import torch.distributed as dist

    n = sub.world_size
    sizes = [a.batch * a.hidden * (2 if gpu else 4)] + [int(m * (1 << 20)) for m in a.allreduce_mib]
    comm = None
    if gpu:
        from graphir.runtime.distributed_cuda import make_communicator

        comm = make_communicator(sub, local_rank, key=f"nccl/bench{n}")
    rows = []
    for nbytes in sizes:
        count = max(1, nbytes // (2 if gpu else 4))
        if gpu:
            buf = torch.randn(count, device="cuda").to(torch.bfloat16)
            stream = torch.cuda.current_stream().cuda_stream
            ours = lambda: comm.all_reduce(buf.data_ptr(), buf.data_ptr(), count,  # noqa: E731
                                           "bfloat16", stream)
            theirs = lambda: dist.all_reduce(buf, group=tgroup)  # noqa: E731
        else:
            host = np.random.default_rng(3).standard_normal(count).astype(np.float32)
            t = torch.from_numpy(host.copy())
            ours = lambda: sub.all_reduce(host)  # noqa: E731
            theirs = lambda: dist.all_reduce(t, group=tgroup)  # noqa: E731
        ms = [time_steps(ours, a, gpu), time_steps(theirs, a, gpu)]
        ms = [max_over(sub, m) for m in ms]
        bus = [count * (2 if gpu else 4) * 2 * (n - 1) / n / (m * 1e-3) / 1e9 for m in ms]
        rows.append({"tp": n, "bytes": count * (2 if gpu else 4), "ours_ms": ms[0],
                     "torch_ms": ms[1], "ours_busbw_gbs": bus[0], "torch_busbw_gbs": bus[1],
                     "ratio": bus[0] / bus[1]})
    return rows


def max_over(ctx, value: float) -> float:
    import numpy as np

    return float(ctx.all_gather(np.array([value], np.float64)).max())


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    import torch.distributed as dist

    from graphir.runtime.distributed import DistributedConfig, init

    cfg = DistributedConfig.from_env(check_calls=a.check_calls)
    gpu = not a.dry_run
    from datetime import timedelta

    if gpu:
        torch.cuda.set_device(cfg.local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timedelta(seconds=cfg.timeout_s),
                                device_id=torch.device("cuda", cfg.local_rank))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.timeout_s))
    ctx = init(cfg)
    steps, ar = [], []
    for tp in [t for t in a.tp if t <= ctx.world_size]:
        # Every rank takes part in making each group, also the ranks outside it.
        sub = ctx.subgroup(tp) if tp > 1 else None
        tgroup = dist.new_group(ranks=list(range(tp))) if tp > 1 else None
        ms = None
        if tp == 1:
            if ctx.rank == 0:
                ms = one_device_step(a, gpu, cfg.local_rank)
        elif sub is not None:
            ms = max_over(sub, tp_step(a, sub, gpu))
            ar += allreduce_rows(a, sub, tgroup, gpu, cfg.local_rank)
        ctx.barrier(f"after TP {tp}")
        if ms is not None and ctx.rank == 0:
            steps.append({"tp": tp, "step_ms": ms})
    if ctx.rank == 0:
        report(a, steps, ar)
    ctx.close()
    dist.destroy_process_group()
    return 0


def report(a, steps: list[dict], ar: list[dict]) -> None:
    base = next((s["step_ms"] for s in steps if s["tp"] == 1), None)
    print(f"\nTP decode step: batch {a.batch}, context {a.context}, hidden {a.hidden}, "
          f"{a.heads} heads / {a.kv_heads} KV heads x {a.head_dim}"
          + ("  [dry run: CPU, tiny shapes]" if a.dry_run else ""))
    print(f"{'TP':>4} {'step ms':>10} {'vs 1 GPU':>9}  target")
    for s in steps:
        ratio = s["step_ms"] / base if base else float("nan")
        s["vs_one"] = ratio
        tgt = "<= 0.60 " + ("PASS" if ratio <= 0.6 else "FAIL") if s["tp"] == 2 and base else ""
        print(f"{s['tp']:>4} {s['step_ms']:>10.4f} {ratio:>9.3f}  {tgt}")
    print(f"\n{'TP':>4} {'bytes':>12} {'ours GB/s':>10} {'torch GB/s':>11} {'ours/torch':>11}  "
          f"target")
    for r in ar:
        ok = "PASS" if r["ratio"] >= 0.95 else "FAIL"
        print(f"{r['tp']:>4} {r['bytes']:>12} {r['ours_busbw_gbs']:>10.2f} "
              f"{r['torch_busbw_gbs']:>11.2f} {r['ratio']:>11.3f}  >= 0.95 {ok}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items()},
                                            "steps": steps, "allreduce": ar}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
