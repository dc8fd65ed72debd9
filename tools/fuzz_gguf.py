"""Fuzz target: damaged .gguf files through the GGUF attention layer's loaders.

A tiny Qwen2-style file (q/k/v biases, q Q4_0, k Q8_0, v Q5_0, o F16: one projection per block
encoding) is written once; each case flips bits, sets bytes to edge values, truncates or inserts
bytes, mostly in the header (keys, value types, counts, tensor infos), sometimes in the blocks'
scales. Then `GGUFQAttentionWithRope.from_gguf` builds a layer from it and `load_from_gguf`
loads it into a layer that holds the undamaged file's weights. Fine: a ValueError (the loaders'
clean refusal) with the preloaded layer exactly as it was (the same projections, encodings and
arrays), or a load that completes. A finding: any other exception, a refusal that changed the
layer, or (caught by the harness) a case that hangs or takes over a second: one flipped bit in
an array's item count kept the gguf package's reader busy for hours until the header walk
(nn/gguf_header.py) bounded every count by the file's size.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, NH, NKV, D = 64, 2, 1, 32
MIX = {"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q5_0", "attn_output": "F16"}
_EDGE = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x09, 0x08, 0x7C)   # 9 / 8: GGUF's array / string types
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_tiny(path: Path, seed: int = 0) -> int:
    """Write the file; returns where its tensor data starts (the header's end)."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([b"<s>", b"a", b"bc"])      # an array of strings, as real files carry
    rows = {"attn_q": NH * D, "attn_k": NKV * D, "attn_v": NKV * D, "attn_output": HIDDEN}
    for name, enc in MIX.items():
        n_in = NH * D if name == "attn_output" else HIDDEN
        f = (rng.standard_normal((rows[name], n_in)) * 0.1).astype(np.float32)
        if enc == "F16":
            w.add_tensor(f"blk.0.{name}.weight", f.astype(np.float16))
        else:
            t = gguf.GGMLQuantizationType[enc]
            w.add_tensor(f"blk.0.{name}.weight", np.asarray(quantize(f, t)), raw_dtype=t)
        if name != "attn_output":
            w.add_tensor(f"blk.0.{name}.bias", rng.standard_normal(rows[name]).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return int(gguf.GGUFReader(str(path)).data_offset)


def damage(data: bytes, header_end: int, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    k = rng.random()
    if k < 0.45:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        return bytes(b), "header bits"
    if k < 0.7:
        b[rng.randrange(header_end)] = rng.choice(_EDGE)
        return bytes(b), "header byte"
    if k < 0.8:
        return bytes(b[:rng.randrange(len(b))]), "truncated"
    if k < 0.9:
        i = rng.randrange(header_end)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
        return bytes(b), "inserted"
    i = rng.randrange(header_end, len(b))
    b[i] = rng.choice((0x7C, 0xFC, 0xFF, b[i] ^ (1 << rng.randrange(8))))   # 0x7C..: f16 inf/nan
    return bytes(b), "data byte"


class GGUFTarget:
    def __init__(self):
        from graphir.nn import GGUFQAttentionWithRope

        self.dir = Path(tempfile.mkdtemp(prefix="graphir-fuzz-gguf-"))
        good = self.dir / "good.gguf"
        self.header_end = write_tiny(good)
        self.good = good.read_bytes()
        self.layer = GGUFQAttentionWithRope.from_gguf(good, 0)
        self.cls = GGUFQAttentionWithRope

    def snapshot(self) -> list:
        """What a refused load must leave as it was, each entry compared by identity: the
        projections, their encodings (enum members), every weight and its array."""
        from graphir.nn.module import weight_data

        return [(p, getattr(self.layer, p), getattr(self.layer, p).encoding) for p in PROJS] + \
               [(n, w, weight_data(w)) for n, w in self.layer.raw_state_dict().items()]

    def __call__(self, rng: random.Random) -> str | None:
        data, what = damage(self.good, self.header_end, rng)
        path = self.dir / "case.gguf"
        path.write_bytes(data)
        try:
            self.cls.from_gguf(path, 0)
        except ValueError:
            pass
        except Exception as e:  # noqa: BLE001
            return f"gguf ({what}): from_gguf raised {type(e).__name__}: {str(e)[:160]}"
        before = self.snapshot()
        try:
            self.layer.load_from_gguf(path, 0)
        except ValueError:
            after = self.snapshot()
            if len(after) != len(before) or any(
                    a[0] != b[0] or a[1] is not b[1] or a[2] is not b[2]
                    for a, b in zip(after, before)):
                return f"gguf ({what}): load_from_gguf refused the file but changed the layer"
            return None
        except Exception as e:  # noqa: BLE001
            return f"gguf ({what}): load_from_gguf raised {type(e).__name__}: {str(e)[:160]}"
        # Accepted: put the undamaged weights back for the next case.
        self.layer.load_from_gguf(self.dir / "good.gguf", 0)
        return None
