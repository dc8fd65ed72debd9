"""graphir: the IR of the graph compiler (types, values, graphs, textual IR, passes)."""
from .device import DeviceRef
from .dim import Dim
from .dtype import DType
from .types import BufferType, ChainType, TensorType
from .value import BufferValue, ChainValue, TensorValue, Value
from .graph import Graph, Node
from .weight import Weight
from .parser import ParseError, parse
from .verifier import VerificationError
from . import core_ops  # noqa: F401  (registers chain/weight/constant)

__version__ = "0.1.0"

__all__ = ["DeviceRef", "Dim", "DType", "BufferType", "ChainType", "TensorType", "BufferValue",
           "ChainValue", "TensorValue", "Value", "Graph", "Node", "Weight", "ParseError", "parse",
           "VerificationError", "__version__"]
