"""InferenceSession: compile (or open) an artifact for the session's device and run it.

Example:
    >>> session = InferenceSession(devices=[DeviceRef.CPU()])
    >>> model = session.load(graph, weights={"proj.weight": w})
    >>> (y,) = model.execute(x)
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Mapping, Sequence

from graphir.device import DeviceRef

EXECUTORS = {"cpu": "graphir.runtime.cpu_executor", "cuda": "graphir.runtime.cuda.executor"}


class InferenceSession:
    """Runs artifacts on one kind of device.

    Args:
        devices: the devices to run on (default: the CPU).
        trusted_keys: public keys (64 hex characters, 32 bytes or `.pub` files). When given,
            every artifact opened from disk must carry a valid Ed25519 signature by one of them
            (`graphir compile --sign KEY`): the way to detect an artifact tampered with between
            machines. Graphs compiled in this process are trusted as they are.
        distributed: run as one process of a job with one process per device (started by
            torchrun): a DistributedConfig (`DistributedConfig.from_env()`) or the RankContext
            of `graphir.runtime.distributed.init()`. `load` then takes a `.gdist` bundle
            (`graphir.runtime.distributed_artifact.compile_distributed`) or a multi-device
            Graph (split and compiled by each process), binds only this rank's weights and
            returns a DistributedModel that runs this rank's steps (see
            runtime/distributed.py). A rank runs on its graph device (GPU: CUDA ordinal
            LOCAL_RANK); `devices` is not used then.

    Example (in each process of `torchrun --nproc_per_node 2 serve.py`):
        >>> session = InferenceSession(distributed=DistributedConfig.from_env())  # doctest: +SKIP
        >>> model = session.load("tp.gdist", weights="model.safetensors")       # doctest: +SKIP
    """

    def __init__(self, devices: Sequence[DeviceRef] | None = None, *,
                 trusted_keys: Sequence | None = None, distributed=None):
        self.distributed = None
        if distributed is not None:
            from .distributed import DistributedConfig, RankContext, init

            if not isinstance(distributed, (DistributedConfig, RankContext)):
                raise TypeError(f"distributed must be a DistributedConfig or RankContext, got "
                                f"{type(distributed).__name__}")
            self.distributed = distributed if isinstance(distributed, RankContext) \
                else init(distributed)
        self.devices = list(devices or [DeviceRef.CPU()])
        self.trusted_keys = None if trusted_keys is None else list(trusted_keys)
        kinds = {d.device_type for d in self.devices}
        if len(kinds) != 1:
            raise ValueError(f"a session runs on one kind of device, got {self.devices}")

    @property
    def target(self) -> str:
        return "cpu" if self.devices[0].is_cpu() else "cuda:sm_90"

    def load(self, model, *, weights: Mapping | str | Path | None = None,
             target: str | None = None, use_cache: bool = True, progress: bool | None = None,
             copy_outputs: bool = False):
        """Compile a Graph (or open a `.gart` path / Artifact) and bind its weights.

        `progress`: True shows bars on stderr over the compile and the weights bound, False
        hides them, None (default) follows graphir.progress (GRAPHIR_PROGRESS, the CLI).
        `copy_outputs` (GPU): each call returns its device outputs in fresh buffers, as MAX
        does, instead of the model's reused ones, which stay valid only until its next call
        (an allocation and a device copy per output; threads sharing a model want it). CPU
        outputs are always new arrays the caller owns.
        """
        from graphir.progress import scope

        with scope(progress):
            return self._load(model, weights, target, use_cache, copy_outputs)

    def _load(self, model, weights, target, use_cache: bool, copy_outputs: bool = False):
        from graphir.lowering.artifact import Artifact, load_artifact

        if self.distributed is not None:
            from .distributed_model import load_rank_model

            if copy_outputs:
                raise ValueError("copy_outputs is not supported by a distributed session: "
                                 "copy each rank's outputs (or ask for numpy) instead")

            return load_rank_model(model, weights, self.distributed, target=target,
                                   trusted_keys=self.trusted_keys, use_cache=use_cache)

        if isinstance(model, (str, Path)):
            art = load_artifact(model, trusted_keys=self.trusted_keys)
        elif isinstance(model, Artifact):
            art = model if self.trusted_keys is None else \
                load_artifact(model.path, trusted_keys=self.trusted_keys)
        else:
            from graphir.lowering.driver import compile_graph

            art = compile_graph(model, target or self.target, use_cache=use_cache)
        backend = art.target.split(":")[0]
        if backend not in EXECUTORS:
            raise ValueError(f"{art.path}: no runtime for target {art.target!r}; this graphir "
                             f"runs {sorted(EXECUTORS)}")
        mod = importlib.import_module(EXECUTORS[backend])
        return mod.load(art, load_weights(weights), self.devices, copy_outputs=copy_outputs)


def load_weights(weights) -> dict:
    """A state dict from a mapping, a .safetensors file or a .gguf file."""
    if weights is None:
        return {}
    if isinstance(weights, Mapping):
        return dict(weights)
    p = Path(weights)
    if p.suffix == ".safetensors":
        from graphir.nn.linear_quant import load_safetensors

        return load_safetensors(p)
    if p.suffix == ".gguf":
        from graphir.nn.gguf_loader import load_gguf

        return {k: t.data for k, t in load_gguf(p).items()}
    raise ValueError(f"cannot read weights from {str(p)!r}: expected a dict, .safetensors or .gguf")
