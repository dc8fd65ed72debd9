"""A rank graph on its GPU: the cuda executor with this process's NCCL communicator.

Each process of a GPU job loads its rank's cuda artifact on GPU LOCAL_RANK through the usual
loader (runtime/cuda/device_model.py), then hands the executor a `RankDeviceGroup`: the same
one device, whose collectives (the rank graph's allreduce / allgather with `world_size`) go
through a `RankCommunicator` made with ncclCommInitRank from the unique id rank 0 shares
through the job's store. The communicator is aborted when the job breaks (the watchdog of
runtime/distributed_watchdog.py sees a dead peer), so no collective waits forever.

Collectives are issued on the stream the device is launching on at that moment, which is the
capture stream while a call is captured into a CUDA graph: NCCL collectives are captured and
replayed with the kernels around them.
"""
from __future__ import annotations

from typing import Any, Mapping

from graphir.dim import Dim
from graphir.device import DeviceRef

from .cuda.multi_device import DeviceGroup
from .distributed import DistributedError, RankContext


def _issue_stream(dev) -> int:
    # CudaDevice keeps the stream it issues on in `_cur` (the capture stream during a capture).
    cur = getattr(dev, "_cur", None)
    if cur is None:
        cur = getattr(getattr(dev, "stream", None), "handle", None)
    return int(cur or 0)


class RankDeviceGroup(DeviceGroup):
    """One device of a rank; collectives over the job's processes through NCCL."""

    def __init__(self, members: Mapping[int, Any], comm):
        super().__init__(members)
        if len(self.members) != 1:
            raise ValueError(f"a rank runs one device, got {sorted(self.members)}")
        self.comm = comm

    def all_reduce(self, parts, count: int, dtype) -> None:
        (lid, src, dst), = parts
        self.comm.all_reduce(src, dst, count, dtype.name, _issue_stream(self[lid]))

    def all_gather(self, parts, counts, dtype) -> None:
        (lid, src, dst), = parts
        (count,) = counts
        self.comm.all_gather(src, dst, count, dtype.name, _issue_stream(self[lid]))

    def transfer(self, *args, **kwargs) -> None:
        raise ValueError("a rank graph moves values between processes only through collectives")


def check_gathers(plan: Mapping) -> None:
    """Refuse allgathers the rank executor cannot place (an inner axis with outer rows)."""
    for i, s in enumerate(plan["steps"]):
        if s["kernel"] == "collective" and s["op"] == "allgather":
            shape = plan["values"][s["outputs"][0]]["shape"]
            ax = int(s["attrs"].get("axis", 0)) % max(len(shape), 1)
            outer = [Dim(d) for d in shape[:ax]]
            if not all(d.is_static and int(d) == 1 for d in outer):
                raise ValueError(f"plan step {i}: an allgather across processes on axis {ax} "
                                 f"of {shape} is not supported on GPUs; gather on axis 0")


def load_rank(art, weights: Mapping[str, Any], ctx: RankContext, *, use_graphs: bool = True,
              stream: Any = None, copy_outputs: bool = False):
    """This rank's cuda artifact on GPU `ctx.config.local_rank` (no collective yet: the ranks
    first agree that all of them loaded; then `attach_communicator`)."""
    from .cuda.device_model import load

    check_gathers(art.manifest["plan"])
    model = load(art, weights, [DeviceRef.GPU(ctx.config.local_rank)], use_graphs=use_graphs,
                 stream=stream, copy_outputs=copy_outputs)
    ex = model.executor
    if type(ex.group) is not DeviceGroup or len(ex.group.members) != 1:
        raise RuntimeError(f"the cuda executor of {art.path} did not load as one device "
                           f"({type(ex.group).__name__}); a rank graph runs on one GPU")
    return model


def attach_communicator(model, ctx: RankContext, *, lib: Any = None) -> None:
    """Give a loaded rank model the job's NCCL communicator (every rank calls this together)."""
    ex = model.executor
    comm = make_communicator(ctx, ctx.config.local_rank, lib=lib)
    ex.group = RankDeviceGroup(ex.group.members, comm)


def make_communicator(ctx: RankContext, device: int | None, *, key: str = "nccl/world",
                      lib: Any = None):
    """The job's NCCL communicator for this rank, bootstrapped through the store; registered
    for abort when the job breaks, with the heartbeat watchdog running."""
    from .cuda.nccl import NcclError, RankCommunicator

    ctx.barrier(f"NCCL bootstrap ({key})")  # every rank is alive before NCCL blocks in init
    try:
        comm = RankCommunicator.bootstrap(ctx.store, ctx.world_size, ctx.rank, device=device,
                                          key=key, lib=lib)
    except NcclError:
        raise
    except Exception as e:  # noqa: BLE001  (the store's timeout or a dead rank 0)
        msg = (f"graphir.distributed: rank {ctx.rank} could not get the NCCL unique id from "
               f"the store within {ctx.config.timeout_s:g} s ({type(e).__name__}: {e})")
        ctx.fail(msg)
        raise DistributedError(msg) from e
    ctx.on_abort(comm.abort)
    ctx.start_watchdog()
    return comm
