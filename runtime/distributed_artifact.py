"""A distributed artifact (`.gdist` directory): every rank's compiled graph and the collective
schedule, compiled once and loaded by each process of the job.

    tp.gdist/distributed.json   what the ranks run: world size, the devices, per rank its
                                artifact, root digest, inputs, outputs, weights (its shard) and
                                collectives; the schedule digest; a digest over all of it
    tp.gdist/rank0.gart ...     one ordinary artifact per rank (runtime/distributed_split.py)

compile_distributed checks that the compiled plans of all ranks issue the same collectives in
the same order (op, dtype, rank, axis): ranks that disagree would wait on each other forever.
load_bundle verifies the manifest's digest; `Bundle.artifact(rank)` opens and verifies that
rank's artifact and checks it is the one the manifest names.

Example:
    >>> bundle = compile_distributed(tp_graph, "cpu", out="tp.gdist")     # doctest: +SKIP
    >>> art = load_bundle("tp.gdist").artifact(rank=1)                     # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from graphir.lowering.artifact import Artifact, ArtifactError, load_artifact

from .distributed_split import COLLECTIVES, split_graph

MANIFEST = "distributed.json"
FORMAT = "graphir-distributed"
VERSION = 1


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def plan_collectives(art: Artifact) -> list[list]:
    """[op, dtype, rank, axis] of each collective step of a compiled rank graph, in order."""
    plan = art.manifest["plan"]
    out = []
    for s in plan["steps"]:
        if s["op"] in COLLECTIVES and s["kernel"] != "view":
            v = plan["values"][s["inputs"][0]]
            out.append([s["op"], v["dtype"], len(v["shape"]), int(s["attrs"].get("axis", 0))])
    return out


def schedule_digest(schedule: list) -> str:
    return _digest(schedule)


def compile_distributed(graph, target: str = "cpu", *, out, progress: bool | None = None,
                        options: dict | None = None) -> "Bundle":
    """Split `graph` per device, compile each rank's graph for `target`, write `out`.

    Raises SplitError (runtime/distributed_split.py) for a graph that cannot run one process
    per device and ArtifactError when the compiled ranks' collectives would not match."""
    from graphir.lowering.artifact import graph_hash
    from graphir.lowering.driver import compile_graph

    out = Path(out)
    ranks = split_graph(graph)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".graphir-tmp-", dir=out.parent))
    try:
        entries, schedules = [], []
        for r in ranks:
            art = compile_graph(r.graph, target, out=tmp / f"rank{r.rank}.gart", progress=progress,
                                options=options)
            schedules.append(plan_collectives(art))
            entries.append({"artifact": f"rank{r.rank}.gart", "device": str(r.device),
                            "root_digest": art.manifest["root_digest"], "inputs": r.inputs,
                            "outputs": r.outputs, "weights": r.weights,
                            "collectives": r.collectives})
        for r, s in enumerate(schedules):
            if s != schedules[0]:
                raise ArtifactError(f"{out}: compiled for {target}, rank {r} issues collectives "
                                    f"{s} but rank 0 issues {schedules[0]}; the ranks would wait "
                                    f"on each other forever")
        manifest = {"format": FORMAT, "version": VERSION, "graph": graph.name,
                    "graph_hash": graph_hash(str(graph)), "target": art.target,
                    "world_size": len(ranks), "devices": [e["device"] for e in entries],
                    "ranks": entries, "schedule_digest": schedule_digest(schedules[0])}
        manifest["digest"] = _digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        from graphir.lowering.fsutil import replace_dir

        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, manifest)


@dataclass
class Bundle:
    """An opened `.gdist` (see the module docstring)."""

    path: Path
    manifest: dict

    @property
    def world_size(self) -> int:
        return self.manifest["world_size"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def rank_info(self, rank: int) -> dict:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"{self.path}: compiled for {self.world_size} ranks, there is no "
                             f"rank {rank!r}")
        return self.manifest["ranks"][rank]

    def artifact(self, rank: int, trusted_keys=None) -> Artifact:
        """Rank `rank`'s artifact, verified (and signature-checked with `trusted_keys`)."""
        info = self.rank_info(rank)
        art = load_artifact(self.path / info["artifact"], trusted_keys=trusted_keys)
        if art.manifest["root_digest"] != info["root_digest"]:
            raise ArtifactError(f"{self.path}: {info['artifact']} is not the artifact "
                                f"{MANIFEST} names (root digest differs); recompile the bundle")
        if plan_collectives(art) and schedule_digest(plan_collectives(art)) != \
                self.manifest["schedule_digest"]:
            raise ArtifactError(f"{self.path}: {info['artifact']}'s collectives are not the "
                                f"schedule {MANIFEST} records")
        return art


def is_bundle(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_bundle(path) -> Bundle:
    """Open a `.gdist` and check its manifest (ArtifactError naming what is wrong)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path}: not a distributed artifact (no {MANIFEST})")
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt {MANIFEST} ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ArtifactError(f"{path}: {MANIFEST} is not a {FORMAT} version {VERSION} manifest")
    body = {k: v for k, v in m.items() if k != "digest"}
    if m.get("digest") != _digest(body):
        raise ArtifactError(f"{path}: {MANIFEST} was changed after it was written (its digest "
                            f"does not match); recompile the bundle")
    ranks = m.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != m.get("world_size") or not ranks:
        raise ArtifactError(f"{path}: {MANIFEST} lists {len(ranks or [])} ranks for world size "
                            f"{m.get('world_size')}")
    for r in ranks:
        p = (path / str(r.get("artifact", ""))).resolve()
        if path.resolve() not in p.parents:
            raise ArtifactError(f"{path}: rank artifact {r.get('artifact')!r} points outside the "
                                f"bundle")
    return Bundle(path, m)
