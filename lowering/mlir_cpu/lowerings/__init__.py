"""CPU lowerings, one module per op family; importing this registers them all."""
from . import elementwise  # noqa: F401
