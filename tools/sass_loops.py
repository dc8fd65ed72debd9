"""The prefill kernels' key loops in their sm_90 SASS, compiled here with no GPU: per config and
mask, the instruction count of each loop that issues wgmma (the innermost ones are the
consumers' key loops), its most frequent opcodes, in-place register half swaps, registers and
stack; with --base REV, the same for a git revision side by side (its tree checked out in a
temporary worktree and imported instead of this one).

    python tools/sass_loops.py m128n128w4s2tmawspersistdynqtma --d 128 --masks CAUSAL,NULL
    python tools/sass_loops.py m128n128w4s2tmaws m128n128w4s2tmawslpt --base HEAD~1

What it found (BENCHMARKS.md, 2026-12-05): a P operand carried across a loop join as fp32, each
key block swapping its bf16 halves back (64 extra instructions a block in 924).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SWAP = re.compile(r"PRMT (R\d+), \1, 0x5432, \1")


def parse(sass: str) -> list[tuple[int, str]]:
    """[(address, instruction without its predicate)] in program order."""
    out = []
    for line in sass.splitlines():
        m = LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2))))
    return out


def wgmma_loops(code: list[tuple[int, str]], most: int = 16) -> list[dict]:
    """Each backward branch's body that issues 1..`most` HGMMA (the key loops and their
    short neighbours, not the tile loops around them): size, HGMMA count, top opcodes."""
    loops = []
    for addr, ins in code:
        b = re.match(r"BRA (0x[0-9a-f]+)", ins)
        if not b or int(b.group(1), 16) >= addr:
            continue
        body = [i for a, i in code if int(b.group(1), 16) <= a <= addr]
        hg = sum(i.startswith("HGMMA") for i in body)
        if 0 < hg <= most:
            ops = collections.Counter(i.split()[0].split(".")[0] for i in body)
            loops.append({"at": hex(int(b.group(1), 16)), "size": len(body), "hgmma": hg,
                          "top": ops.most_common(6)})
    return loops


def half_swaps(code: list[tuple[int, str]]) -> int:
    return sum(bool(SWAP.fullmatch(i)) for _, i in code)


_CHILD = r"""
import json, os, re, subprocess, sys, tempfile
if os.environ.get("SASS_LOOPS_TREE"):  # a revision's tree: not the installed (editable) one
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import triton
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for name, d, mask in json.loads(sys.argv[1]):
    spec = fa.aot_specs(32, 8, d, 128, "bfloat16", mask, config=fc.get(name))[0]
    cubin = aot.compile_spec(spec).cubin
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([BIN, "-sass", f.name], capture_output=True, text=True).stdout
    res = subprocess.run([BIN, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    out[f"{name} d{d} {mask}"] = {"sass": sass, "res": res}
print("JSON" + json.dumps(out))
"""


def _tree_of(rev: str) -> tuple[str, str]:
    """(worktree of rev, a directory that imports it as `graphir`: the package's folders
    linked under one name, as pyproject's package-dir maps them)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True).stdout.strip()
    tree = tempfile.mkdtemp(prefix="sass-loops-")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-f", tree, rev],
                   check=True, capture_output=True)
    shim = tempfile.mkdtemp(prefix="sass-loops-shim-")
    pkg = os.path.join(shim, "graphir")
    os.mkdir(pkg)
    for e in os.listdir(os.path.join(tree, "graphir")):
        os.symlink(os.path.join(tree, "graphir", e), os.path.join(pkg, e))
    for sub in ("ops", "nn", "lowering", "runtime", "tools", "examples"):
        os.symlink(os.path.join(tree, sub), os.path.join(pkg, sub))
    return tree, shim


def measure(jobs: list, shim: str | None = None) -> dict:
    """Compile each (config, head dim, mask) in a child (of the tree `shim` imports, else the
    installed one); its loops, swaps, registers and stack, analysed here (a revision older
    than this tool has none of it)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if shim:
        env.update(PYTHONPATH=shim, SASS_LOOPS_TREE="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], capture_output=True,
                       text=True, env=env, cwd=shim or tempfile.gettempdir())
    line = next((x for x in r.stdout.splitlines() if x.startswith("JSON")), None)
    if r.returncode or line is None:
        raise SystemExit(f"compiling failed:\n{r.stderr[-3000:]}")
    out = {}
    for key, got in json.loads(line[4:]).items():
        code = parse(got["sass"])
        m = re.search(r"REG:(\d+) STACK:(\d+)", got["res"])
        out[key] = {"loops": wgmma_loops(code), "swaps": half_swaps(code), "regs": int(m[1]),
                    "stack": int(m[2])}
    return out


def _row(info: dict) -> str:
    loops = " ".join(f"{lp['size']}" for lp in info["loops"])
    return f"loops [{loops}] swaps {info['swaps']} regs {info['regs']} stack {info['stack']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="prefill config names (config_tag)")
    ap.add_argument("--d", type=int, nargs="+", default=[128], help="head dims")
    ap.add_argument("--masks", default="CAUSAL", help="comma-separated mask variants")
    ap.add_argument("--base", help="a git revision to compare with")
    ap.add_argument("--top", action="store_true", help="print each loop's top opcodes")
    a = ap.parse_args(argv)
    jobs = [(c, d, m) for c in a.configs for d in a.d for m in a.masks.split(",")]
    now = measure(jobs)
    base, tree = None, None
    if a.base:
        tree, shim = _tree_of(a.base)
        try:
            base = measure(jobs, shim)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], capture_output=True)
    for key, info in now.items():
        print(f"{key}: {_row(info)}")
        if base:
            print(f"{'':>{len(key)}}  {a.base}: {_row(base[key])}")
        if a.top:
            for lp in info["loops"]:
                print(f"    {lp['at']} {lp['size']} ins, {lp['hgmma']} HGMMA: "
                      + ", ".join(f"{o} {n}" for o, n in lp["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
