"""nn/gguf_header.py: a GGUF header whose counts or lengths do not fit in the file is refused at
once with a ValueError naming the key or tensor, before the gguf package's reader (which walks
an array item by item for as many items as its count says) sees it; good files, big-endian ones
and long vocabularies pass. And metadata values of the wrong type or range (nn/gguf_config.py)
are refused by name."""
import struct
import time

import gguf
import numpy as np
import pytest

from graphir.nn.gguf_header import check_gguf_header
from graphir.nn.gguf_loader import read_gguf


def header(keys: list[bytes], tensors: list[bytes] = (), order: str = "<") -> bytes:
    """Magic, version 3, counts, then the raw key and tensor-info entries given."""
    return (b"GGUF" + struct.pack(order + "IQQ", 3, len(tensors), len(keys)) + b"".join(keys)
            + b"".join(tensors))


def s(text: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "Q", len(text)) + text


def kv_u32(key: bytes, v: int) -> bytes:
    return s(key) + struct.pack("<II", 4, v)


def kv_array(key: bytes, itype: int, count: int, body: bytes) -> bytes:
    return s(key) + struct.pack("<IIQ", 9, itype, count) + body


def tensor_info(name: bytes, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", ggml_type, offset)


def write(tmp_path, data: bytes):
    p = tmp_path / "f.gguf"
    p.write_bytes(data)
    return p


def test_a_well_formed_header_passes(tmp_path):
    keys = [kv_u32(b"general.alignment", 32), s(b"general.name") + struct.pack("<I", 8)
            + s(b"tiny"), kv_array(b"tokens", 8, 2, s(b"a") + s(b"bc")),
            kv_array(b"types", 5, 3, struct.pack("<3i", 1, 2, 3)),
            kv_array(b"nested", 9, 1, struct.pack("<IQ", 0, 2) + b"xy")]
    check_gguf_header(write(tmp_path, header(keys, [tensor_info(b"w", [4, 2])]) + bytes(64)))


@pytest.mark.parametrize("keys,tensors,match", [
    # One flipped bit made a string an array whose item count is the string's bytes: the gguf
    # reader then loops for hours (found by `graphir.tools.fuzz --target gguf`).
    ([kv_array(b"general.architecture", 5, 7954895644034859008, b"qwen2")], [],
     r"key 0 \('general.architecture'\)'s 7954895644034859008 items at byte 68 needs"),
    ([kv_array(b"tokens", 8, 1 << 40, s(b"a"))], [],
     r"the header declares 1099511627776 items in key 0 \('tokens'\)"),
    ([kv_array(b"tokens", 8, 2, s(b"a") + struct.pack("<Q", 1 << 50))], [],
     r"key 0 \('tokens'\)'s string 1 at byte \d+ does not fit"),
    ([s(b"k") + struct.pack("<I", 13)], [], r"key 0 \('k'\): unknown value type 13"),
    ([kv_array(b"k", 99, 1, b"")], [], r"key 0 \('k'\): unknown array item type 99"),
    ([kv_array(b"k", 9, 1, struct.pack("<IQ", 9, 1) * 6)], [], "arrays nested deeper than 4"),
    ([struct.pack("<Q", 1 << 62)], [], r"key 0's name's length|key 0's name \("),
    ([kv_u32(b"a", 1)], [tensor_info(b"w", [4] * 1000)], r"tensor 0 \('w'\) has 1000 dimensions"),
])
def test_counts_that_do_not_fit_are_refused_at_once(tmp_path, keys, tensors, match):
    p = write(tmp_path, header(keys, tensors) + bytes(64))
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        check_gguf_header(p)
    # read_gguf says what the file is and why, as for any unreadable file.
    with pytest.raises(ValueError, match="cannot read the GGUF file .truncated or corrupt"):
        read_gguf(p)
    assert time.perf_counter() - t < 1.0


def test_declared_counts_beyond_the_file(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40) + bytes(100)
    with pytest.raises(ValueError, match=r"declares 1099511627776 keys at byte 24"):
        check_gguf_header(write(tmp_path, data))
    data = b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0) + bytes(100)
    with pytest.raises(ValueError, match=r"declares 1099511627776 tensors"):
        check_gguf_header(write(tmp_path, data))
    with pytest.raises(ValueError, match="too short for a GGUF header"):
        check_gguf_header(write(tmp_path, b"GGUF\x03\x00"))
    with pytest.raises(ValueError, match=r"not a GGUF file: it starts with b'PK\\x03\\x04'"):
        check_gguf_header(write(tmp_path, b"PK\x03\x04" + bytes(40)))


def real_file(path, endianess=gguf.GGUFEndian.LITTLE, n_tokens: int = 3) -> None:
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    w.add_head_count(2)
    w.add_token_list([f"t{i}".encode() for i in range(n_tokens)])
    w.add_token_types([1] * n_tokens)
    w.add_tensor("w", np.arange(8, dtype=np.float32).reshape(2, 4))   # swapped by the writer
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_files_the_gguf_writer_makes_pass_and_every_truncation_is_refused(tmp_path, endianess):
    p = tmp_path / "real.gguf"
    real_file(p, endianess)
    check_gguf_header(p)
    data = p.read_bytes()
    end = int(gguf.GGUFReader(str(p)).data_offset)
    cut = tmp_path / "cut.gguf"
    for n in range(0, end - 7, 7):      # every cut inside the header
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError):
            check_gguf_header(cut)


def test_a_long_vocabulary_is_walked_quickly(tmp_path):
    p = tmp_path / "vocab.gguf"
    real_file(p, n_tokens=100_000)
    t = time.perf_counter()
    check_gguf_header(p)
    assert time.perf_counter() - t < 2.0     # ~40 ms on the dev machine; the reader's is ~seconds


# -- metadata values: refused by name, as the gguf fuzz target's metadata edits found --------
@pytest.mark.parametrize("key,value,vtype,match", [
    ("qwen2.rope.freq_base", float("nan"), "FLOAT32", r"qwen2.rope.freq_base must be a finite"),
    ("qwen2.rope.freq_base", -1.0, "FLOAT32", r"qwen2.rope.freq_base must be positive"),
    ("qwen2.attention.layer_norm_rms_epsilon", -1.0, "FLOAT32", "must be at least 0.0"),
    ("qwen2.attention.sliding_window", float("inf"), "FLOAT32",
     r"sliding_window must be a positive int, got inf"),
    ("qwen2.attention.sliding_window", [0.5], "ARRAY", r"sliding_window must be a positive int"),
    ("general.architecture", [1, 2], "ARRAY", r"GGUF architecture \[1, 2\] is not supported"),
    ("qwen2.rope.scaling.yarn_beta_fast", "x", "STRING", r"yarn_beta_fast must be a finite"),
    ("qwen2.rope.scaling.factor", 0.0, "FLOAT32", r"rope.scaling.factor must be positive"),
    ("qwen2.attention.value_length", 0, "UINT32", r"value_length must be a positive int"),
])
def test_metadata_values_of_the_wrong_type_or_range_are_named(tmp_path, key, value, vtype, match):
    from graphir.nn import GGUFQAttentionWithRope
    from graphir.tools.fuzz_gguf import metadata, write_tiny

    meta = metadata()
    meta[key] = (value, gguf.GGUFValueType[vtype])
    write_tiny(tmp_path / "m.gguf", meta=meta)
    with pytest.raises(ValueError, match=match):
        GGUFQAttentionWithRope.from_gguf(tmp_path / "m.gguf", 0)
    write_tiny(tmp_path / "good.gguf")          # the same file unedited builds the layer
    assert GGUFQAttentionWithRope.from_gguf(tmp_path / "good.gguf", 0).gguf_config.rope_theta == 1e4
