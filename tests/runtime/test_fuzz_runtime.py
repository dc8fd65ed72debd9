"""A short run of the runtime fuzz targets (long runs: `python -m graphir.tools.fuzz`): damaged
artifacts are refused or compute the unedited artifact's numbers; random ragged metadata is refused
cleanly with the KV cache untouched, or runs the interpreter's numbers, on the compiled CPU
path and the interpreter alike."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("mlir.ir")

from graphir.tools import fuzz_runtime  # noqa: E402


@pytest.fixture(scope="module")
def artifacts():
    return fuzz_runtime.ArtifactTarget()


@pytest.fixture(scope="module")
def metadata():
    return fuzz_runtime.MetadataTarget()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rng=st.randoms(use_true_random=False))
def test_damaged_artifacts(artifacts, rng):
    assert artifacts(rng) is None


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rng=st.randoms(use_true_random=False))
def test_random_metadata(metadata, rng):
    assert metadata(rng) is None
