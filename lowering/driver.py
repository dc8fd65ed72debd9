"""The compile driver: graph -> passes -> backend -> `.gart` artifact (through the cache).

A backend module exposes `build(graph, target: Target, progress) -> (payload, extra)`: the files
of the artifact (relative path -> bytes) and the manifest fields it needs (plan, kernel table).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from graphir.passes import run_passes
from graphir.progress import bar as progress_bar
from graphir.progress import scope as progress_scope

from . import cache
from .artifact import Artifact, write_artifact

BACKENDS = {"cpu": "graphir.lowering.mlir_cpu.backend", "cuda": "graphir.lowering.triton_gpu.backend"}
CUDA_ARCHS = (90,)   # compute capabilities the GPU kernels are written for (Hopper)


@dataclass(frozen=True)
class Target:
    """`cpu` (this host), `cpu:x86-64:avx512` (see mlir_cpu/cpu_target.py) or `cuda:sm_90`
    (the arch is the compute capability, e.g. 90)."""

    backend: str
    arch: int | None = None
    cpu: str | None = None   # the CPU target's spec, e.g. "x86-64:avx2"; None: this host

    @staticmethod
    def parse(text: str) -> "Target":
        kind, _, arch = text.partition(":")
        if kind == "cpu":
            if not arch:
                return Target("cpu")
            from .mlir_cpu.cpu_target import CpuTarget

            return Target("cpu", cpu=CpuTarget.parse(arch).spec)
        if kind == "cuda":
            arch = arch or "sm_90"
            if not arch.startswith("sm_") or not arch[3:].isdigit():
                raise ValueError(f"bad CUDA arch {arch!r}; expected e.g. sm_90")
            if int(arch[3:]) not in CUDA_ARCHS:
                # Other archs reached LLVM with Hopper-only instructions and aborted the process.
                raise ValueError(
                    f"CUDA target {text!r} is not supported: graphir's GPU kernels use Hopper's "
                    f"wgmma, TMA and register reallocation, so the CUDA targets are "
                    f"{', '.join(f'cuda:sm_{a}' for a in CUDA_ARCHS)} (H100, H200); other "
                    f"GPUs can run the cpu target's artifact on the host")
            return Target("cuda", int(arch[3:]))
        raise ValueError(f"unknown target {text!r}; expected 'cpu', 'cpu:x86-64:avx2' or "
                         f"'cuda:sm_90'")

    def resolved(self) -> "Target":
        """`cpu` becomes this host's CPU target (e.g. cpu:x86-64:avx512); others are kept."""
        if self.backend == "cpu" and self.cpu is None:
            from .mlir_cpu.cpu_target import host_target

            return Target("cpu", cpu=host_target().spec)
        return self

    def __str__(self) -> str:
        if self.backend == "cpu":
            return "cpu" if self.cpu is None else f"cpu:{self.cpu}"
        return f"cuda:sm_{self.arch}"


# The phases each backend reports through `say` (message prefixes), for the compile bar.
PHASES = {"cpu": ("emitting MLIR", "compiling to native code"),
          "cuda": ("lowering to Triton kernels", "compiling kernel")}


class _Say:
    """The driver's `say`: to the caller's callback, and to the phase bar (a phase's first
    message marks the phases before it done; other messages only show beside the bar)."""

    def __init__(self, callback: Callable[[str], None] | None, bar, phases: tuple[str, ...]):
        self.callback, self.bar, self.phases = callback, bar, phases

    def __call__(self, msg: str) -> None:
        if self.callback is not None:
            self.callback(msg)
        i = next((k for k, p in enumerate(self.phases) if msg.startswith(p)), 0)
        self.bar.stage(msg, advance=max(i - self.bar.n, 0))

    def done(self, msg: str) -> None:
        self.bar.stage(msg, advance=max(len(self.phases) - self.bar.n, 0))


def compile_graph(graph, target: str | Target = "cpu", *, out: str | Path | None = None,
                  use_cache: bool = True, passes: list[str] | None = None,
                  progress: bool | Callable[[str], None] | None = None,
                  options: dict | None = None) -> Artifact:
    """Compile graph for target into an artifact (from the cache when an equal one exists).

    `progress`: True shows a bar over the phases on stderr, False hides it, None (default)
    follows graphir.progress (GRAPHIR_PROGRESS, the CLI); a callable gets each phase's message.

    Example:
        >>> art = compile_graph(g, "cpu")
        >>> model = InferenceSession().load(art, weights=w)
    """
    tgt = (target if isinstance(target, Target) else Target.parse(target)).resolved()
    phases = ("running passes",) + PHASES[tgt.backend] + ("writing artifact",)
    with progress_scope(None if callable(progress) else progress), \
            progress_bar(len(phases), desc=f"compile {tgt}", unit="phase") as bar:
        say = _Say(progress if callable(progress) else None, bar, phases)
        art = _compile(graph, tgt, out, use_cache, passes, say, dict(options or {}))
    return art


def _compile(graph, tgt: Target, out, use_cache: bool, passes, say: _Say,
             options: dict) -> Artifact:
    g = _copy(graph)
    say("running passes")
    run_passes(g, passes)
    # The key is taken before lowering-specific rewrites: a cache hit needs no backend import.
    key = cache.cache_key(str(g), str(tgt), {**options, **_tuning_salt(tgt, options)})
    if use_cache and out is None:
        hit = cache.lookup(key, str(tgt))
        if hit is not None:
            say("cache hit")
            say.done("cache hit")
            return hit
    backend = _backend(tgt)  # registers its lowerings
    decompose(g, tgt.backend)
    text = str(g)
    payload, extra = backend.build(g, tgt, say, **options)
    dest = Path(out) if out is not None else cache.entry_path(key)
    say("writing artifact")
    # Into the cache an entry another writer got in first is kept (an equal build), but a
    # compile asked for with use_cache=False replaces it: returning the old entry would hand
    # back exactly what the caller chose not to use.
    art = write_artifact(dest, graph_text=text, target=str(tgt), payload=payload, extra=extra,
                         replace=out is not None or not use_cache)
    say.done(f"wrote {dest.name}")
    return art


def _tuning_salt(tgt: Target, options: dict) -> dict:
    """cuda: the shipped tuning table and, when tuning, the GPU tuned on (cache-key parts)."""
    if tgt.backend != "cuda":
        return {}
    from .triton_gpu.tuning import cache_salt

    return cache_salt(bool(options.get("tune")))


def _backend(tgt: Target):
    """The backend module of a target; a missing compiler package is one clear error."""
    from graphir.optional import require

    need = {"cpu": ("mlir", "the cpu target (MLIR)"), "cuda": ("triton", f"target {tgt}")}
    module, feature = need[tgt.backend]
    require(module, feature)
    if tgt.backend == "cuda":
        require("networkx", feature)
    return importlib.import_module(BACKENDS[tgt.backend])


def _copy(graph):
    """Passes rewrite in place; compile a parsed copy so the caller's graph is untouched."""
    from graphir import parse

    return parse(str(graph))


def decompose(graph, backend: str) -> bool:
    """Apply the backend's own rewrites (registry.BACKEND_REWRITES), then rewrite nodes the
    backend cannot lower by their registered decompositions."""
    from graphir.passes.dce import dce
    from graphir.rewrite import Pattern, apply_patterns

    from .registry import BACKEND_REWRITES, DECOMPOSITIONS, STRUCTURAL, lowering_for

    def rewrite(node, rw) -> bool:
        own = BACKEND_REWRITES.get((node.op, backend))
        if own is not None and own(node, rw):
            return True
        if node.op in STRUCTURAL or lowering_for(node.op, backend) is not None:
            return False
        fn = DECOMPOSITIONS.get(node.op)
        return bool(fn and fn(node, rw))

    changed = apply_patterns(graph, [Pattern("decompose", rewrite)])
    if changed:
        dce(graph)
        graph.verify()
    return changed
