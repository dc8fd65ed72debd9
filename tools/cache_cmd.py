"""`graphir cache info|clear`: the compile cache ($GRAPHIR_CACHE_DIR, default ~/.cache/graphir)."""
from __future__ import annotations

import shutil
from pathlib import Path


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def cmd_cache(args) -> int:
    from graphir.lowering.cache import cache_dir

    d = cache_dir()
    entries = sorted(d.glob("*.gart")) if d.is_dir() else []
    if args.action == "info":
        total = _size(d)
        print(f"cache     {d}")
        print(f"entries   {len(entries)} artifacts, {total / 2**20:.1f} MiB in all")
        for e in entries[-args.last:] if args.last else []:
            print(f"  {e.name}  {_size(e) / 2**20:7.2f} MiB")
        return 0
    removed = 0
    for e in d.iterdir() if d.is_dir() else []:
        if e.is_dir():
            shutil.rmtree(e, ignore_errors=True)
        else:
            e.unlink(missing_ok=True)
        removed += 1
    print(f"removed {removed} entries from {d}")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="show or clear the compile cache",
                       description="The compile cache holds one artifact per (graph, target, "
                                   "compiler version); set GRAPHIR_CACHE_DIR to move it.")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("--last", type=int, default=10, metavar="N",
                   help="info: list the last N entries (default 10; 0 for none)")
    c.set_defaults(fn=cmd_cache)
