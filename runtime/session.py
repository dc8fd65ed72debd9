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
    def __init__(self, devices: Sequence[DeviceRef] | None = None):
        self.devices = list(devices or [DeviceRef.CPU()])
        kinds = {d.device_type for d in self.devices}
        if len(kinds) != 1:
            raise ValueError(f"a session runs on one kind of device, got {self.devices}")

    @property
    def target(self) -> str:
        return "cpu" if self.devices[0].is_cpu() else "cuda:sm_90"

    def load(self, model, *, weights: Mapping | str | Path | None = None,
             target: str | None = None, use_cache: bool = True, progress: bool = False):
        """Compile a Graph (or open a `.gart` path / Artifact) and bind its weights."""
        from graphir.lowering.artifact import Artifact, load_artifact

        if isinstance(model, (str, Path)):
            art = load_artifact(model)
        elif isinstance(model, Artifact):
            art = model
        else:
            from graphir.lowering.driver import compile_graph

            art = compile_graph(model, target or self.target, use_cache=use_cache, progress=progress)
        backend = art.target.split(":")[0]
        mod = importlib.import_module(EXECUTORS[backend])
        return mod.load(art, load_weights(weights), self.devices)


def load_weights(weights) -> dict:
    """A state dict from a mapping, a .safetensors file or a .gguf file."""
    if weights is None:
        return {}
    if isinstance(weights, Mapping):
        return dict(weights)
    p = Path(weights)
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(p))
    if p.suffix == ".gguf":
        from graphir.nn.gguf_loader import load_gguf

        return {k: t.data for k, t in load_gguf(p).items()}
    raise ValueError(f"cannot read weights from {str(p)!r}: expected a dict, .safetensors or .gguf")
