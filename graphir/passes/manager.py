"""The pass manager: runs named passes in order, verifying after each, printing on request."""
from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO

from ..printer import print_graph
from . import PASSES, default_pipeline


class PassManager:
    """Run passes by name. `print_after_all` writes the IR after every pass to `out`.

    Example:
        >>> PassManager(["canonicalize", "cse", "dce"]).run(graph)
    """

    def __init__(self, passes: Sequence[str] | None = None, *, print_after_all: bool = False,
                 verify: bool = True, out: TextIO | None = None, elide_over: int | None = None):
        names = default_pipeline() if passes is None else list(passes)
        unknown = [p for p in names if p not in PASSES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; known: {sorted(PASSES)}")
        self.names = names
        self.print_after_all = print_after_all
        self.verify = verify
        self.out = out or sys.stdout
        self.elide_over = elide_over  # printed IR: dense constants above this many elements elided
        self.timings: list[tuple[str, float, bool]] = []

    def run(self, graph):
        for name in self.names:
            t0 = time.perf_counter()
            changed = PASSES[name](graph)
            self.timings.append((name, time.perf_counter() - t0, bool(changed)))
            if self.verify:
                try:
                    graph.verify()
                except ValueError as e:
                    raise type(e)(f"after pass {name!r}: {e}") from None
            if self.print_after_all:
                self.out.write(f"// -----// IR after {name} {'' if changed else '(no change) '}//----- //\n")
                self.out.write(print_graph(graph, elide_over=self.elide_over))
        return graph


def run_passes(graph, passes: Sequence[str] | None = None, **kw):
    """Run passes (default: the default pipeline) on graph in place and return it."""
    return PassManager(passes, **kw).run(graph)
