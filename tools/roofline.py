"""A roofline chart (matplotlib, PNG) for the benchmark scripts: each kernel and each peer at its
arithmetic intensity (FLOPs per byte of the fewest bytes it must move) and achieved rate,
under the machine's measured memory bandwidth and matrix (or FMA) rate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Point:
    """One timed kernel: `flops` and `nbytes` it must do and move, `seconds` it took."""

    name: str
    flops: float
    nbytes: float
    seconds: float
    ours: bool = True

    @property
    def intensity(self) -> float:
        return self.flops / max(self.nbytes, 1.0)

    @property
    def rate(self) -> float:  # FLOP/s achieved
        return self.flops / max(self.seconds, 1e-12)


def plot(points: list[Point], bandwidth: float, peak: float, out: str | Path,
         title: str) -> Path | None:
    """Write the chart to `out` (PNG); bandwidth in bytes/s, peak in FLOP/s. Returns None (and
    writes nothing) when matplotlib is not installed: the table is the result, the chart a view."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [p for p in points if p.flops > 0 and p.nbytes > 0 and p.seconds > 0]
    lo = min([p.intensity for p in pts] + [0.5]) / 2
    hi = max([p.intensity for p in pts] + [2 * peak / bandwidth]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.loglog(xs, [min(peak, bandwidth * x) for x in xs], color="black", lw=1.5,
              label=f"roof: {bandwidth / 1e9:.0f} GB/s, {peak / 1e12:.1f} TFLOP/s")
    for p in pts:
        ax.scatter(p.intensity, p.rate, marker="o" if p.ours else "x", s=36,
                   color="#16a34a" if p.ours else "#dc2626", zorder=3)
        ax.annotate(p.name, (p.intensity, p.rate), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.scatter([], [], marker="o", color="#16a34a", label="graphir")
    ax.scatter([], [], marker="x", color="#dc2626", label="peer")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def attention_layer_work(batch: int, cached: int, new: int, nh: int, nkv: int, d: int,
                         hidden: int, elem: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one step of the attention layer (examples/llama_attention.py):
    the qkv and o projections, causal attention of each sequence's `new` tokens over its
    `cached` + `new` keys (QK^T and PV), and the bytes it must move at least once: the weights,
    the K/V it reads and the new K/V it writes, x read and the output written. `elem` is the
    bytes of one element (2 for bf16, 4 for f32)."""
    tokens = batch * new
    weights = ((nh + 2 * nkv) * d + nh * d) * hidden
    keys_seen = batch * (new * cached + new * (new + 1) // 2)   # (query, key) pairs, causal
    flops = 2 * tokens * weights + 4 * nh * d * keys_seen
    kv_read = batch * (cached + new) * 2 * nkv * d
    kv_written = tokens * 2 * nkv * d
    nbytes = elem * (weights + kv_read + kv_written + 2 * tokens * hidden)
    return float(flops), float(nbytes)


def write_chart(points: list[Point], bandwidth: float, peak: float, out: str | Path,
                title: str) -> str:
    """plot(), then the line a benchmark prints under its table: where the chart went, or why
    there is none."""
    try:
        path = plot(points, bandwidth, peak, out, title)
    except Exception as e:  # noqa: BLE001  (the chart is a view; it must not lose the table)
        return f"roofline chart not written: {type(e).__name__}: {e}"
    if path is None:
        return "roofline chart not written: matplotlib is not installed (pip install matplotlib)"
    return f"roofline chart: {path}"
