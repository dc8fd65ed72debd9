"""This process's part of a multi-device graph: load it (a `.gdist` bundle, or a Graph split and
compiled here), bind only its weights, and run it against the other ranks.

Loading ends with every rank agreeing, through one all-gather, that all ranks loaded and run
the same graph with the same collective schedule; a rank that failed (a missing weight, a bad
artifact) fails every rank with its message instead of leaving them waiting.

Each call of a graph with collectives starts with the same kind of agreement (see
DistributedConfig.check_calls): every rank checks its own inputs (types, dims, ragged/paged
metadata) and the ranks compare the collectives' sizes; a refusal anywhere raises on every
rank before anything runs (the refusing rank raises its own ValueError), so a failed call
loses no state and leaves the job usable.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np

from graphir.dim import Dim
from graphir.types import BufferType

from .distributed import DistributedError, RankContext
from .distributed_artifact import (Bundle, is_bundle, load_bundle, plan_collectives,
                                   schedule_digest)


def rank_weights(weights, names: Sequence[str]) -> dict:
    """Only the weights `names` from a mapping or a .safetensors file (read one by one, so a
    rank never holds the other ranks' shards); other sources are read whole, then filtered."""
    if weights is None:
        return {}
    if isinstance(weights, Mapping):
        return {n: weights[n] for n in names if n in weights}
    p = Path(weights)
    if p.suffix == ".safetensors":
        from graphir.nn.linear_quant import load_safetensors

        return load_safetensors(p, names=names)
    from .session import load_weights

    full = load_weights(weights)
    return {n: full[n] for n in names if n in full}


def _digest_row(*parts) -> np.ndarray:
    h = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return np.frombuffer(h, np.int64).copy()


def _compact(row: np.ndarray) -> np.ndarray:
    """`row` as it fits an agreement exchange: long ones by their digest."""
    return row if row.size <= 8 else _digest_row(row.tolist())


def _agree(ctx: RankContext, what: str, row: np.ndarray, error: BaseException | None,
           tag: str):
    """All-gather [status, *row]; a rank's error is published in the store first. Returns the
    rows; raises on every rank when any rank failed."""
    ctx.calls += 1
    key = f"refused/{ctx.calls}"
    if error is not None:
        ctx.publish(f"{key}/{ctx.rank}", f"{type(error).__name__}: {error}")
    rows = ctx.gather_rows(np.concatenate([[int(error is not None)], _compact(row)]), what, tag)
    if error is not None:
        raise error
    bad = [r for r in range(ctx.world_size) if rows[r, 0]]
    if bad:
        why = "; ".join(f"rank {r}: {ctx.fetch(f'{key}/{r}').decode(errors='replace')}"
                        for r in bad)
        raise DistributedError(f"graphir.distributed: {what} was refused by rank(s) {bad} "
                               f"({why}); no rank ran it")
    return rows[:, 1:]


class DistributedModel:
    """One rank's model. `execute(*inputs)` takes this rank's inputs (`inputs` gives their
    indices among the original graph's; `select_inputs` picks them from a full list) and
    returns this rank's outputs (`outputs`: their original indices)."""

    def __init__(self, local, ctx: RankContext, graph, info: Mapping):
        self.local, self.ctx, self.graph = local, ctx, graph
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.inputs: list[int] = list(info["inputs"])
        self.outputs: list[int] = list(info["outputs"])
        self.weight_names: list[str] = list(info["weights"])
        self._types = [v.type for v in graph.inputs]
        self._coll = [n for n in graph.nodes if n.attrs.get("world_size") is not None]
        self._checks = None

    def select_inputs(self, all_inputs: Sequence) -> list:
        """This rank's inputs out of a list indexed like the original graph's inputs (entries
        of other ranks may be None)."""
        need = max(self.inputs, default=-1) + 1
        if len(all_inputs) < need:
            raise ValueError(f"select_inputs: rank {self.rank} reads original input "
                             f"{need - 1}, the list has {len(all_inputs)} entries")
        return [all_inputs[i] for i in self.inputs]

    def _signature(self, inputs) -> np.ndarray:
        """Check this rank's inputs as the executor will; the collectives' operand sizes."""
        from .interpreter import _check_input, bind_dims, check_buffers_writable

        if len(inputs) != len(self._types):
            raise ValueError(f"rank {self.rank} of graph {self.graph.name!r} takes "
                             f"{len(self._types)} inputs (original inputs {self.inputs}), got "
                             f"{len(inputs)}")
        host = all(isinstance(a, np.ndarray) for a in inputs)
        if host:
            arrays = [_check_input(k, t, a) for k, (t, a) in enumerate(zip(self._types, inputs))]
            env = bind_dims(self._types, arrays)
            if self._checks is None:
                from .dim_checks import DimCheck
                from .ragged import RaggedCheck

                self._checks = (DimCheck(self.graph), RaggedCheck(self.graph))
            check_buffers_writable(self._types, arrays)
            self._checks[0].check(env)
            self._checks[1].check(lambda k: arrays[k], env)
        else:  # device tensors: their shapes (the executor checks the rest)
            env = bind_dims(self._types, [SimpleNamespace(ndim=len(a.shape), shape=tuple(a.shape))
                                          for a in inputs])
        return np.array([Dim(d).evaluate(env) for n in self._coll
                         for d in n.operands[0].type.shape], np.int64)

    def execute(self, *inputs, **options):
        """Run this rank's part; the ranks of a graph with collectives must call together."""
        self.ctx._check_usable()
        if self._coll and self.ctx.config.check_calls:
            width = sum(n.operands[0].type.rank for n in self._coll)
            error, sig = None, np.zeros(width, np.int64)
            try:
                sig = self._signature(inputs)
            except (ValueError, TypeError) as e:
                error = e
            rows = _agree(self.ctx, f"call of {self.graph.name!r}", sig, error, "call")
            if (rows != rows[0]).any():
                raise DistributedError(
                    f"graphir.distributed: the ranks' collectives of {self.graph.name!r} have "
                    f"different sizes this call ({dict(enumerate(rows.tolist()))}); every rank "
                    f"must be given the same tokens; no rank ran it")
        return self.local.execute(*inputs, **options)

    __call__ = execute

    def kv_cache_manager(self, *, total_num_pages: int, input_index: int | None = None, **kw):
        """A PagedKVCacheManager for this rank's shard of the paged cache: the blocks input of
        this rank's graph (TP: its KV heads; DP: the cache of its batch slice)."""
        from .kv_cache import PagedKVCacheManager

        bufs = [k for k, t in enumerate(self._types) if isinstance(t, BufferType)]
        k = input_index if input_index is not None else (bufs[0] if len(bufs) == 1 else None)
        if k is None or k not in bufs:
            raise ValueError(f"kv_cache_manager: rank {self.rank}'s buffer inputs are {bufs}; "
                             f"pass input_index= one of them")
        t = self._types[k]
        _, _, layers, page, heads, dim = [int(d) if d.is_static else None for d in
                                          map(Dim, t.shape)]
        return PagedKVCacheManager(num_layers=layers, n_kv_heads=heads, head_dim=dim,
                                   page_size=page, total_num_pages=total_num_pages,
                                   dtype=t.dtype.storage, **kw)


def load_rank_model(source, weights, ctx: RankContext, *, target: str | None = None,
                    trusted_keys=None, use_cache: bool = True, cuda_options: Mapping | None = None,
                    ) -> DistributedModel:
    """Load this rank's part of `source` (a `.gdist` path or Bundle, or a multi-device Graph
    split and compiled by this process) and bind only its weights."""
    from graphir.lowering.artifact import graph_hash

    error, local, art, info, graph, ident = None, None, None, None, None, ""
    try:
        if isinstance(source, Bundle) or isinstance(source, (str, Path)) and is_bundle(source):
            bundle = source if isinstance(source, Bundle) else load_bundle(source)
            if bundle.world_size != ctx.world_size:
                raise ValueError(f"{bundle.path} was compiled for {bundle.world_size} processes; "
                                 f"this job has {ctx.world_size}")
            info = bundle.rank_info(ctx.rank)
            art = bundle.artifact(ctx.rank, trusted_keys)
            ident = bundle.manifest["graph_hash"]
        elif hasattr(source, "nodes"):
            from graphir.lowering.driver import compile_graph

            from .distributed_split import rank_devices, split_rank

            n = len(rank_devices(source))
            if n != ctx.world_size:
                raise ValueError(f"graph {source.name!r} runs on {n} devices; this job has "
                                 f"{ctx.world_size} processes (one per device)")
            rg = split_rank(source, ctx.rank)
            tgt = target or ("cuda:sm_90" if rg.device.is_gpu() else "cpu")
            art = compile_graph(rg.graph, tgt, use_cache=use_cache)
            info = {"inputs": rg.inputs, "outputs": rg.outputs, "weights": rg.weights}
            ident = graph_hash(str(source))
        else:
            raise TypeError(f"load: expected a .gdist bundle or a Graph for a distributed "
                            f"session, got {type(source).__name__}")
        graph = art.graph()
        mine = rank_weights(weights, info["weights"])
        if art.target.split(":")[0] == "cpu":
            from .cpu_executor import load as cpu_load

            local = cpu_load(art, mine, [], collectives=ctx)
        else:
            from .distributed_cuda import load_rank

            local = load_rank(art, mine, ctx, **dict(cuda_options or {}))
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if isinstance(e, DistributedError):
            raise
        error = e
    row = _digest_row(ident, schedule_digest(plan_collectives(art)) if art else "")
    rows = _agree(ctx, "loading", row, error, "load")
    if (rows != rows[0]).any():
        raise DistributedError(f"graphir.distributed: the ranks loaded different graphs or "
                               f"collective schedules (rank {ctx.rank} differs from "
                               f"{[r for r in range(ctx.world_size) if (rows[r] != rows[ctx.rank]).any()]}"
                               f"); load the same bundle everywhere")
    if not art.target.startswith("cpu"):
        from .distributed_cuda import attach_communicator

        attach_communicator(local, ctx)
    return DistributedModel(local, ctx, graph, info)
