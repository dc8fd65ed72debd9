"""The README's Python snippets run as printed: the graph, its compile and run, and loading a
(tiny, random) Hugging Face checkpoint saved as ./model."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_graph_compile_and_run_snippets(capsys):
    pytest.importorskip("mlir.ir")
    ns: dict = {}
    exec(SNIPPETS[0], ns)  # noqa: S102  (the README's own code)
    assert ns["out"].shape == (5, 32)
    exec(SNIPPETS[1], ns)  # noqa: S102
    import numpy as np

    assert ns["y"].shape == (5, 32) and np.isfinite(ns["y"]).all()


def test_the_load_your_model_snippet(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from tests.nn.test_pretrained_hf import _llama, save_tiny

    save_tiny(_llama(None), tmp_path / "model", seed=3)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(SNIPPETS[2], ns)  # noqa: S102
    assert ns["y"].shape == (5, ns["attn"].hidden_size)
    assert os.getcwd() == str(tmp_path)
