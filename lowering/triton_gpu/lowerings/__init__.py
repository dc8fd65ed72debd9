"""CUDA lowerings, one module per op family; importing this registers them all."""
from . import shape  # noqa: F401
from . import reduce  # noqa: F401
from . import linalg  # noqa: F401
from . import rope_store  # noqa: F401
from . import attention  # noqa: F401
from . import quant  # noqa: F401
from . import mla  # noqa: F401
from . import fallback  # noqa: F401
