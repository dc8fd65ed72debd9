"""Summarise ncu's per-SASS-instruction CSV (`ncu -i R --page source --csv --print-source
sass`): the instructions with the most warp-state samples, their main stall reasons, and the
samples summed by opcode. Used by ncu_source.sh; also runs on a copied CSV anywhere."""
import csv
import sys
from collections import Counter


def num(v):
    try:
        return float(str(v).replace(",", ""))
    except ValueError:
        return 0.0


def main(path):
    lines = open(path).read().splitlines()
    # The CSV starts with a "Kernel Name" line, then the header.
    start = next(i for i, l in enumerate(lines) if l.startswith('"Address"'))
    rows = list(csv.DictReader(lines[start:]))
    if not rows:
        print("no rows in", path)
        return
    cols = list(rows[0])
    total_c = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    stall_cs = [c for c in cols if c.startswith("stall_") and "Not Issued" not in c]
    if total_c is None:
        print("columns:", cols)
        return
    # Warps parked for the whole kernel: in a warp-specialized kernel the warps of a partition's
    # warpgroup that run no code (the loader takes one warp of four) wait at the register
    # reallocation rendezvous (BAR.SYNC, then a NOP before USETMAXREG.TRY_ALLOC) until the end.
    # Their samples are stalls of nobody's work: counted apart, left out of the shares below.
    parked = [r for i, r in enumerate(rows[:-1]) if "USETMAXREG.TRY_ALLOC" in rows[i + 1]["Source"]
              and r["Source"].split()[:1] == ["NOP"]]
    n_parked = sum(num(r[total_c]) for r in parked)
    rows = [r for r in rows if not any(r is p for p in parked)]
    total = sum(num(r[total_c]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} samples of working warps "
          f"({n_parked:.0f} more of warps parked at the register rendezvous, left out)")
    by_op = Counter()
    for r in rows:
        by_op[r["Source"].split()[0].split(".")[0] if r["Source"].split() else "?"] += num(r[total_c])
    print("by opcode:", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_op.most_common(14)))
    reasons = Counter()
    for r in rows:
        for c in stall_cs:
            reasons[c] += num(r[c])
    print("by reason:", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in reasons.most_common(10)))
    for r in sorted(rows, key=lambda r: -num(r[total_c]))[:40]:
        top = sorted(((num(r[c]), c) for c in stall_cs), reverse=True)[:3]
        why = ", ".join(f"{c.replace('stall_', '')} {v:.0f}" for v, c in top if v)
        print(f"{r.get('Address', '?'):>8} {100 * num(r[total_c]) / total:5.1f}%  "
              f"{r['Source'][:60]:60}  {why}")


if __name__ == "__main__":
    main(sys.argv[1])
