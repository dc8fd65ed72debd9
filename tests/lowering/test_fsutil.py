"""Atomic artifact replacement and the sweep of what killed compiles leave behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from graphir.lowering import fsutil


def _tree(d: Path, text: str) -> Path:
    d.mkdir()
    (d / "manifest.json").write_text(text)
    return d


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_dir_swaps_in_the_new_tree(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fsutil, "_EXCHANGE", None)
    dest = _tree(tmp_path / "a.gart", "old")
    new = _tree(tmp_path / "new", "new")
    fsutil.replace_dir(new, dest)
    assert (dest / "manifest.json").read_text() == "new"
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gart"]  # nothing left aside


def test_replace_dir_into_an_empty_place(tmp_path):
    new = _tree(tmp_path / "new", "x")
    fsutil.replace_dir(new, tmp_path / "out.gart")
    assert (tmp_path / "out.gart" / "manifest.json").read_text() == "x"


def test_sweep_removes_only_our_stale_entries(tmp_path):
    old = time.time() - 2 * fsutil.STALE_AFTER_S
    stale = _tree(tmp_path / f"{fsutil.TMP_PREFIX}dead", "x")
    fresh = _tree(tmp_path / f"{fsutil.TMP_PREFIX}live", "x")
    users = _tree(tmp_path / ".tmp-mine", "x")
    for p in (stale, users):
        os.utime(p, (old, old))
    assert fsutil.sweep_stale(tmp_path) == 1
    assert not stale.exists() and fresh.exists() and users.exists()


def test_scratch_of_a_killed_process_is_removed():
    code = ("import time\nfrom graphir.lowering.fsutil import scratch_dir\n"
            "with scratch_dir('test') as d:\n    print(d, flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = Path(p.stdout.readline().strip())
    assert path.is_dir() and path.name.startswith(f"{fsutil.SCRATCH_PREFIX}{p.pid}-")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert path.is_dir()  # SIGKILL runs no cleanup ...
    fsutil.sweep_dead_scratch()
    assert not path.exists()  # ... the next compile's sweep does


def test_scratch_dir_is_removed_on_error():
    with pytest.raises(RuntimeError):
        with fsutil.scratch_dir("err") as d:
            raise RuntimeError("boom")
    assert not Path(d).exists()
    assert Path(tempfile.gettempdir()).exists()


def test_failed_rewrite_keeps_the_old_artifact(tmp_path):
    pytest.importorskip("mlir.ir")
    from graphir import DType, Graph, TensorType, ops
    from graphir.lowering.artifact import load_artifact, write_artifact
    from graphir.lowering.driver import compile_graph

    with Graph("g", input_types=[TensorType(DType.float32, ["n", 4])]) as g:
        g.output(ops.exp(g.inputs[0]))
    out = tmp_path / "m.gart"
    old = compile_graph(g, "cpu", out=out).manifest
    so = (out / "cpu/kernels.so").read_bytes()
    with pytest.raises(TypeError):  # a payload that fails midway through the write
        write_artifact(out, graph_text=str(g), target=old["target"],
                       payload={"cpu/kernels.so": b"new", "cpu/b.bin": None}, extra={})
    art = load_artifact(out)
    assert art.manifest == old and (art.path / "cpu/kernels.so").read_bytes() == so
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gart"]
