"""Read a .gguf file: its metadata (key/value pairs) and its tensors as raw GGUF blocks.

GGUF records a tensor's dims innermost-first (ne[0] is the contiguous one), the reverse of numpy /
PyTorch order; the logical shapes returned here are in numpy order, e.g. `[out, in]` for a linear
weight. The `gguf` package is imported only when a file is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple

import numpy as np

from graphir.ops.quant.gguf_blocks import GGUF_BLOCK_GEOMETRY, gguf_row_nbytes
from .gguf_header import check_gguf_header

__all__ = ["GGUFTensor", "GGUFFile", "GGUFMetadata", "load_gguf", "read_gguf"]


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file.

    `data` is float32 / float16 in the logical shape for F32 / F16 tensors; for every other
    encoding it is uint8 `[prod(shape[:-1]), row_nbytes]`, the blocks as stored, ready for
    `ops.quant.gguf_blocks.dequantize_gguf(data, encoding, shape[-1])`.
    """

    data: np.ndarray
    encoding: str
    shape: tuple[int, ...]


class GGUFMetadata(Mapping):
    """A GGUF file's key/value metadata, decoded on access (tokenizer arrays stay undecoded
    unless read): strings as str, numbers as int / float / bool, arrays as lists.

    Example:
        >>> read_gguf("model.gguf").metadata["general.architecture"]  # doctest: +SKIP
        'qwen2'
    """

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = {k: f for k, f in fields.items() if not k.startswith("GGUF.")}
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            value = self._fields[key].contents()
            if isinstance(value, np.generic):
                value = value.item()
            self._cache[key] = value
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class GGUFFile(NamedTuple):
    """A parsed .gguf file: `metadata` (GGUFMetadata), `tensors` ({name: GGUFTensor}) and
    `unsupported` ({name: encoding} of tensors in types graphir does not decode, e.g. IQ4_XS;
    an error only for whoever needs them)."""

    metadata: GGUFMetadata
    tensors: dict[str, GGUFTensor]
    unsupported: dict[str, str]

    def tensor(self, name: str, what: str = "") -> GGUFTensor:
        """The tensor `name`, or a ValueError saying it is missing or in an unsupported type."""
        if name in self.unsupported:
            raise ValueError(f"tensor {name!r}: GGUF encoding {self.unsupported[name]} is not "
                             f"supported; supported: {sorted(GGUF_BLOCK_GEOMETRY)}")
        if name not in self.tensors:
            raise ValueError(f"no tensor {name!r}" + (f" (for {what})" if what else ""))
        return self.tensors[name]


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read a .gguf file's metadata and tensors (memory-mapped, read-only views).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be parsed (truncated or corrupt), a tensor uses an encoding
            graphir does not decode, or its stored byte count does not match its shape.

    Example:
        >>> f = read_gguf("model.gguf")  # doctest: +SKIP
        >>> f.metadata["llama.attention.head_count"], f.tensors["blk.0.attn_v.weight"].encoding
        (32, 'Q6_K')
    """
    from gguf import GGUFReader  # heavy optional dependency, only needed to parse files

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {os.fspath(path)!r}")
    try:
        check_gguf_header(path)     # bounds every count first: the reader trusts them
        reader = GGUFReader(path, "r")
        tensors, unsupported = _tensors(reader)
    except (ValueError, IndexError, KeyError, EOFError) as e:
        # The gguf reader reports a short file as a failed reshape or read; say what it means.
        raise ValueError(f"{os.fspath(path)}: cannot read the GGUF file (truncated or "
                         f"corrupt?): {e}") from e
    return GGUFFile(GGUFMetadata(reader.fields), tensors, unsupported)


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
    f = read_gguf(path)
    for name in f.unsupported:
        f.tensor(name)  # raises, naming the tensor and its encoding
    return f.tensors


def _tensors(reader) -> tuple[dict[str, GGUFTensor], dict[str, str]]:
    out: dict[str, GGUFTensor] = {}
    unsupported: dict[str, str] = {}
    for t in reader.tensors:
        encoding = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if encoding not in GGUF_BLOCK_GEOMETRY:
            unsupported[t.name] = encoding
            continue
        out[t.name] = GGUFTensor(_tensor_data(t.name, t.data, encoding, shape), encoding, shape)
    return out, unsupported


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
