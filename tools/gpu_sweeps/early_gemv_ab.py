"""The B1 decode step's qkv GEMV launched early behind the metadata upload (it reads x and its
weight before its PDL wait: matmul_skinny's LATE_WAIT) against the same artifact with the
runtime's permission withheld (PlanExecutor._early_ok false: every kernel launched in order).
One build, two loaded models, checked against torch eager and against each other, then the
synchronized wall a step in alternated rounds and each kernel's time.
    python3 tools/gpu_sweeps/early_gemv_ab.py [rounds] [case]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import alternated_walls, load_variants, report  # noqa: E402


def _setup(name, model):
    if name == "in order":
        model.executor._early_ok = lambda *a: False


def main(rounds: int, case: str) -> None:
    import torch
    from graphir.lowering.driver import compile_graph

    art = {}

    def build(g, _):  # one artifact for both
        if "a" not in art:
            art["a"] = compile_graph(g, "cuda:sm_90")
        return art["a"]
    fns, errs, outs = load_variants(case, {"early": None, "in order": None}, build, _setup)
    wall = alternated_walls(fns, rounds)
    print(f"{torch.cuda.get_device_name()}; {case}; {rounds} alternated rounds of 100 "
          f"synchronized steps; outputs equal: {torch.equal(outs['early'], outs['in order'])}")
    report(fns, errs, wall, 10)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5,
         sys.argv[2] if len(sys.argv) > 2 else "decode B1 ctx4096")
