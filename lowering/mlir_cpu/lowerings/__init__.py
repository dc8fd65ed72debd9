"""CPU lowerings, one module per op family; importing this registers them all."""
from . import elementwise  # noqa: F401
from . import float8  # noqa: F401  (after elementwise: it legalizes the f8 casts)
from . import shape  # noqa: F401
from . import reduce  # noqa: F401
from . import quant  # noqa: F401
from . import mla  # noqa: F401
from . import linalg  # noqa: F401
from . import flash_attention  # noqa: F401
from . import rope_store  # noqa: F401
