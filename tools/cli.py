"""The `graphir` command line: dump, opt, demo (and more as backends land)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

import graphir
from graphir import progress

STAGES = ["graph", "passes", "triton", "ptx"]
ELIDE_OVER = 64  # dumps print dense constants up to this many elements

# ---- CPU backend commands (issue 6): compile/run/inspect/demo live in compile_cmd.py,
# run_cmd.py, inspect_cmd.py and demo.py; dump gets the MLIR toolchain's stages.
from .compile_cmd import CPU_STAGES, CPU_STAGES_HELP  # noqa: E402

STAGES += CPU_STAGES


def _cmd_dump(args) -> int:
    from graphir.passes import PassManager
    from graphir.printer import print_graph

    from .loader import load_graph

    g = load_graph(args.file, **({"fuse_rope_and_store": False} if args.unfused else {}))
    elide = None if args.full_constants else ELIDE_OVER
    if args.format != "text":
        return _dump_pictures(g, args)
    if args.output:
        raise ValueError("-o/--output writes pictures (--format dot|svg|png); text goes to stdout")
    if args.stage == "graph":
        sys.stdout.write(print_graph(g, elide_over=elide))
    elif args.stage == "passes":
        sys.stdout.write("// -----// IR as built //----- //\n" + print_graph(g, elide_over=elide))
        PassManager(args.passes.split(",") if args.passes else None, print_after_all=True,
                    elide_over=elide).run(g)
    elif args.stage in CPU_STAGES:
        from .compile_cmd import dump_cpu_stage

        dump_cpu_stage(g, args.stage, args.passes)
    else:
        _dump_kernels(g, args.stage, args.passes, getattr(args, "target", None) or "cuda:sm_90")
    return 0


def _dump_pictures(g, args) -> int:
    """--format dot|svg|png: the graph as built (stage graph), or one picture per pass that
    changed it (stage passes: OUT-00-built.svg, OUT-01-<pass>.svg, ...)."""
    from graphir.dot import graph_to_dot
    from graphir.passes import PASSES, default_pipeline

    from .render import render

    if args.stage not in ("graph", "passes"):
        raise ValueError(f"--format {args.format} draws --stage graph or passes, not {args.stage}")
    if not args.output:
        raise ValueError(f"--format {args.format} needs -o OUT (a file, or for --stage passes "
                         f"the prefix of one file per pass)")
    if args.stage == "graph":
        print(f"wrote {render(graph_to_dot(g, f'@{g.name}'), args.format, args.output)}")
        return 0
    out = Path(args.output)
    stem, ext = (out.parent / out.stem), f".{args.format}"
    written = [render(graph_to_dot(g, f"@{g.name} as built"), args.format,
                      f"{stem}-00-built{ext}")]
    names = [p for p in args.passes.split(",") if p] if args.passes else default_pipeline()
    for name in names:
        if name not in PASSES:
            raise ValueError(f"unknown pass {name!r}; known: {sorted(PASSES)}")
        if PASSES[name](g):
            g.verify()
            written.append(render(graph_to_dot(g, f"@{g.name} after {name}"), args.format,
                                  f"{stem}-{len(written):02d}-{name}{ext}"))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _dump_kernels(g, stage: str, passes: str | None, target: str) -> None:
    """Compile for cuda (through the cache) and print every kernel's Triton source or PTX."""
    from graphir.lowering.driver import compile_graph

    names = [p for p in passes.split(",") if p] if passes else None
    art = compile_graph(g, target, passes=names)
    kind = "source" if stage == "triton" else "ptx"
    for key, md in sorted(art.manifest["kernels"].items()):
        if md.get("kind") == "cublaslt":  # a library call: no Triton source or PTX of ours
            sys.stdout.write(f"// -----// {stage}: {key} (cuBLASLt call; Triton fallback "
                             f"{md['fallback']}) //----- //\n\n")
            continue
        sys.stdout.write(f"// -----// {stage}: {key} (entry {md['name']}, {md['num_warps']} warps, "
                         f"{md['shared']} B shared) //----- //\n")
        sys.stdout.write(art.file(md[kind]).read_text())
        sys.stdout.write("\n")


def _cmd_compile(args) -> int:
    # Any target: a progress line on stderr, then the artifact written and the stage times.
    from .compile_cmd import cmd_compile

    return cmd_compile(args)


def _cmd_opt(args) -> int:
    from graphir.passes import PassManager

    from .loader import load_graph

    g = load_graph(args.file)
    names = [p for p in args.passes.split(",") if p] if args.passes else None
    PassManager(names, print_after_all=args.print_after_all).run(g)
    if not args.print_after_all:
        sys.stdout.write(str(g))
    return 0


def _cmd_demo(args) -> int:
    from .demo import demo

    return demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphir",
        description="graphir: a graph compiler for LLM attention layers. "
                    "Build graphs in Python (examples/), inspect and optimize their IR, run them.")
    p.add_argument("--version", action="version", version=f"graphir {graphir.__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log what graphir does (-vv: debug detail); errors show their traceback")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("dump", help="print a graph's IR at a stage",
                       description="Build FILE.py[:FUNC] (FUNC returns a Graph, default `build`) "
                                   "or read a .gir file, and print its IR.")
    d.add_argument("file", help="FILE.py[:FUNC] or FILE.gir")
    d.add_argument("--stage", choices=STAGES, default="graph",
                   help="graph: as built; passes: after each pass of the pipeline; "
                        "triton / ptx: the kernels of the cuda build; " + CPU_STAGES_HELP)
    d.add_argument("-p", "--passes", help="comma-separated passes (default: the default pipeline)")
    d.add_argument("--target", default="cuda:sm_90",
                   help="for --stage triton|ptx: the CUDA target (default cuda:sm_90)")
    d.add_argument("--unfused", action="store_true",
                   help="build FUNC with fuse_rope_and_store=False, so --stage passes shows the "
                        "fusion pass do the fusing")
    d.add_argument("--format", choices=["text", "dot", "svg", "png"], default="text",
                   help="text (default) or a picture of --stage graph|passes: dot, svg or png "
                        "(svg/png need Graphviz's dot program)")
    d.add_argument("-o", "--output", help="the picture's file (--stage passes: a prefix; one "
                                          "file per pass that changed the graph)")
    d.add_argument("--full-constants", action="store_true",
                   help=f"print dense constants whole (default: elide those over "
                        f"{ELIDE_OVER} elements)")
    d.set_defaults(fn=_cmd_dump)

    c = sub.add_parser("compile", help="compile a graph ahead of time into a .gart artifact",
                       description="Run the passes, lower and compile FILE for --target and "
                                   "write the artifact directory -o OUT.gart.")
    c.add_argument("file", help="FILE.py[:FUNC] or FILE.gir")
    c.add_argument("--target", default="cpu", help="cpu or cuda:sm_90 (no GPU needed)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (.gart)")
    c.add_argument("-p", "--passes", help="comma-separated passes (default: the default pipeline)")
    c.add_argument("-q", "--quiet", action="store_true",
                   help="no progress output (bars show when stderr is a terminal; "
                        "GRAPHIR_PROGRESS=1/0 forces them on/off)")
    c.add_argument("--sign", metavar="KEY",
                   help="sign the artifact with this Ed25519 private key (see `graphir keygen`)")
    c.add_argument("--tune", action="store_true",
                   help="cuda: time every candidate kernel config on this machine's GPU and "
                        "keep the fastest (without a GPU: the shipped default table)")
    c.set_defaults(fn=_cmd_compile)

    o = sub.add_parser("opt", help="run passes over a graph and print the result",
                       description="Run passes (-p a,b,c; default pipeline if omitted) and print the IR.")
    o.add_argument("file", help="FILE.gir or FILE.py[:FUNC]")
    o.add_argument("-p", "--passes", help="comma-separated pass names, e.g. canonicalize,cse,dce")
    o.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    o.set_defaults(fn=_cmd_opt)

    m = sub.add_parser("demo", help="the main job: build, compile and run attention layers",
                       description="Build the Llama-style attention layer (examples/llama_attention.py), "
                                   "compile it for the CPU, run a ragged prefill and decode steps "
                                   "through the paged KV cache, check every step against the "
                                   "interpreter and print the time of each stage.")
    m.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="cpu (default) or gpu (an NVIDIA GPU: compiled for cuda:sm_90)")
    m.add_argument("-q", "--quiet", action="store_true",
                   help="do not print the IR or progress")
    from .demo import add_arguments as _add_demo_arguments  # CPU demo options (issue 6)

    _add_demo_arguments(m)
    m.set_defaults(fn=_cmd_demo)

    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts",
                       description="Write a new private key to KEY (mode 0600) and its public key "
                                   "to KEY.pub; sign with `graphir compile --sign KEY`, verify "
                                   "with `--trusted-key KEY.pub`.")
    k.add_argument("key", help="path of the private key to create (must not exist)")
    k.set_defaults(fn=_cmd_keygen)

    from . import cache_cmd, inspect_cmd, run_cmd

    run_cmd.add_parser(sub)
    inspect_cmd.add_parser(sub)
    cache_cmd.add_parser(sub)
    return p


def _cmd_keygen(args) -> int:
    from graphir.lowering.signing import generate_key

    if os.path.exists(args.key):
        raise ValueError(f"{args.key} exists; pick a new path (keys are never overwritten)")
    priv, pub = generate_key(args.key)
    print(f"wrote {priv} (private: keep it on the build machine) and {pub} (public: give it "
          f"to loaders as a trusted key)")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else
                        logging.INFO if verbose else logging.WARNING,
                        format="graphir %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        # Progress bars on stderr when it is a terminal (GRAPHIR_PROGRESS=1/0 forces); -q: none.
        with progress.scope("off" if getattr(args, "quiet", False) else "auto"):
            return args.fn(args) or 0
    except KeyboardInterrupt:
        print(f"graphir {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every failure is one line; -v adds the traceback)
        if verbose:
            traceback.print_exc()
        from .errors import describe

        print(f"graphir {args.cmd}: error: {describe(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
