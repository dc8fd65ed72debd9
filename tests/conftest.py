"""Shared pytest options: `--update-goldens` rewrites golden IR files instead of comparing."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden .gir files (tests/**/goldens) instead of comparing")


@pytest.fixture
def update_goldens(request) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture(autouse=True, scope="session")
def _private_compile_cache():
    # Artifacts compiled by the test run go to a throwaway cache, never the user's.
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="graphir-test-cache-") as d:
        old = os.environ.get("GRAPHIR_CACHE_DIR")
        os.environ["GRAPHIR_CACHE_DIR"] = d
        yield
        if old is None:
            os.environ.pop("GRAPHIR_CACHE_DIR", None)
        else:
            os.environ["GRAPHIR_CACHE_DIR"] = old
