"""Fuzz target: damaged .gguf files through the GGUF attention layer's loaders.

A tiny Qwen2-style file (q/k/v biases, q Q4_0, k Q8_0, v Q5_0, o F16: one projection per block
encoding; YaRN RoPE, a sliding window) is written once; most cases flip bits, set bytes to edge
values, truncate or insert bytes, mostly in the header (keys, value types, counts, tensor
infos), sometimes in the blocks' scales; the rest write a well-formed file with one metadata
value replaced by another of any type (0, 2**31, NaN, -1.0, a string, an array) or deleted.
Then `GGUFQAttentionWithRope.from_gguf` builds a layer from it and `load_from_gguf`
loads it into a layer that holds the undamaged file's weights. Fine: a ValueError (the loaders'
clean refusal) with the preloaded layer exactly as it was (the same projections, encodings and
arrays), or a load that completes with usable numbers (finite positive RoPE values and sizes:
a NaN rope.freq_base or a negative epsilon used to be taken as is). A finding: any other exception, a refusal that changed the
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
# GGUFAttentionConfig fields an accepted file must give as finite positive numbers / counts.
_POSITIVE = ("rope_theta", "rope_scaling_factor", "yarn_beta_fast", "yarn_beta_slow")
_COUNTS = ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "num_layers",
           "context_length")


def metadata(arch: str = "qwen2") -> dict:
    """key -> (value, GGUF value type): the tiny file's metadata, llama.cpp's keys."""
    V = __import__("gguf").GGUFValueType
    return {"general.architecture": (arch, V.STRING),
            f"{arch}.block_count": (1, V.UINT32), f"{arch}.context_length": (128, V.UINT32),
            f"{arch}.embedding_length": (HIDDEN, V.UINT32),
            f"{arch}.attention.head_count": (NH, V.UINT32),
            f"{arch}.attention.head_count_kv": (NKV, V.UINT32),
            f"{arch}.rope.freq_base": (10000.0, V.FLOAT32),
            f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32),
            f"{arch}.attention.sliding_window": (64, V.UINT32),
            f"{arch}.rope.scaling.type": ("yarn", V.STRING),
            f"{arch}.rope.scaling.factor": (4.0, V.FLOAT32),
            f"{arch}.rope.scaling.original_context_length": (32, V.UINT32),
            f"{arch}.rope.scaling.yarn_beta_fast": (32.0, V.FLOAT32),
            "tokenizer.ggml.tokens": ([b"<s>", b"a", b"bc"], V.ARRAY)}   # strings, as files carry


def write_tiny(path: Path, seed: int = 0, meta: dict | None = None) -> int:
    """Write the file (`meta`: metadata() with edits); returns where its tensor data starts."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), None)
    for key, (value, vtype) in (metadata() if meta is None else meta).items():
        w.add_key_value(key, value, vtype)
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


# Typed values a metadata edit puts in place of one key's (GGUF value types by name).
_VALUES = [(0, "UINT32"), (1 << 31, "UINT32"), (3, "UINT32"), (-1, "INT32"), (0.0, "FLOAT32"),
           (-1.0, "FLOAT32"), (float("nan"), "FLOAT32"), (float("inf"), "FLOAT32"),
           (2.5, "FLOAT64"), ("x", "STRING"), ("", "STRING"), ("llama", "STRING"),
           (True, "BOOL"), ([1, 2], "ARRAY"), ([0.5], "ARRAY"), ([b"a"], "ARRAY"),
           (7, "UINT8"), (1 << 40, "UINT64")]


def edit_metadata(rng: random.Random) -> tuple[dict, str]:
    import gguf

    meta = metadata(rng.choice(["qwen2", "qwen2", "llama"]))
    key = rng.choice(list(meta))
    if rng.random() < 0.15:
        del meta[key]
        return meta, f"metadata: {key} deleted"
    value, vtype = rng.choice(_VALUES)
    meta[key] = (value, gguf.GGUFValueType[vtype])
    return meta, f"metadata: {key} = {value!r} ({vtype})"


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
        path = self.dir / "case.gguf"
        if rng.random() < 0.3:    # a well-formed file whose metadata says something odd
            meta, what = edit_metadata(rng)
            write_tiny(path, meta=meta)
        else:
            data, what = damage(self.good, self.header_end, rng)
            path.write_bytes(data)
        try:
            cfg = self.cls.from_gguf(path, 0).gguf_config
        except ValueError:
            cfg = None
        except Exception as e:  # noqa: BLE001
            return f"gguf ({what}): from_gguf raised {type(e).__name__}: {str(e)[:160]}"
        if cfg is not None:
            # What a layer was built from must be usable numbers (NaN theta made NaN outputs).
            win = cfg.sliding_window
            odd = [k for k in _POSITIVE if not getattr(cfg, k) > 0] + \
                  [k for k in _COUNTS if not (isinstance(getattr(cfg, k), int)
                                              and getattr(cfg, k) >= 1)] + \
                  (["rms_norm_eps"] if not cfg.rms_norm_eps >= 0 else []) + \
                  (["sliding_window"] if win is not None and not (isinstance(win, int) and win > 0)
                   else [])
            if odd:
                return f"gguf ({what}): from_gguf accepted " + ", ".join(
                    f"{k} = {getattr(cfg, k)!r}" for k in odd)
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
