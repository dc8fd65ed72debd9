"""The manifest's shape, checked at load so a malformed one is a clean ArtifactError, never a
KeyError or a crash deep in an executor. Unknown keys are refused too: an artifact never
carries data its loader does not understand.

Backend sections: cpu (`plan`, `kernels` [symbols], `library`, `cpu` [the ISA record]) and
triton_gpu (`backend`, `plan`, `kernels` {key: launch metadata}, `input_names`, `tuning`).
"""
from __future__ import annotations

from .artifact import ArtifactError

HEX64 = set("0123456789abcdef")
COMMON = {"format_version": int, "graph_hash": str, "target": str, "tool_versions": dict,
          "files": dict, "root_digest": str}
BACKENDS = {
    "cpu": {"plan": dict, "kernels": list, "library": str, "cpu": dict},
    "triton_gpu": {"backend": str, "plan": dict, "kernels": dict, "input_names": (list, type(None)),
                   "tuning": dict},
}
# What a triton_gpu kernel-table entry must hold for the launcher (extra keys are metadata).
CUDA_KERNEL_KEYS = {"name": str, "params": list, "num_warps": int, "shared": int}


def _fail(path, msg: str):
    raise ArtifactError(f"{path}: malformed manifest: {msg}; recompile the artifact")


def _typed(path, where: str, d: dict, spec: dict, exact: bool) -> None:
    missing = sorted(set(spec) - set(d))
    if missing:
        _fail(path, f"{where} lacks {missing}")
    extra = sorted(set(d) - set(spec))
    if exact and extra:
        _fail(path, f"{where} has unknown keys {extra}")
    for k, t in spec.items():
        if not isinstance(d[k], t) or (t is int and isinstance(d[k], bool)):
            _fail(path, f"{where}[{k!r}] is a {type(d[k]).__name__}")


def validate_manifest(m: dict, path) -> str:
    """Check `m` against the schema of its backend; returns the backend name."""
    backend = "triton_gpu" if m.get("backend") == "triton_gpu" else "cpu"
    if m.get("backend") not in (None, "triton_gpu"):
        _fail(path, f"unknown backend {m.get('backend')!r}")
    _typed(path, "the manifest", m, {**COMMON, **BACKENDS[backend]}, exact=True)
    for rel, digest in m["files"].items():
        if not isinstance(rel, str) or not isinstance(digest, str) or len(digest) != 64 \
                or not set(digest) <= HEX64:
            _fail(path, f"file entry {rel!r} has no sha256")
    if not all(isinstance(v, str) for v in m["tool_versions"].values()):
        _fail(path, "tool_versions holds non-strings")
    if not m["target"].startswith({"cpu": "cpu", "triton_gpu": "cuda:"}[backend]):
        _fail(path, f"target {m['target']!r:.40} is not a {backend} target")
    if backend == "cpu":
        if m["cpu"].get("target") != m["target"]:
            _fail(path, f"the cpu record is for {m['cpu'].get('target')!r:.40}, the artifact for "
                        f"{m['target']!r:.40}")
        if m["library"] not in m["files"]:
            _fail(path, f"library {m['library']!r} is not one of the artifact's files")
        if not all(isinstance(k, str) for k in m["kernels"]):
            _fail(path, "kernels must be symbol names")
        return backend
    for key, k in m["kernels"].items():
        if not isinstance(k, dict):
            _fail(path, f"kernel {key!r} is not a table")
        if k.get("kind") == "cublaslt":
            continue
        _typed(path, f"kernel {key!r}", k, CUDA_KERNEL_KEYS, exact=False)
        if k.get("cubin") not in m["files"]:
            _fail(path, f"kernel {key!r} names cubin {k.get('cubin')!r}, which is not one of the "
                        f"artifact's files")
    return backend
