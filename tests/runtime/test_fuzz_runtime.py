"""A short run of the runtime fuzz targets (long runs: `python -m graphir.tools.fuzz`): damaged
artifacts are refused or compute the unedited artifact's numbers; random ragged metadata is refused
cleanly with the KV cache untouched, or runs the interpreter's numbers, on the compiled CPU
path and the interpreter alike; the CUDA fast path's metadata check answers only what the full
check accepts, with the same facts."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("mlir.ir")

from graphir.tools import fuzz_ragged, fuzz_runtime  # noqa: E402


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


@pytest.fixture(scope="module")
def fastfacts():
    return fuzz_ragged.FastFactsTarget()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(rng=st.randoms(use_true_random=False))
def test_fast_metadata_check(fastfacts, rng):
    assert fastfacts(rng) is None
