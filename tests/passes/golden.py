"""Golden IR files: compare printed IR against tests/passes/goldens/NAME, or rewrite them with
`pytest --update-goldens`."""
from __future__ import annotations

import os

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "goldens")


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, name)


def check_golden(name: str, text: str, update: bool) -> None:
    """Assert `text` equals the golden file `name` (or write it when `update`)."""
    path = golden_path(name)
    if update:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return
    if not os.path.exists(path):
        raise AssertionError(f"golden file {path} is missing; run pytest with --update-goldens")
    with open(path) as f:
        want = f.read()
    assert text == want, f"IR differs from golden {name} (refresh with --update-goldens if intended)"
