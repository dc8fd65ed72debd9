"""Fuzz targets for what reaches the compiled CPU path: damaged artifacts and ragged metadata.

Both compile one small artifact once (a few seconds), then each case is cheap. A case's
outcome is fine when the input is refused with a clean error (ArtifactError / ValueError) and
the KV cache is untouched, or when it is accepted and the result equals the unedited
artifact's, bit for bit (artifacts) or the interpreter's (metadata).
Anything else is a finding; a crash ends the fuzzer, which is a finding too.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

POOL, PAGE, MAX_PAGES = 9, 4, 4          # the tiny Llama layer's cache (build_tiny)


class ArtifactTarget:
    """Random edits of a compiled artifact: manifest values, keys, file bytes, with and without
    a recomputed root digest."""

    def __init__(self):
        from graphir import DType, Graph, TensorType, Weight, ops
        from graphir.lowering.driver import compile_graph

        w = Weight("w", DType.float32, [8, 8])
        with Graph("fz", input_types=[TensorType(DType.float32, ["n", 8])]) as g:
            x = g.inputs[0]
            h = ops.matmul(x, w, transpose_b=True)
            g.output(ops.tanh(h) * ops.exp(x))
        self.weights = {"w": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
        self.dir = Path(tempfile.mkdtemp(prefix="graphir-fuzz-art-"))
        self.good = compile_graph(g, "cpu", out=self.dir / "good.gart").path
        # The oracle: what the unedited artifact computes. (The float64 reference is no oracle
        # at f32 tolerances: the matmul's rounding is amplified wherever its products cancel,
        # 1.5e-5 relative at seed 1209's case 36766, in numpy's f32 product too.)
        from graphir.runtime import InferenceSession

        self.unedited = InferenceSession().load(self.good, weights=self.weights)

    def __call__(self, rng: random.Random) -> str | None:
        from graphir.lowering.artifact import ArtifactError, root_digest
        from graphir.runtime import InferenceSession

        art = self.dir / "case.gart"
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(self.good, art)
        m = json.loads((art / "manifest.json").read_text())
        what = rng.choice(["value", "delete", "add", "bytes"])
        if what == "bytes":
            f = rng.choice([p for p in art.rglob("*") if p.is_file()])
            data = bytearray(f.read_bytes())
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(data))
        else:
            mutate_json(m, rng, what)
            if rng.random() < 0.7:
                m["root_digest"] = root_digest(m)
            (art / "manifest.json").write_text(json.dumps(m))
        x = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((3, 8)).astype(np.float32)
        try:
            model = InferenceSession().load(art, weights=self.weights)
            (y,) = model.execute(x)
        except (ArtifactError, ValueError, TypeError):
            return None
        except Exception as e:  # noqa: BLE001
            return f"artifact ({what}): {type(e).__name__}: {str(e)[:160]}"
        (want,) = self.unedited.execute(x)
        if not np.array_equal(y, want):
            return (f"artifact ({what}): an edited artifact loaded and computed other numbers "
                    f"than the unedited one")
        return None


# What a manifest edit puts in place of a value.
_MANIFEST_VALUES = (0, 1, -1, 2 ** 40, "x", None, [], {}, True, 1.5, "cpu/kernels.so")


def mutate_json(m, rng: random.Random, what: str, values=_MANIFEST_VALUES) -> None:
    """Change ("value"), delete ("delete") or add ("add", in an object) one entry somewhere
    inside a JSON document, in place; a new value is a copy of one of `values` (so that edits
    never share a list or object between two places)."""
    node = m
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if not isinstance(node[key], (dict, list)) or not node[key]:
            break
        node = node[key]
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
    elif isinstance(node, list) and node:
        key = rng.randrange(len(node))
    else:
        return
    new = copy.deepcopy(rng.choice(values))
    if what == "delete":
        del node[key]
    elif what == "add" and isinstance(node, dict):
        node[f"extra{rng.randrange(9)}"] = new
    else:
        node[key] = new


class MetadataTarget:
    """Random ragged/paged metadata for the tiny Llama layer compiled for the CPU."""

    def __init__(self):
        from graphir.examples.llama_attention import build_tiny, random_weights
        from graphir.runtime import InferenceSession

        self.graph = build_tiny()
        self.weights = random_weights(self.graph, seed=1)
        self.model = InferenceSession().load(self.graph, weights=self.weights)

    def __call__(self, rng: random.Random) -> str | None:
        from graphir.runtime.interpreter import run

        r = np.random.default_rng(rng.randrange(1 << 30))
        batch = rng.randint(1, 3)
        new = r.integers(0, 5, batch)
        cached = r.integers(0, 12, batch)
        offs = np.concatenate([[0], np.cumsum(new)]).astype(np.int64)
        lut = r.integers(0, POOL, (batch, MAX_PAGES))
        kind = rng.choice(["good", "offs", "lut", "clen", "rows"])
        if kind == "offs":
            offs[rng.randrange(len(offs))] += rng.choice([-3, -1, 1, 7])
        elif kind == "lut":
            lut[rng.randrange(batch), rng.randrange(MAX_PAGES)] = rng.choice(
                [POOL, POOL + 1, 100000, 2 ** 31, 2 ** 32 - 1])
        elif kind == "clen":
            cached[rng.randrange(batch)] = rng.choice([13, 40, 2 ** 31])
        rows = int(max(offs[-1], 0)) + (rng.choice([-1, 1]) if kind == "rows" else 0)
        x = r.standard_normal((max(rows, 0), 64)).astype(np.float32)
        blocks = r.standard_normal((POOL + 1, 2, 2, PAGE, 2, 16)).astype(np.float32)
        maxl = np.array([[max(int(new.max()), 1), int((new + cached).max()) or 1]], np.uint32)
        args = [x, np.clip(offs, 0, 2 ** 32 - 1).astype(np.uint32), blocks,
                np.clip(cached, 0, 2 ** 32 - 1).astype(np.uint32), lut.astype(np.uint32), maxl]
        outcome = []
        for who, fn in (("interpreter", lambda a: run(self.graph, *a, weights=self.weights)),
                        ("compiled", lambda a: self.model.execute(*a))):
            a = [v.copy() for v in args]
            try:
                outcome.append((fn(a)[0], a[2]))
            except ValueError:
                if not np.array_equal(a[2], blocks):
                    return f"metadata ({kind}): the {who} refused the call but wrote the cache"
                outcome.append(None)
            except Exception as e:  # noqa: BLE001
                return f"metadata ({kind}): the {who} raised {type(e).__name__}: {str(e)[:120]}"
        if (outcome[0] is None) != (outcome[1] is None):
            return f"metadata ({kind}): the interpreter and the compiled path disagree on refusing"
        if outcome[0] is not None:
            (yi, bi), (yc, bc) = outcome
            if not (np.allclose(yi, yc, rtol=1e-4, atol=1e-4) and np.allclose(bi, bc, 1e-5, 1e-5)):
                return f"metadata ({kind}): accepted, but the compiled result differs"
        return None
