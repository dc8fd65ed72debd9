"""`graphir run ART.gart`: execute an artifact on random or given inputs and weights."""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np

from . import numerics


def input_names(graph) -> list[str]:
    """The names inputs are looked up by in an .npz: the graph's input names, else arg0, arg1..."""
    return list(graph.input_names) if graph.input_names else [f"arg{i}" for i in range(len(graph.inputs))]


def read_inputs(path: str | Path, graph) -> list[np.ndarray]:
    """Inputs from an .npz keyed by input name (or arr_0, arr_1, ... as np.savez writes them)."""
    names = input_names(graph)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        positional = [f"arr_{i}" for i in range(len(names))]
        use = names if set(names) <= keys else positional if set(positional) <= keys else None
        if use is None:
            missing = [n for n in names if n not in keys]
            raise ValueError(f"{path}: inputs {missing} are missing (the .npz has {sorted(keys)}; "
                             f"expected keys {names} or arr_0..arr_{len(names) - 1})")
        extra = sorted(keys - set(use))
        if extra:
            raise ValueError(f"{path}: unexpected arrays {extra}; the graph's inputs are {names}")
        return [z[k] for k in use]


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict from .safetensors, .gguf or .npz (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file {str(p)!r}")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from graphir.runtime.session import load_weights

    return load_weights(p)


def _devices(target: str):
    from graphir.device import DeviceRef

    return [DeviceRef.GPU() if target.startswith("cuda") else DeviceRef.CPU()]


def cmd_run(args) -> int:
    from graphir.lowering.artifact import ArtifactError, load_artifact
    from graphir.runtime.session import InferenceSession

    try:
        art = load_artifact(args.artifact, trusted_keys=getattr(args, "trusted_key", None) or None)
    except ArtifactError as e:
        raise ValueError(str(e)) from None
    graph = art.graph()
    rng = np.random.default_rng(args.seed)
    if args.inputs:
        if args.dim:
            raise ValueError("--dim sets the sizes of random inputs; it cannot go with --inputs")
        inputs = read_inputs(args.inputs, graph)
        print(f"inputs: {args.inputs}")
    else:
        inputs, env = numerics.random_inputs(graph, numerics.parse_dims(args.dim), rng)
        given = set(numerics.parse_dims(args.dim))
        dims = ", ".join(f"{k}={v}{'' if k in given else ' (default)'}" for k, v in env.items())
        print(f"inputs: random (seed {args.seed}){f'; dims {dims}' if dims else ''}")
    if args.weights:
        weights = read_weights(args.weights)
        print(f"weights: {args.weights} ({len(weights)} arrays)")
    else:
        weights = numerics.random_weights(graph, rng)
        print(f"weights: random ({len(weights)} arrays)")

    t0 = time.perf_counter()
    model = InferenceSession(devices=_devices(art.target)).load(art, weights=weights)
    t_load = time.perf_counter() - t0
    ref_inputs = copy.deepcopy(inputs) if args.check else None
    t0 = time.perf_counter()
    outs = model.execute(*inputs)
    t_exec = time.perf_counter() - t0
    for i, o in enumerate(outs):
        dt = graph.outputs[i].type.dtype
        print(f"output {i}: {list(o.shape)} {dt.short}  {numerics.checksum(o)}")
    print(f"load {t_load * 1e3:.1f} ms, execute {t_exec * 1e3:.1f} ms ({art.target})")
    if args.save:
        np.savez(args.save, **{f"out{i}": o for i, o in enumerate(outs)})
        print(f"saved outputs to {args.save}")
    if not args.check:
        return 0
    return _check(graph, ref_inputs, inputs, outs, weights)


def _check(graph, ref_inputs, inputs, outs, weights) -> int:
    """Run the interpreter on the same inputs; compare outputs and every updated buffer."""
    from graphir.types import BufferType
    from graphir.runtime.interpreter import run

    t0 = time.perf_counter()
    want = run(graph, *ref_inputs, weights=weights)
    t_ref = time.perf_counter() - t0
    rows = [(f"output {i}", g, w, graph.outputs[i].type.dtype) for i, (g, w) in enumerate(zip(outs, want))]
    names = input_names(graph)
    rows += [(f"buffer {names[i]}", a, r, v.type.dtype)
             for i, (v, a, r) in enumerate(zip(graph.inputs, inputs, ref_inputs))
             if isinstance(v.type, BufferType)]
    ok = True
    for what, g, w, dt in rows:
        err, good = numerics.compare(g, w, dt)
        ok &= good
        print(f"check {what}: max rel err {err:.2e} vs interpreter  {'OK' if good else 'MISMATCH'}")
    print(f"interpreter {t_ref * 1e3:.1f} ms; {'OK' if ok else 'MISMATCH'}")
    if not ok:
        print("graphir run: results differ from the interpreter", file=sys.stderr)
    return 0 if ok else 1


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a compiled artifact (random or .npz inputs)",
                       description="Load ART.gart (every file's hash is checked), bind weights, run it "
                                   "once and print each output's shape and checksum.")
    r.add_argument("artifact", help="artifact directory (.gart) written by `graphir compile`")
    r.add_argument("--inputs", help=".npz keyed by input name (or arr_0, arr_1, ...); default: random")
    r.add_argument("--weights", help=".safetensors, .npz or .gguf state dict; default: random")
    r.add_argument("--dim", action="append", metavar="NAME=INT",
                   help=f"size of a symbolic dim for random inputs (repeatable; default "
                        f"{numerics.DEFAULT_DIM})")
    r.add_argument("--seed", type=int, default=0, help="seed of the random inputs/weights (default 0)")
    r.add_argument("--check", action="store_true",
                   help="also run the reference interpreter and compare (exit 1 on mismatch)")
    r.add_argument("--save", metavar="OUT.npz", help="write the outputs (out0, out1, ...) to an .npz")
    r.add_argument("--trusted-key", action="append", metavar="KEY.pub",
                   help="require a valid signature by this public key (repeatable)")
    r.set_defaults(fn=cmd_run)
