"""Fuzz target: the CUDA executor's per-signature fast check of ragged / paged metadata
(runtime/ragged.py `FastFacts`) against the full check it stands in for.

A decode loop's hits skip the full check: the fast one answers the call's facts from a scalar
read or a reduction, and from byte comparisons with the last call's offsets and lookup table.
So the property: whenever the fast check answers, the full check accepts the same metadata and
gives the same (bucketed) facts; where the metadata is bad or unusual the fast check must answer
None (the executor then runs the full check, which names the fault). Cases form a serving-like
stream: FastFacts objects live across cases per input signature (their byte caches too), the
metadata is often the last call's again or a small edit of it, and edits aim at the edges (the
pool's last page, one past it, 2**31, 2**32 - 1, a cache that needs one page more than a row
holds, offsets out of order). Any exception from the fast check is a finding as well.
"""
from __future__ import annotations

import random

import numpy as np

PAGE, POOL, MAX_PAGES = 4, 30, 6          # the tiny Llama layer (build_tiny), a pool of 30
WANTED = [("seqmax", 1, 1), ("kvmax", (1, 3), 16)]   # the facts its cuda plan asks for
OFFS, CLEN, LUT = 1, 3, 4                 # its metadata inputs


class FastFactsTarget:
    def __init__(self):
        from graphir.examples.llama_attention import build_tiny
        from graphir.runtime.ragged import RaggedCheck

        self.check = RaggedCheck(build_tiny())
        self.fasts: dict = {}              # input signature -> its FastFacts (None: no fast path)
        self.last: dict | None = None

    def _fresh(self, r: np.random.Generator) -> dict:
        b = int(r.integers(1, 5))
        new = np.ones(b, np.int64) if r.random() < 0.5 else r.integers(0, 4, b).astype(np.int64)
        cached = r.integers(0, MAX_PAGES * PAGE - 3, b)
        lut = r.permutation(POOL)[:b * MAX_PAGES].reshape(b, MAX_PAGES)
        if r.random() < 0.3:               # padding past a sequence's pages: the null page
            lut[:, MAX_PAGES - 1] = POOL - 1
        if b > 1 and r.random() < 0.3:     # dummy sequences padding the batch: one new token
            pad = r.random(b) < 0.5        # each, every page the null page
            new[pad], cached[pad], lut[pad] = 1, 0, POOL - 1
        dt = [np.uint32, np.int32, np.int64][int(r.integers(0, 3))]
        offs = np.concatenate([[0], np.cumsum(new)])
        return {OFFS: offs.astype(dt), CLEN: cached.astype(dt), LUT: lut.astype(dt)}

    def _edit(self, rng: random.Random, a: dict) -> None:
        """One value of one metadata input set at an edge, in place (shape and dtype kept)."""
        k = rng.choice([OFFS, CLEN, LUT])
        arr = a[k]
        i = rng.randrange(arr.size)
        edges = [0, 1, POOL - 1, POOL, MAX_PAGES * PAGE, MAX_PAGES * PAGE + 1, 2 ** 31 - 1,
                 2 ** 31, 2 ** 32 - 1, int(arr.flat[i]) + rng.choice([-2, -1, 1, 2])]
        v = rng.choice(edges)
        info = np.iinfo(arr.dtype)
        arr.flat[i] = min(max(v, info.min), info.max)

    def __call__(self, rng: random.Random) -> str | None:
        from graphir.runtime.cuda.plan_values import bucketed

        r = np.random.default_rng(rng.randrange(1 << 30))
        if self.last is not None and rng.random() < 0.6:
            a = {k: v.copy() for k, v in self.last.items()}     # the next step of a loop
            if rng.random() < 0.5:
                a[CLEN] = (a[CLEN] + 1).astype(a[CLEN].dtype)
        else:
            a = self._fresh(r)
        rows = int(a[OFFS][-1])            # the hidden states' rows: fixed before any edit
        for _ in range(rng.choice([0, 0, 1, 2])):
            self._edit(rng, a)
        self.last = a
        env = {"total_seq_len": max(rows, 0), "batch": len(a[CLEN]),
               "total_num_pages": POOL, "max_num_pages": MAX_PAGES, "steps_remaining": 1}
        shapes, dts = [None] * 6, [None] * 6
        for k, v in a.items():
            shapes[k], dts[k] = v.shape, v.dtype
        sig = (rows, tuple(tuple(s) if s else None for s in shapes), tuple(dts))
        if sig not in self.fasts:
            self.fasts[sig] = self.check.fast(self.check.bounds(env), shapes, dts, WANTED)
        fast = self.fasts[sig]
        if fast is None:
            return None
        inputs = [a.get(k) for k in range(6)]
        blobs = [a[k].tobytes() if k in a else None for k in range(6)] if rng.random() < 0.7 \
            else [None] * 6
        try:
            got = fast(inputs, blobs)
        except Exception as e:  # noqa: BLE001
            return f"fast check raised {type(e).__name__}: {str(e)[:120]}"
        if got is None:
            return None
        try:
            f = self.check.check(a.__getitem__, env)
        except ValueError as e:
            return f"fast check accepted what the full check refuses: {str(e)[:160]}"
        want = (f.seq_max[OFFS], bucketed(f.kv_max[(OFFS, CLEN)], WANTED[1][2]))
        if got != want:
            return f"fast check's facts {got} differ from the full check's {want}"
        return None
