"""The `graphir` command line: dump, opt, demo (and more as backends land)."""
from __future__ import annotations

import argparse
import sys

import graphir

STAGES = ["graph", "passes"]


def _cmd_dump(args) -> int:
    from graphir.passes import PassManager

    from .loader import load_graph

    g = load_graph(args.file)
    if args.stage == "graph":
        sys.stdout.write(str(g))
    elif args.stage == "passes":
        sys.stdout.write("// -----// IR as built //----- //\n" + str(g))
        PassManager(args.passes.split(",") if args.passes else None, print_after_all=True).run(g)
    return 0


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
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("dump", help="print a graph's IR at a stage",
                       description="Build FILE.py[:FUNC] (FUNC returns a Graph, default `build`) "
                                   "or read a .gir file, and print its IR.")
    d.add_argument("file", help="FILE.py[:FUNC] or FILE.gir")
    d.add_argument("--stage", choices=STAGES, default="graph",
                   help="graph: as built; passes: after each pass of the pipeline")
    d.add_argument("-p", "--passes", help="comma-separated passes (default: the default pipeline)")
    d.set_defaults(fn=_cmd_dump)

    o = sub.add_parser("opt", help="run passes over a graph and print the result",
                       description="Run passes (-p a,b,c; default pipeline if omitted) and print the IR.")
    o.add_argument("file", help="FILE.gir or FILE.py[:FUNC]")
    o.add_argument("-p", "--passes", help="comma-separated pass names, e.g. canonicalize,cse,dce")
    o.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    o.set_defaults(fn=_cmd_opt)

    m = sub.add_parser("demo", help="the main job: build, compile and run attention layers",
                       description="Build the example graphs, print their IR, run them and check "
                                   "them against numpy.")
    m.add_argument("--device", default="cpu", help="cpu (default)")
    m.add_argument("--quiet", action="store_true", help="do not print the IR")
    m.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args) or 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"graphir {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
