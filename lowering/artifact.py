"""The `.gart` artifact: a directory with manifest.json, graph.gir and compiled code.

Loading checks the format version, the graph hash and the sha256 of every file; nothing in an
artifact is unpickled or executed except its own compiled code (.so / .cubin), and that only
after its hash matched the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .fsutil import TMP_PREFIX, replace_dir, sweep_stale

FORMAT_VERSION = 3  # 2: the manifest carries a root digest; 3: the CPU library declares its ABI
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact that cannot be trusted or used (tampered, truncated, wrong version)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def root_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own root_digest, in canonical JSON. The manifest
    lists every file's sha256, so this one digest covers the whole artifact."""
    body = {k: v for k, v in manifest.items() if k != "root_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def graph_hash(graph_text: str) -> str:
    return hashlib.sha256(graph_text.encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    import numpy

    import graphir

    return {"graphir": graphir.__version__, "python": platform.python_version(),
            "numpy": numpy.__version__, "machine": platform.machine()}


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise ArtifactError(f"{self.path}: {rel!r} is not listed in the manifest")
        return self.path / rel

    def graph(self):
        from graphir import parse

        return parse((self.path / "graph.gir").read_text())


def write_artifact(out: Path, *, graph_text: str, target: str, payload: dict[str, bytes],
                   extra: dict, replace: bool = True) -> Artifact:
    """Write atomically: build in a temp dir beside `out`, then rename into place.

    replace=False (the compile cache): if another writer got there first, keep theirs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    try:
        files = {"graph.gir": graph_text.encode(), **payload}
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        manifest = {
            "format_version": FORMAT_VERSION,
            "graph_hash": graph_hash(graph_text),
            "target": target,
            "tool_versions": tool_versions(),
            **extra,
            "files": {rel: sha256_file(tmp / rel) for rel in sorted(files)},
        }
        manifest["root_digest"] = root_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if replace:
            replace_dir(tmp, out)  # the old artifact stays until the new one is whole
            return Artifact(out, manifest)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # an equal entry won the race
            return load_artifact(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out, manifest)


def load_artifact(path, *, expect_target: str | None = None,
                  trusted_keys=None) -> Artifact:
    """Open and verify an artifact; raises ArtifactError naming what is wrong.

    With `trusted_keys` (public keys: 64 hex characters, 32 bytes or .pub files) the artifact
    must also carry a valid signature by one of them (lowering/signing.py)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not a graphir artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactError(f"{path}: manifest has no format_version")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest['format_version']} is not "
                            f"supported (this graphir reads version {FORMAT_VERSION}); recompile it")
    if manifest.get("root_digest") != root_digest(manifest):
        raise ArtifactError(f"{path}: {MANIFEST} was changed after the artifact was written (its "
                            f"root digest does not match); recompile it")
    from .manifest_schema import validate_manifest

    backend = validate_manifest(manifest, path)
    mine = tool_versions()
    theirs = manifest.get("tool_versions", {})
    if not isinstance(theirs, dict):
        raise ArtifactError(f"{path}: manifest tool_versions is not a mapping")
    for key in ("graphir", "machine"):
        if theirs.get(key) != mine[key]:
            raise ArtifactError(f"{path}: built by {key} {theirs.get(key)!r}, this is "
                                f"{mine[key]!r}; recompile it")
    files = manifest.get("files")
    if not isinstance(files, dict) or "graph.gir" not in files:
        raise ArtifactError(f"{path}: manifest lists no files")
    for rel, digest in files.items():
        p = (path / rel).resolve()
        if path.resolve() not in p.parents:
            raise ArtifactError(f"{path}: file {rel!r} points outside the artifact")
        if not p.is_file():
            raise ArtifactError(f"{path}: {rel} is missing (truncated artifact?)")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{path}: {rel} does not match its sha256 in the manifest "
                                f"(tampered or truncated)")
    graph_text = (path / "graph.gir").read_text()
    if graph_hash(graph_text) != manifest.get("graph_hash"):
        raise ArtifactError(f"{path}: graph.gir does not match the manifest's graph hash")
    from graphir import ParseError, parse

    from .plan_check import check_plan

    try:
        graph = parse(graph_text)
    except ParseError as e:
        raise ArtifactError(f"{path}: graph.gir does not parse ({e})") from None
    check_plan(manifest["plan"], graph, path, backend)
    if expect_target is not None and manifest.get("target") != expect_target:
        raise ArtifactError(f"{path}: built for {manifest.get('target')!r}, not {expect_target!r}")
    if trusted_keys is not None:
        from .signing import SignatureError, verify

        try:
            verify(path, manifest["root_digest"], trusted_keys)
        except SignatureError as e:
            raise ArtifactError(str(e)) from None
    return Artifact(path, manifest)
