"""Read the tensors of a .gguf file as raw GGUF blocks plus their logical shapes.

GGUF records a tensor's dims innermost-first (ne[0] is the contiguous one), the reverse of numpy /
PyTorch order; the logical shapes returned here are in numpy order, e.g. `[out, in]` for a linear
weight. The `gguf` package is imported only when a file is read.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from graphir.ops.quant.gguf_blocks import GGUF_BLOCK_GEOMETRY, gguf_row_nbytes

__all__ = ["GGUFTensor", "load_gguf"]


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file.

    `data` is float32 / float16 in the logical shape for F32 / F16 tensors; for every other
    encoding it is uint8 `[prod(shape[:-1]), row_nbytes]`, the blocks as stored, ready for
    `ops.quant.gguf_blocks.dequantize_gguf(data, encoding, shape[-1])`.
    """

    data: np.ndarray
    encoding: str
    shape: tuple[int, ...]


def load_gguf(path: str | os.PathLike[str]) -> dict[str, GGUFTensor]:
    """Read every tensor of a .gguf file (memory-mapped, read-only views).

    Args:
        path: the .gguf file.

    Returns:
        `{name: GGUFTensor(data, encoding, shape)}` in file order; `shape` is the logical shape
        in numpy order (GGUF's dims reversed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a tensor uses an encoding graphir does not decode, or its stored byte count
            does not match its shape.

    Example:
        >>> tensors = load_gguf("model.gguf")  # doctest: +SKIP
        >>> tensors["blk.0.attn_q.weight"].encoding  # doctest: +SKIP
        'Q4_K'
    """
    from gguf import GGUFReader  # heavy optional dependency, only needed to parse files

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {os.fspath(path)!r}")
    reader = GGUFReader(path, "r")
    out: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        encoding = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if encoding not in GGUF_BLOCK_GEOMETRY:
            raise ValueError(
                f"tensor {t.name!r}: GGUF encoding {encoding} is not supported; "
                f"supported: {sorted(GGUF_BLOCK_GEOMETRY)}"
            )
        out[t.name] = GGUFTensor(_tensor_data(t.name, t.data, encoding, shape), encoding, shape)
    return out


def _tensor_data(name: str, data: np.ndarray, encoding: str, shape: tuple[int, ...]) -> np.ndarray:
    if encoding in ("F32", "F16"):
        if data.shape != shape:
            raise ValueError(
                f"tensor {name!r}: {encoding} data has shape {data.shape}, expected {shape}"
            )
        return data
    rows, cols = math.prod(shape[:-1]), shape[-1]
    try:
        row_nbytes = gguf_row_nbytes(encoding, cols)
    except ValueError as e:
        raise ValueError(f"tensor {name!r} with shape {shape}: {e}") from None
    raw = np.asarray(data).view(np.uint8)
    if raw.size != rows * row_nbytes:
        raise ValueError(
            f"tensor {name!r}: {encoding} shape {shape} needs {rows * row_nbytes} bytes, "
            f"the file holds {raw.size}"
        )
    return raw.reshape(rows, row_nbytes)
