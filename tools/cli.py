"""The `graphir` command line: dump, opt, demo (and more as backends land)."""
from __future__ import annotations

import argparse
import sys

import graphir

STAGES = ["graph", "passes", "triton", "ptx"]

# ---- CPU backend commands (issue 6): compile/run/inspect/demo live in compile_cmd.py,
# run_cmd.py, inspect_cmd.py and demo.py; dump gets the MLIR toolchain's stages.
from .compile_cmd import CPU_STAGES, CPU_STAGES_HELP  # noqa: E402

STAGES += CPU_STAGES


def _cmd_dump(args) -> int:
    from graphir.passes import PassManager

    from .loader import load_graph

    g = load_graph(args.file)
    if args.stage == "graph":
        sys.stdout.write(str(g))
    elif args.stage == "passes":
        sys.stdout.write("// -----// IR as built //----- //\n" + str(g))
        PassManager(args.passes.split(",") if args.passes else None, print_after_all=True).run(g)
    elif args.stage in CPU_STAGES:
        from .compile_cmd import dump_cpu_stage

        dump_cpu_stage(g, args.stage, args.passes)
    else:
        _dump_kernels(g, args.stage, args.passes, getattr(args, "target", None) or "cuda:sm_90")
    return 0


def _dump_kernels(g, stage: str, passes: str | None, target: str) -> None:
    """Compile for cuda (through the cache) and print every kernel's Triton source or PTX."""
    from graphir.lowering.driver import compile_graph

    names = [p for p in passes.split(",") if p] if passes else None
    art = compile_graph(g, target, passes=names)
    kind = "source" if stage == "triton" else "ptx"
    for key, md in sorted(art.manifest["kernels"].items()):
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
    d.set_defaults(fn=_cmd_dump)

    c = sub.add_parser("compile", help="compile a graph ahead of time into a .gart artifact",
                       description="Run the passes, lower and compile FILE for --target and "
                                   "write the artifact directory -o OUT.gart.")
    c.add_argument("file", help="FILE.py[:FUNC] or FILE.gir")
    c.add_argument("--target", default="cpu", help="cpu or cuda:sm_90 (no GPU needed)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (.gart)")
    c.add_argument("-p", "--passes", help="comma-separated passes (default: the default pipeline)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
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
    m.add_argument("--device", default="cpu", help="cpu (default)")
    m.add_argument("--quiet", action="store_true", help="do not print the IR")
    from .demo import add_arguments as _add_demo_arguments  # CPU demo options (issue 6)

    _add_demo_arguments(m)
    m.set_defaults(fn=_cmd_demo)

    # CPU backend commands (issue 6)
    from . import inspect_cmd, run_cmd

    run_cmd.add_parser(sub)
    inspect_cmd.add_parser(sub)
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
