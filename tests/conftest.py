"""Shared pytest options: `--update-goldens` rewrites golden IR files instead of comparing."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden .gir files (tests/**/goldens) instead of comparing")


@pytest.fixture
def update_goldens(request) -> bool:
    return bool(request.config.getoption("--update-goldens"))
