"""`graphir demo`: the main job, end to end on the CPU."""
from __future__ import annotations

import os
import time

import numpy as np

from runtime.interpreter import run

from .loader import load_graph

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _mlp_numpy(x, w):
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w["norm.weight"]
    g = h @ w["gate.weight"].T
    return x + ((g / (1 + np.exp(-g))) * (h @ w["up.weight"].T)) @ w["down.weight"].T


def _attention_numpy(q, k, v):
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def demo(args) -> int:
    rng = np.random.default_rng(0)
    ok = True
    for name, check in [("mlp.py", "mlp"), ("softmax_attention.py", "attn")]:
        t0 = time.perf_counter()
        g = load_graph(os.path.join(_EXAMPLES, name))
        t_build = time.perf_counter() - t0
        if not args.quiet:
            print(f"== {name}: IR ==")
            print(g)
        if check == "mlp":
            weights = {n: rng.standard_normal([int(d) for d in v.type.shape]).astype(np.float32) * 0.2
                       for n, v in g.weights.items()}
            x = rng.standard_normal((5, 64)).astype(np.float32)
            t0 = time.perf_counter()
            (y,) = run(g, x, weights=weights)
            want = _mlp_numpy(x.astype(np.float64), {k: v.astype(np.float64) for k, v in weights.items()})
        else:
            q, k, v = (rng.standard_normal((4, 16, 8)).astype(np.float32) for _ in range(3))
            t0 = time.perf_counter()
            (y,) = run(g, q, k, v)
            want = _attention_numpy(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
        t_run = time.perf_counter() - t0
        err = float(np.max(np.abs(y - want)))
        good = err < 1e-4
        ok &= good
        print(f"{name:24s} build {t_build * 1e3:7.1f} ms   interpreter {t_run * 1e3:7.1f} ms   "
              f"max|err| vs numpy {err:.2e}  {'OK' if good else 'MISMATCH'}")
    print("demo:", "all results match" if ok else "MISMATCH")
    return 0 if ok else 1
