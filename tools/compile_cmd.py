"""`graphir compile` and `graphir dump --stage mlir|...`: the compile driver seen from the CLI.

The driver reports stages through a progress callback (`say(message)`); StageTimer turns those
messages into a live progress line and a table of stage times.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import TextIO

# Stages of lowering/mlir_cpu/toolchain.py that `graphir dump` can print.
CPU_STAGES = ["mlir", "scheduled", "bufferized", "llvm", "llvmir"]
CPU_STAGES_HELP = ("mlir: the CPU kernels as emitted; scheduled: after the matmul schedule; "
                   "bufferized: on memrefs; llvm: the LLVM dialect; llvmir: LLVM IR text")


class StageTimer:
    """A progress callback for `compile_graph`: shows the current stage, records stage times.

    On a terminal the stage line is rewritten in place; otherwise each stage gets its own line.
    Call `finish()` when the compile returned; `stages` is then [(name, seconds), ...].
    """

    def __init__(self, stream: TextIO | None = sys.stderr, prefix: str = "graphir"):
        self.stream = stream
        self.prefix = prefix
        self.t0 = time.perf_counter()
        self._marks: list[tuple[str, float]] = []
        self.stages: list[tuple[str, float]] = []
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        self._marks.append((message, now))
        if self.stream is not None:
            line = f"[{self.prefix} {now - self.t0:6.2f}s] {message}"
            self.stream.write(f"\r{line:<72}" if self._tty else line + "\n")
            self.stream.flush()

    def finish(self) -> list[tuple[str, float]]:
        end = time.perf_counter()
        ends = [t for _, t in self._marks[1:]] + [end]
        self.stages = [(m, e - t) for (m, t), e in zip(self._marks, ends)]
        if self._tty:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()
        return self.stages

    @property
    def total(self) -> float:
        return sum(s for _, s in self.stages)

    @property
    def cache_hit(self) -> bool:
        return any(m == "cache hit" for m, _ in self.stages)

    def summary(self) -> str:
        parts = [f"{m} {s:.2f} s" for m, s in self.stages if m != "cache hit"]
        return " | ".join(parts + [f"total {self.total:.2f} s"])


def stage_stream(quiet: bool) -> TextIO | None:
    """Where StageTimer writes its stage lines: stderr, unless quiet or the progress bars
    (graphir.progress) already show the stages."""
    from graphir import progress

    return None if quiet or progress.enabled() else sys.stderr


def _pass_list(text: str | None) -> list[str] | None:
    return [p for p in text.split(",") if p] if text else None


def cmd_compile(args) -> int:
    """Compile FILE for --target into the artifact -o OUT, printing the stage times."""
    from graphir.lowering.driver import compile_graph

    from .loader import load_graph

    g = load_graph(args.file)
    tune = bool(getattr(args, "tune", False))
    if tune and not args.target.startswith("cuda"):
        raise ValueError(f"--tune applies to cuda targets (it times GPU kernels), not "
                         f"{args.target!r}")
    from graphir.lowering.registry import NoLowering

    timer = StageTimer(stage_stream(args.quiet))
    try:
        with warnings.catch_warnings():
            # The no-GPU fallback of --tune is reported below, once, from the manifest.
            warnings.filterwarnings("ignore", message="--tune needs a CUDA GPU")
            art = compile_graph(g, args.target, out=args.output, passes=_pass_list(args.passes),
                                progress=timer, options={"tune": True} if tune else None)
    except (NotImplementedError, NoLowering) as e:  # an op without a lowering for this target
        raise ValueError(f"cannot compile {args.file} for {args.target}: {e}") from None
    finally:
        timer.finish()
    if getattr(args, "sign", None):
        from graphir.lowering.signing import sign

        rec = sign(art.path, args.sign)
        if not args.quiet:
            print(f"signed with key {rec['key_id']}")
    note = art.manifest.get("tuning", {}).get("note") if tune else None
    if note:
        print(f"graphir compile: note: {note}", file=sys.stderr)
    if not args.quiet:
        n = len(art.manifest.get("kernels", {}))
        print(f"wrote {art.path} ({art.target}{f', {n} kernels' if n else ''})")
        print(f"stages: {timer.summary()}")
    return 0


def cpu_stage_text(graph, stage: str, passes: list[str] | None = None) -> str:
    """The CPU module of `graph` (after the passes and decompositions) at a toolchain stage."""
    from graphir import parse
    from graphir.passes import run_passes
    from graphir.lowering.driver import decompose
    from graphir.lowering.mlir_cpu.backend import mlir_text

    g = parse(str(graph))  # passes rewrite in place: leave the caller's graph alone
    run_passes(g, passes)
    decompose(g, "cpu")
    return mlir_text(g, stage)


def dump_cpu_stage(graph, stage: str, passes: str | None) -> None:
    """`graphir dump FILE --stage mlir|scheduled|bufferized|llvm|llvmir`: print to stdout."""
    from graphir.lowering.registry import NoLowering

    try:
        text = cpu_stage_text(graph, stage, _pass_list(passes))
    except (NotImplementedError, NoLowering) as e:
        raise ValueError(f"cannot lower graph @{graph.name} for the CPU: {e}") from None
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
