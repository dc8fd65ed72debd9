import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_compile_cache():
    # Compiled artifacts of the test run go to a throwaway cache, never the user's.
    with tempfile.TemporaryDirectory(prefix="graphir-test-cache-") as d:
        old = os.environ.get("GRAPHIR_CACHE_DIR")
        os.environ["GRAPHIR_CACHE_DIR"] = d
        yield
        if old is None:
            os.environ.pop("GRAPHIR_CACHE_DIR", None)
        else:
            os.environ["GRAPHIR_CACHE_DIR"] = old
