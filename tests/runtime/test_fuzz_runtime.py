"""A short run of the runtime fuzz targets (long runs: `python -m graphir.tools.fuzz`): damaged
artifacts are refused or compute the unedited artifact's numbers; random ragged metadata is refused
cleanly with the KV cache untouched, or runs the interpreter's numbers, on the compiled CPU
path and the interpreter alike; the CUDA fast path's metadata check answers only what the full
check accepts, with the same facts; damaged .gguf files are refused with a ValueError that
leaves a loaded layer as it was, or load; edited config.json files are refused with a
ValueError naming the key, or build a layer."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("mlir.ir")

from graphir.tools import fuzz  # noqa: E402


@pytest.mark.parametrize("target,examples", [("artifacts", 150), ("metadata", 150),
                                             ("fastfacts", 400), ("gguf", 300),
                                             ("configs", 400)])
def test_runtime_target_finds_nothing(target, examples):
    case = fuzz.make_target(target)     # the same case function `graphir.tools.fuzz` runs

    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(rng=st.randoms(use_true_random=False))
    def run(rng):
        assert case(rng) is None

    run()
