"""Random serving streams through the CUDA executor on the CPU tests' stand-in device
(graph_device.py: Triton's interpreter, recorded "CUDA graphs", staging slots) against the
reference interpreter, step by step: batches that come and go, decode steps, prefill chunks,
sequences that take no token, hidden states as device tensors or numpy, and metadata edited at
its edges (offsets off by a few, page ids at and past the pool, the null page, caches past the
pages or the RoPE table). Each step: the executor and the interpreter both refuse (a
ValueError, the cache untouched) or both run, with equal outputs and caches. The keys, the
replays, the fast metadata check and the staging all serve such a stream.

    TRITON_INTERPRET=1 python -m tests.runtime.cuda.serving_stream [seconds] [seed]
tests/runtime/cuda/test_executor_stream.py runs a short stream.
"""
from __future__ import annotations

import random
import sys
import time

import numpy as np

from tests.runtime.cuda.graph_device import PAGE, POOL, ROPE_ROWS, Cache, aligned  # noqa: E402
import torch  # noqa: E402  (after the interpreter switch)
from graphir.runtime.interpreter import run  # noqa: E402

PAGES_PER_SEQ = 12


def _edit(rng: random.Random, b: int, offs, clen, lut) -> str:
    """One metadata value set at an edge, in place; returns what was edited."""
    what = rng.choice(["offsets", "cache_lengths", "lookup_table", "null page"])
    if what == "offsets":
        i = rng.randrange(len(offs))
        offs[i] = max(int(offs[i]) + rng.choice([-2, -1, 1, 3]), 0)
    elif what == "cache_lengths":
        clen[rng.randrange(b)] = rng.choice([ROPE_ROWS - 1, ROPE_ROWS, PAGES_PER_SEQ * PAGE,
                                             2 ** 31, 0])
    elif what == "lookup_table":
        lut[rng.randrange(b), rng.randrange(lut.shape[1])] = rng.choice(
            [POOL - 1, POOL, POOL + 5, 2 ** 32 - 1, int(lut[0, 0])])
    else:
        lut[rng.randrange(b)] = POOL - 1
    return what


def step(ex, cache: Cache, rng: random.Random, held: dict) -> tuple[str | None, bool]:
    """One random step: (a finding or None, whether both sides refused it). `held`: a
    serving loop's hidden-state buffers by row count, refilled in place (their addresses come
    back, so the executor reads them in place once it has seen them twice)."""
    b = len(cache.clen)
    mode = rng.choice(["decode", "decode", "decode", "prefill", "mixed"])
    new = [1] * b if mode == "decode" else [rng.randint(0, 6) for _ in range(b)]
    qkv, offs, clen, lut, freqs, maxl = cache.inputs(new)
    lut = lut.copy()
    what = _edit(rng, b, offs, clen, lut) if rng.random() < 0.25 else None
    r = rng.random()
    if r < 0.4:
        x = held.setdefault(qkv.shape, aligned(qkv))
        x.copy_(torch.from_numpy(qkv))
    else:
        x = torch.from_numpy(qkv) if r < 0.8 else qkv
    before = cache.dev.clone()
    try:
        (y,) = ex.execute(x, offs, cache.dev, clen, lut, freqs, maxl)
        y, err = np.asarray(y.clone() if isinstance(y, torch.Tensor) else y), None
    except ValueError as e:
        err = e
    ref = cache.ref.copy()
    try:
        (want,) = run(ex.graph, qkv, offs, ref, clen, lut, freqs, maxl)
        ref_err = None
    except ValueError as e:
        ref_err = e
    tag = f"({mode}, edit: {what})"
    if (err is None) != (ref_err is None):
        return f"{tag} executor {err!r} but interpreter {ref_err!r}", False
    if err is not None:
        if not torch.equal(before, cache.dev):
            return f"{tag} refused but wrote the cache", True
        return None, True
    if not np.allclose(y, want, rtol=1e-5, atol=1e-5):
        return f"{tag} outputs differ by {np.abs(y - want).max():.2e}", False
    diff = np.abs(cache.dev.numpy() - ref)
    diff[POOL - 1] = 0          # the null page: writes racing there may land in any order
    if diff.max() > 1e-6:
        return f"{tag} caches differ by {diff.max():.2e}", False
    cache.ref = ref
    cache.dev.copy_(torch.from_numpy(ref))
    cache.clen = clen + np.asarray(new, np.uint32)
    return None, False


def stream(ex, rng: random.Random, steps: int | None = None, seconds: float | None = None):
    """(steps run, refused, findings) of a random stream on executor `ex`."""
    nr = np.random.default_rng(rng.randrange(1 << 30))
    t0, n, refused, findings, cache, held = time.time(), 0, 0, [], None, {}
    while (steps is None or n < steps) and (seconds is None or time.time() - t0 < seconds):
        if cache is None or rng.random() < 0.05:
            b = rng.randint(1, 4)
            cache = Cache(nr, nr.integers(0, 120, b).tolist(), pages_per_seq=PAGES_PER_SEQ)
        finding, was_refused = step(ex, cache, rng, held)
        n, refused = n + 1, refused + was_refused
        if finding:
            findings.append(finding)
            cache = None
        elif (cache.clen + 6 >= min(PAGES_PER_SEQ * PAGE, ROPE_ROWS)).any():
            cache = None        # the next batch: this one would outgrow its pages
    return n, refused, findings


def main(argv=None) -> int:
    from graphir.lowering.triton_gpu.backend import lower
    from tests.runtime.cuda.graph_device import build_graph, executor

    argv = sys.argv[1:] if argv is None else argv
    seconds = float(argv[0]) if argv else 60.0
    seed = int(argv[1]) if len(argv) > 1 else 0
    g = build_graph()
    ex, _ = executor((g, lower(g)))
    n, refused, findings = stream(ex, random.Random(seed), seconds=seconds)
    print(f"{n} steps, {refused} refused by both, {len(findings)} findings; {ex.stats}")
    for f in findings[:20]:
        print("  ", f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
