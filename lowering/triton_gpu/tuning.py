"""Compile-time autotuning: which kernel config runs each shape bucket of each kernel step.

A kernel family (the matmul now; attention and decode later) declares buckets over one symbolic
size (the matmul's row count M), the candidate configs of each bucket and its built-in default
(`Family`). While the backend lowers a graph, each tunable step asks `select(family, facts)`
for one choice per bucket and gets it from the active `Selector`: a table of choices measured on
this machine's GPU (`tune()`), in front of the shipped default table (tuning_defaults.json,
measured on an H200), in front of the family's built-in defaults. The selector remembers every
step it answered; `manifest_section()` turns that into the artifact's "tuning" section, so
serving reads its choices and never tunes or JIT-compiles.

Table format (the shipped file and the output of `tune()`):
    {"version": 1, "device": "NVIDIA H200",
     "families": {"matmul": {"bf16": {"*": {"m1": CHOICE, ...},
                                      "N=6144,K=4096": {"m64": CHOICE, ...}}}}}
    CHOICE = "config name" | {"config": name, "fallback": name | None, "params": {...},
                              "candidates": [{"config": name, "ms": t, "rel_err": e} |
                                             {"config": name, "error": text}]}
The exact-shape entry wins over "*" (a matmul with a bias also takes its shape's entry
without one, measured where the bias is not: the epilogue costs next to nothing); a choice a
shape cannot run (see `Family.eligible`) is skipped. A choice needing a library the serving machine may lack (cuBLASLt) names a Triton
`fallback`, which the plan keeps. `params` is what the winner needs at run time besides its
name, as its measurement returned it (a matmul's cuBLASLt algorithm record); the lowering
copies it into the kernel entry.

The shipped matmul table is the one tools/gpu_sweeps/matmul.py measured on an H200 (its
"provenance" key says which run); fp32 entries there are predictions, not measurements.

Adding a family: a function returning a `Family` (its kernel module's CANDIDATES and
default_config, plus `launches` and `bench` for the measurer) registered in `_FAMILY_MAKERS`,
and one `select()` call in its lowering.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from graphir import progress

DEFAULTS_PATH = Path(__file__).with_name("tuning_defaults.json")
TABLE_VERSION = 1
# Largest relative L2 error vs the float64 reference a candidate may show and still be timed
# (bf16 output rounding alone gives ~3e-3; tf32 products for fp32 inputs ~5e-4).
MAX_REL_ERR = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 5e-3}


class TuningError(ValueError):
    """A malformed tuning table or request; the message names the culprit."""


# -- families -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One tunable kernel family.

    candidates(bucket, facts) and default(bucket, facts) give config dicts (each has a "name");
    eligible(config, facts) says whether a config can run those facts; shape_key(facts) is the
    table key of one shape; needs_fallback(config): the plan must keep a Triton fallback for it;
    can_fall_back_to(config): it can be that fallback; get(name | dict) validates a config;
    launches(config, facts, size) and bench(facts, size, seed) describe a measurement (see
    tuning_gpu.py).
    """

    name: str
    size: str
    buckets: tuple
    tune_size: Mapping[str, int]
    candidates: Callable[[str, Mapping], list]
    default: Callable[[str, Mapping], dict]
    eligible: Callable[[dict, Mapping], bool]
    shape_key: Callable[[Mapping], str]
    needs_fallback: Callable[[dict], bool]
    can_fall_back_to: Callable[[dict], bool]
    get: Callable[[Any], dict]
    launches: Callable[..., dict]
    bench: Callable[..., dict]
    near_keys: Callable[[Mapping], list] = lambda facts: []   # after shape_key, before "*"

    def bucket_of(self, size: int) -> str:
        return next(b for b, top in self.buckets if top is None or size <= top)

    def lookup_keys(self, facts: Mapping) -> list[str]:
        """Table keys to try for `facts`, best first."""
        return list(dict.fromkeys([self.shape_key(facts), *self.near_keys(facts), "*"]))


def _matmul_family() -> Family:
    from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

    return Family(
        name="matmul", size="M", buckets=mc.BUCKETS, tune_size=mc.TUNE_M,
        candidates=lambda b, f: mc.candidates(b, f["dtype"], f["N"], f["K"]),
        default=lambda b, f: mc.default_config(b, f["dtype"], f["N"], f["K"]),
        eligible=lambda c, f: mc.ineligible(c, f["dtype"], f["N"], f["K"]) is None,
        shape_key=lambda f: f"N={f['N']},K={f['K']}" + (",bias" if f.get("bias") else ""),
        needs_fallback=lambda c: c["kind"] == "cublaslt",
        # The fallback takes the cuBLASLt launch's grid and arguments: a single Triton launch.
        can_fall_back_to=lambda c: c["kind"] in ("tile", "gemv", "tma")
        and c.get("SPLIT_K", 1) == 1,
        get=mc.get, launches=mc.tuning_launches, bench=mc.bench,
        near_keys=lambda f: [f"N={f['N']},K={f['K']}"])


def _decode_family() -> Family:
    # Paged decode attention: buckets over (batch x KV heads, context length), see
    # kernels/paged_decode_tuning.py; `size` is a (units, context) pair, never a static int.
    from graphir.lowering.triton_gpu.kernels import paged_decode_config as pc
    from graphir.lowering.triton_gpu.kernels import paged_decode_tuning as pt

    return Family(
        name="decode", size="units_kv", buckets=pt.BUCKETS, tune_size=pt.TUNE_SIZE,
        candidates=pt.candidates, default=pt.default, eligible=pt.eligible,
        shape_key=pt.shape_key, needs_fallback=lambda c: False,
        can_fall_back_to=lambda c: False, get=pc.get, launches=pt.tuning_launches,
        bench=pt.bench)


def _prefill_family() -> Family:
    # Ragged prefill attention: buckets over batch x 128-row query tiles, see
    # kernels/flash_attention_tuning.py; `size` is a (batch, new tokens) pair.
    from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
    from graphir.lowering.triton_gpu.kernels import flash_attention_tuning as ft

    return Family(
        name="prefill", size="tiles", buckets=ft.BUCKETS, tune_size=ft.TUNE_SIZE,
        candidates=ft.candidates, default=ft.default, eligible=ft.eligible,
        shape_key=ft.shape_key,
        # A warp-specialized winner cannot serve a soft-capped call (Gemma 2; the cap is not a
        # fact): that call runs the bucket's fastest Triton config instead.
        needs_fallback=fc.is_ws, can_fall_back_to=lambda c: not fc.is_ws(c), get=fc.get,
        launches=ft.tuning_launches, bench=ft.bench, near_keys=ft.near_keys)


_FAMILY_MAKERS: dict[str, Callable[[], Family]] = {"matmul": _matmul_family,
                                                   "decode": _decode_family,
                                                   "prefill": _prefill_family}
_families: dict[str, Family] = {}


def family(name: str) -> Family:
    """The registered family `name`."""
    if name not in _families:
        if name not in _FAMILY_MAKERS:
            raise TuningError(f"unknown kernel family {name!r}; known: {sorted(_FAMILY_MAKERS)}")
        _families[name] = _FAMILY_MAKERS[name]()
    return _families[name]


# -- tables ---------------------------------------------------------------------------------
def load_table(path: str | Path | None = None) -> dict:
    """Read and validate a table (default: the shipped one)."""
    p = Path(path) if path is not None else DEFAULTS_PATH
    try:
        table = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TuningError(f"cannot read tuning table {p}: {e}") from None
    validate_table(table, str(p))
    return table


def table_digest() -> str:
    """Hash of the shipped table (part of the compile-cache key: a new table, new choices)."""
    try:
        return hashlib.sha256(DEFAULTS_PATH.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def choice_names(choice) -> tuple[Any, Any]:
    """(config name, fallback name or None) of a table entry."""
    if isinstance(choice, str):
        return choice, None
    if isinstance(choice, dict):
        return choice.get("config"), choice.get("fallback")
    return None, None


def validate_table(table: Any, where: str = "tuning table") -> None:
    """Raise TuningError naming the first malformed entry."""
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        raise TuningError(f"{where}: not a version-{TABLE_VERSION} tuning table")
    fams = table.get("families", {})
    if not isinstance(fams, dict):
        raise TuningError(f"{where}: 'families' must be a mapping")
    for fname, by_dtype in fams.items():
        fam = family(fname)
        buckets = dict(fam.buckets)
        for dtype, shapes in by_dtype.items():
            for shape, per_bucket in shapes.items():
                for bucket, choice in per_bucket.items():
                    at = f"{where}: {fname}/{dtype}/{shape}/{bucket}"
                    if bucket not in buckets:
                        raise TuningError(f"{at}: unknown bucket (buckets: {list(buckets)})")
                    name, fb = choice_names(choice)
                    if not isinstance(name, str):
                        raise TuningError(f"{at}: a choice is a config name or "
                                          f"{{'config': name, ...}}, got {choice!r}")
                    try:
                        cfg = fam.get(name)
                        fb_cfg = fam.get(fb) if fb is not None else None
                    except ValueError as e:
                        raise TuningError(f"{at}: {e}") from None
                    if fb_cfg is not None and not fam.can_fall_back_to(fb_cfg):
                        raise TuningError(f"{at}: {fb!r} cannot stand in for {cfg['name']!r}")
                    if isinstance(choice, dict) and not isinstance(choice.get("params", {}),
                                                                   dict):
                        raise TuningError(f"{at}: 'params' must be a mapping")


# -- selection ------------------------------------------------------------------------------
@dataclass
class Choice:
    """What runs one bucket of one step, and where that came from."""

    bucket: str
    config: dict
    source: str                          # "tuned", "default table" or "built-in"
    fallback: dict | None = None
    candidates: list = field(default_factory=list)
    params: dict | None = None           # what the winner needs at run time (see the table)

    def to_json(self, fam: Family) -> dict:
        out = {"bucket": self.bucket, f"max_{fam.size}": dict(fam.buckets)[self.bucket],
               "winner": self.config["name"],
               "fallback": self.fallback["name"] if self.fallback else None,
               "source": self.source, "candidates": self.candidates}
        return out if self.params is None else {**out, "params": self.params}


@dataclass
class Site:
    """One tunable step as the lowering saw it."""

    family: str
    facts: dict
    where: str
    size: int | None
    choices: list


class Selector:
    """Answers `select()` from tables (first match wins) and records every step it answered.

    tables: [(source label, table)], e.g. [("tuned", t), ("default table", shipped)].
    """

    def __init__(self, tables: list[tuple[str, dict]] | None = None):
        self.tables = list(tables) if tables is not None else [("default table", load_table())]
        self.sites: list[Site] = []

    def _entry(self, fam: Family, facts: Mapping, bucket: str):
        for source, table in self.tables:
            shapes = table.get("families", {}).get(fam.name, {}).get(facts["dtype"], {})
            for key in fam.lookup_keys(facts):
                choice = shapes.get(key, {}).get(bucket)
                if choice is None:
                    continue
                name, fb = choice_names(choice)
                cfg = fam.get(name)
                if fam.eligible(cfg, facts):
                    fb_cfg = fam.get(fb) if fb is not None else None
                    if fb_cfg is not None and not fam.eligible(fb_cfg, facts):
                        fb_cfg = None
                    d = choice if isinstance(choice, dict) else {}
                    return Choice(bucket, cfg, source, fb_cfg, list(d.get("candidates", [])),
                                  d.get("params"))
        return None

    def choose(self, fam_name: str, facts: Mapping, where: str = "",
               size: int | None = None, above: int | None = None) -> list[Choice]:
        """One Choice per bucket (only the bucket of `size` when the size is static; with
        `above`, only the buckets holding sizes past it: the step runs another path below)."""
        fam = family(fam_name)
        buckets = [fam.bucket_of(size)] if size is not None else \
            [b for b, top in fam.buckets if above is None or top is None or top > above]
        out = []
        for b in buckets:
            ch = self._entry(fam, facts, b) or Choice(b, fam.default(b, facts), "built-in")
            if fam.needs_fallback(ch.config) and ch.fallback is None:
                ch.fallback = next(c for c in [fam.default(b, facts)] + fam.candidates(b, facts)
                                   if fam.can_fall_back_to(c) and fam.eligible(c, facts))
            out.append(ch)
        self.sites.append(Site(fam_name, dict(facts), where, size, out))
        return out


_active: ContextVar[Selector | None] = ContextVar("graphir_tuning_selector", default=None)


@contextmanager
def using(selector: Selector):
    """Make `selector` answer `select()` inside the block."""
    token = _active.set(selector)
    try:
        yield selector
    finally:
        _active.reset(token)


def select(fam_name: str, facts: Mapping, where: str = "", size: int | None = None,
           above: int | None = None):
    """The choices for one step (see Selector.choose); outside `using`, the shipped table."""
    sel = _active.get()
    if sel is None:
        sel = Selector()
    return sel.choose(fam_name, facts, where, size, above)


# -- tuning ---------------------------------------------------------------------------------
Measure = Callable[[Family, Mapping, dict, int], Mapping[str, float]]


def tune(sites: list[Site], measure: Measure, device: str | None = None,
         say: Callable[[str], None] = lambda m: None) -> dict:
    """Time every candidate of every bucket of every site; returns a table of the winners.

    `measure(family, facts, config, size)` returns {"ms", "rel_err"} or raises; a candidate
    whose error is over MAX_REL_ERR, or that raised, is recorded but never wins.
    """
    table: dict = {"version": TABLE_VERSION, "device": device, "families": {}}
    work, seen = [], set()
    for site in sites:
        key = (site.family, json.dumps(site.facts, sort_keys=True), site.size)
        if key not in seen:
            seen.add(key)
            fam = family(site.family)
            for ch in site.choices:
                size = site.size if site.size is not None else fam.tune_size[ch.bucket]
                work.append((fam, site.facts, ch.bucket, size))
    if hasattr(measure, "prepare"):  # e.g. compile every candidate's kernels in parallel
        measure.prepare([(fam, facts, cfg, size) for fam, facts, bucket, size in work
                         for cfg in fam.candidates(bucket, facts)])
    total = sum(len(fam.candidates(bucket, facts)) for fam, facts, bucket, _ in work)
    with progress.bar(total, desc="tune", unit="config") as bar:
        for fam, facts, bucket, size in work:
            shapes = table["families"].setdefault(fam.name, {}).setdefault(facts["dtype"], {})
            what = f"{fam.name} {fam.shape_key(facts)} {bucket} ({fam.size}={size})"
            say(f"tuning {what}")
            bar.stage(what)
            entry = shapes.setdefault(fam.shape_key(facts), {})
            entry[bucket] = _tune_bucket(fam, facts, bucket, size, measure, bar)
    return table


def _tune_bucket(fam: Family, facts: Mapping, bucket: str, size: int, measure: Measure,
                 bar=progress.NULL) -> dict:
    limit = MAX_REL_ERR.get(facts["dtype"], 1e-2)
    results, passing, params = [], [], {}
    for cfg in fam.candidates(bucket, facts):
        try:
            r = measure(fam, facts, cfg, size)
        except Exception as e:  # noqa: BLE001  (a failing candidate is recorded, not fatal)
            results.append({"config": cfg["name"], "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        finally:
            bar.update()
        row = {"config": cfg["name"], "ms": round(float(r["ms"]), 6),
               "rel_err": float(f"{float(r['rel_err']):.3g}")}
        if r.get("params") is not None:
            params[cfg["name"]] = r["params"]  # kept for the winner only: rows stay small
        if not row["rel_err"] <= limit:  # NaN fails too
            row["error"] = f"rel_err {row['rel_err']} over {limit}"
        else:
            passing.append((row["ms"], cfg))
        results.append(row)
    if not passing:
        return {"config": fam.default(bucket, facts)["name"], "fallback": None,
                "candidates": results, "note": "no candidate passed; built-in default"}
    passing.sort(key=lambda p: p[0])
    win = passing[0][1]
    fb = None
    if fam.needs_fallback(win):
        fb = next((c["name"] for _, c in passing if fam.can_fall_back_to(c)),
                  fam.default(bucket, facts)["name"])
    out = {"config": win["name"], "fallback": fb, "candidates": results}
    return out if win["name"] not in params else {**out, "params": params[win["name"]]}


# -- manifest -------------------------------------------------------------------------------
def manifest_section(selector: Selector, *, requested: bool = False, tuned: bool = False,
                     device: str | None = None, note: str = "") -> dict:
    """The artifact's "tuning" section: per tunable step, each bucket's winner and timings."""
    steps = []
    for s in selector.sites:
        fam = family(s.family)
        steps.append({"step": s.where, "family": s.family, "facts": s.facts,
                      "buckets": [c.to_json(fam) for c in s.choices]})
    return {"requested": requested, "tuned": tuned, "device": device,
            "tables": [label for label, _ in selector.tables], "default_table":
            DEFAULTS_PATH.name, "default_table_sha256": table_digest(), "note": note,
            "steps": steps}


def format_section(section: Mapping) -> list[str]:
    """Human-readable lines of a manifest's tuning section (for `graphir inspect`)."""
    how = ("tuned on " + str(section.get("device"))) if section.get("tuned") else \
        f"default table {section.get('default_table')}"
    lines = [f"tuning    {how}" + (f" ({section['note']})" if section.get("note") else "")]
    for st in section.get("steps", []):
        facts = ", ".join(f"{k}={v}" for k, v in st["facts"].items())
        lines.append(f"  {st['family']} {st['step']} ({facts})")
        for b in st["buckets"]:
            bound = next((v for k, v in b.items() if k.startswith("max_")), None)
            # A list bound (decode: [units, keys]) is spelled out by the bucket's name.
            where = "" if isinstance(bound, list) else "<= " + str(bound) if bound else "larger"
            head = f"    {b['bucket']:<11} {where:<8} {b['winner']:<28} [{b['source']}]"
            if b.get("fallback"):
                head += f" fallback {b['fallback']}"
            lines.append(head)
            if b.get("params"):
                lines.append(f"           params {_brief(b['params'])}")
            timed = [c for c in b.get("candidates", []) if "ms" in c]
            for c in sorted(timed, key=lambda c: c["ms"]):
                flag = f"  ({c['error']})" if c.get("error") else ""
                lines.append(f"           {c['config']:<28} {c['ms'] * 1e3:9.1f} us  "
                             f"rel_err {c['rel_err']:.1e}{flag}")
            lines += [f"           {c['config']:<28} failed: {c['error']}"
                      for c in b.get("candidates", []) if "ms" not in c]
    return lines


def _brief(value) -> str:
    """JSON of `value` without long strings (an algorithm's opaque bytes)."""
    def drop(v):
        if isinstance(v, dict):
            return {k: drop(x) for k, x in v.items() if not (isinstance(x, str) and len(x) > 40)}
        return v
    return json.dumps(drop(value), sort_keys=True)


def cache_salt(tune: bool) -> dict:
    """What a cuda compile's cache key must include besides the graph: the shipped table and,
    when tuning, the GPU that would be measured (a compile that fell back to the table for
    lack of a GPU must not be reused where one is present)."""
    salt = {"tuning_table": table_digest()}
    if tune:
        try:
            from graphir.runtime.cuda import driver

            salt["tune_device"] = driver.device_properties(0).name \
                if driver.is_available() else None
        except Exception:  # noqa: BLE001  (no usable GPU)
            salt["tune_device"] = None
    return salt
