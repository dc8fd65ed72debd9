"""Fuzz graphir's input surfaces for as long as asked; the tests run the same targets briefly.

    python -m graphir.tools.fuzz [--target parser|builders|artifacts|metadata|fastfacts|gguf|
                                 configs|all]
                                 [--seconds 60] [--seed 0]

Each target turns a random.Random into one case and classifies the outcome: a clean error
(ParseError / ValueError / TypeError that names the op), a success (which must round-trip through
the textual IR), or a finding (any other exception, an unnamed error, a failed round trip, or a
case slower than a second). The command prints one line per target and exits 1 on findings.
"""
from __future__ import annotations

import argparse
import inspect
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from graphir import BufferType, DeviceRef, DType, Graph, ParseError, TensorType, parse

SLOW_S = 1.0
HANG_S = 30.0   # a case still running after this is stopped and reported (a loop on bad input)


class _Hang(BaseException):
    """Raised into a case that runs past HANG_S: a BaseException, so that a target's own
    `except Exception` (classifying what the code under test raised) lets it through."""


def _stop_case(signum, frame):
    raise _Hang()
_SEED_IR = """graph @seed(%x: tensor<[total_seq_len, 8], f32, cpu:0>, %offs: tensor<[batch+1], u32, cpu:0>) {
  %0 = gir.weight {device = cpu:0, dtype = f32, name = "w", shape = [16, 8]} : tensor<[16, 8], f32, cpu:0>
  %1 = gir.matmul(%x, %0) {transpose_b = true} : tensor<[total_seq_len, 16], f32, cpu:0>
  %2 = gir.constant {device = cpu:0, dtype = f32, value = dense<[2] : [0.5, -1.0]>} : tensor<[2], f32, cpu:0>
  %3, %4 = gir.split(%1) {axis = 1, sizes = [8, 8]} : (tensor<[total_seq_len, 8], f32, cpu:0>, tensor<[total_seq_len, 8], f32, cpu:0>) loc("model.py:12")
  %5 = gir.add(%3, %4) : tensor<[total_seq_len, 8], f32, cpu:0>
  gir.output %5
}
"""
_PIECES = list('%@()[]{}<>,:=*+-/#"\\ \n0123456789abcxyzeE.') + [
    "gir.", "tensor", "buffer", "dense", "loc(", "99999999999999999999999", "1e999", "(((((",
    "!chain", "f32", "inf", "nan", '"\\q"', "a*b*c*d*e*f*g*h*i*j*k*l*m*n*o*p*q*r*",
    "*".join(f"(a{i}+b{i})" for i in range(12))]


def seed_texts() -> list[str]:
    """The seed IR plus the golden files of the pass tests when run from a checkout."""
    texts = [_SEED_IR]
    goldens = Path(__file__).resolve().parents[1] / "tests" / "passes" / "goldens"
    texts += [p.read_text() for p in sorted(goldens.glob("*.gir"))] if goldens.is_dir() else []
    return texts


def mutate_ir(text: str, rng: random.Random) -> str:
    """A few random edits: inserted pieces, deletions, duplicated spans, deep nesting."""
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text) + 1)
        k = rng.random()
        if k < 0.35:
            text = text[:i] + rng.choice(_PIECES) + text[i:]
        elif k < 0.6:
            text = text[:i] + text[i + rng.randint(1, 8):]
        elif k < 0.8:
            a, b = sorted((i, rng.randrange(len(text) + 1)))
            text = text[:a] + text[a:b][:60] * rng.randint(1, 3) + text[b:]
        elif k < 0.9:
            text = text[:i] + rng.choice("([-") * rng.randint(50, 3000) + text[i:]
        else:
            text = text[:i] + rng.choice(_PIECES) * rng.randint(2, 40) + text[i:]
    return text


@dataclass
class Tally:
    cases: int = 0
    findings: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        return f"{name}: {self.cases} cases, {len(self.findings)} findings"


def parser_case(rng: random.Random, texts: list[str]) -> str | None:
    """None when the parser either parses (and round-trips) or raises a located ParseError."""
    text = mutate_ir(rng.choice(texts), rng)
    try:
        g = parse(text)
    except ParseError:
        return None
    except Exception as e:  # noqa: BLE001  (any other exception is the finding)
        return f"{type(e).__name__}: {str(e)[:200]}"
    out = str(g)
    if str(parse(out)) != out:
        return "accepted text does not print back the same"
    return None


def _random_type(rng: random.Random) -> TensorType:
    shape = [rng.choice([1, 2, 3, 4, 8, "n", "m"]) for _ in range(rng.randint(0, 4))]
    return TensorType(rng.choice(list(DType)), shape,
                      rng.choice([DeviceRef.CPU(), DeviceRef.GPU()]))


def _random_scalar(rng: random.Random):
    return rng.choice([0, 1, -1, 2, 3, -5, 10 ** 30, 2 ** 63, 0.5, float("inf"), float("nan"),
                       True, False, None, "x", "cpu", [], [1, 2], [0], (1,), DType.float32,
                       DeviceRef.CPU(), -2 ** 70, 1e308])


def builder_names() -> list[str]:
    from graphir import ops

    return sorted(n for n in dir(ops) if not n.startswith("_")
                  and inspect.isfunction(getattr(ops, n)))


def builder_case(rng: random.Random, names: list[str]) -> str | None:
    """None when a random call of a builder records a printable op or raises a named error."""
    from graphir import ops

    name = rng.choice(names)
    fn = getattr(ops, name)
    types = [_random_type(rng) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.1:
        types.append(BufferType(DType.float32, [3, 2, 1, 4, 1, 8]))
    with Graph("fuzz", input_types=types) as g:
        vals = list(g.inputs)
        args, kwargs = [], {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is not p.empty and rng.random() < 0.5:
                continue
            v = rng.choice(vals + [_random_scalar(rng)])
            if rng.random() < 0.15:
                v = rng.sample(vals, k=min(len(vals), rng.randint(0, 3)))
            (kwargs.__setitem__(p.name, v) if p.kind == p.KEYWORD_ONLY else args.append(v))
        try:
            out = fn(*args, **kwargs)
        except (ValueError, TypeError) as e:
            msg = str(e)
            return None if ("gir." in msg or f"ops.{name}" in msg) else \
                f"ops.{name}: unnamed {type(e).__name__}: {msg[:160]}"
        except Exception as e:  # noqa: BLE001
            return f"ops.{name}: {type(e).__name__}: {str(e)[:160]}"
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if hasattr(o, "type")]
        g.output(*outs)
    try:
        text = str(g)
        if str(parse(text)) != text:
            return f"ops.{name}: the recorded graph does not print back the same"
    except Exception as e:  # noqa: BLE001
        return f"ops.{name}: the recorded graph does not round-trip: {type(e).__name__}: {e}"
    return None


TARGETS = ("parser", "builders", "artifacts", "metadata", "fastfacts", "gguf", "configs")


def make_target(name: str) -> Callable[[random.Random], str | None]:
    """The case function of a target (artifacts and metadata compile a small model first)."""
    if name == "parser":
        texts = seed_texts()
        return lambda rng: parser_case(rng, texts)
    if name == "builders":
        names = builder_names()
        return lambda rng: builder_case(rng, names)
    from . import fuzz_configs, fuzz_gguf, fuzz_ragged, fuzz_runtime

    return {"fastfacts": fuzz_ragged.FastFactsTarget, "gguf": fuzz_gguf.GGUFTarget,
            "configs": fuzz_configs.ConfigTarget,
            "artifacts": fuzz_runtime.ArtifactTarget,
            "metadata": fuzz_runtime.MetadataTarget}[name]()


def run(target: str, seconds: float, seed: int = 0, max_cases: int | None = None) -> Tally:
    """Run one target until `seconds` pass (or `max_cases`); return its tally."""
    case = make_target(target)
    rng = random.Random(seed)
    tally, end = Tally(), time.monotonic() + seconds
    while time.monotonic() < end and (max_cases is None or tally.cases < max_cases):
        t0 = time.perf_counter()
        finding = _bounded(case, rng)
        dt = time.perf_counter() - t0
        tally.cases += 1
        if finding is None and dt > SLOW_S:
            finding = f"slow case: {dt:.1f} s"
        if finding:
            tally.findings.append(finding)
    return tally


def _bounded(case, rng) -> str | None:
    """case(rng), stopped after HANG_S where a timer signal can interrupt it (the main thread
    of a POSIX process): a case that never returns is a finding, not a fuzz run that hangs
    (found so: a manifest whose values were edited into a cycle of views)."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return case(rng)
    old = signal.signal(signal.SIGALRM, _stop_case)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        return case(rng)
    except _Hang:
        return f"hang: a case ran past {HANG_S:.0f} s and was stopped"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="all", choices=["all", *TARGETS])
    ap.add_argument("--seconds", type=float, default=60.0, help="per target")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    bad = 0
    for name in names:
        t = run(name, args.seconds, args.seed)
        print(t.line(name))
        for f in sorted(set(t.findings))[:20]:
            print("  ", f)
        bad += len(t.findings)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
