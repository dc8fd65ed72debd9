"""Read tensors out of a Hugging Face checkpoint directory: model.safetensors, or the shards
that model.safetensors.index.json names. Only the tensors asked for are read (each at its byte
offset), so one layer of a large sharded model loads without touching the rest; bfloat16 is
widened to float32 bit-exactly (numpy has no bfloat16).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from graphir.dtype import DType

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# safetensors dtype -> (numpy dtype of the stored bytes, graphir dtype)
_DTYPES = {"F32": ("<f4", DType.float32), "F16": ("<f2", DType.float16),
           "BF16": ("<u2", DType.bfloat16), "F64": ("<f8", DType.float32)}
_MAX_HEADER = 100 * 2 ** 20
# Bytes an element of every safetensors dtype takes (those not read still get their spans checked).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _header(path: Path) -> tuple[dict, int]:
    """(tensor table, byte offset of the data) of one .safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            table = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    table.pop("__metadata__", None)
    _check_table(path, table, size - 8 - n)
    return table, 8 + n


def _check_table(path: Path, table: dict, data_bytes: int) -> None:
    """Every entry as the safetensors format defines it: a dtype, a shape of non-negative ints,
    data offsets inside the data whose span fits the shape, and the spans tiling the data with no
    gap or overlap (what the safetensors library refuses otherwise: an offset pointing into the
    header or into another tensor would read the wrong bytes in silence)."""
    spans = []
    for name, info in table.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: its header entry must be an object, got {info!r:.80}")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in _ITEMSIZE:
            raise ValueError(f"{where}: unknown dtype {dt!r:.40}")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise ValueError(f"{where}: shape must list non-negative ints, got {shape!r:.80}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_whole(o) for o in offs)
                and offs[0] <= offs[1] <= data_bytes):
            raise ValueError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end "
                             f"<= {data_bytes} (the data's size), got {offs!r:.80}")
        need = int(np.prod(shape, dtype=object)) * _ITEMSIZE[dt]
        if offs[1] - offs[0] != need:
            raise ValueError(f"{where}: {offs[1] - offs[0]} bytes for shape {shape} of {dt} "
                             f"({need} needed)")
        spans.append((offs[0], offs[1], name))
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            what = "overlaps the tensor before it" if start < pos else \
                f"leaves data bytes {pos}..{start} to no tensor"
            raise ValueError(f"{path}: tensor {name!r} at data bytes {start}..{end} {what}")
        pos = end
    if pos != data_bytes:
        raise ValueError(f"{path}: the tensors cover {pos} bytes of data, the file holds "
                         f"{data_bytes}")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Checkpoint:
    """The safetensors tensors of a Hugging Face model directory, by name.

    Example:
        >>> ckpt = Checkpoint("path/to/model")  # doctest: +SKIP
        >>> ckpt.load(["model.layers.0.self_attn.q_proj.weight"])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        single, index = self.path / SINGLE, self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is {type(weight_map).__name__}")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' "
                                 f"object): {e}") from None
            for k, v in weight_map.items():
                # A shard is a file of this directory: no paths (nothing outside it is read).
                if not isinstance(v, str) or v != os.path.basename(v) or v in ("", ".", ".."):
                    raise ValueError(f"{index}: tensor {k!r} maps to {v!r:.80}, not the file "
                                     f"name of a shard in the model directory")
            self._file_of = {k: self.path / v for k, v in weight_map.items()}
        elif single.is_file():
            self._file_of = None
        else:
            others = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f"; found {others[:3]} (PyTorch pickles are not read)" if others else ""
            raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {os.fspath(self.path)!r}{hint}")
        self._headers: dict[Path, tuple[dict, int]] = {}
        if self._file_of is None:
            self._file_of = {k: single for k in self._table(single)}

    def _table(self, f: Path) -> dict:
        if f not in self._headers:
            if not f.is_file():
                raise FileNotFoundError(f"{INDEX} in {os.fspath(self.path)!r} names the shard "
                                        f"{f.name!r}, which is missing")
            self._headers[f] = _header(f)
        return self._headers[f][0]

    def names(self) -> set[str]:
        return set(self._file_of)

    def dtype(self, name: str) -> DType:
        """The graphir dtype a stored tensor maps to (F64 reads as float32)."""
        code = self._info(name).get("dtype")
        if code not in _DTYPES:
            self._unsupported(name)
        return _DTYPES[code][1]

    def _info(self, name: str) -> dict:
        f = self._file_of[name]
        info = self._table(f).get(name)
        if info is None:
            raise ValueError(f"{f}: tensor {name!r} is listed in {INDEX} but not in the shard")
        return info

    def _unsupported(self, name: str):
        raise ValueError(f"tensor {name!r} is stored as {self._info(name)['dtype']}; only "
                         f"{sorted(_DTYPES)} are read (quantized checkpoints are not supported)")

    def load(self, names) -> dict[str, np.ndarray]:
        """The named tensors as float32 / float16 arrays (bf16 widened exactly to float32)."""
        out = {}
        for name in names:
            if name not in self._file_of:
                raise KeyError(f"no tensor {name!r} in the checkpoint at {os.fspath(self.path)!r}")
            info, f = self._info(name), self._file_of[name]
            if info.get("dtype") not in _DTYPES:
                self._unsupported(name)
            stored = np.dtype(_DTYPES[info["dtype"]][0])
            # _check_table has checked the shape, the offsets and their byte count.
            shape, start = info["shape"], info["data_offsets"][0]
            count = int(np.prod(shape, dtype=np.int64))
            a = np.fromfile(f, dtype=stored, count=count, offset=self._headers[f][1] + start)
            if a.size != count:
                raise ValueError(f"{f}: truncated file, tensor {name!r} needs {count} values")
            if info["dtype"] == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a.astype(a.dtype.newbyteorder("="), copy=False).reshape(shape)
        return out
